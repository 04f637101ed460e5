"""Batched per-view augmentations on the images' device (docs/method.md §6).

One view of a batch is made by `random_resized_crop` (in `loaders.crop`) and then `augment`,
which runs, in the published order, colour jitter, grayscale, Gaussian blur, solarize,
horizontal flip and ImageNet normalisation, each with per-sample random parameters. The
parameters are drawn on the generator's device by `draw_params` and applied by `apply`, so a
backend pays no host round trip and tests can read or set every per-sample decision. Drawing is
one `torch.rand` (`param_uniforms`) and pure tensor maths (`params_from_uniforms`), so a compiled
view makes its parameters inside its graph (`random_augment`; `loaders.crop.random_view`): on a
GPU the eager launches per view are its `torch.rand` calls (two with `random_view`, one with
`random_augment`), not ~90 small ops.

The colour ops follow torchvision's tensor kernels (formulas, clamping after each jitter step,
the jitter order as a random permutation per sample); their outputs equal torchvision's
functional ops applied to each sample with the same parameters. The published code runs the
same ops on PIL uint8 images, so it differs from this float pipeline by uint8 rounding after
every op (PIL's hue shift is also quantised to 1/255 of the circle).

The GPU contract (counted on CPU by `tests/test_loaders.py` with `bench.dispatch.OpCounter`): no
op here reads a device value on the host or builds a tensor from host data per batch. Constant
tensors (normalisation, hue offsets) are made once per device (`loaders.device.channel_constant`),
and `apply`
has no data-dependent shapes, so `torch.compile(apply, fullgraph=True)` is one graph; the
loaders compile the functions built on it (`random_augment`, `loaders.crop.random_view`) on CUDA
(`loaders.device.view_function`).

Dtypes: images stay uint8 while they move and while they are flipped (a gather of bytes: the
flip commutes with every other op, so it runs first, on the smallest data), the view is written
in the caller's dtype (bf16 for training on a GPU), and the arithmetic in between is fp32:
bf16's 8-bit mantissa would move a pixel of 200/255 by up to 1/255 at each of the ~10 chained
ops, far beyond the 1e-5 to which these ops equal torchvision's. Compiled, the chain of
pointwise ops is fused, so fp32 intermediates live in registers and cost no memory traffic.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from loaders.device import channel_constant
from loaders.eval_view import IMAGENET_MEAN, IMAGENET_STD, normalise

SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize(img, 128) inverts values >= 128
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # torchvision's ColorJitter op ids (`fn_idx`)
HUE_OFFSETS = (5.0, 3.0, 1.0)  # n = 5, 3, 1 of `_adjust_hue`'s closed form, one per channel


@dataclass(frozen=True)
class ViewSpec:
    """The recipe of one view: crop geometry and the probability/strength of every op."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter_prob: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        probs = (self.jitter_prob, self.grayscale_prob, self.blur_prob, self.solarize_prob, self.flip_prob)
        if not all(0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"probabilities must lie in [0, 1]; got {probs}")
        if min(self.jitter) < 0 or self.jitter[HUE] > 0.5:
            raise ValueError(f"jitter strengths must be >= 0 and hue <= 0.5; got {self.jitter}")
        if not 0 < self.scale[0] <= self.scale[1] or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"scale and ratio must be increasing positive pairs; got {self.scale}, {self.ratio}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be an increasing positive pair; got {self.blur_sigma}")


def recipe_views(global_size: int, global_scale: tuple[float, float], local_crops: int = 0,
                 local_size: int = 96, local_scale: tuple[float, float] = (0.05, 0.35)) -> list[ViewSpec]:
    """The published views (docs/method.md §6): view 1 (blur p=1), view 2 (blur p=0.1, solarize p=0.2),
    then `local_crops` local views (blur p=0.5)."""
    view1 = ViewSpec(global_size, global_scale, blur_prob=1.0)
    view2 = ViewSpec(global_size, global_scale, blur_prob=0.1, solarize_prob=0.2)
    local = ViewSpec(local_size, local_scale, blur_prob=0.5)
    return [view1, view2] + [local] * local_crops


@dataclass
class AugmentParams:
    """Per-sample random parameters of one view, all `(B, ...)` tensors on one device.

    `jitter`, `grayscale`, `blur`, `solarize`, `flip` say which samples get each op; `order` is
    each sample's jitter order (a permutation of the op ids, like torchvision's `fn_idx`);
    `factors[:, BRIGHTNESS|CONTRAST|SATURATION|HUE]` are its jitter factors; `sigma` its blur
    sigma. Factors and sigma are drawn for every sample and only used where the op applies.
    """

    spec: ViewSpec
    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor
    flip: torch.Tensor

    def decisions(self) -> dict[str, torch.Tensor]:
        """Which samples got each op, as `Batch.params` reports them."""
        return {name: getattr(self, name) for name in ("jitter", "grayscale", "blur", "solarize", "flip")}


PARAM_UNIFORMS = 14  # per sample: jitter coin, 4 order keys, 4 jitter factors, grayscale, blur, sigma, solarize, flip


def param_uniforms(batch: int, generator: torch.Generator) -> torch.Tensor:
    """`(B, PARAM_UNIFORMS)` uniforms in [0, 1) for one view's parameters: one `torch.rand` on
    `generator.device` (dynamo does not trace an explicit generator, so this stays eager). Also
    makes the device's constants, eagerly, so that a compiled `apply` reads them as inputs."""
    for values in (IMAGENET_MEAN, IMAGENET_STD, HUE_OFFSETS):
        channel_constant(values, generator.device)
    return torch.rand(batch, PARAM_UNIFORMS, generator=generator, device=generator.device)


def params_from_uniforms(spec: ViewSpec, uniforms: torch.Tensor) -> AugmentParams:
    """One view's parameters from `param_uniforms`: pure tensor maths (Python-float constants, no
    tensor built from host data), so a compiled view can draw its parameters inside its graph."""
    jitter, order_keys, factors = uniforms[:, 0], uniforms[:, 1:5], uniforms[:, 5:9]
    grayscale, blur, sigma, solarize, flip = uniforms[:, 9:].unbind(dim=1)
    b, c, s, h = spec.jitter
    ranges = ((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h))
    sigma_low, sigma_high = spec.blur_sigma
    return AugmentParams(
        spec=spec,
        jitter=jitter < spec.jitter_prob,
        order=order_keys.argsort(dim=1),
        factors=torch.stack([low + (high - low) * factors[:, i] for i, (low, high) in enumerate(ranges)], dim=1),
        grayscale=grayscale < spec.grayscale_prob,
        blur=blur < spec.blur_prob,
        sigma=sigma_low + (sigma_high - sigma_low) * sigma,
        solarize=solarize < spec.solarize_prob,
        flip=flip < spec.flip_prob,
    )


def draw_params(batch: int, spec: ViewSpec, generator: torch.Generator) -> AugmentParams:
    """Draw one view's parameters for `batch` samples on `generator.device` (no host sync)."""
    return params_from_uniforms(spec, param_uniforms(batch, generator))


def apply(images: torch.Tensor, params: AugmentParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Augment `(B, 3, H, W)` images (float in [0, 1], or uint8) with `params`; returns the
    normalised view in `dtype`. Ops whose probability is 0 in the spec are skipped outright."""
    if params.spec.flip_prob > 0:
        # The flip commutes with every other op (all are pointwise or mirror-symmetric), so it is
        # done first, while the images may still be uint8.
        width = images.shape[-1]
        columns = torch.arange(width, device=images.device)
        columns = torch.where(params.flip[:, None], width - 1 - columns, columns)
        images = images.gather(-1, columns[:, None, None, :].expand_as(images))
    return colour_and_normalise(images, params, dtype)


def colour_and_normalise(images: torch.Tensor, params: AugmentParams, dtype: torch.dtype) -> torch.Tensor:
    """Every op of `apply` but the flip (which the caller has done, e.g. inside the crop)."""
    spec = params.spec
    x = images.to(torch.float32) / 255 if images.dtype == torch.uint8 else images.to(torch.float32)
    if spec.jitter_prob > 0:
        x = _color_jitter(x, params)
    if spec.grayscale_prob > 0:
        x = torch.where(_per_sample(params.grayscale), TF.rgb_to_grayscale(x), x)
    if spec.blur_prob > 0:
        x = _gaussian_blur(x, params.sigma, params.blur, spec.blur_sigma[1])
    if spec.solarize_prob > 0:
        threshold = torch.where(params.solarize, SOLARIZE_THRESHOLD, 2.0)  # 2: above every value, no inversion
        x = torch.where(x >= _per_sample(threshold), 1 - x, x)
    return normalise(x, dtype)


def augment(images: torch.Tensor, spec: ViewSpec, generator: torch.Generator,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`apply(images, draw_params(...))`: one augmented, normalised view of a cropped batch."""
    return apply(images, draw_params(images.shape[0], spec, generator), dtype)


def random_augment(images: torch.Tensor, uniforms: torch.Tensor, spec: ViewSpec,
                   dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`apply` with the parameters made from `param_uniforms` inside: what the ffcv backend compiles,
    one graph per view with its parameters. Returns the view and its decisions (`Batch.params`)."""
    params = params_from_uniforms(spec, uniforms)
    return apply(images, params, dtype), params.decisions()


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """`(B,)` -> `(B, 1, 1, 1)`, to broadcast a per-sample value over an image batch."""
    return values.view(-1, 1, 1, 1)


def _color_jitter(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """torchvision's ColorJitter with a per-sample op order, in 7 batched steps.

    Brightness, contrast and saturation are all `clamp(x·f + (1−f)·target)` (target 0, the
    mean luma, the luma), so one batched step can run a different one of them per sample. Hue
    (an RGB->HSV->RGB round trip, the expensive op) runs in one step, slot 3: each sample's
    order is shifted so that its hue op lands there, its earlier ops in slots 0–2 and its later
    ones in slots 4–6; empty slots and unjittered samples get factor 1, an exact identity.
    """
    batch = x.shape[0]
    hue_position = (params.order == HUE).int().argmax(dim=1, keepdim=True)
    slots = torch.full((batch, 7), -1, dtype=torch.long, device=x.device)
    slots.scatter_(1, torch.arange(4, device=x.device) + 3 - hue_position, params.order)
    slots = torch.where(params.jitter[:, None], slots, -1)
    identity = torch.ones(batch, 1, device=x.device)
    blend_factors = torch.cat([params.factors[:, :HUE], identity], dim=1)  # column HUE = "no op"
    factors = blend_factors.gather(1, torch.where(slots < 0, HUE, slots))  # (B, 7), 1 in empty slots
    # Each slot's target times (1 − f): the luma for saturation, its mean for contrast, 0 for brightness.
    luma_weight = torch.where(slots == SATURATION, 1 - factors, 0.0)
    mean_weight = torch.where(slots == CONTRAST, 1 - factors, 0.0)
    for slot in range(7):
        if slot == 3:
            x = torch.where(_per_sample(params.jitter), _adjust_hue(x, params.factors[:, HUE]), x)
            continue
        gray = TF.rgb_to_grayscale(x)
        mean = gray.mean(dim=(-2, -1), keepdim=True)
        target = torch.addcmul(mean * _per_sample(mean_weight[:, slot]), gray, _per_sample(luma_weight[:, slot]))
        x = torch.addcmul(target, x, _per_sample(factors[:, slot])).clamp_(0, 1)
    return x


def _adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """torchvision's `adjust_hue` (RGB -> HSV, hue += factor mod 1, HSV -> RGB) with a
    per-sample factor; torchvision's only takes one. Same hue formula as torchvision's
    `_rgb_to_hsv`; the way back is the closed form `v − chroma·clamp(min(k, 4 − k), 0, 1)`,
    `k = (n + 6·hue) mod 6` for n = 5, 3, 1 (R, G, B), which needs no per-pixel sector lookup.
    The shift folds into `k`: the shifted `6·hue` is `(sector + 6·factor) mod 6`, and `k`'s own
    `mod 6` absorbs that one, so a single `mod` runs over the whole image.

    That `mod` is `a − 6·floor(a / 6)`: on its range (a in [−3, 13]) it gives `torch.remainder`'s
    values, and compiled it is a few vector instructions, where inductor's `remainder` (a
    Python-style floor-mod) made this op 5× slower on a CPU."""
    value = x.amax(dim=1, keepdim=True)
    chroma = value - x.amin(dim=1, keepdim=True)
    red, green, blue = x.unbind(dim=1)
    value_plane, chroma_plane = value[:, 0], chroma[:, 0]
    # torchvision's `bc − gc`, `2 + rc − bc`, `4 + gc − rc` (rc = (value − red) / chroma, …), as
    # channel differences over the chroma: one division of a plane instead of one per channel.
    sector = torch.where(value_plane == red, green - blue,
                         torch.where(value_plane == green, 2 * chroma_plane + blue - red, 4 * chroma_plane + red - green))
    sector = sector / torch.where(chroma_plane > 0, chroma_plane, 1.0)
    shifted = (sector + 6 * hue.view(-1, 1, 1))[:, None]  # in [-4, 8]: sector in [-1, 5], |hue| <= 0.5
    k = _mod(channel_constant(HUE_OFFSETS, x.device) + shifted, 6)
    return value - chroma * torch.minimum(k, 4 - k).clamp_(0, 1)


def _mod(a: torch.Tensor, m: float) -> torch.Tensor:
    """`a mod m` in [0, m) for a positive `m`."""
    return a - m * torch.floor(a / m)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, active: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, per-sample `sigma` where `active` (a delta kernel elsewhere).

    The kernel is the sampled, normalised Gaussian torchvision uses, with radius
    `ceil(3·max_sigma)` for every sample (13 taps for sigma <= 2). The published code calls
    PIL's `GaussianBlur(radius=sigma)`, whose `radius` is this standard deviation; PIL
    approximates the Gaussian by three box blurs and repeats edge pixels, so padding here is
    `replicate` (torchvision pads `reflect`, which was further from PIL). Measured on a 32-px
    image, this differs from PIL by ~0.5/255 on average, at most ~2.5/255 inside the image and
    ~8/255 at its border for sigma >= 1.5, where the box approximation is coarsest.

    Each pass is a batched matmul with a per-sample `(S, S)` matrix (`_blur_matrix`) that holds
    the padding in its edge columns, as the crop's resampling is: on a CPU 1.4–1.7× faster than
    the grouped convolution of the padded planes it replaces (oneDNN runs `B·C` tiny groups), and
    equal to it within float rounding (~3e-7).
    """
    batch, channels, height, width = x.shape
    radius = math.ceil(3 * max_sigma)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2)
    kernel = torch.where(active[:, None], kernel / kernel.sum(dim=1, keepdim=True), (taps == 0).float())
    cdf = F.pad(kernel.cumsum(dim=1), (1, 0))  # cdf[:, t + radius + 1] = the weight of taps <= t
    across = _blur_matrix(cdf, width)
    down = across if height == width else _blur_matrix(cdf, height)
    out = torch.bmm(x.reshape(batch, channels * height, width), across.transpose(1, 2))
    return down[:, None] @ out.view(batch, channels, height, width)


def _blur_matrix(cdf: torch.Tensor, size: int) -> torch.Tensor:
    """`(B, size, size)` matrices `M` with `M @ v` the blur of `v` along one axis, edge pixels
    repeated: `M[i, j]` is the weight of every tap `t` that reads pixel `j` from output pixel `i`,
    i.e. with `clamp(i + t, 0, size − 1) = j`. Those taps are one (`t = j − i`), or, in the edge
    columns, every `t` beyond the edge, so each entry is a difference of the kernel's cumulative
    sums `cdf` (`(B, 2·radius + 2)`, with a leading 0)."""
    radius = (cdf.shape[1] - 2) // 2
    i = torch.arange(size, device=cdf.device)[:, None]
    j = torch.arange(size, device=cdf.device)[None, :]
    last = torch.where(j == size - 1, radius, j - i)  # the largest tap landing on j
    before = torch.where(j == 0, -radius, j - i) - 1  # the largest tap before the first landing on j
    index = (torch.stack([last, before]) + radius + 1).clamp_(0, 2 * radius + 1)
    below = cdf.index_select(1, index.flatten()).view(-1, 2, size, size)
    return below[:, 0] - below[:, 1]
