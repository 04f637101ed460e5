"""`.beton` files read by FFCV's `Loader`, each image decoded once per sample for all its views.

Stock FFCV decodes once per pipeline, so two views would cost two JPEG decodes. Here the one
image decoder, `MultiViewRGBImageDecoder`, decodes each image once (libjpeg-turbo, or the raw
pixels) and cuts every view from that decode with its own crop: FFCV's `get_random_crop`
(torchvision's `RandomResizedCrop.get_params`) resized by FFCV's `resize_crop` (OpenCV's
INTER_AREA), or, for evaluation, the resize and centre crop. A sample's views are packed into
one uint8 row. Crops are drawn from a generator seeded per sample by `(seed, epoch, index)`, so
they are reproducible and do not depend on which thread decoded what.

The rest of the recipe (colour jitter, grayscale, blur, solarize, flip, normalise) runs batched
on the training device (`loaders.augment.random_augment`: the parameters made from uniforms and
`apply`, one graph per view, compiled on CUDA), the uniforms drawn from a generator seeded by
`(seed, epoch, rank, batch)`, as in the memory backend. The device
stage (`_device_stage`) makes the host wait for nothing: the uint8 views, labels, areas and
indices go through pinned memory with non-blocking copies (`loaders.device.to_device`), and on
CUDA `build_loader` puts the loader behind `loaders.device.Prefetcher`, so batch N+1's device
stage runs on a side stream while step N trains.

FFCV visits exactly `loaders.sampling.epoch_indices` (a custom traversal order; FFCV's
`distributed` stays off), from batch `start_batch` on after `set_epoch(epoch, start_batch)`
(FFCV then never reads the samples before it), and one FFCV `Loader` is built and reused across
epochs. Decoding threads: `data.workers`, or with `data.workers: 0` the cores divided by the
ranks on this node (`LOCAL_WORLD_SIZE`).
"""
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, suppress
from dataclasses import replace
from queue import Empty

import numba
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, get_random_crop
from ffcv.libffcv import ctypes_memcopy, imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.pipeline.state import State
from ffcv.traversal_order.base import TraversalOrder

from loaders.augment import ViewSpec, param_uniforms, random_augment
from loaders.builder import Batch, EpochLoader, LoaderSettings, worker_threads
from loaders.device import to_device, view_function
from loaders.eval_view import eval_resize_length, normalise
from loaders.seeding import derive_seed
from loaders.shards import open_converted

BATCHES_AHEAD = 2

class MultiViewRGBImageDecoder(Operation):
    """FFCV decoder of an `RGBImageField` into every view of a sample, from one decode.

    Output per batch: `(pixels, areas)`, `pixels` `(B, Σ_v 3·S_v²)` uint8 with view `v` as an
    `(S_v, S_v, 3)` image at columns `offsets[v]:offsets[v + 1]`, and `areas` `(B, V)` float32,
    each crop's fraction of the image. Views are random-resized crops per `views` (size, scale,
    ratio); or, when `short_side` is given (evaluation), torchvision's `Resize(short_side)` then
    `CenterCrop(size)`, with no randomness. `seed_epoch` holds `(seed, epoch)` for the crops'
    generator: the caller sets it before each epoch and the compiled code reads it through its
    address, because numba freezes the arrays a compiled function captures.
    """

    def __init__(self, views: Sequence[ViewSpec], short_side: int | None = None) -> None:
        super().__init__()
        self.sizes = np.array([view.size for view in views])
        self.offsets = np.cumsum([0] + [3 * view.size ** 2 for view in views])
        self.scales = np.array([view.scale for view in views], dtype=np.float64)
        self.ratios = np.array([view.ratio for view in views], dtype=np.float64)
        self.short_side = short_side
        self.seed_epoch = np.zeros(2, dtype=np.int64)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        row = (int(self.offsets[-1]),)
        return (replace(previous_state, jit_mode=True, shape=row, dtype=np.dtype("u1")),
                (AllocationQuery(row, np.dtype("u1")), AllocationQuery((len(self.sizes),), np.dtype("f4"))))

    def _cutter(self) -> Callable:
        """`cut(image, v, view) -> area`: writes view `v` of a decoded `(H, W, 3)` image into
        `view` (`(S, S, 3)`) and returns the fraction of the image it shows; compiled."""
        resize = Compiler.compile(resize_crop)
        scales, ratios, short_side = self.scales, self.ratios, self.short_side
        if short_side is None:
            random_crop = Compiler.compile(get_random_crop)

            def cut(image, v, view):
                height, width = image.shape[0], image.shape[1]
                top, left, h, w = random_crop(height, width, scales[v], ratios[v])
                resize(image, top, top + h, left, left + w, view)
                return h * w / (height * width)
        else:
            def cut(image, v, view):  # torchvision's Resize (int(S·long/short)) and CenterCrop (round)
                height, width, size = image.shape[0], image.shape[1], view.shape[0]
                long_side = int(short_side * max(height, width) / min(height, width))
                new_height, new_width = (short_side, long_side) if height <= width else (long_side, short_side)
                resized = np.empty((new_height, new_width, 3), dtype=np.uint8)
                resize(image, 0, height, 0, width, resized)
                top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
                view[:] = resized[top:top + size, left:left + size]
                return size * size / (new_height * new_width)
        return Compiler.compile(cut)

    def generate_code(self) -> Callable:
        memory_read, my_range = self.memory_read, Compiler.get_iterator()
        decode_jpeg, seed_of, cut = Compiler.compile(imdecode), Compiler.compile(derive_seed), self._cutter()
        sizes, offsets, jpg = self.sizes, self.offsets, IMAGE_MODES["jpg"]
        seed_epoch_address = self.seed_epoch.ctypes.data

        def decode(batch_indices, storage, metadata, storage_state):
            pixels, areas = storage
            seed_epoch = np.empty(2, dtype=np.int64)
            ctypes_memcopy(seed_epoch_address, seed_epoch.ctypes.data, 16)
            for row in my_range(len(batch_indices)):
                index = batch_indices[row]
                field = metadata[index]
                height, width = np.int64(field["height"]), np.int64(field["width"])
                data = memory_read(field["data_ptr"], storage_state)
                if field["mode"] == jpg:  # the one decode of this sample
                    image = np.empty((height, width, 3), dtype=np.uint8)
                    decode_jpeg(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                else:
                    image = data.reshape(height, width, 3)
                np.random.seed(seed_of(seed_epoch[0], seed_epoch[1], index))
                for v in range(len(sizes)):
                    view = pixels[row, offsets[v]:offsets[v + 1]].reshape(sizes[v], sizes[v], 3)
                    areas[row, v] = cut(image, v, view)
            return pixels[:len(batch_indices)], areas[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class _FfcvOrder(TraversalOrder):
    """FFCV's traversal order: the indices our loader sets before each iteration (`EpochLoader.order`).
    It holds them rather than the loader, so that the loader is in no reference cycle (see
    `tests/test_loaders.py::test_a_dropped_loader_is_freed_at_once`)."""

    def __init__(self, indices: np.ndarray) -> None:
        self.indices = indices  # FFCV's `len()` reads the first order it is given: epoch 0's

    def __call__(self, loader: Loader) -> "_FfcvOrder":
        """FFCV 1.0.2 accepts a custom order only as an instance, which it calls with the loader."""
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.indices


def _stop(batches: EpochIterator) -> None:
    """End an epoch's decoding thread, even one abandoned mid-epoch. Once stopped, the thread ends
    within half a second of finding its queue full, except in its last act, putting the end-of-epoch
    marker, which waits for room: so a batch is taken off the queue whenever it does not end in time."""
    batches.close()
    while batches.is_alive():
        batches.join(timeout=1.0)
        with suppress(Empty):
            batches.output_queue.get_nowait()


class FfcvLoader(EpochLoader):
    """Batches from one FFCV `Loader` over the split's `.beton`, decoding in `worker_threads` threads (at
    most one per core)."""

    def __init__(self, settings: LoaderSettings) -> None:
        data = settings.data
        dataset = open_converted(data.root)
        super().__init__(settings, dataset.count(settings.split))
        if settings.train:
            self.specs = settings.views()
            self.decoder = MultiViewRGBImageDecoder(self.specs)
        else:
            self.specs = [ViewSpec(data.image_size, (1.0, 1.0))]
            self.decoder = MultiViewRGBImageDecoder(self.specs, short_side=eval_resize_length(data.image_size))
        self.traversal = _FfcvOrder(self.order().numpy())
        threads = min(worker_threads(data.workers), numba.config.NUMBA_NUM_THREADS)  # numba refuses more
        self.loader = Loader(str(dataset.ffcv_file(settings.split)), batch_size=settings.batch_size,
                             num_workers=threads, order=self.traversal, drop_last=settings.train,
                             batches_ahead=BATCHES_AHEAD, seed=settings.seed,
                             pipelines={"image": PipelineSpec("image", decoder=self.decoder),
                                        "label": [IntDecoder()]})
        self.augment = view_function(random_augment, settings.device, data.compile_views)

    def __iter__(self) -> Iterator[Batch]:
        with closing(self.host_batches()) as batches:  # closed at once when the consumer stops mid-epoch
            for number, *host in batches:
                yield self._device_stage(*host, number)

    def host_batches(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The host stage alone (FFCV's threads: decode once, cut every view): per batch its number in
        the epoch and host tensors `(pixels, areas, labels, indices)`, as `_device_stage` takes them."""
        s = self.settings
        self.decoder.seed_epoch[:] = (s.seed, self.epoch)  # no decoding thread runs between epochs
        self.loader.next_epoch = self.epoch
        self.traversal.indices = self.order().numpy()
        batches = iter(self.loader)
        try:
            for number, ((pixels, areas), labels) in enumerate(batches):
                # Host tensors that own their memory: FFCV refills its buffers once the next batch is taken.
                # The pixels are consumed (copied to the device, or cut into views) before that.
                yield (number + self.start_batch, torch.from_numpy(pixels), torch.from_numpy(areas.copy()),
                       torch.from_numpy(labels[:, 0].astype(np.int64)),
                       torch.from_numpy(batches.order[number * s.batch_size:][:len(labels)]))
        finally:  # also when the consumer stops mid-epoch: end FFCV's thread before another starts
            _stop(batches)

    def _device_stage(self, pixels: torch.Tensor, areas: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                      number: int) -> Batch:
        """Batch `number` of the epoch from its host tensors (packed uint8 rows, crop areas, labels,
        indices): moved to the device without a host sync, then augmented there."""
        s = self.settings
        pixels, labels, indices = (to_device(t, s.device) for t in (pixels, labels, indices))
        crops = [pixels[:, start:end].unflatten(1, (spec.size, spec.size, 3)).permute(0, 3, 1, 2).contiguous()
                 for spec, start, end in zip(self.specs, self.decoder.offsets, self.decoder.offsets[1:])]
        if not s.train:
            return Batch([normalise(crops[0], s.dtype)], labels, indices)
        generator = torch.Generator(s.device).manual_seed(s.batch_seed(self.epoch, number))
        areas = to_device(areas, s.device)
        views, params = [], []
        for v, (spec, images) in enumerate(zip(self.specs, crops)):
            view, decisions = self.augment(images, param_uniforms(len(images), generator), spec, s.dtype)
            views.append(view)
            params.append({"area": areas[:, v], **decisions})
        return Batch(views, labels, indices, params)


def make_loader(settings: LoaderSettings) -> FfcvLoader:
    return FfcvLoader(settings)
