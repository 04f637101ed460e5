"""The published multi-pass PatchMix algorithm, written out step by step (docs/method.md §1).

It shares no code with `kernels.patchmix`: it is the independent reference the one-pass kernel is
tested against bit-for-bit, and the baseline `bench.py kernel` times it against.
"""
import torch


def patchmix_reference(images: torch.Tensor, patch_size: int, num_mix: int,
                       perm: torch.Tensor) -> torch.Tensor:
    """patchify → permute → regroup → pull each group from the neighbour → un-permute → unpatchify."""
    batch, channels, height, width = images.shape
    p, hp, wp = patch_size, height // patch_size, width // patch_size
    num_patches = hp * wp
    # patchify: (B, C, H, W) -> (B, T, C·p·p), patches numbered row-major
    patches = images.reshape(batch, channels, hp, p, wp, p).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(batch, num_patches, channels * p * p)
    # permute the positions with the batch-wide permutation
    shuffled = patches[:, perm]
    # regroup: m consecutive groups of S positions, the remainder stays with image g itself
    per_group = num_patches // num_mix
    grouped = shuffled[:, : per_group * num_mix].reshape(batch, num_mix, per_group, -1)
    remainder = shuffled[:, per_group * num_mix:]
    # mixed image g takes group j from image (g + j) mod B
    pulled = [torch.roll(grouped[:, j], shifts=-j, dims=0) for j in range(num_mix)]
    mixed_shuffled = torch.cat([torch.stack(pulled, dim=1).reshape(batch, per_group * num_mix, -1), remainder], 1)
    # un-permute and unpatchify
    mixed = mixed_shuffled[:, torch.argsort(perm)]
    mixed = mixed.reshape(batch, hp, wp, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return mixed.reshape(batch, channels, height, width)
