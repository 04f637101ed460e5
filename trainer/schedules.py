"""Schedules precomputed per iteration and indexed by the global step (as DINO's `cosine_scheduler`)."""
import numpy as np


def cosine_schedule(start: float, end: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """`epochs × steps_per_epoch` values: linear from `warmup_start` to `start` over the warm-up
    epochs, then a half cosine from `start` to `end`."""
    warmup_steps = warmup_epochs * steps_per_epoch
    warmup = np.linspace(warmup_start, start, warmup_steps, endpoint=False)
    steps = np.arange(epochs * steps_per_epoch - warmup_steps)
    cosine = end + 0.5 * (start - end) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


def linear_warmup(value: float, start: float, epochs: int, steps_per_epoch: int, warmup_epochs: int) -> np.ndarray:
    """`start` → `value` linearly over the warm-up epochs, then constant (the temperature)."""
    warmup_steps = warmup_epochs * steps_per_epoch
    return np.concatenate([np.linspace(start, value, warmup_steps, endpoint=False),
                           np.full(epochs * steps_per_epoch - warmup_steps, value)])
