"""What a dataset reader returns: the samples of each split, in a deterministic order."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One image: a file (`name` relative to the source root) or pixels already in memory (CIFAR, digits)."""

    name: str  # also how the sample is listed in the manifest when it is skipped
    label: int
    pixels: np.ndarray | None = None


@dataclass(frozen=True)
class Source:
    """What a dataset reader found: class names in label order and the samples of each split."""

    classes: list[str]
    splits: dict[str, list[Sample]]
    root: Path | None  # the folder Sample.name is relative to; None when all pixels are in memory
