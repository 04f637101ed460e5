"""The evaluation protocols behind eval.py (recipe §7): kNN, linear probe, fine-tuning, weights I/O."""
