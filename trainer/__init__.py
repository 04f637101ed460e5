"""The pieces `train.py` is made of: schedules, distributed set-up, checkpoints, logging."""


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do (train.py prints it as one line)."""
