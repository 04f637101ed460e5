"""The published pipeline: PIL decoding and torchvision transforms in `DataLoader` workers (docs/method.md §6).

It is the benchmarks' baseline and the tests' semantic reference. Every random decision is
made the way torchvision's `RandomResizedCrop`, `RandomApply`, `RandomGrayscale` and
`RandomHorizontalFlip` make it, from torch's (and, for the blur sigma, Python's) RNG seeded
per sample by `(seed, epoch, index)` — so results do not depend on which worker ran what —
and is recorded so that `Batch.params` can report it.
"""
import random
from collections.abc import Iterator

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from loaders.augment import SOLARIZE_THRESHOLD, ViewSpec
from loaders.builder import Batch, EpochLoader, LoaderSettings, worker_threads
from loaders.eval_view import eval_view, to_tensor
from loaders.seeding import derive_seed, seed_global_rngs
from loaders.shards import ShardSamples, open_converted

def _chance(p: float) -> bool:
    """torchvision's `RandomApply` coin: `p < torch.rand(1)` means skip."""
    return p > 0 and bool(torch.rand(1) < p)


def published_view(image: Image.Image, spec: ViewSpec) -> tuple[torch.Tensor, dict[str, float]]:
    """One view the way the published code makes it, with its decisions recorded."""
    top, left, height, width = T.RandomResizedCrop.get_params(image, list(spec.scale), list(spec.ratio))
    area = height * width / (image.width * image.height)
    image = TF.resized_crop(image, top, left, height, width, [spec.size, spec.size], T.InterpolationMode.BICUBIC)
    decisions = {"area": area}
    if decisions.setdefault("jitter", _chance(spec.jitter_prob)):
        image = T.ColorJitter(*spec.jitter)(image)
    if decisions.setdefault("grayscale", _chance(spec.grayscale_prob)):
        image = TF.to_grayscale(image, num_output_channels=3)
    if decisions.setdefault("blur", _chance(spec.blur_prob)):
        image = image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*spec.blur_sigma)))
    if decisions.setdefault("solarize", _chance(spec.solarize_prob)):
        image = ImageOps.solarize(image, round(SOLARIZE_THRESHOLD * 255))
    if decisions.setdefault("flip", _chance(spec.flip_prob)):
        image = TF.hflip(image)
    return to_tensor(image), decisions


class _Views(Dataset):
    """Item `(index, seed)`: the sample's views, label, index and decisions."""

    def __init__(self, samples: ShardSamples, specs: list[ViewSpec], eval_size: int | None) -> None:
        self.samples, self.specs, self.eval_size = samples, specs, eval_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        image, label = self.samples.decode(index)
        if self.eval_size is not None:
            return [eval_view(image, self.eval_size)], label, index, []
        seed_global_rngs(seed)
        views, decisions = zip(*(published_view(image, spec) for spec in self.specs))
        return list(views), label, index, list(decisions)


class _EpochSampler(Sampler):
    """The loader's `(index, per-sample seed)` pairs for its next iteration."""

    def __init__(self, loader: EpochLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed, epoch = self.loader.settings.seed, self.loader.epoch
        return iter((i, derive_seed(seed, epoch, i)) for i in self.loader.order().tolist())

    def __len__(self) -> int:
        return len(self.loader.order())


class TorchvisionLoader(EpochLoader):
    """PIL + torchvision transforms in `worker_threads(data.workers)` persistent `DataLoader` processes;
    augmentations seeded per sample by `(seed, epoch, index)`."""

    def __init__(self, settings: LoaderSettings) -> None:
        data = settings.data
        samples = ShardSamples(open_converted(data.root), settings.split)
        super().__init__(settings, len(samples))
        self.loader = DataLoader(
            _Views(samples, settings.views(), None if settings.train else data.image_size),
            batch_size=settings.batch_size, sampler=_EpochSampler(self), drop_last=settings.train,
            num_workers=worker_threads(data.workers), persistent_workers=True,
            pin_memory=settings.device.type == "cuda",
        )

    def __iter__(self) -> Iterator[Batch]:
        s = self.settings
        for views, labels, indices, decisions in self.loader:
            yield Batch(views=[v.to(s.device, s.dtype, non_blocking=True) for v in views],
                        labels=labels.to(s.device, non_blocking=True),
                        indices=indices.to(s.device, non_blocking=True),
                        params=[{k: v.to(s.device, non_blocking=True) for k, v in d.items()} for d in decisions])


def make_loader(settings: LoaderSettings) -> TorchvisionLoader:
    return TorchvisionLoader(settings)
