"""Batched view augmentations (`loaders.augment`, `loaders.crop`) against torchvision and PIL
applied to each sample with the same parameters, and the recipe's rates (docs/method.md §6)."""
import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T1
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode

from loaders.augment import (BRIGHTNESS, CONTRAST, HUE, SATURATION, SOLARIZE_THRESHOLD, ViewSpec, _mod, apply,
                             augment, draw_params, param_uniforms, random_augment, recipe_views)
from loaders.crop import (box_uniforms, centre_view, crop_boxes, make_view, padded_images, random_resized_crop,
                          random_view, resized_crop)
from loaders.device import view_function
from loaders.eval_view import IMAGENET_MEAN, IMAGENET_STD, eval_view

# Every op off: `apply` only normalises. Tests switch on the op they check.
PLAIN = ViewSpec(16, (0.5, 1.0), jitter_prob=0.0, grayscale_prob=0.0, flip_prob=0.0)
ADJUST = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast,
          SATURATION: TF.adjust_saturation, HUE: TF.adjust_hue}
TOL = 1e-5


def _images(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """uint8-valued float images with grey pixels and ties between channels (HSV edge cases)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, 3, size, size), generator=gen).float() / 255
    x[:, :, :2] = x[:, :1, :2]  # grey rows: max == min
    x[:, 1, 2:4] = x[:, 0, 2:4]  # red == green
    x[:, 2, 4:6] = x[:, 1, 4:6]  # green == blue
    return x


def _smooth(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth float images inside [0.1, 0.9], so bicubic overshoot is never clamped."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch, 3, height, width, generator=gen)
    return 0.1 + 0.8 * F.avg_pool2d(noise, 5, stride=1, padding=2, count_include_pad=False)


def _params(spec: ViewSpec, batch: int, seed: int = 0, **fields: torch.Tensor):
    """Drawn parameters with some fields overridden."""
    params = draw_params(batch, spec, torch.Generator().manual_seed(seed))
    return dataclasses.replace(params, **fields)


def _normalise(image: torch.Tensor) -> torch.Tensor:
    return TF.normalize(image, list(IMAGENET_MEAN), list(IMAGENET_STD))


def _mask(batch: int) -> torch.Tensor:
    return torch.arange(batch) % 2 == 0


def _blur_reference(image: torch.Tensor, sigma: float, radius: int = 6) -> torch.Tensor:
    """Direct 2-D float64 convolution with the sampled Gaussian, edges replicated."""
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = torch.outer(kernel, kernel) / kernel.sum() ** 2
    padded = F.pad(image[:, None].double(), (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel[None, None])[:, 0].float()


def _jitter_reference(image: torch.Tensor, params, b: int) -> torch.Tensor:
    """torchvision's ColorJitter on one sample with that sample's order and factors."""
    factors = params.factors[b].tolist()
    return T.ColorJitter(0.4, 0.4, 0.2, 0.1).transform(image, dict(
        fn_idx=params.order[b], brightness_factor=factors[BRIGHTNESS], contrast_factor=factors[CONTRAST],
        saturation_factor=factors[SATURATION], hue_factor=factors[HUE]))


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = TOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------
# The recipe's views
# ---------------------------------------------------------------------------------------------
def test_recipe_views_follow_section_6():
    views = recipe_views(224, (0.35, 1.0), local_crops=8, local_size=96, local_scale=(0.05, 0.35))
    assert len(views) == 10
    view1, view2, local = views[0], views[1], views[2]
    assert (view1.size, view1.scale, view1.blur_prob, view1.solarize_prob) == (224, (0.35, 1.0), 1.0, 0.0)
    assert (view2.size, view2.scale, view2.blur_prob, view2.solarize_prob) == (224, (0.35, 1.0), 0.1, 0.2)
    assert (local.size, local.scale, local.blur_prob, local.solarize_prob) == (96, (0.05, 0.35), 0.5, 0.0)
    assert all(v == local for v in views[2:])
    for view in views:
        assert view.ratio == (3 / 4, 4 / 3) and view.jitter == (0.4, 0.4, 0.2, 0.1)
        assert (view.jitter_prob, view.grayscale_prob, view.flip_prob, view.blur_sigma) == (0.8, 0.2, 0.5, (0.1, 2.0))
    assert len(recipe_views(32, (0.1, 1.0))) == 2


def test_view_spec_rejects_bad_values():
    with pytest.raises(ValueError):
        ViewSpec(32, (0.1, 1.0), flip_prob=1.5)
    with pytest.raises(ValueError):
        ViewSpec(32, (0.1, 1.0), jitter=(0.4, 0.4, 0.2, 0.6))


# ---------------------------------------------------------------------------------------------
# Each op, per sample, against torchvision / PIL
# ---------------------------------------------------------------------------------------------
def test_normalise_only():
    x = _images(4)
    before = x.clone()
    _close(apply(x, _params(PLAIN, 4)), _normalise(x))
    assert torch.equal(x, before)  # the input is never modified


def test_uint8_input_equals_float_input():
    x = _images(4)
    params = _params(recipe_views(16, (0.5, 1.0))[1], 4)
    _close(apply((x * 255).round().to(torch.uint8), params), apply(x, params))


@pytest.mark.parametrize("op", [BRIGHTNESS, CONTRAST, SATURATION, HUE])
def test_each_jitter_op_matches_torchvision(op):
    batch = 8
    spec = dataclasses.replace(PLAIN, jitter_prob=1.0)
    params = _params(spec, batch)
    factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(batch, 1)
    factors[:, op] = params.factors[:, op]
    params = dataclasses.replace(params, factors=factors)
    x = _images(batch)
    out = apply(x, params)
    for b in range(batch):
        _close(out[b], _normalise(ADJUST[op](x[b], factors[b, op].item())))


def test_hue_mod_equals_torch_remainder_on_its_range():
    """The hue shift's cheap `mod` (`a − 6·floor(a/6)`) gives `torch.remainder`'s values on the range
    it is used on: offset + sector + 6·hue in [−3, 13], integers and their neighbours included (a sum
    with an offset of at least 1, so never a subnormal: those are left out)."""
    a = torch.rand(2_000_000, generator=torch.Generator().manual_seed(0)) * 16 - 3
    edges = torch.arange(-3.0, 14.0)
    edges = edges[edges != 0]
    neighbours = torch.cat([edges, torch.nextafter(edges, edges - 1), torch.nextafter(edges, edges + 1)])
    a = torch.cat([a, neighbours, torch.tensor([-1e-8, 1e-8, 6 - 1e-7, 12 - 1e-6])])
    assert torch.equal(_mod(a, 6), torch.remainder(a, 6))


def test_jitter_in_every_order_matches_torchvision_color_jitter():
    orders = torch.tensor(list(itertools.permutations(range(4))))  # all 24 orders
    batch = len(orders) + 4
    spec = dataclasses.replace(PLAIN, jitter_prob=0.8)
    jitter = torch.arange(batch) < len(orders)  # the last 4 samples are not jittered
    params = _params(spec, batch, jitter=jitter, order=torch.cat([orders, orders[:4]]))
    x = _images(batch)
    out = apply(x, params)
    for b in range(batch):
        expected = _jitter_reference(x[b], params, b) if jitter[b] else x[b]
        _close(out[b], _normalise(expected))


@pytest.mark.parametrize("op,reference", [("grayscale", lambda x: TF.rgb_to_grayscale(x, 3)),
                                           ("solarize", lambda x: TF.solarize(x, SOLARIZE_THRESHOLD)),
                                           ("flip", TF.horizontal_flip)])
def test_masked_op_matches_torchvision(op, reference):
    batch = 6
    mask = _mask(batch)
    params = _params(dataclasses.replace(PLAIN, **{f"{op}_prob": 0.5}), batch, **{op: mask})
    x = _images(batch)
    out = apply(x, params)
    for b in range(batch):
        _close(out[b], _normalise(reference(x[b]) if mask[b] else x[b]))


def test_solarize_matches_pil():
    batch = 6
    params = _params(dataclasses.replace(PLAIN, solarize_prob=0.2), batch, solarize=_mask(batch))
    pixels = torch.randint(0, 256, (batch, 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    pixels[:, :, 0, :2] = torch.tensor([127, 128], dtype=torch.uint8)  # either side of PIL's threshold
    out = apply(pixels, params)
    for b in range(batch):
        image = Image.fromarray(pixels[b].permute(1, 2, 0).numpy())
        expected = ImageOps.solarize(image, 128) if params.solarize[b] else image
        _close(out[b], _normalise(torch.from_numpy(np.array(expected)).permute(2, 0, 1) / 255))


@pytest.mark.parametrize("height, width", [(16, 16), (7, 12), (5, 5), (1, 1)])
def test_blur_matches_float64_gaussian_and_leaves_others_alone(height, width):
    """Also on images narrower than the 13-tap kernel, where most taps read a repeated edge."""
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0, 1.3])
    blur = torch.tensor([True, True, True, True, True, False])
    params = _params(dataclasses.replace(PLAIN, blur_prob=0.5), len(sigma), blur=blur, sigma=sigma)
    x = _images(len(sigma))[..., :height, :width]
    out = apply(x, params)
    for b in range(len(sigma)):
        _close(out[b], _normalise(_blur_reference(x[b], sigma[b].item()) if blur[b] else x[b]))


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_blur_is_close_to_pil_gaussian_blur(sigma):
    """The published code blurs with PIL's GaussianBlur(radius=sigma): three box blurs and uint8
    rounding, so only close: under 1/255 on average over a 32-px image, edges included."""
    x = (_smooth(1, 32, 32) * 255).round() / 255
    x = x + torch.linspace(0, 0.1, 32)  # a gradient, so the edge handling matters
    x = (x.clamp(0, 1) * 255).round() / 255
    params = _params(dataclasses.replace(PLAIN, blur_prob=1.0), 1, sigma=torch.tensor([sigma]))
    ours = apply(x, params)[0] * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    image = Image.fromarray((x[0] * 255).round().byte().permute(1, 2, 0).numpy())
    pil = torch.from_numpy(np.array(image.filter(ImageFilter.GaussianBlur(radius=sigma)))).permute(2, 0, 1) / 255
    assert (ours - pil).abs().mean() < 1 / 255


def test_whole_view_matches_torchvision_ops_in_recipe_order():
    batch = 16
    spec = recipe_views(16, (0.5, 1.0))[1]  # every op possible
    params = _params(spec, batch, seed=3, grayscale=_mask(batch), solarize=_mask(batch).roll(1),
                     blur=torch.arange(batch) % 3 == 0)
    x = _images(batch, seed=3)
    out = apply(x, params, dtype=torch.float32)
    for b in range(batch):
        y = _jitter_reference(x[b], params, b) if params.jitter[b] else x[b]
        y = TF.rgb_to_grayscale(y, 3) if params.grayscale[b] else y
        y = _blur_reference(y, params.sigma[b].item()) if params.blur[b] else y
        y = TF.solarize(y, SOLARIZE_THRESHOLD) if params.solarize[b] else y
        y = TF.horizontal_flip(y) if params.flip[b] else y
        _close(out[b], _normalise(y))


# ---------------------------------------------------------------------------------------------
# Rates, ranges, determinism, dtypes
# ---------------------------------------------------------------------------------------------
def _assert_rate(mask: torch.Tensor, p: float) -> None:
    """Observed rate within 5 binomial standard deviations; exact when p is 0 or 1."""
    n = mask.numel()
    rate = mask.float().mean().item()
    assert abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / n), (rate, p)


@pytest.mark.parametrize("view", range(3), ids=["view1", "view2", "local"])
def test_drawn_rates_and_ranges_follow_the_recipe(view):
    n = 4000
    spec = recipe_views(32, (0.1, 1.0), local_crops=1, local_size=16)[view]
    params = draw_params(n, spec, torch.Generator().manual_seed(view))
    _assert_rate(params.jitter, 0.8)
    _assert_rate(params.grayscale, 0.2)
    _assert_rate(params.blur, [1.0, 0.1, 0.5][view])
    _assert_rate(params.solarize, [0.0, 0.2, 0.0][view])
    _assert_rate(params.flip, 0.5)
    # Orders are permutations, each op equally likely at each position.
    assert (params.order.sort(dim=1).values == torch.arange(4)).all()
    for position in range(4):
        _assert_rate(params.order[:, position] == HUE, 0.25)
    for column, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        factor = params.factors[:, column]
        assert low <= factor.min() and factor.max() <= high
        assert abs(factor.mean() - (low + high) / 2) < 5 * (high - low) / math.sqrt(12 * n)
    assert 0.1 <= params.sigma.min() and params.sigma.max() <= 2.0


def test_same_generator_state_same_view():
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    spec = recipe_views(24, (0.1, 1.0))[1]

    def view(seed):
        gen = torch.Generator().manual_seed(seed)
        crops, boxes = random_resized_crop(images, spec, gen)
        return augment(crops, spec, gen), boxes

    (first, boxes), (again, boxes_again), (other, _) = view(5), view(5), view(6)
    assert torch.equal(first, again) and torch.equal(boxes, boxes_again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_output_shapes_and_dtypes(dtype):
    images = torch.randint(0, 256, (5, 3, 40, 30), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    for spec in recipe_views(24, (0.35, 1.0), local_crops=1, local_size=12):
        crops, boxes = random_resized_crop(images, spec, gen)
        assert crops.shape == (5, 3, spec.size, spec.size) and crops.dtype == torch.float32
        assert 0 <= crops.min() and crops.max() <= 1
        assert boxes.shape == (5, 4) and boxes.dtype == torch.int64
        out = augment(crops, spec, gen, dtype=dtype)
        assert out.shape == (5, 3, spec.size, spec.size) and out.dtype == dtype


# ---------------------------------------------------------------------------------------------
# Random-resized crop
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width,scale", [(32, 32, (0.1, 1.0)), (40, 24, (0.05, 0.35)), (30, 50, (0.35, 1.0))])
def test_crop_boxes_inside_image_with_recipe_area_and_ratio(height, width, scale):
    ratio = (3 / 4, 4 / 3)
    top, left, h, w = crop_boxes(4000, height, width, scale, ratio, torch.Generator().manual_seed(0)).double().T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # w and h are rounded from sqrt(area·ratio) and sqrt(area/ratio): allow half a pixel each.
    area = height * width
    assert ((w - 0.5) * (h - 0.5) <= scale[1] * area).all() and ((w + 0.5) * (h + 0.5) >= scale[0] * area).all()
    assert ((w - 0.5) / (h + 0.5) <= ratio[1]).all() and ((w + 0.5) / (h - 0.5) >= ratio[0]).all()


@pytest.mark.parametrize("height,width,scale", [(32, 32, (0.1, 1.0)), (40, 24, (0.05, 0.35))])
def test_crop_boxes_distributed_like_torchvision(height, width, scale):
    ratio = (3 / 4, 4 / 3)
    ours = crop_boxes(4000, height, width, scale, ratio, torch.Generator().manual_seed(1)).double()
    torch.manual_seed(1)
    image = torch.empty(3, height, width)
    theirs = torch.tensor([T1.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(2000)],
                          dtype=torch.float64)
    for stat in (lambda b: b[:, 2] * b[:, 3], lambda b: torch.log(b[:, 3] / b[:, 2]),
                 lambda b: b[:, 0] / height, lambda b: b[:, 1] / width):
        a, b = stat(ours), stat(theirs)
        assert abs(a.mean() - b.mean()) < 5 * math.sqrt(a.var() / len(a) + b.var() / len(b))


def test_crop_boxes_fall_back_to_torchvision_centre_crop():
    for height, width in [(8, 32), (32, 8)]:  # no box of area >= 0.9·H·W fits the ratio range
        boxes = crop_boxes(16, height, width, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
        expected = T1.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.9, 1.0], [3 / 4, 4 / 3])
        assert (boxes == torch.tensor(expected)).all()


def test_full_box_at_same_size_reproduces_the_image():
    x = _images(3, size=32)
    full = torch.tensor([[0, 0, 32, 32]] * 3)
    _close(resized_crop(x, full, 32), x, atol=1e-6)
    _close(resized_crop((x * 255).round().to(torch.uint8), full, 32), x, atol=1e-6)


@pytest.mark.parametrize("height,width,size", [(32, 32, 32), (64, 48, 24), (40, 56, 96), (60, 52, 11)])
def test_resized_crop_matches_torchvision_antialiased_bicubic(height, width, size):
    """Random boxes, and the whole image: the strongest shrink, whose cubic is the widest (the
    weights are computed on a band of taps sized for it)."""
    x = _smooth(7, height, width)
    boxes = crop_boxes(6, height, width, (0.05, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    boxes = torch.cat([boxes, torch.tensor([[0, 0, height, width]])])
    out = resized_crop(x, boxes, size)
    for b, (top, left, h, w) in enumerate(boxes.tolist()):
        expected = TF.resized_crop(x[b], top, left, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True)
        _close(out[b], expected)


@pytest.mark.parametrize("height,width,size", [(32, 32, 32), (64, 48, 24), (40, 56, 96)])
def test_resized_crop_matches_pil_bicubic(height, width, size):
    """The published pipeline: PIL crop + resize(BICUBIC) on uint8, equal to its rounding."""
    pixels = (_smooth(6, height, width, seed=2) * 255).round().to(torch.uint8)
    boxes = crop_boxes(6, height, width, (0.05, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(2))
    out = resized_crop(pixels, boxes, size)
    for b, (top, left, h, w) in enumerate(boxes.tolist()):
        image = Image.fromarray(pixels[b].permute(1, 2, 0).numpy())
        pil = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
        _close(out[b], torch.from_numpy(np.array(pil)).permute(2, 0, 1) / 255, atol=1.5 / 255)


# ---------------------------------------------------------------------------------------------
# One view as one compiled graph (what the memory and ffcv backends run on CUDA)
# ---------------------------------------------------------------------------------------------
def _view_inputs(seed: int = 0):
    images = torch.randint(0, 256, (8, 3, 40, 36), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    spec = recipe_views(24, (0.1, 1.0))[1]  # every op possible
    gen = torch.Generator().manual_seed(seed)
    boxes = crop_boxes(8, 40, 36, spec.scale, spec.ratio, gen)
    return images, boxes, _params(spec, 8, seed=seed, flip=_mask(8), blur=_mask(8).roll(1))


def test_make_view_folds_the_flip_into_the_crop():
    images, boxes, params = _view_inputs()
    expected = apply(resized_crop(images, boxes, params.spec.size), params)
    _close(make_view(images, boxes, params, torch.float32), expected)


def test_uint8_views_flip_before_the_float_conversion():
    images, boxes, params = _view_inputs(1)
    crops = (resized_crop(images, boxes, params.spec.size) * 255).round().to(torch.uint8)
    _close(apply(crops, params), apply(crops.float() / 255, params))


def _uniform_inputs(seed: int = 0):
    """Full images, a view spec and one view's uniforms, as the backends draw them."""
    images, _, params = _view_inputs(seed)
    generator = torch.Generator().manual_seed(seed)
    return images, box_uniforms(8, generator), param_uniforms(8, generator), params.spec


def test_random_view_is_the_drawn_boxes_and_params_made_into_a_view():
    """`random_view` (what the memory backend compiles) equals `make_view` of `crop_boxes` and
    `draw_params` drawn from the same generator, and reports their areas and decisions."""
    images, box_u, param_u, spec = _uniform_inputs()
    generator = torch.Generator().manual_seed(0)
    boxes = crop_boxes(8, 40, 36, spec.scale, spec.ratio, generator)
    params = draw_params(8, spec, generator)
    view, reported = random_view(images, box_u, param_u, spec, torch.float32)
    assert torch.equal(view, make_view(images, boxes, params, torch.float32))
    assert torch.equal(reported["area"], boxes[:, 2] * boxes[:, 3] / (40 * 36))
    assert reported.keys() - {"area"} == params.decisions().keys()
    assert all(torch.equal(reported[k], v) for k, v in params.decisions().items())
    crops = (resized_crop(images, boxes, spec.size) * 255).round().to(torch.uint8)
    augmented, decisions = random_augment(crops, param_u, spec, torch.float32)
    assert torch.equal(augmented, apply(crops, params)) and decisions.keys() == params.decisions().keys()


SIZES = [(40, 36), (23, 51), (60, 60), (9, 14)]  # images of different sizes, padded to (60, 60)


def _packed(seed: int = 0, smooth: bool = False) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Uint8 images of `SIZES` (random bytes, or `_smooth`) and their rows as FFCV's whole-image
    decoder packs them: each image's `(h, w, 3)` pixels at the start of its row, random bytes after;
    and their `(B, 2)` sizes."""
    generator = torch.Generator().manual_seed(seed)
    images = [(_smooth(1, h, w, seed + i)[0] * 255).round().to(torch.uint8) if smooth
              else torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
              for i, (h, w) in enumerate(SIZES)]
    rows = torch.randint(0, 256, (len(SIZES), 3 * 60 * 60), generator=generator, dtype=torch.uint8)
    for row, image in zip(rows, images):
        row[:image.numel()] = image.permute(1, 2, 0).flatten()
    return images, rows, torch.tensor(SIZES)


def test_padded_images_unpack_each_row_into_its_image():
    images, rows, sizes = _packed()
    padded = padded_images(rows, sizes, 60, 60)
    assert padded.shape == (4, 3, 60, 60) and padded.dtype == torch.float32
    assert all(torch.equal(padded[i, :, :h, :w], image / 255) for i, ((h, w), image) in enumerate(zip(SIZES, images)))


def test_random_view_of_padded_images_is_each_image_on_its_own():
    """What the ffcv backend makes with `data.device_crops`: views of images of different sizes padded
    to one. Each equals `random_view` of its image alone from its own uniforms (up to matmul
    summation order): boxes stay inside their image, whatever the padding holds; areas are
    fractions of each image's own size."""
    images, rows, sizes = _packed(1)
    spec = dataclasses.replace(recipe_views(24, (0.35, 1.0), 0, 16, (0.05, 0.35))[1], blur_prob=0.5)
    generator = torch.Generator().manual_seed(1)
    box_u, param_u = box_uniforms(4, generator), param_uniforms(4, generator)
    views, reported = random_view(padded_images(rows, sizes, 60, 60), box_u, param_u, spec, torch.float32, sizes)
    for i, image in enumerate(images):
        alone, expected = random_view(image[None], box_u[i:i + 1], param_u[i:i + 1], spec, torch.float32)
        _close(views[i:i + 1], alone, atol=1e-5)
        assert all(torch.equal(reported[k][i:i + 1], expected[k]) for k in expected)


@pytest.mark.parametrize("size", [24, 32])
def test_centre_view_of_padded_images_matches_pil_eval_view(size):
    """What the ffcv backend evaluates with `data.device_crops`: the published evaluation view (PIL's
    bicubic resize of the short side to `size·256/224`, centre crop) of images of different sizes
    padded to one: wide, tall, square, shrunk, at scale 1 and enlarged. Equal to `eval_view` of each
    PIL image up to PIL's two uint8 roundings, whatever the padding holds."""
    images, rows, sizes = _packed(5, smooth=True)
    views = centre_view(padded_images(rows, sizes, 60, 60), sizes, size, torch.float32)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for view, image in zip(views, images):
        expected = eval_view(Image.fromarray(image.permute(1, 2, 0).numpy()), size)
        _close(view * std, expected * std, atol=1.5 / 255)


@pytest.mark.parametrize("fn", ["random_view", "random_augment", "padded", "centre"])
def test_view_compiles_to_one_graph_equal_to_eager(fn):
    """What the backends compile, drawing included (`padded`: ffcv's with `data.device_crops`, the
    unpacking of the rows and a view of the padded images; `centre`: its evaluation view):
    fullgraph=True, so dynamo would raise at a graph break (a host read, a data-dependent shape).
    The `aot_eager` backend runs the traced graph with eager kernels, so it must equal eager exactly."""
    images, box_u, param_u, spec = _uniform_inputs(2)
    torch._dynamo.reset()
    if fn == "random_view":
        function, args = random_view, (images, box_u, param_u, spec, torch.bfloat16)
    elif fn == "random_augment":
        function, args = random_augment, (images, param_u, spec, torch.bfloat16)
    elif fn == "centre":
        _, rows, sizes = _packed(2)

        def function(rows, sizes):
            return centre_view(padded_images(rows, sizes, 60, 60), sizes, 24, torch.bfloat16), {}

        args = rows, sizes
    else:
        _, rows, sizes = _packed(2)

        def function(rows, sizes, box_u, param_u):
            return random_view(padded_images(rows, sizes, 60, 60), box_u, param_u, spec, torch.bfloat16, sizes)

        args = rows, sizes, box_u[:4], param_u[:4]
    eager, eager_decisions = function(*args)
    compiled, decisions = torch.compile(function, fullgraph=True, dynamic=False, backend="aot_eager")(*args)
    assert compiled.dtype == torch.bfloat16 and torch.equal(compiled, eager)
    assert all(torch.equal(decisions[k], eager_decisions[k]) for k in eager_decisions)


@pytest.mark.slow
@pytest.mark.parametrize("padded", [False, True])
def test_view_compiled_by_inductor_matches_eager(padded):
    """The real compiler as the loaders call it (C++ kernels on CPU, Triton on CUDA): equal to eager up
    to fp32 reassociation; `padded`: ffcv's device crops, the rows' unpacking compiled too, and its
    evaluation view."""
    images, box_u, param_u, spec = _uniform_inputs(3)
    sizes = None
    torch._dynamo.reset()
    if padded:
        _, rows, sizes = _packed(3)
        box_u, param_u = box_u[:4], param_u[:4]
        images = padded_images(rows, sizes, 60, 60)
        assert torch.equal(view_function(padded_images, rows.device, True)(rows, sizes, 60, 60), images)
        _close(view_function(centre_view, images.device, True)(images, sizes, 24, torch.float32),
               centre_view(images, sizes, 24, torch.float32))
    compiled, _ = view_function(random_view, images.device, True)(images, box_u, param_u, spec, torch.float32, sizes)
    _close(compiled, random_view(images, box_u, param_u, spec, torch.float32, sizes)[0])


def test_compiled_view_builds_no_tensor_from_host_data():
    """The constants reach the graph as inputs (made once per device), never as `torch.tensor(list)`
    inside it, which on CUDA would be a host-to-device copy per call."""
    images, box_u, param_u, spec = _uniform_inputs(4)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(random_view, fullgraph=True, dynamic=False, backend=capture)(images, box_u, param_u, spec,
                                                                               torch.float32)
    (graph,) = graphs
    targets = {node.target for node in graph.graph.nodes if node.op == "call_function"}
    assert not targets & {torch.tensor, torch.as_tensor, torch.from_numpy}, targets
