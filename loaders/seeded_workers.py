"""Samples made by PIL transforms in `DataLoader` worker processes, each under its own seed.

Used by the torchvision backend (pre-training views) and by the linear and fine-tuning
protocols (`evaluation.data.ImageLoader`). The caller chooses, per iteration, the `(index, seed)`
pairs to visit; each sample is decoded and made under `seeded(seed)` (Python's, NumPy's and
torch's RNGs), so a batch does not depend on which worker made it, and any epoch can be
recomputed alone. The workers persist across iterations, and their seeds come from a private
generator, so iterating never moves the global torch RNG.
"""
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from loaders.seeding import seeded
from loaders.shards import ShardSamples

Make = Callable[[Image.Image, int, int], Any]  # (image, label, index) -> the sample as the batch holds it


class _Seeded(Dataset):
    """Item `(index, seed)`: `make(image, label, index)` of sample `index`, run under `seeded(seed)`."""

    def __init__(self, samples: ShardSamples, make: Make) -> None:
        self.samples, self.make = samples, make

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        image, label = self.samples.decode(index)
        with seeded(seed):
            return self.make(image, label, index)


class _Pairs(Sampler):
    """The `(index, seed)` pairs of the next iteration, as a list the owner sets.

    It holds no reference back to its owner on purpose: such a cycle leaves the DataLoader's
    iterator to the cycle collector, which closes its index queues before the iterator asks its
    workers to stop, so each worker waits out DataLoader's 5-second join and is killed."""

    def __init__(self) -> None:
        self.pairs: Sequence[tuple[int, int]] = ()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


class SeededWorkers:
    """Batches of `make(image, label, index)` made in `workers` persistent processes (0: in this one)."""

    def __init__(self, samples: ShardSamples, make: Make, *, batch_size: int, workers: int, device: torch.device,
                 drop_last: bool = False) -> None:
        self.sampler = _Pairs()
        self.loader = DataLoader(_Seeded(samples, make), batch_size=batch_size, sampler=self.sampler,
                                 drop_last=drop_last, num_workers=workers, persistent_workers=workers > 0,
                                 pin_memory=device.type == "cuda", generator=torch.Generator())

    def batches(self, pairs: Sequence[tuple[int, int]]) -> Iterator[Any]:
        """The collated batches of the samples `pairs` lists, in that order."""
        self.sampler.pairs = pairs
        return iter(self.loader)
