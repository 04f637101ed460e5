"""The evaluation protocols behind eval.py (docs/method.md §7): kNN, linear probe, fine-tuning, weights I/O."""
