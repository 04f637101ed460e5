"""`.beton` files read by FFCV's `Loader`, each image decoded once per sample for all its views.

Stock FFCV decodes once per pipeline, so two views would cost two JPEG decodes. Here each image
is decoded once (libjpeg-turbo, or the raw pixels), then one of two ways, per `data.device_crops`
(`None`, for images of at most 1,024 px: device crops in training on CUDA, and in evaluation on
every device; else host crops; `loaders.builder.resolve_device_crops`):

- **Device crops.** `WholeRGBImageDecoder` packs the whole decoded image into its sample's row;
  the device unpacks the batch (`loaders.crop.padded_images`) and makes every view there as the
  memory backend does (`loaders.crop.random_view`: boxes, parameters and view from uniforms drawn
  from a generator seeded by `(seed, epoch, rank, batch)`, compiled on CUDA). The host stage is
  the decode alone; the recipe's bicubic filter cuts the views.
- **Host crops.** `MultiViewRGBImageDecoder` cuts every view from the decode with its own crop:
  FFCV's `get_random_crop` (torchvision's `RandomResizedCrop.get_params`) resized by FFCV's
  `resize_crop` (OpenCV's INTER_AREA), drawn from a generator seeded per sample by
  `(seed, epoch, index)`, so they do not depend on which thread decoded what. A sample's views
  are packed into one uint8 row, and the rest of the recipe (colour jitter, grayscale, blur,
  solarize, flip, normalise) runs batched on the device (`loaders.augment.random_augment`,
  uniforms from the per-batch generator).

Evaluation resizes and centre-crops each image (`loaders.eval_view`), the same two ways: on the
device with PIL's bicubic (`loaders.crop.centre_view`, eager and in IEEE fp32; `data.device_crops:
null` picks it on every device for images of at most 1,024 px, so this backend's evaluation view
is the same on a CPU and a GPU), or on the host with OpenCV's INTER_AREA, whose filter is not the
recipe's.

The device stage (`_device_stage`) makes the host wait for nothing: pixels, labels, areas or
sizes and indices go through pinned memory with non-blocking copies (`loaders.device.to_device`),
and on CUDA `build_loader` puts the loader behind `loaders.device.Prefetcher`, so batch N+1's
device stage runs on a side stream while step N trains.

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
from ffcv.libffcv import ctypes_memcopy, imdecode, memcpy, resize_crop
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.pipeline.state import State
from ffcv.traversal_order.base import TraversalOrder

from loaders.augment import ViewSpec, param_uniforms, random_augment
from loaders.builder import Batch, EpochLoader, LoaderSettings, resolve_device_crops, worker_threads
from loaders.crop import centre_view, padded_images, random_view, random_views
from loaders.device import to_device, view_function
from loaders.eval_view import eval_resize_length, normalise
from loaders.seeding import derive_seed
from loaders.shards import open_converted

BATCHES_AHEAD = 2


def _sample_decoder(memory_read: Callable) -> Callable:
    """`decode(field, storage_state, out)`: one sample of an `RGBImageField` decoded into the
    contiguous uint8 `out` (`height·width·3` long, or `(height, width, 3)`): libjpeg-turbo for
    a JPEG, a copy for raw pixels; compiled."""
    decode_jpeg, copy, jpg = Compiler.compile(imdecode), Compiler.compile(memcpy), IMAGE_MODES["jpg"]

    def decode(field, storage_state, out):
        height, width = np.int64(field["height"]), np.int64(field["width"])
        data = memory_read(field["data_ptr"], storage_state)
        if field["mode"] == jpg:
            decode_jpeg(data, out, height, width, height, width, 0, 0, 1, 1, False, False)
        else:
            copy(data, out)

    return Compiler.compile(decode)


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
        my_range, decode_sample = Compiler.get_iterator(), _sample_decoder(self.memory_read)
        seed_of, cut = Compiler.compile(derive_seed), self._cutter()
        sizes, offsets = self.sizes, self.offsets
        seed_epoch_address = self.seed_epoch.ctypes.data

        def decode(batch_indices, storage, metadata, storage_state):
            pixels, areas = storage
            seed_epoch = np.empty(2, dtype=np.int64)
            ctypes_memcopy(seed_epoch_address, seed_epoch.ctypes.data, 16)
            for row in my_range(len(batch_indices)):
                index = batch_indices[row]
                field = metadata[index]
                image = np.empty((np.int64(field["height"]), np.int64(field["width"]), 3), dtype=np.uint8)
                decode_sample(field, storage_state, image)  # the one decode of this sample
                np.random.seed(seed_of(seed_epoch[0], seed_epoch[1], index))
                for v in range(len(sizes)):
                    view = pixels[row, offsets[v]:offsets[v + 1]].reshape(sizes[v], sizes[v], 3)
                    areas[row, v] = cut(image, v, view)
            return pixels[:len(batch_indices)], areas[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class WholeRGBImageDecoder(Operation):
    """FFCV decoder of an `RGBImageField` into whole images, for views cut on the device
    (`data.device_crops`): the host stage is then one decode per sample and nothing else.

    Output per batch: `(pixels, sizes)`, `pixels` `(B, N)` uint8 with each sample's `(H, W, 3)`
    image at the start of its row (`N`: 3 × the dataset's largest `H·W`), and `sizes` `(B, 2)`
    int64 `(H, W)`. `loaders.crop.padded_images` unpacks a batch into `(B, 3, height, width)`
    for `(height, width)`, the dataset's largest height and width, set here once FFCV has read
    the file's metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.height = self.width = 0

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        heights, widths = self.metadata["height"].astype(np.int64), self.metadata["width"].astype(np.int64)
        self.height, self.width = int(heights.max()), int(widths.max())
        row = (3 * int((heights * widths).max()),)
        return (replace(previous_state, jit_mode=True, shape=row, dtype=np.dtype("u1")),
                (AllocationQuery(row, np.dtype("u1")), AllocationQuery((2,), np.dtype("i8"))))

    def generate_code(self) -> Callable:
        my_range, decode_sample = Compiler.get_iterator(), _sample_decoder(self.memory_read)

        def decode(batch_indices, storage, metadata, storage_state):
            pixels, sizes = storage
            for row in my_range(len(batch_indices)):
                field = metadata[batch_indices[row]]
                height, width = np.int64(field["height"]), np.int64(field["width"])
                decode_sample(field, storage_state, pixels[row, :height * width * 3])
                sizes[row, 0], sizes[row, 1] = height, width
            return pixels[:len(batch_indices)], sizes[:len(batch_indices)]

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
        self.device_crops = resolve_device_crops(data, settings.device, settings.train)
        self.specs = settings.views() if settings.train else [ViewSpec(data.image_size, (1.0, 1.0))]
        short_side = None if settings.train else eval_resize_length(data.image_size)
        self.decoder = WholeRGBImageDecoder() if self.device_crops else MultiViewRGBImageDecoder(self.specs, short_side)
        self.traversal = _FfcvOrder(self.order().numpy())
        threads = min(worker_threads(data.workers), numba.config.NUMBA_NUM_THREADS)  # numba refuses more
        self.loader = Loader(str(dataset.ffcv_file(settings.split)), batch_size=settings.batch_size,
                             num_workers=threads, order=self.traversal, drop_last=settings.train,
                             batches_ahead=BATCHES_AHEAD, seed=settings.seed,
                             pipelines={"image": PipelineSpec("image", decoder=self.decoder),
                                        "label": [IntDecoder()]})
        if self.device_crops and not settings.train:  # one view, eager: compiled, a partial batch would recompile
            self.unpack, self.make_view = padded_images, centre_view
        elif self.device_crops:
            self.unpack = view_function(padded_images, settings.device, data.compile_views)
            self.make_view = view_function(random_view, settings.device, data.compile_views)
        else:
            self.make_view = view_function(random_augment, settings.device, data.compile_views)

    def __iter__(self) -> Iterator[Batch]:
        with closing(self.host_batches()) as batches:  # closed at once when the consumer stops mid-epoch
            for number, *host in batches:
                yield self._device_stage(*host, number)

    def host_batches(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The host stage alone (FFCV's threads: decode once, and cut every view unless
        `device_crops`): per batch its number in the epoch and host tensors `(pixels, areas or
        sizes, labels, indices)`, as `_device_stage` takes them."""
        s = self.settings
        if not self.device_crops:
            self.decoder.seed_epoch[:] = (s.seed, self.epoch)  # no decoding thread runs between epochs
        self.loader.next_epoch = self.epoch
        self.traversal.indices = self.order().numpy()
        batches = iter(self.loader)
        try:
            for number, ((pixels, per_sample), labels) in enumerate(batches):
                # Host tensors that own their memory: FFCV refills its buffers once the next batch is taken.
                # The pixels are consumed (copied to the device, or cut into views) before that.
                yield (number + self.start_batch, torch.from_numpy(pixels), torch.from_numpy(per_sample.copy()),
                       torch.from_numpy(labels[:, 0].astype(np.int64)),
                       torch.from_numpy(batches.order[number * s.batch_size:][:len(labels)]))
        finally:  # also when the consumer stops mid-epoch: end FFCV's thread before another starts
            _stop(batches)

    def _device_stage(self, pixels: torch.Tensor, per_sample: torch.Tensor, labels: torch.Tensor,
                      indices: torch.Tensor, number: int) -> Batch:
        """Batch `number` of the epoch from its host tensors (uint8 rows; crop areas, or image sizes
        with `device_crops`; labels; indices): moved to the device without a host sync, then there
        its views augmented, or, with `device_crops`, cut from the whole images and augmented as the
        memory backend does."""
        s = self.settings
        pixels, per_sample, labels, indices = (to_device(t, s.device) for t in (pixels, per_sample, labels, indices))
        if self.device_crops:
            images = self.unpack(pixels, per_sample, self.decoder.height, self.decoder.width)
            if not s.train:
                return Batch([self.make_view(images, per_sample, s.data.image_size, s.dtype)], labels, indices)
            views, params = random_views(self.make_view, images, self.specs, self._generator(number), s.dtype,
                                         per_sample)
            return Batch(views, labels, indices, params)
        crops = [pixels[:, start:end].unflatten(1, (spec.size, spec.size, 3)).permute(0, 3, 1, 2).contiguous()
                 for spec, start, end in zip(self.specs, self.decoder.offsets, self.decoder.offsets[1:])]
        if not s.train:
            return Batch([normalise(crops[0], s.dtype)], labels, indices)
        generator, views, params = self._generator(number), [], []
        for v, (spec, images) in enumerate(zip(self.specs, crops)):
            view, decisions = self.make_view(images, param_uniforms(len(images), generator), spec, s.dtype)
            views.append(view)
            params.append({"area": per_sample[:, v], **decisions})
        return Batch(views, labels, indices, params)

    def _generator(self, number: int) -> torch.Generator:
        """The device generator of batch `number`'s uniforms, seeded by `(seed, epoch, rank, batch)`."""
        s = self.settings
        return torch.Generator(s.device).manual_seed(s.batch_seed(self.epoch, number))


def make_loader(settings: LoaderSettings) -> FfcvLoader:
    return FfcvLoader(settings)
