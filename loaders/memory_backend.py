"""The whole split as one uint8 tensor on the device; every view made there, batched (CIFAR-sized data).

No worker processes: a batch is an index into the resident tensor, then per view the uniforms of
its crop boxes and augmentation parameters, drawn on the device from a generator seeded by
`(seed, epoch, rank, batch)` — so any batch can be made without the ones before it (mid-epoch
start: `set_epoch(epoch, start_batch)`) — and `loaders.crop.random_view`, which turns them into
boxes, parameters and the view in one graph, compiled on CUDA.

Nothing per batch makes the host wait for the GPU (tests count it): the epoch's order goes to the
device once per epoch through pinned memory, labels are gathered on the device, and on CUDA
`build_loader` puts the loader behind `loaders.device.Prefetcher`, so batch N+1 is made on a side
stream while step N trains.
"""
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from loaders.builder import Batch, EpochLoader, LoaderSettings, worker_threads
from loaders.crop import random_view, random_views
from loaders.device import to_device, view_function
from loaders.eval_view import eval_views
from loaders.shards import ShardSamples, open_converted


def load_split(samples: ShardSamples, workers: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Decode every sample once: `(N, 3, H, W)` uint8 images and `(N,)` int64 labels.

    All images must share one size (CIFAR, digits); larger, varied data belongs to ffcv/dali.
    """
    def decode(i: int) -> tuple[np.ndarray, int]:
        image, label = samples.decode(i)
        return np.asarray(image), label

    with ThreadPoolExecutor(max(1, workers)) as pool:
        decoded = list(pool.map(decode, range(len(samples)), chunksize=256))
    shapes = {image.shape for image, _ in decoded}
    if len(shapes) != 1:
        raise ValueError(f"the memory backend needs images of one size; this split has {len(shapes)} sizes "
                         f"(e.g. {sorted(shapes)[:3]}): use data.backend=ffcv or dali")
    images = np.stack([image for image, _ in decoded]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), np.array([label for _, label in decoded], dtype=np.int64)


class MemoryLoader(EpochLoader):
    """Batches cut from a device-resident uint8 copy of the split."""

    def __init__(self, settings: LoaderSettings) -> None:
        data = settings.data
        samples = ShardSamples(open_converted(data.root), settings.split)
        images, labels = load_split(samples, worker_threads(data.workers))
        super().__init__(settings, len(samples))
        self.images = torch.from_numpy(images).to(settings.device)
        self.labels = torch.from_numpy(labels).to(settings.device)
        self.specs = settings.views()
        self.make_view = view_function(random_view, settings.device, data.compile_views)

    def __iter__(self) -> Iterator[Batch]:
        s = self.settings
        order = to_device(self.order(), s.device)
        generator = torch.Generator(s.device)
        for number, indices in enumerate(order.split(s.batch_size), start=self.start_batch):
            images = self.images[indices]
            if not s.train:
                yield Batch([eval_views(images, s.data.image_size, s.dtype)], self.labels[indices], indices)
                continue
            generator.manual_seed(s.batch_seed(self.epoch, number))
            views, params = random_views(self.make_view, images, self.specs, generator, s.dtype)
            yield Batch(views, self.labels[indices], indices, params)


def make_loader(settings: LoaderSettings) -> MemoryLoader:
    return MemoryLoader(settings)
