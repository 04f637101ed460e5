"""The published pipeline: PIL decoding and torchvision transforms in `DataLoader` workers (docs/method.md §6).

It is the benchmarks' baseline and the tests' semantic reference. Every random decision is
made the way torchvision's `RandomResizedCrop`, `RandomApply`, `RandomGrayscale` and
`RandomHorizontalFlip` make it, from torch's (and, for the blur sigma, Python's) RNG seeded
per sample by `(seed, epoch, index)` — so results do not depend on which worker ran what —
and is recorded so that `Batch.params` can report it.
"""
import random
from collections.abc import Iterator
from functools import partial

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from loaders.augment import SOLARIZE_THRESHOLD, ViewSpec
from loaders.builder import Batch, EpochLoader, LoaderSettings, worker_threads
from loaders.eval_view import eval_view, to_tensor
from loaders.seeded_workers import SeededWorkers
from loaders.seeding import derive_seed
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


def _training_sample(image: Image.Image, label: int, index: int, specs: list[ViewSpec]) -> tuple:
    views, decisions = zip(*(published_view(image, spec) for spec in specs))
    return list(views), label, index, list(decisions)


def _eval_sample(image: Image.Image, label: int, index: int, size: int) -> tuple:
    return [eval_view(image, size)], label, index, []


class TorchvisionLoader(EpochLoader):
    """PIL + torchvision transforms in `worker_threads(data.workers)` persistent `DataLoader` processes;
    augmentations seeded per sample by `(seed, epoch, index)`."""

    def __init__(self, settings: LoaderSettings) -> None:
        data = settings.data
        samples = ShardSamples(open_converted(data.root), settings.split)
        super().__init__(settings, len(samples))
        make = (partial(_training_sample, specs=settings.views()) if settings.train
                else partial(_eval_sample, size=data.image_size))
        self.workers = SeededWorkers(samples, make, batch_size=settings.batch_size, drop_last=settings.train,
                                     workers=worker_threads(data.workers), device=settings.device)

    def __iter__(self) -> Iterator[Batch]:
        s = self.settings
        pairs = [(i, derive_seed(s.seed, self.epoch, i)) for i in self.order().tolist()]
        for views, labels, indices, decisions in self.workers.batches(pairs):
            yield Batch(views=[v.to(s.device, s.dtype, non_blocking=True) for v in views],
                        labels=labels.to(s.device, non_blocking=True),
                        indices=indices.to(s.device, non_blocking=True),
                        params=[{k: v.to(s.device, non_blocking=True) for k, v in d.items()} for d in decisions])


def make_loader(settings: LoaderSettings) -> TorchvisionLoader:
    return TorchvisionLoader(settings)
