"""The PatchMix framework (docs/method.md §3–4), laid out like MoCo v3's `moco/builder.py`.

A base encoder (a ViT whose `head` is the projector) with a predictor, and an optional
momentum encoder updated by EMA. `forward` mixes the views and returns the PatchMix loss.
Everything in `forward` is traceable by torch.compile as one graph (no host data, no
data-dependent Python branches), also under DDP with keys gathered by functional collectives.
"""
import copy
from collections.abc import Callable, Sequence
from functools import partial

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from kernels.patchmix import patchmix, patchmix_targets
from model.heads import build_predictor, build_projector
from model.loss import soft_target_contrastive

Gather = Callable[[torch.Tensor], torch.Tensor]


def _identity(keys: torch.Tensor) -> torch.Tensor:
    return keys


def _momentum_copy(encoder: nn.Module) -> nn.Module:
    """A frozen copy of `encoder`, without stochastic depth (the published momentum encoder is
    built with drop path 0)."""
    momentum = copy.deepcopy(encoder)
    for module in momentum.modules():
        if isinstance(module, DropPath):
            module.drop_prob = 0.0
    return momentum.requires_grad_(False)


class PatchMixFramework(nn.Module):
    """Base encoder + projector + predictor, and an optional momentum encoder (docs/method.md §4).

    Without a momentum encoder (published for ViT-Tiny on CIFAR) the keys come from the base
    encoder: the key of view 1 is the detached projection of the same forward that makes its
    query (as the published code does), the other keys are base forwards under `no_grad`.
    """

    def __init__(self, encoder: VisionTransformer, dim: int = 256, mlp_dim: int = 4096,
                 momentum_encoder: bool = True, num_mix: int = 2, smoothing_source: float = 0.0,
                 smoothing_mix: float = 0.0) -> None:
        super().__init__()
        patch_h, patch_w = encoder.patch_embed.patch_size
        if patch_h != patch_w:
            raise ValueError(f"encoder's patch size must be square to mix patches; got {patch_h}x{patch_w}")
        encoder.head = build_projector(encoder.num_features, mlp_dim, dim)
        self.base = encoder
        self.predictor = build_predictor(dim, mlp_dim)
        self.momentum = _momentum_copy(encoder) if momentum_encoder else None
        self.patch_size = patch_h
        self.num_mix = num_mix
        # Label smoothing per contrast (docs/method.md §2): the published models were trained with
        # 0.1 on the source and local-crop-vs-original terms and 0 on every mixed contrast.
        self.smoothing_source = smoothing_source
        self.smoothing_mix = smoothing_mix

    @property
    def key_encoder(self) -> nn.Module:
        """The encoder that makes the keys (and is evaluated, docs/method.md §7)."""
        return self.base if self.momentum is None else self.momentum

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """EMA of the parameters, one fused pass: momentum ← momentum + (1 − m)·(base − momentum).
        No-op without a momentum encoder."""
        if self.momentum is not None:
            torch._foreach_lerp_(list(self.momentum.parameters()), list(self.base.parameters()), 1.0 - m)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.base(x))

    @torch.no_grad()
    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_encoder(x)

    def _query_and_key(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        projection = self.base(x)
        key = projection.detach() if self.momentum is None else self._key(x)
        return self.predictor(projection), key

    def _mix(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return patchmix(x, self.patch_size, self.num_mix, generator=generator)[0]

    def forward(self, views: Sequence[torch.Tensor], temperature: float, gather: Gather = _identity,
                rank: int = 0, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """PatchMix loss of one step (docs/method.md §3) from `views = [v1, v2, *local_crops]`.

        Every view is a batch of the same `B` images. `gather` concatenates keys across ranks
        (identity on one process) and `rank` offsets the targets. Mixes are drawn from
        `generator` in the order v1, v2, crops (eager only: dynamo cannot trace a generator, so
        leave it None under torch.compile). Returns each term's contribution to the loss
        (`source`, `mix` and `mix_mix` already halved, `multi` and `multi_mix` with local crops)
        and their sum `loss`.
        """
        v1, v2, *crops = views
        targets = patchmix_targets(v1.shape[0], self.num_mix, rank, device=v1.device)
        source = partial(soft_target_contrastive, temperature=temperature, smoothing=self.smoothing_source)
        mixed = partial(soft_target_contrastive, temperature=temperature, smoothing=self.smoothing_mix)
        mixed_v1, mixed_v2 = self._mix(v1, generator), self._mix(v2, generator)

        q1, k1 = self._query_and_key(v1)
        k1, k2, mk1 = gather(k1), gather(self._key(v2)), gather(self._key(mixed_v1))
        mq2 = self._query(mixed_v2)
        terms = {
            "source": source(q1, k2, *targets.source),
            "mix": mixed(mq2, k1, *targets.mix) / 2,
            "mix_mix": mixed(mq2, mk1, *targets.mix_mix) / 2,
        }
        if crops:
            mixed_crops = [self._mix(crop, generator) for crop in crops]

            def crop_term(batch: list[torch.Tensor], contrast: Callable, target: tuple[torch.Tensor, torch.Tensor]
                          ) -> torch.Tensor:
                """Σ_c [CE(c, k1) + CE(c, k2)] / K. All crops share one forward, as published
                (this sets the heads' BatchNorm statistics)."""
                queries = self._query(torch.cat(batch)).chunk(len(batch))
                return sum(contrast(q, k, *target) for q in queries for k in (k1, k2)) / len(batch)

            terms["multi"] = crop_term(crops, source, targets.source)
            terms["multi_mix"] = crop_term(mixed_crops, mixed, targets.mix)
        terms["loss"] = sum(terms.values())
        return terms
