"""DALI backend: one DALI pipeline per epoch decodes every sample once and cuts and augments all its
views inside DALI (docs/method.md §6), on the GPU when the training device is CUDA.

Feeding. A batch-mode `fn.external_source` reads batch `i` of this rank's `epoch_indices(seed, epoch,
rank)` from the WebDataset shards (`ShardSamples.read`: encoded bytes and label, random access
through the index files) and passes the dataset indices along. So the epoch visits exactly the
order every backend shares, in exactly `num_batches` batches: training drops the same tail on all
ranks, evaluation ends with a partial batch, and nothing is padded or repeated at the epoch's end.
(`fn.readers.webdataset` is not used: it gives each rank a contiguous range of samples, shuffles
within a buffer and pads the last batch or runs into the next epoch, so neither the order nor the
epoch's length would match the other backends'.)

Decoding. `fn.decoders.image` once per sample, on `"mixed"` (nvJPEG on the GPU) for a CUDA device,
else on the CPU; every view is resampled from that one decode.

Training views, each per sample with DALI's random ops:
- crop: torchvision's `RandomResizedCrop` window, drawn in the graph (`_crop_window`), then
  `fn.resize` of that ROI to `S×S`, bicubic and antialiased (PIL's filter: within 1/255 of
  torchvision's `resized_crop` away from the crop's edge; DALI also reads the pixels just outside
  the crop, so pixels on the edge differ by up to a few levels);
- colour jitter (p = 0.8) and grayscale (p = 0.2) in one colour map, see `_jitter`;
- Gaussian blur, sigma ~ U(0.1, 2), window `2·ceil(3σ) + 1` (`fn.gaussian_blur`, whose border is
  a reflection where PIL repeats the edge pixel);
- solarize (view 2): `x xor 255` where `x >= 128`, as PIL's `ImageOps.solarize(img, 128)`;
- flip and ImageNet normalisation fused in `fn.crop_mirror_normalize` (CHW, the settings' dtype).
Every decision and the crop's area are extra pipeline outputs, returned as `Batch.params`.

Evaluation: the torchvision transform (short side to `S·256/224`, bicubic, centre crop) as one
`fn.resize` of the centre window's ROI (`_eval_window`), then normalisation; no randomness.

Seeds. DALI's random ops draw from the pipeline's seed, fixed when the pipeline is built, so the
pipeline is built for each epoch with a seed from `(seed, epoch, rank)`: iterating an epoch twice
gives identical batches. The previous epoch's pipeline is released when its iteration ends.
"""
import math
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

from loaders.augment import SOLARIZE_THRESHOLD, ViewSpec, recipe_views
from loaders.builder import Batch, LoaderSettings
from loaders.eval_view import IMAGENET_MEAN, IMAGENET_STD, eval_resize_length
from loaders.sampling import epoch_indices, num_batches
from loaders.seeding import derive_seed
from loaders.shards import ShardSamples, open_converted

ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 windows before its centre fallback
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, torchvision's and PIL's grayscale
FLAGS = ("jitter", "grayscale", "blur", "solarize", "flip")
PARAMS = ("area", *FLAGS)  # per view, the pipeline outputs after the view itself
DALI_DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}  # others: float32, then cast
MEAN_255 = [255 * m for m in IMAGENET_MEAN]
STD_255 = [255 * s for s in IMAGENET_STD]
# Colour matrices on RGB column vectors (see `_jitter`): a pixel's luma as grey (L), its chroma
# (C = I − L), and its chroma turned a quarter turn about the grey axis (C·K).
_L = np.outer(np.ones(3), LUMA)
_K = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / math.sqrt(3)
COLOUR_BASIS = tuple(m.astype(np.float32) for m in (_L, np.eye(3) - _L, (np.eye(3) - _L) @ _K))


class _EpochSource:
    """Batch-mode external source: iteration `i` is the encoded images, labels and dataset indices of
    batch `i` of `order`; StopIteration after the last (possibly partial) batch ends the epoch."""

    def __init__(self, samples: ShardSamples, order: list[int], batch_size: int) -> None:
        self.samples, self.order, self.batch_size = samples, order, batch_size

    def __call__(self, iteration: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        indices = self.order[iteration * self.batch_size:(iteration + 1) * self.batch_size]
        if not indices:
            raise StopIteration
        encoded, labels = zip(*(self.samples.read(i) for i in indices))
        return ([np.frombuffer(data, np.uint8) for data in encoded], np.array(labels, np.int64),
                np.array(indices, np.int64))


def _where(condition: DataNode, if_true, if_false) -> DataNode:
    """Per-sample `if_true if condition else if_false` for numbers (`condition` is 0 or 1)."""
    return condition * if_true + (1 - condition) * if_false


def _round(x: DataNode) -> DataNode:
    """Round half up (torchvision rounds half to even; with random real inputs ties do not occur)."""
    return dmath.floor(x + 0.5)


def _uniform(low: float, high: float, shape: list[int] | None = None) -> DataNode:
    """Per-sample U[low, high); a point range gives that value (DALI rejects an empty range)."""
    if high > low:
        return fn.random.uniform(range=[low, high], shape=shape)
    return fn.random.uniform(values=[low], shape=shape)


def _crop_window(height: DataNode, width: DataNode, spec: ViewSpec) -> tuple[DataNode, DataNode, DataNode]:
    """torchvision's `RandomResizedCrop.get_params` per sample, its attempts vectorised: draw 10
    windows (area ~ U(scale)·H·W, log-uniform aspect ratio), take the first that fits in the image,
    else the centred window of the largest area whose ratio is clamped to `spec.ratio`.

    Returns the ROI's `(top, left)` and `(bottom, right)` corners and its area as a fraction of the
    image's, all float32.
    """
    target = height * width * _uniform(*spec.scale, shape=[ATTEMPTS])
    aspect = dmath.exp(_uniform(math.log(spec.ratio[0]), math.log(spec.ratio[1]), shape=[ATTEMPTS]))
    w, h = _round(dmath.sqrt(target * aspect)), _round(dmath.sqrt(target / aspect))
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    rank = fits * types.Constant(np.arange(ATTEMPTS, 0, -1, dtype=np.float32))  # earlier attempts rank higher
    best = fn.reductions.max(rank)
    found = best > 0
    first = (rank == best) & found  # one-hot of the first fitting attempt
    h = _where(found, fn.reductions.sum(h * first), dmath.min(height, _round(width / spec.ratio[0])))
    w = _where(found, fn.reductions.sum(w * first), dmath.min(width, _round(height * spec.ratio[1])))
    corner = _uniform(0.0, 1.0, shape=[2])
    top = _where(found, dmath.min(dmath.floor(corner[0] * (height - h + 1)), height - h),
                 dmath.floor((height - h) / 2))
    left = _where(found, dmath.min(dmath.floor(corner[1] * (width - w + 1)), width - w),
                  dmath.floor((width - w) / 2))
    return fn.stack(top, left), fn.stack(top + h, left + w), h * w / (height * width)


def _jitter(x: DataNode, brightness: DataNode, contrast: DataNode, saturation: DataNode,
            hue: DataNode) -> DataNode:
    """Colour jitter of a uint8 HWC view: one affine colour map per sample, `x ↦ A·x + t`
    (`fn.coord_transform`). Factors are per sample; `(1, 1, 1, 0)` is the identity and `hue` is a
    fraction of the colour circle, as in torchvision.

    Write a pixel as its luma, as grey (`L·x`, `L = 1·lumaᵀ`), plus its chroma (`C·x`, `C = I − L`).
    torchvision's brightness is `b·x`; contrast `c·x + (1 − c)·m`, `m` the view's mean luma;
    saturation `L·x + s·C·x`, so `s = 0` is grayscale. Hue is `L·x + C·R·x`, `R` the rotation by
    `θ = 2π·hue` about the grey axis, which on chroma is `C·R = cos θ·C + sin θ·C·K` (`K`: the
    quarter turn): each pixel's HSV hue turns by θ (within about 10 %) and its luma is kept, where
    torchvision's HSV shift keeps its max and min instead (2–17 levels apart on average on
    ImageNet crops at hue 0.08). Brightness and contrast scale a pixel and add grey; saturation
    and hue change chroma only, so keep luma (and `m`) and grey: the four commute, and
    torchvision's random order would only change where values clip to [0, 255] between ops,
    which this single map does once, at the end. Composed:
    `A = b·c·(L + s·(cos θ·C + sin θ·C·K))`, `t = b·(1 − c)·m`.
    """
    means = fn.reductions.mean(x, axes=[0, 1], dtype=types.FLOAT)
    luma = LUMA[0] * means[0] + LUMA[1] * means[1] + LUMA[2] * means[2]
    gain, angle = brightness * contrast, 2 * math.pi * hue
    luma_part, chroma, chroma_turned = (types.Constant(m) for m in COLOUR_BASIS)
    matrix = gain * (luma_part + saturation * (dmath.cos(angle) * chroma + dmath.sin(angle) * chroma_turned))
    # Named arguments live on the CPU: in GPU pipelines the mean luma is computed on the device.
    return fn.coord_transform(x, M=matrix, T=brightness * (1 - contrast) * luma.cpu(), dtype=types.UINT8)


def _resize(images: DataNode, start: DataNode, end: DataNode, size: int) -> DataNode:
    """The ROI `[start, end)` (`(y, x)` pixels) of each image, resampled to `size × size` with an
    antialiased bicubic filter, as PIL resizes."""
    return fn.resize(images, roi_start=start, roi_end=end, size=[size, size], interp_type=types.INTERP_CUBIC,
                     antialias=True)


def _normalise(x: DataNode, dtype: types.DALIDataType, mirror: DataNode | int = 0) -> DataNode:
    """ImageNet normalisation to CHW `dtype`, mirrored horizontally where `mirror`."""
    return fn.crop_mirror_normalize(x, mirror=mirror, mean=MEAN_255, std=STD_255, output_layout="CHW", dtype=dtype)


def _train_view(images: DataNode, height: DataNode, width: DataNode, spec: ViewSpec,
                dtype: types.DALIDataType) -> list[DataNode]:
    """One augmented view of every image and its per-sample parameters, in `PARAMS` order."""
    start, end, area = _crop_window(height, width, spec)
    x = _resize(images, start, end, spec.size)
    probabilities = (spec.jitter_prob, spec.grayscale_prob, spec.blur_prob, spec.solarize_prob, spec.flip_prob)
    drawn = {name: fn.random.coin_flip(probability=p) for name, p in zip(FLAGS, probabilities)}
    b, c, s, h = spec.jitter

    def factor(low: float, high: float, identity: float) -> DataNode:
        return _where(drawn["jitter"], _uniform(low, high), identity)

    # Grayscale after the jitter is saturation 0 in the jitter's colour map (see `_jitter`).
    x = _jitter(x, factor(max(0.0, 1 - b), 1 + b, 1.0), factor(max(0.0, 1 - c), 1 + c, 1.0),
                factor(max(0.0, 1 - s), 1 + s, 1.0) * (1 - drawn["grayscale"]), factor(-h, h, 0.0))
    if spec.blur_prob > 0:
        sigma = _uniform(*spec.blur_sigma)
        window = _where(drawn["blur"], 2 * dmath.ceil(3 * sigma) + 1, 1)  # a 1-tap window is the identity
        x = fn.gaussian_blur(x, sigma=sigma, window_size=fn.cast(window, dtype=types.INT32))
    if spec.solarize_prob > 0:
        inverts = fn.cast(drawn["solarize"] * 255, dtype=types.UINT8)  # 255 where solarized, else 0
        x = x ^ ((x >= round(SOLARIZE_THRESHOLD * 255)) * inverts)  # uint8 throughout: 255 - x where set
    return [_normalise(x, dtype, mirror=drawn["flip"]), area, *drawn.values()]


def _half_of(n: DataNode) -> DataNode:
    """Python's `round(n / 2)` for a whole number `n >= 0`: ties go to the even neighbour."""
    down = dmath.floor(n / 2)
    return down + ((n - 2 * down == 1) & (down - 2 * dmath.floor(down / 2) == 1))


def _eval_window(height: DataNode, width: DataNode, size: int) -> tuple[DataNode, DataNode]:
    """The ROI of the input that torchvision's eval transform keeps: `resize(int(size·256/224))`
    (short side to that length, long side `int(short·long/short)`) then `center_crop(size)`
    (offset `round((resized − size)/2)`), mapped back to input pixels."""
    short = eval_resize_length(size)
    portrait = width <= height  # torchvision's `short, long = (w, h) if w <= h else (h, w)`
    new_h = _where(portrait, dmath.floor(short * height / width), short)
    new_w = _where(portrait, short, dmath.floor(short * width / height))
    top, left = _half_of(new_h - size), _half_of(new_w - size)
    scale_y, scale_x = height / new_h, width / new_w
    return (fn.stack(top * scale_y, left * scale_x),
            fn.stack((top + size) * scale_y, (left + size) * scale_x))


def _eval_view(images: DataNode, height: DataNode, width: DataNode, size: int,
               dtype: types.DALIDataType) -> DataNode:
    """torchvision's eval transform in one resampling: the kept window, straight to `size × size`."""
    return _normalise(_resize(images, *_eval_window(height, width, size), size), dtype)


def _cuda_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


class DaliLoader:
    """Batches from a DALI pipeline rebuilt, with an `(seed, epoch, rank)` seed, for each epoch."""

    def __init__(self, settings: LoaderSettings) -> None:
        data = settings.data
        self.settings = settings
        self.samples = ShardSamples(open_converted(data.root), settings.split)
        self.specs = recipe_views(data.image_size, data.global_scale, data.local_crops, data.local_size,
                                  data.local_scale)
        self.epoch = 0

    def __len__(self) -> int:
        s = self.settings
        return num_batches(len(self.samples), s.batch_size, train=s.train, rank=s.rank, world_size=s.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Order and augmentations both follow `(seed, epoch)`."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        s = self.settings
        order = epoch_indices(len(self.samples), s.batch_size, train=s.train, seed=s.seed, epoch=self.epoch,
                              rank=s.rank, world_size=s.world_size).tolist()
        pipeline = self._pipeline(order)
        for _ in range(len(self)):
            yield self._batch([self._to_torch(output) for output in pipeline.run()])

    def _pipeline(self, order: list[int]) -> Pipeline:
        """This epoch's pipeline. Outputs: labels, indices, then the eval view, or for each training
        view the view and its `PARAMS`."""
        s = self.settings
        on_gpu = s.device.type == "cuda"
        dtype = DALI_DTYPES.get(s.dtype, types.FLOAT)
        pipeline = Pipeline(batch_size=s.batch_size, num_threads=max(1, s.data.workers),
                            device_id=_cuda_index(s.device) if on_gpu else None,
                            seed=derive_seed(s.seed, self.epoch, s.rank))
        with pipeline:
            encoded, labels, indices = fn.external_source(
                _EpochSource(self.samples, order, s.batch_size), num_outputs=3, batch=True,
                dtype=[types.UINT8, types.INT64, types.INT64])
            images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
            shape = images.shape(dtype=types.FLOAT)
            height, width = shape[0], shape[1]
            if s.train:
                views = [out for spec in self.specs for out in _train_view(images, height, width, spec, dtype)]
            else:
                views = [_eval_view(images, height, width, s.data.image_size, dtype)]
            pipeline.set_outputs(labels, indices, *views)
        pipeline.build()
        return pipeline

    def _to_torch(self, output) -> torch.Tensor:
        """A copy of one pipeline output (DALI reuses its buffers) on the training device."""
        return to_torch_tensor(output.as_tensor(), copy=True).to(self.settings.device, non_blocking=True)

    def _batch(self, outputs: list[torch.Tensor]) -> Batch:
        labels, indices, *views = outputs
        if not self.settings.train:
            return Batch([views[0].to(self.settings.dtype)], labels, indices)
        stride = 1 + len(PARAMS)
        params = [{name: value if name == "area" else value.bool()
                   for name, value in zip(PARAMS, views[start + 1:start + stride])}
                  for start in range(0, len(views), stride)]
        return Batch([v.to(self.settings.dtype) for v in views[::stride]], labels, indices, params)


def make_loader(settings: LoaderSettings) -> DaliLoader:
    return DaliLoader(settings)
