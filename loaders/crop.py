"""Batched random-resized crop of a device tensor (docs/method.md §6), for data already on the device.

Boxes are drawn like torchvision's `RandomResizedCrop.get_params` (10 attempts of an area in
`scale·H·W` and a log-uniform aspect ratio, else the centre crop), vectorised over the batch.

Resampling is PIL's antialiased bicubic (the published pipeline resizes PIL images), written as
two batched matmuls `Wy · (image · Wxᵀ)` with per-sample weight matrices: PIL's cubic
(a = −0.5), its support widened by the downscale factor, taps outside the box dropped and the
rest renormalised. As in Pillow of the published code's era, the horizontal pass runs first and
its result is clamped to [0, 1], as PIL clamps its intermediate uint8 image (newer Pillow, e.g.
13.0, runs the vertical pass first when the height shrinks much more than the width). So it matches PIL to about
1/255 (PIL rounds to uint8 twice) and, where nothing overshoots [0, 1], equals torchvision's
`resized_crop(..., BICUBIC, antialias=True)` on float images.

`make_view` is one whole view from full images, crop and augmentations, with the flip folded
into the crop (a flipped sample's column weights, reversed): no op reads a device value on the
host and no shape depends on data, so `torch.compile(make_view, fullgraph=True)` is one graph.
`random_view` adds the drawing of the boxes and parameters from uniforms, and is what the memory
backend (and the ffcv backend with `data.device_crops`) compiles: only the two `torch.rand` calls
that make the uniforms stay eager (dynamo does not trace an explicit `torch.Generator`), where
drawing eagerly took ~90 tiny `(B,)`-sized ops per view, each a kernel launch on a GPU.

`centre_view` is the evaluation view of padded images by the same two matmuls (the resize of the
short side to `size·256/224` and the centre crop, computed only at the crop's pixels): what the
ffcv backend evaluates with `data.device_crops`.

Why not `grid_sample` or `roi_align`: grid_sample's bicubic is a = −0.75 and never antialiases
(a 400-px crop shrunk to 224 would alias); roi_align is bilinear. The dense matrices cost
`B·S·(H+W)` floats and two matmuls of `2·B·3·S·H·(W+S)` FLOPs: nothing for CIFAR; for a 128-image
batch of ImageNet images padded to 512 px (`padded_images`), ~65 GFLOP per 224-px view and ~23 per
96-px one, ~0.3 TFLOP for the 10-view recipe, about a millisecond of an H200 in TF32.
"""
import math
from collections.abc import Callable, Sequence

import torch

from loaders.augment import AugmentParams, ViewSpec, colour_and_normalise, param_uniforms, params_from_uniforms
from loaders.eval_view import eval_window, normalise


ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its centre-crop fallback


def box_uniforms(batch: int, generator: torch.Generator, attempts: int = ATTEMPTS) -> torch.Tensor:
    """`(B, 2·attempts + 2)` float64 uniforms in [0, 1) for one view's crop boxes: one `torch.rand` on
    `generator.device` (eager: dynamo does not trace an explicit generator)."""
    return torch.rand(batch, 2 * attempts + 2, generator=generator, device=generator.device, dtype=torch.float64)


def crop_boxes(batch: int, height: int | torch.Tensor, width: int | torch.Tensor, scale: tuple[float, float],
               ratio: tuple[float, float], generator: torch.Generator, attempts: int = ATTEMPTS) -> torch.Tensor:
    """`(B, 4)` int64 boxes `(top, left, height, width)` on `generator.device`, distributed as
    torchvision's `RandomResizedCrop.get_params` draws them. The image size is one for the whole
    batch (ints) or one per sample (`(B,)` int tensors: JPEGs of different sizes)."""
    return boxes_from_uniforms(box_uniforms(batch, generator, attempts), height, width, scale, ratio)


def boxes_from_uniforms(uniforms: torch.Tensor, height: int | torch.Tensor, width: int | torch.Tensor,
                        scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
    """`crop_boxes` from `box_uniforms`: pure tensor maths, so a compiled view can cut its boxes
    inside its graph. Per sample, attempt `i` takes its area from column `i` and its log aspect
    ratio from column `attempts + i`; the last two columns place the box."""
    batch, attempts = uniforms.shape[0], (uniforms.shape[1] - 2) // 2
    # An int becomes a device-side fill, never a host-to-device copy (which would sync a CUDA stream).
    height, width = (size.to(device=uniforms.device, dtype=torch.float64) if isinstance(size, torch.Tensor)
                     else torch.full((batch,), float(size), dtype=torch.float64, device=uniforms.device)
                     for size in (height, width))
    area = (height * width)[:, None] * (scale[0] + (scale[1] - scale[0]) * uniforms[:, :attempts])
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * uniforms[:, attempts:2 * attempts]
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w >= 1) & (w <= width[:, None]) & (h >= 1) & (h <= height[:, None])
    first = fits.int().argmax(dim=1, keepdim=True)  # the first attempt that fits
    fallback_h, fallback_w = _centre_crop_size(height, width, ratio)
    found = fits.any(dim=1)
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)
    corner = uniforms[:, 2 * attempts:]
    top = torch.where(found, (corner[:, 0] * (height - h + 1)).floor().minimum(height - h), (height - h) // 2)
    left = torch.where(found, (corner[:, 1] * (width - w + 1)).floor().minimum(width - w), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1).long()


def _centre_crop_size(height: torch.Tensor, width: torch.Tensor,
                      ratio: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's fallback: the largest centred box whose aspect ratio is clamped to `ratio`
    (per sample; rounding half to even, as Python's `round`)."""
    in_ratio = width / height
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    return (torch.where(narrow, torch.round(width / min(ratio)), height),
            torch.where(wide, torch.round(height * max(ratio)), width))


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Crop each `(B, C, H, W)` image (uint8, or float in [0, 1]) to its box and resize it to
    `size × size` with PIL's bicubic; returns float32 in [0, 1] (clamped, like PIL's uint8).
    Samples where the `(B,)` bool `flip` is set come out mirrored left to right, at no cost."""
    height, width = images.shape[-2:]
    top, left, box_h, box_w = boxes.to(images.device).unbind(dim=1)
    rows = _bicubic_weights(top, box_h.to(torch.float32) / size, top, top + box_h, height, size)
    cols = _bicubic_weights(left, box_w.to(torch.float32) / size, left, left + box_w, width, size)
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    return _resample(images, rows, cols)


def resized_centre_crop(images: torch.Tensor, sizes: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation crop (`loaders.eval_view.eval_view`: torchvision's `Resize(eval_resize_length(size))`
    with PIL's bicubic, then `CenterCrop(size)`) of each image of a padded `(B, C, H, W)` batch
    (`sizes`: `(B, 2)` int64 heights and widths, as `padded_images` takes them); float32 in [0, 1].

    Only the crop's pixels are computed: those of `eval_window`, each output pixel's taps taken from
    the whole image (a resize, unlike a crop, reads beyond the window it keeps)."""
    start, end = eval_window(*sizes.unbind(dim=1), size)
    rows, cols = (_bicubic_weights(start[:, axis].float(), ((end[:, axis] - start[:, axis]) / size).float(),
                                   torch.zeros_like(sizes[:, axis]), sizes[:, axis], images.shape[axis - 2], size)
                  for axis in (0, 1))
    return _resample(images, rows, cols)


def centre_view(images: torch.Tensor, sizes: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """The normalised evaluation view in `dtype` of padded images (`resized_centre_crop`): what the ffcv
    backend runs, eagerly and in IEEE fp32, for evaluation with `data.device_crops`."""
    return normalise(resized_centre_crop(images, sizes, size), dtype)


def _resample(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`rows · image · colsᵀ` per sample and channel, from uint8 or [0, 1] float images, in float32:
    the horizontal pass first, clamped to [0, 1] as PIL clamps its intermediate uint8 image; then
    the vertical one, clamped too."""
    batch, channels, height, width = images.shape
    if images.dtype == torch.uint8:
        cols = cols / 255  # fold the uint8 -> [0, 1] scaling into the weights
    out = torch.bmm(images.to(torch.float32).reshape(batch, channels * height, width), cols.transpose(1, 2))
    out = out.clamp_(0, 1).view(batch, channels, height, cols.shape[1])
    return (rows[:, None] @ out).clamp_(0, 1)


def make_view(images: torch.Tensor, boxes: torch.Tensor, params: AugmentParams, dtype: torch.dtype) -> torch.Tensor:
    """One normalised view in `dtype` of full `(B, C, H, W)` images: `boxes` resized to
    `params.spec.size`, then `loaders.augment.apply`'s ops with `params` (equal to
    `apply(resized_crop(images, boxes, size), params, dtype)`)."""
    spec = params.spec
    crops = resized_crop(images, boxes, spec.size, params.flip if spec.flip_prob > 0 else None)
    return colour_and_normalise(crops, params, dtype)


def random_view(images: torch.Tensor, box_uniforms: torch.Tensor, param_uniforms: torch.Tensor, spec: ViewSpec,
                dtype: torch.dtype, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One view of full `(B, C, H, W)` images with every random choice made from uniforms
    (`box_uniforms`, `loaders.augment.param_uniforms`): the boxes, the parameters, then `make_view`.
    Pure tensor maths, so the memory and ffcv backends compile drawing and view as one graph.
    Returns the view and what `Batch.params` reports: each box's area as a fraction of the image,
    and the decisions. `sizes` (`(B, 2)` int64 heights and widths) is for images of different
    sizes padded to one (`padded_images`): each box stays inside its own image."""
    height, width = images.shape[-2:] if sizes is None else sizes.unbind(dim=1)
    boxes = boxes_from_uniforms(box_uniforms, height, width, spec.scale, spec.ratio)
    params = params_from_uniforms(spec, param_uniforms)
    area = (boxes[:, 2] * boxes[:, 3]) / (height * width)
    return make_view(images, boxes, params, dtype), {"area": area, **params.decisions()}


def random_views(make_view: Callable, images: torch.Tensor, specs: Sequence[ViewSpec], generator: torch.Generator,
                 dtype: torch.dtype, sizes: torch.Tensor | None = None
                 ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Every view in `specs` of a batch: per view its box and parameter uniforms drawn from
    `generator` (in that order), then `make_view` (`random_view`, or its compiled graph). Returns
    the views and, per view, what `random_view` reports."""
    views, params = [], []
    for spec in specs:
        uniforms = box_uniforms(len(images), generator), param_uniforms(len(images), generator)
        view, drawn = make_view(images, *uniforms, spec, dtype, sizes)
        views.append(view)
        params.append(drawn)
    return views, params


def padded_images(rows: torch.Tensor, sizes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`(B, 3, height, width)` float32 images in [0, 1] from `(B, N)` uint8 rows, each holding one
    `(h, w, 3)` image at its start (`sizes`: `(B, 2)` int64 `(h, w)`, at most `(height, width)`),
    as FFCV's whole-image decoder packs them. A gather at computed indices and the conversion, one
    fused kernel when compiled; converted here once, where each view's crop would convert the
    whole uint8 batch again (for 10 views of 512-px images, ~5 GB less memory traffic per
    128-image batch). Pixels beyond an image's own size are arbitrary values from its row, which
    `resized_crop` never weighs, as every box lies inside its image. Eagerly (a CPU) its
    temporaries are an int64 index per pixel and two uint8 copies, ~3.7 MB per 512-px image (an
    index per byte took ~8.4 MB)."""
    batch, device = rows.shape[0], rows.device
    pixels = rows.view(batch, -1, 3)  # one RGB triple per pixel: an index per pixel, not per byte
    y = torch.arange(height, device=device)[None, :, None]
    x = torch.arange(width, device=device)[None, None, :]
    index = (y * sizes[:, 1, None, None] + x).clamp(max=pixels.shape[1] - 1).view(batch, -1, 1)  # (B, H·W, 1)
    images = pixels.gather(1, index.expand(-1, -1, 3)).view(batch, height, width, 3).permute(0, 3, 1, 2)
    return images.contiguous().to(torch.float32).div_(255)


def random_resized_crop(images: torch.Tensor, spec: ViewSpec,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-resized crop of every image per `spec`: float32 `(B, C, S, S)` in [0, 1] and the
    `(B, 4)` boxes `(top, left, height, width)` they were cut from."""
    height, width = images.shape[-2:]
    boxes = crop_boxes(images.shape[0], height, width, spec.scale, spec.ratio, generator)
    return resized_crop(images, boxes, spec.size), boxes


def _bicubic_weights(start: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                     in_size: int, out_size: int) -> torch.Tensor:
    """`(B, out_size, in_size)` resampling matrices of PIL's bicubic, per sample: output pixel `u`
    centred at `start + (u + 0.5)·scale` in input coordinates (input pixel `x` at `x + 0.5`), its
    taps the input pixels in `[low, high)` (the crop's box, or the whole image), renormalised.
    When shrinking (`scale > 1`), the cubic is stretched by the scale (antialias).

    The cubic is evaluated on a band of `ceil(4·max(1, in_size / out_size)) + 2` pixels per
    output pixel, from its support's first pixel: wide enough for the largest stretch a box
    inside the image allows (a support `4·stretch` wide); taps beyond a sample's own support
    weigh 0. The band is then scattered into the dense matrix the matmuls take. For a 96-px view
    of a 512-px image that is 24 taps against 512 columns, so the weights' temporaries are that
    much smaller."""
    taps = math.ceil(4 * max(1.0, in_size / out_size)) + 2
    scale = scale[:, None, None]
    stretch = scale.clamp(min=1.0)
    centre = (torch.arange(out_size, device=start.device) + 0.5)[None, :, None] * scale  # from `start`
    first = torch.floor(start[:, None, None] + centre - 0.5 - 2 * stretch).long()  # the support's first pixel
    pixels = first + torch.arange(taps, device=start.device)  # (B, out_size, taps)
    position = pixels - start[:, None, None] + 0.5
    inside = (pixels >= low[:, None, None]) & (pixels < high[:, None, None])
    weights = _cubic((position - centre) / stretch) * inside
    weights = weights / weights.sum(dim=-1, keepdim=True)
    dense = weights.new_zeros(weights.shape[0], out_size, in_size)
    return dense.scatter_add_(2, pixels.clamp(0, in_size - 1), weights)  # taps outside add 0


def _cubic(d: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """PIL's bicubic kernel (Keys, a = −0.5), zero beyond |d| = 2."""
    d = d.abs()
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = (((d - 5) * d + 8) * d - 4) * a
    return torch.where(d < 1, near, torch.where(d < 2, far, 0.0))
