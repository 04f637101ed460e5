"""Data loading: the converted datasets written by convert_datasets.py (see loaders/manifest.py)."""
