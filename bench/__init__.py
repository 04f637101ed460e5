"""Benchmarks behind `python bench.py`: one module per benchmark, one shared harness."""
