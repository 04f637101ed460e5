"""PatchMix in one pass: the mixing op (Triton kernel + torch gather, bit-identical) and the
sparse contrastive targets that go with it (docs/method.md §1–2).

Mixed image `g` holds, at patch position `t`, the patch at position `t` of image
`(g + group[t]) % B`. Nothing moves spatially, so each output patch row is a contiguous copy
of `patch_size` elements from one source image: the Triton kernel reads every input element
once and writes every output element once, with no intermediate tensor of the image's size.
"""
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a CPU-only torch build without Triton: the torch backend still works
    triton = None

BACKENDS = ("triton", "torch")


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
if triton is not None:
    def _patchmix_rows(src_ptr, dst_ptr, group_ptr, n_rows, batch, rows_per_image, height, width_patches,
                       P: tl.constexpr, P_BLOCK: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        """Copy `BLOCK_ROWS` patch rows (P contiguous pixels each) from their source images.

        A patch row is indexed by `row = ((g·C + c)·H + h)·Wp + wp`; its output offset is `row·P` and
        its input offset differs only by the batch shift `(src_g − g)·C·H·W`.
        """
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        g = rows // rows_per_image
        r = rows % rows_per_image
        wp = r % width_patches
        h = (r // width_patches) % height
        t = (h // P) * width_patches + wp
        shift = tl.load(group_ptr + t, mask=row_ok, other=0)
        src_g = (g + shift) % batch
        cols = tl.arange(0, P_BLOCK)
        mask = row_ok[:, None] & (cols < P)[None, :]
        dst = rows * P
        src = dst + (src_g - g) * (rows_per_image * P)
        values = tl.load(src_ptr + src[:, None] + cols[None, :], mask=mask)
        tl.store(dst_ptr + dst[:, None] + cols[None, :], values, mask=mask)

    # Compiled for GPU tensors (interpreted anyway when TRITON_INTERPRET=1 is set at import).
    _patchmix_rows_jit = triton.jit(_patchmix_rows)
    # Triton's interpreter runs the same kernel on CPU tensors: how it is tested without a GPU.
    _patchmix_rows_interpreted = InterpretedFunction(_patchmix_rows)


def _mix_triton(images: torch.Tensor, group: torch.Tensor, patch_size: int) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
    batch, channels, height, width = images.shape
    out = torch.empty_like(images)
    width_patches = width // patch_size
    rows_per_image = channels * height * width_patches
    n_rows = batch * rows_per_image
    p_block = triton.next_power_of_2(patch_size)
    block_rows = max(1, 4096 // p_block)
    grid = (triton.cdiv(n_rows, block_rows),)
    kernel = _patchmix_rows_jit if images.is_cuda else _patchmix_rows_interpreted
    kernel[grid](images, out, group.to(torch.int32), n_rows, batch, rows_per_image, height, width_patches,
                 P=patch_size, P_BLOCK=p_block, BLOCK_ROWS=block_rows)
    return out


def _mix_torch(images: torch.Tensor, group: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The same row copy as the kernel, as one `index_select` over patch rows of `P` pixels."""
    batch, channels, height, width = images.shape
    hp, wp, p = height // patch_size, width // patch_size, patch_size
    rows_per_image = channels * height * wp
    arange = torch.arange(batch, device=images.device)[:, None]
    shift = ((arange + group[None, :]) % batch - arange) * rows_per_image  # (B, T) row offset to the source
    rows = torch.arange(batch * rows_per_image, device=images.device).view(batch, channels, hp, p, wp)
    source_rows = (rows + shift.view(batch, 1, hp, 1, wp)).view(-1)
    return images.view(-1, p).index_select(0, source_rows).view(images.shape)


# --------------------------------------------------------------------------------------------
# Custom op: one opaque node for torch.compile, differentiable (the inverse mix is a mix)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("patchmix::mix", mutates_args=())
def _mix_op(images: torch.Tensor, group: torch.Tensor, patch_size: int, backend: str) -> torch.Tensor:
    images = images.contiguous()
    if backend == "triton":
        return _mix_triton(images, group, patch_size)
    return _mix_torch(images, group, patch_size)


@_mix_op.register_fake
def _(images: torch.Tensor, group: torch.Tensor, patch_size: int, backend: str) -> torch.Tensor:
    return images.new_empty(images.shape)


def _mix_setup_context(ctx, inputs, output) -> None:
    images, group, patch_size, backend = inputs
    ctx.save_for_backward(group)
    ctx.batch, ctx.patch_size, ctx.backend = images.shape[0], patch_size, backend


def _mix_backward(ctx, grad):
    (group,) = ctx.saved_tensors
    # Output g, position t came from input (g + group[t]) % B, so the gradient goes back by −group.
    return _mix_op(grad, torch.remainder(-group, ctx.batch), ctx.patch_size, ctx.backend), None, None, None


_mix_op.register_autograd(_mix_backward, setup_context=_mix_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def default_backend(images: torch.Tensor) -> str:
    """Triton for CUDA tensors, and on CPU when TRITON_INTERPRET=1; torch otherwise."""
    if triton is not None and (images.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return "triton"
    return "torch"


def group_of_positions(perm: torch.Tensor, num_mix: int) -> torch.Tensor:
    """Group of each patch position (docs/method.md §1.3): `perm[s]` is in group `s // S`, `S = T // m`;
    the remainder positions `perm[s]`, `s >= S·m`, are in group 0."""
    num_patches = perm.numel()
    per_group = num_patches // num_mix
    ranks = torch.arange(num_patches, device=perm.device)
    group_of_rank = torch.where(ranks < per_group * num_mix, ranks // per_group, 0)
    return torch.empty_like(ranks).scatter_(0, perm.long(), group_of_rank)


def _check_inputs(images: torch.Tensor, patch_size: int, num_mix: int, perm: torch.Tensor | None,
                  backend: str | None) -> int:
    if images.dim() != 4:
        raise ValueError(f"images must have 4 dims (B, C, H, W); got shape {tuple(images.shape)}")
    if not images.is_floating_point() or images.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"images must be float32, bfloat16 or float16; got {images.dtype} "
                         "(convert integer images with .float() first)")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int; got {patch_size!r}")
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"images' H and W must be multiples of patch_size={patch_size}; got H={height}, W={width}")
    num_patches = (height // patch_size) * (width // patch_size)
    if not isinstance(num_mix, int) or not 1 <= num_mix <= num_patches:
        raise ValueError(f"num_mix must be an int in [1, T={num_patches}] (T = number of patches); got {num_mix!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'triton' or 'torch'; got {backend!r}")
    if perm is not None:
        if perm.shape != (num_patches,) or perm.is_floating_point() or perm.dtype == torch.bool:
            raise ValueError(f"perm must be an integer tensor of shape (T,) = ({num_patches},); "
                             f"got {perm.dtype} of shape {tuple(perm.shape)}")
        if not torch.compiler.is_compiling():  # data-dependent: checked eagerly only
            expected = torch.arange(num_patches, device=perm.device)
            if not torch.equal(perm.sort().values.long(), expected):
                raise ValueError(f"perm must be a permutation of 0..{num_patches - 1} (each position exactly once)")
    return num_patches


def patchmix(images: torch.Tensor, patch_size: int, num_mix: int, *, perm: torch.Tensor | None = None,
             generator: torch.Generator | None = None,
             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix the patches of a batch (docs/method.md §1) in one pass.

    Returns `(mixed, group)`: patch position `t` of `mixed[g]` is patch position `t` of
    `images[(g + group[t]) % B]`. `perm` (a permutation of the `T` patch positions) is drawn on
    the images' device from `generator` when not given. `backend` is `"triton"`, `"torch"` or
    None (see `default_backend`); both give bit-identical results.
    """
    num_patches = _check_inputs(images, patch_size, num_mix, perm, backend)
    if perm is None:
        perm = torch.randperm(num_patches, device=images.device, generator=generator)
    group = group_of_positions(perm.to(images.device), num_mix)
    mixed = _mix_op(images, group, patch_size, backend or default_backend(images))
    return mixed, group


# --------------------------------------------------------------------------------------------
# Sparse targets (docs/method.md §2)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchMixTargets:
    """The three contrasts' targets, each `(index, weight)` of shape `(B, K)`, rank offset included."""

    source: tuple[torch.Tensor, torch.Tensor]
    mix: tuple[torch.Tensor, torch.Tensor]
    mix_mix: tuple[torch.Tensor, torch.Tensor]


def _sparse_rows(batch_size: int, offsets: torch.Tensor, weights: torch.Tensor,
                 rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row g targets `(g + offset) % B` with the given weights; repeated indices in a row are
    merged into their first occurrence (weights add up, the repeats keep weight 0)."""
    rows = torch.arange(batch_size, device=offsets.device)[:, None]
    index = (rows + offsets[None, :]) % batch_size
    weight = weights.to(torch.float32).expand(batch_size, -1)
    first = (index[:, :, None] == index[:, None, :]).int().argmax(dim=2)
    merged = torch.zeros_like(weight).scatter_add_(1, first, weight)
    return index + batch_size * rank, merged


def patchmix_targets(batch_size: int, num_mix: int, rank: int = 0, *,
                     device: torch.device | str | None = None) -> PatchMixTargets:
    """Targets of the source, mix and mix-mix contrasts for a local batch on rank `rank`
    (docs/method.md §2). Built from `arange` on `device` alone: no host data is copied to the
    device, so calling it every step costs no host-device synchronisation."""
    if batch_size < 1 or num_mix < 1 or rank < 0:
        raise ValueError(f"need batch_size >= 1, num_mix >= 1, rank >= 0; got {batch_size}, {num_mix}, {rank}")
    m = num_mix
    one = torch.arange(1, device=device)
    mix = torch.arange(m, device=device)
    mix_mix = torch.arange(2 * m - 1, device=device)
    return PatchMixTargets(
        source=_sparse_rows(batch_size, one, torch.ones(1, device=device), rank),
        mix=_sparse_rows(batch_size, mix, torch.full((m,), 1.0 / m, device=device), rank),
        mix_mix=_sparse_rows(batch_size, mix_mix - (m - 1), (m - (mix_mix - (m - 1)).abs()) / m**2, rank),
    )
