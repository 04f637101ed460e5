"""Schedules precomputed per iteration and indexed by the global step (as DINO's `cosine_scheduler`)."""
from dataclasses import dataclass

import numpy as np

from configs.schema import OptimConfig


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


@dataclass(frozen=True)
class Schedules:
    """Every per-iteration schedule of a pre-training run (docs/method.md §5), indexed by step."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    temperature: np.ndarray

    @classmethod
    def build(cls, optim: OptimConfig, epochs: int, steps_per_epoch: int, global_batch: int) -> "Schedules":
        """lr: linear warm-up to `optim.lr × batch/256`, then cosine to `min_lr`; weight decay and
        momentum: cosine; temperature: optional linear warm-up."""
        peak = optim.lr * global_batch / 256  # the linear scaling rule
        return cls(
            lr=cosine_schedule(peak, optim.min_lr, epochs, steps_per_epoch, optim.warmup_epochs),
            weight_decay=cosine_schedule(optim.weight_decay, optim.weight_decay_end, epochs, steps_per_epoch),
            momentum=cosine_schedule(optim.momentum, 1.0, epochs, steps_per_epoch),
            temperature=linear_warmup(optim.temperature, optim.warmup_temperature, epochs, steps_per_epoch,
                                      optim.temperature_warmup_epochs),
        )

    def at(self, step: int) -> dict[str, float]:
        """The values applied at `step` (0-based), as plain floats."""
        return {"lr": float(self.lr[step]), "wd": float(self.weight_decay[step]),
                "momentum": float(self.momentum[step]), "temperature": float(self.temperature[step])}
