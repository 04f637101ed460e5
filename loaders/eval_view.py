"""The evaluation view, in one place: short side resized to `size·256/224` (bicubic), centre crop
`size`, ImageNet normalisation (docs/method.md §7).

`eval_view` is the PIL reference (the torchvision backend, kNN, linear and fine-tune protocols);
`eval_views` is its batched uint8-tensor twin (memory backend); the FFCV and DALI backends resize
the window `eval_window` of each image. `normalise` is the one uint8 → normalised conversion.
"""
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as TF2
from PIL import Image

from loaders.device import channel_constant

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_resize_length(size: int) -> int:
    """The short side the image is resized to before the centre crop of `size`."""
    return int(size * 256 / 224)


def eval_window(heights: torch.Tensor, widths: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The window of each `(heights[i], widths[i])` image that the evaluation view shows, as float64
    `(B, 2)` `(y, x)` starts and ends in input pixels: torchvision's `Resize(eval_resize_length(size))`
    (short side to that length, long side `int(short·long/short)`) then `CenterCrop(size)` (offset
    `round((resized − size)/2)`, half to even), mapped back through the resize's scale."""
    short = eval_resize_length(size)
    heights, widths = heights.double(), widths.double()
    portrait = widths <= heights  # torchvision's `short, long = (w, h) if w <= h else (h, w)`
    new_h = torch.where(portrait, torch.floor(short * heights / widths), short)
    new_w = torch.where(portrait, short, torch.floor(short * widths / heights))
    top, left = torch.round((new_h - size) / 2), torch.round((new_w - size) / 2)
    scale_y, scale_x = heights / new_h, widths / new_w
    start = torch.stack([top * scale_y, left * scale_x], dim=1)
    end = torch.stack([(top + size) * scale_y, (left + size) * scale_x], dim=1)
    return start, end


def normalise(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 `(…, 3, H, W)` in [0, 255] (or float in [0, 1]) -> ImageNet-normalised `dtype`."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    mean, std = (channel_constant(values, images.device) for values in (IMAGENET_MEAN, IMAGENET_STD))
    return ((x - mean) / std).to(dtype)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> ImageNet-normalised float32 `(3, H, W)`."""
    return TF.normalize(TF.to_tensor(image), list(IMAGENET_MEAN), list(IMAGENET_STD))


def eval_view(image: Image.Image, size: int) -> torch.Tensor:
    """The evaluation view of one PIL image (the reference every backend matches)."""
    image = TF.resize(image, eval_resize_length(size), T.InterpolationMode.BICUBIC)
    return to_tensor(TF.center_crop(image, size))


def eval_views(images: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """The evaluation view of a uint8 `(B, 3, H, W)` batch, on its device."""
    resized = TF2.resize(images, [eval_resize_length(size)], TF2.InterpolationMode.BICUBIC, antialias=True)
    return normalise(TF2.center_crop(resized, [size]), dtype)
