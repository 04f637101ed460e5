"""Triton kernels with their exact torch references."""
