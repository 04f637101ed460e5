"""One interface over the four loader backends.

`build_loader(config.data, ...)` returns an iterable with `len()` and `set_epoch(epoch)` that
yields `Batch(views, labels, indices)` on the training device:

- training: `views = [v1, v2, *local_crops]`, each a normalised `(B, 3, S, S)` tensor made with
  the recipe's augmentations (§6); the last partial global batch is dropped and every rank
  gets the same number of batches;
- evaluation: `views = [image]`, resized to `S·256/224` (bicubic) and centre-cropped, every
  sample exactly once over all ranks (the last batch may be partial).

Order is deterministic given `(seed, epoch)` and ranks are disjoint (see `loaders.sampling`).
"""
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import torch

from configs.schema import DataConfig
from loaders.device import prefetched

BACKEND_MODULES = {
    "ffcv": "loaders.ffcv_backend",
    "dali": "loaders.dali_backend",
    "memory": "loaders.memory_backend",
    "torchvision": "loaders.torchvision_backend",
}


@dataclass
class Batch:
    """What every backend yields: views on the device, labels and dataset indices (int64).

    `params` has, per training view, the per-sample decisions that made it (`area`: the crop's
    fraction of the image; bools `jitter`, `grayscale`, `blur`, `solarize`, `flip`), so that tests
    can check every backend against the recipe's rates.
    """

    views: list[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor
    params: list[dict[str, torch.Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class LoaderSettings:
    """Everything a backend needs, resolved from the config tree and the process's place."""

    data: DataConfig
    split: str
    train: bool
    batch_size: int  # per rank
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def root(self) -> Path:
        return Path(self.data.root)


class Loader(Protocol):
    """The interface train.py and eval.py use."""

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields batches `start_batch, …, len(self) - 1` of `epoch`, the same as
        a full iteration of `epoch` yields there, without making the batches before them."""

    def __iter__(self) -> Iterator[Batch]: ...


def worker_threads(workers: int) -> int:
    """`data.workers`, or for 0 ("auto") this node's cores divided among its ranks (torchrun's
    `LOCAL_WORLD_SIZE`), at least one."""
    if workers > 0:
        return workers
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto`: DALI when a GPU and DALI are present, else FFCV when installed, else torchvision."""
    if name != "auto":
        return name
    if device.type == "cuda" and _available("nvidia.dali"):
        return "dali"
    return "ffcv" if _available("ffcv") else "torchvision"


def build_loader(data: DataConfig, *, split: str, train: bool, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Loader:
    """The loader of `data.backend` for one split of the converted dataset at `data.root`."""
    device = torch.device(device)
    backend = resolve_backend(data.backend, device)
    settings = LoaderSettings(data=data, split=split, train=train, batch_size=batch_size, seed=seed, rank=rank,
                              world_size=world_size, device=device, dtype=dtype)
    loader = importlib.import_module(BACKEND_MODULES[backend]).make_loader(settings)
    return prefetched(loader, device) if backend in ("memory", "ffcv") else loader
