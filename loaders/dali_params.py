"""The host side of the DALI backend: a batch's encoded images and every per-sample random
parameter of its views, as the arrays the DALI graph (loaders/dali_backend.py) takes as inputs.

Parameters are drawn vectorised per batch on a CPU `torch.Generator` seeded by
`derive_seed(seed, epoch, rank, batch)`, with the functions the device backends use:
`crop_boxes` (torchvision's 10-attempt `RandomResizedCrop` rule, per-sample image sizes read
from the JPEG headers) and `draw_params` (jitter factors, coins, blur sigma). So any batch can be
recomputed alone, which is what a mid-epoch resume needs, and the DALI graph holds no random op.

`BatchSource` is the pipeline's parallel `external_source` callback: it runs in DALI's worker
processes, reads shards and draws parameters there, and learns which epoch, first batch and last
batch to produce from an `EpochState` file the loader writes (processes share no Python state).
"""
import io
import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from loaders.augment import ViewSpec, draw_params
from loaders.builder import LoaderSettings
from loaders.crop import crop_boxes
from loaders.eval_view import eval_window
from loaders.shards import ShardSamples

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, torchvision's and PIL's grayscale
# Colour matrices on RGB column vectors (see `colour_maps`): a pixel's luma as grey (L), its chroma
# (C = I − L), and its chroma turned a quarter turn about the grey axis (C·K).
_L = np.outer(np.ones(3), LUMA)
_K = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / math.sqrt(3)
COLOUR_BASIS = tuple(torch.from_numpy(m) for m in (_L, np.eye(3) - _L, (np.eye(3) - _L) @ _K))
DECISIONS = ("area", "jitter", "grayscale", "blur", "solarize", "flip")  # `Batch.params` of a view


def colours(spec: ViewSpec) -> bool:
    """Whether the view's graph has the colour map (jitter or grayscale can happen)."""
    return spec.jitter_prob > 0 or spec.grayscale_prob > 0


def view_inputs(spec: ViewSpec) -> tuple[str, ...]:
    """The per-view arguments the graph takes from the source, in the source's order."""
    return ("roi_start", "roi_end") + ("matrix",) * colours(spec) + ("sigma", "window") * (spec.blur_prob > 0)


def image_sizes(encoded: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(heights, widths)` of encoded images, read from their headers (nothing is decoded)."""
    widths, heights = zip(*(Image.open(io.BytesIO(data)).size for data in encoded))
    return torch.tensor(heights), torch.tensor(widths)


def colour_maps(factors: torch.Tensor, jitter: torch.Tensor,
                grayscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour jitter and grayscale as one affine map per sample, `x ↦ A·x + (g·x̄)·1` on RGB
    pixels (`x̄`: the view's mean pixel). Returns `A` `(B, 3, 3)` and `g` `(B, 3)`, float32.

    Write a pixel as its luma, as grey (`L·x`, `L = 1·lumaᵀ`), plus its chroma (`C·x`, `C = I − L`).
    torchvision's brightness is `b·x`; contrast `c·x + (1 − c)·m`, `m = luma·x̄` the view's mean
    luma; saturation `L·x + s·C·x`, so `s = 0` is grayscale. Hue is `L·x + C·R·x`, `R` the rotation
    by `θ = 2π·hue` about the grey axis, which on chroma is `C·R = cos θ·C + sin θ·C·K` (`K`: the
    quarter turn): each pixel's HSV hue turns by θ (within about 10 %) and its luma is kept, where
    torchvision's HSV shift keeps its max and min instead (2–17 levels apart on average on
    ImageNet crops at hue 0.08). Brightness and contrast scale a pixel and add grey; saturation
    and hue change chroma only, so keep luma (and `m`) and grey: the four commute, and
    torchvision's random order would only change where values clip to [0, 255] between ops,
    which this single map does once, at the end. Composed:
    `A = b·c·(L + s·(cos θ·C + sin θ·C·K))`, `g = b·(1 − c)·luma`. Samples without jitter get
    factors `(1, 1, 1, 0)`; grayscale (after the jitter) is `s = 0`.
    """
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    b, c, s, hue = torch.where(jitter[:, None], factors.double(), identity).unbind(dim=1)
    s = torch.where(grayscale, 0.0, s)
    angle = (2 * math.pi * hue)[:, None, None]
    luma_part, chroma, chroma_turned = COLOUR_BASIS
    turned = angle.cos() * chroma + angle.sin() * chroma_turned
    matrix = (b * c)[:, None, None] * (luma_part + s[:, None, None] * turned)
    grey = (b * (1 - c))[:, None] * torch.tensor(LUMA, dtype=torch.float64)
    return matrix.float(), grey.float()


def draw_view(heights: torch.Tensor, widths: torch.Tensor, spec: ViewSpec,
              generator: torch.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One view's graph inputs for a batch of images of these sizes, and its decisions.

    Inputs: `view_inputs(spec)` (the crop window as an ROI, `(y, x)` start and end, its x ends
    swapped where the view is flipped: DALI's resize mirrors a reversed ROI exactly; the colour
    map `A`; blur sigma and window `2·ceil(3σ) + 1`, 1 (the identity) where not blurred) plus
    `grey` (`g` of the colour map) and `invert` (255 where solarized, else 0). Decisions:
    `(B, 6)` float32 in `DECISIONS` order, the crop's area as a fraction of the image's first.
    """
    batch = len(heights)
    top, left, h, w = crop_boxes(batch, heights, widths, spec.scale, spec.ratio, generator).double().unbind(dim=1)
    params = draw_params(batch, spec, generator)
    x_start = torch.where(params.flip, left + w, left)
    x_end = torch.where(params.flip, left, left + w)
    matrix, grey = colour_maps(params.factors, params.jitter, params.grayscale)
    window = torch.where(params.blur, 2 * torch.ceil(3 * params.sigma) + 1, 1)
    inputs = {
        "roi_start": torch.stack([top, x_start], dim=1).float().numpy(),
        "roi_end": torch.stack([top + h, x_end], dim=1).float().numpy(),
        "matrix": matrix.numpy(),
        "sigma": params.sigma.numpy(),
        "window": window.int().numpy(),
        "grey": grey.numpy(),
        "invert": (params.solarize * 255).to(torch.uint8).numpy(),
    }
    area = h * w / (heights * widths)
    decisions = torch.stack([area, *(getattr(params, name).double() for name in DECISIONS[1:])], dim=1)
    return inputs, decisions.float().numpy()


class EpochState:
    """Which epoch, first and end batch the source produces: three int64 in a small shared file,
    written by the loader and read by every worker process at each batch."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="dali-epoch-")
        os.close(fd)
        self._values = np.memmap(self.path, np.int64, mode="w+", shape=(3,))

    def set(self, epoch: int, start: int, end: int) -> None:
        self._values[:] = epoch, start, end
        self._values.flush()

    def close(self) -> None:
        os.unlink(self.path)


@dataclass
class BatchSource:
    """Batch-mode parallel `external_source` callback: iteration `i` is batch `start + i` of this
    rank's `epoch_indices` for the state's epoch; StopIteration at the state's end batch.

    Outputs: encoded images, labels, dataset indices; then, training: `grey` `(B, V, 3)`, `invert`
    `(B, V)`, the decisions `(B, V, 6)` when `with_decisions`, and each view's `view_inputs`;
    evaluation: the eval window's ROI start and end.
    """

    samples: ShardSamples
    state_path: str
    settings: LoaderSettings
    specs: list[ViewSpec]
    with_decisions: bool

    def __post_init__(self) -> None:
        self._state: np.ndarray | None = None
        self._order: tuple[int, list[int]] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_state": None, "_order": None}

    def order(self, epoch: int) -> list[int]:
        """This rank's visiting order of `epoch` (kept for the epoch's batches)."""
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, self.settings.order(len(self.samples), epoch).tolist()
        return self._order[1]

    def num_outputs(self) -> int:
        """How many arrays a call returns (see the class's docstring)."""
        if not self.settings.train:
            return 5
        return 5 + self.with_decisions + sum(len(view_inputs(spec)) for spec in self.specs)

    def __len__(self) -> int:
        return self.settings.num_batches(len(self.samples))

    def __call__(self, iteration: int) -> tuple:
        if self._state is None:
            self._state = np.memmap(self.state_path, np.int64, mode="r", shape=(3,))
        epoch, start, end = (int(v) for v in self._state)
        batch = start + iteration
        if batch >= min(end, len(self)):
            raise StopIteration
        size = self.settings.batch_size
        indices = self.order(epoch)[batch * size:(batch + 1) * size]
        encoded, labels = zip(*(self.samples.read(i) for i in indices))
        heights, widths = image_sizes(encoded)
        head = ([np.frombuffer(data, np.uint8) for data in encoded], np.array(labels, np.int64),
                np.array(indices, np.int64))
        if not self.settings.train:
            return head + tuple(t.float().numpy() for t in eval_window(heights, widths, self.settings.data.image_size))
        generator = torch.Generator().manual_seed(self.settings.batch_seed(epoch, batch))
        views, decisions = zip(*(draw_view(heights, widths, spec, generator) for spec in self.specs))
        shared = [np.stack([v[name] for v in views], axis=1) for name in ("grey", "invert")]
        if self.with_decisions:
            shared.append(np.stack(decisions, axis=1))
        return head + tuple(shared) + tuple(v[name] for v, spec in zip(views, self.specs) for name in view_inputs(spec))
