"""ViT-Tiny/Small/Base as pre-trained by PatchMix (docs/method.md §4), on timm's `VisionTransformer`.

Class token, learned position embeddings, qkv bias, LayerNorm eps 1e-6 and MoCo v3's
initialisation. Inputs of any multiple of the patch size are accepted (the 96-px local crops):
the position embeddings are resampled the way the published code does it, see `ViT._pos_embed`.
"""
import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer

ARCHS: dict[str, dict[str, int]] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=12),  # MoCo v3's 12 heads, not timm's 6
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    # Not a published setting: a 4-block ViT for smoke tests and the CPU demo.
    "vit_mini": dict(embed_dim=128, depth=4, num_heads=4),
}


class ViT(VisionTransformer):
    """timm's ViT with `dynamic_img_size`, MoCo v3 init and the published pos-embed resampling.

    Keeps timm's API (`forward_features`, `forward_head`, `head`, `num_features`).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(dynamic_img_size=True, weight_init="moco", **kwargs)
        self._init_patch_embed()

    @torch.no_grad()
    def _init_patch_embed(self) -> None:
        """MoCo v3's patch-embed init, the one part timm's 'moco' mode leaves out: uniform with
        bound sqrt(6 / (C·p·p + dim)), zero bias."""
        proj = self.patch_embed.proj
        bound = math.sqrt(6.0 / (proj.weight[0].numel() + proj.out_channels))
        proj.weight.uniform_(-bound, bound)
        proj.bias.zero_()

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the class token and add position embeddings to NHWC patch tokens.

        Other grid sizes resample the patch embeddings as the published code (DINO's
        `interpolate_pos_encoding`) does: bicubic, no antialiasing, scale factor (n + 0.1) / n0.
        timm's own resampling antialiases, which changes a 14→6 grid by ~80 % at init.
        """
        batch, height, width, dim = x.shape
        pos = self.pos_embed
        grid_h, grid_w = self.patch_embed.grid_size
        if (height, width) != (grid_h, grid_w):
            patch_pos = pos[:, 1:].reshape(1, grid_h, grid_w, dim).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(patch_pos, mode="bicubic",
                                      scale_factor=((height + 0.1) / grid_h, (width + 0.1) / grid_w))
            pos = torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, height * width, dim)], dim=1)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, height * width, dim)], dim=1)
        return self.pos_drop(x + pos)


def create_vit(arch: str, img_size: int, patch_size: int, drop_path_rate: float = 0.0) -> ViT:
    """Build `arch` (a key of `ARCHS`) for `img_size` inputs, without a classifier head."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}; got {arch!r}")
    return ViT(img_size=img_size, patch_size=patch_size, num_classes=0, mlp_ratio=4.0, qkv_bias=True,
               norm_layer=partial(LayerNorm, eps=1e-6), drop_path_rate=drop_path_rate, **ARCHS[arch])
