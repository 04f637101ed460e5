"""One interface over the four loader backends.

`build_loader(config.data, ...)` returns an iterable with `len()` and `set_epoch(epoch, start_batch=0)`
that yields `Batch(views, labels, indices)` on the training device (on CUDA, the memory and ffcv
backends behind `loaders.device.Prefetcher`, which makes the next batch on a side stream):

- training: `views = [v1, v2, *local_crops]`, each a normalised `(B, 3, S, S)` tensor made with
  the recipe's augmentations (§6); the last partial global batch is dropped and every rank
  gets the same number of batches;
- evaluation: `views = [image]`, resized to `S·256/224` (bicubic) and centre-cropped, every
  sample exactly once over all ranks (the last batch may be partial).

Order is deterministic given `(seed, epoch)` and ranks are disjoint (see `loaders.sampling`).
`data.backend: auto` is resolved per split by `resolve_backend`; `data.device_crops: null` (ffcv)
by `resolve_device_crops`.
"""
import importlib
import importlib.util
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import torch

from configs.schema import DataConfig
from loaders.augment import ViewSpec, recipe_views
from loaders.device import explicit_device, prefetched
from loaders.sampling import epoch_indices, num_batches
from loaders.seeding import derive_seed

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

    def views(self) -> list[ViewSpec]:
        """The training views of the recipe: two global, `data.local_crops` local (docs/method.md §6)."""
        d = self.data
        return recipe_views(d.image_size, d.global_scale, d.local_crops, d.local_size, d.local_scale)

    def num_batches(self, num_samples: int) -> int:
        """Batches per epoch on this rank for a split of `num_samples` (every backend's `len()`)."""
        return num_batches(num_samples, self.batch_size, train=self.train, rank=self.rank,
                           world_size=self.world_size)

    def order(self, num_samples: int, epoch: int, start_batch: int = 0) -> torch.Tensor:
        """This rank's dataset indices of `epoch` in visiting order, from batch `start_batch` on."""
        indices = epoch_indices(num_samples, self.batch_size, train=self.train, seed=self.seed, epoch=epoch,
                                rank=self.rank, world_size=self.world_size)
        return indices[start_batch * self.batch_size:]

    def batch_seed(self, epoch: int, number: int) -> int:
        """The seed of batch `number`'s augmentations in `epoch` on this rank."""
        return derive_seed(self.seed, epoch, self.rank, number)


class EpochLoader:
    """What every backend shares: its settings, the split's size, and the epoch and first batch that
    `set_epoch` chose for the next iteration (which each backend reads as it starts)."""

    def __init__(self, settings: LoaderSettings, num_samples: int) -> None:
        self.settings, self.num_samples = settings, num_samples
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        """The epoch's number of batches (a resumed epoch yields the last `len − start_batch`)."""
        return self.settings.num_batches(self.num_samples)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields batches `start_batch, …, len − 1` of `epoch`, equal to those of a
        whole epoch (order and augmentations follow `(seed, epoch)`), without making the ones before."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}] (the epoch's batches); got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def order(self) -> torch.Tensor:
        """The dataset indices the next iteration visits."""
        return self.settings.order(self.num_samples, self.epoch, self.start_batch)


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


MEMORY_BUDGET_BYTES = 4 * 2**30  # the most device memory per rank `auto` gives a split held as uint8
SIZE_PROBES = 16  # samples whose image sizes `auto` reads (headers only) to tell one-size splits


def split_footprint(root: str | Path, split: str) -> int | None:
    """Bytes of the split as one uint8 tensor when its images share one size (judged on
    `SIZE_PROBES` samples spread over it, headers only), else None."""
    from PIL import Image

    from loaders.shards import ShardSamples, open_converted

    samples = ShardSamples(open_converted(root), split)
    count = len(samples)
    probes = sorted({i * (count - 1) // max(1, SIZE_PROBES - 1) for i in range(SIZE_PROBES)}) if count else []
    sizes = {Image.open(io.BytesIO(samples.read(i)[0])).size for i in probes}
    if len(sizes) != 1:
        return None
    (width, height), = sizes
    return count * 3 * width * height


def resolve_backend(data: DataConfig, split: str, device: torch.device) -> str:
    """`data.backend`, or for `auto`: `memory` when the split is one image size and fits in
    `MEMORY_BUDGET_BYTES` (CIFAR, digits); else `dali` on a GPU when DALI is installed (JPEG data
    decoded on the GPU); else `ffcv` when installed; else `torchvision`."""
    if data.backend != "auto":
        return data.backend
    footprint = split_footprint(data.root, split)
    if footprint is not None and footprint <= MEMORY_BUDGET_BYTES:
        return "memory"
    if device.type == "cuda" and _available("nvidia.dali"):
        return "dali"
    return "ffcv" if _available("ffcv") else "torchvision"


DEVICE_CROPS_MAX_SIDE = 1024  # the largest images `data.device_crops: null` ships whole (3 MB each, padded)


def resolve_device_crops(data: DataConfig, device: torch.device, train: bool = True) -> bool:
    """`data.device_crops`, or for `null`: when the dataset's images are at most `DEVICE_CROPS_MAX_SIDE`
    px on a side (its `--max-resolution`; the converter's default is 512), for training on CUDA and
    for evaluation on any device. The ffcv backend then ships each image whole, padded to the file's
    largest, and cuts its views on the device with the recipe's filter (PIL's bicubic). Training on
    a CPU cuts on the host, where OpenCV is faster than dense resampling matrices; evaluation is one
    view per image, so it pays the matrices everywhere for the published evaluation view, the same
    on every device. Larger images would cost transfers and device memory: cut on the host."""
    if data.device_crops is not None:
        return data.device_crops
    from loaders.shards import open_converted

    small = open_converted(data.root).manifest["options"]["max_resolution"] <= DEVICE_CROPS_MAX_SIDE
    return small and (device.type == "cuda" or not train)


def build_loader(data: DataConfig, *, split: str, train: bool, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Loader:
    """The loader of `data.backend` for one split of the converted dataset at `data.root`."""
    device = explicit_device(torch.device(device))
    backend = resolve_backend(data, split, device)
    settings = LoaderSettings(data=data, split=split, train=train, batch_size=batch_size, seed=seed, rank=rank,
                              world_size=world_size, device=device, dtype=dtype)
    threads = torch.get_num_threads()
    loader = importlib.import_module(BACKEND_MODULES[backend]).make_loader(settings)
    torch.set_num_threads(threads)  # FFCV sets torch's thread count: to 1 when imported, to its workers' per Loader
    return prefetched(loader, device) if backend in ("memory", "ffcv") else loader
