"""The pieces `train.py` is made of: schedules, distributed set-up, checkpoints, logging."""
