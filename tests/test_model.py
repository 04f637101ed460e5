"""ViT, heads and the PatchMix framework (docs/method.md §3–4), on CPU with tiny shapes."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from kernels.patchmix import patchmix, patchmix_targets
from model.framework import PatchMixFramework
from model.heads import build_predictor, build_projector
from model.loss import soft_target_contrastive
from model.vit import ViT, create_vit

TIMM_NAMES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
              "vit_base": "vit_base_patch16_224"}
BATCH, IMG, PATCH, CROP = 4, 32, 4, 16


def tiny_vit(drop_path_rate: float = 0.0) -> ViT:
    return ViT(img_size=IMG, patch_size=PATCH, num_classes=0, embed_dim=32, depth=2, num_heads=2,
               drop_path_rate=drop_path_rate)


def tiny_framework(drop_path_rate: float = 0.0, **kwargs) -> PatchMixFramework:
    torch.manual_seed(0)
    return PatchMixFramework(tiny_vit(drop_path_rate), dim=16, mlp_dim=64, **kwargs)


def make_views(num_crops: int) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(BATCH, 3, IMG, IMG) for _ in range(2)] + \
           [torch.randn(BATCH, 3, CROP, CROP) for _ in range(num_crops)]


# --------------------------------------------------------------------------------------------
# ViT
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("img_size,patch_size", [(224, 16), (32, 2)])
@pytest.mark.parametrize("arch", sorted(TIMM_NAMES))
def test_vit_matches_timm_architecture(arch: str, img_size: int, patch_size: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ours = create_vit(arch, img_size, patch_size)
        ref = timm.create_model(TIMM_NAMES[arch], img_size=img_size, patch_size=patch_size, num_classes=0,
                                **({"num_heads": 12} if arch == "vit_small" else {}))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert [b.attn.num_heads for b in ours.blocks] == [b.attn.num_heads for b in ref.blocks]
    expected_heads = {"vit_tiny": 3, "vit_small": 12, "vit_base": 12}[arch]
    assert all(b.attn.num_heads == expected_heads for b in ours.blocks)
    assert all(m.eps == 1e-6 for m in ours.modules() if isinstance(m, nn.LayerNorm))
    assert all(b.attn.qkv.bias is not None for b in ours.blocks)


def test_create_vit_rejects_unknown_arch() -> None:
    with pytest.raises(ValueError, match="arch"):
        create_vit("vit_huge", 224, 16)


def assert_uniform(weight: torch.Tensor, bound: float) -> None:
    """Samples of U(-bound, bound): inside the bound, reaching it, with std bound/√3."""
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.98 * bound
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_vit_moco_v3_initialisation() -> None:
    torch.manual_seed(0)
    model = create_vit("vit_tiny", 32, 4)
    dim = model.embed_dim
    for block in model.blocks:
        assert_uniform(block.attn.qkv.weight, math.sqrt(6 / (3 * dim // 3 + dim)))  # q, k, v apart
        for linear in (block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert_uniform(linear.weight, math.sqrt(6 / (linear.in_features + linear.out_features)))
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, nn.Linear))
    assert_uniform(model.patch_embed.proj.weight, math.sqrt(6 / (3 * 4 * 4 + dim)))
    assert torch.all(model.patch_embed.proj.bias == 0)
    assert model.cls_token.std().item() == pytest.approx(1e-6, rel=0.3)
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.2)


def published_pos_resample(pos_embed: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """The published code's `interpolate_pos_encoding` (DINO's), written out independently."""
    n = int(math.sqrt(pos_embed.shape[1] - 1))
    if (height // patch, width // patch) == (n, n):
        return pos_embed
    h0, w0 = height // patch + 0.1, width // patch + 0.1
    grid = pos_embed[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(h0 / n, w0 / n), mode="bicubic")
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


@pytest.mark.parametrize("size", [32, 24, 96])
def test_position_embeddings_resample_like_published_code(size: int) -> None:
    torch.manual_seed(0)
    model = tiny_vit()
    grid = size // PATCH
    no_patch_signal = torch.zeros(1, grid, grid, model.embed_dim)
    expected = published_pos_resample(model.pos_embed, size, size, PATCH).clone()
    expected[:, 0] += model.cls_token[:, 0]
    torch.testing.assert_close(model._pos_embed(no_patch_signal), expected, rtol=0, atol=0)
    assert model.forward_features(torch.randn(2, 3, size, size)).shape == (2, 1 + grid * grid, model.embed_dim)


def test_vit_runs_96px_local_crops() -> None:
    model = create_vit("vit_tiny", 224, 16)
    assert model.forward_features(torch.randn(2, 3, 96, 96)).shape == (2, 1 + 6 * 6, 192)
    assert model.forward_head(model.forward_features(torch.randn(2, 3, 96, 96))).shape == (2, 192)


# --------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------
def layer_signature(mlp: nn.Sequential) -> list[tuple]:
    rows = []
    for layer in mlp:
        if isinstance(layer, nn.Linear):
            rows.append(("linear", layer.in_features, layer.out_features, layer.bias is not None))
        elif isinstance(layer, nn.BatchNorm1d):
            rows.append(("bn", layer.num_features, layer.affine))
        else:
            rows.append((type(layer).__name__,))
    return rows


def test_projector_and_predictor_layers() -> None:
    assert layer_signature(build_projector(384)) == [
        ("linear", 384, 4096, False), ("bn", 4096, True), ("ReLU",),
        ("linear", 4096, 4096, False), ("bn", 4096, True), ("ReLU",),
        ("linear", 4096, 256, False), ("bn", 256, False)]
    assert layer_signature(build_predictor()) == [
        ("linear", 256, 4096, False), ("bn", 4096, True), ("ReLU",),
        ("linear", 4096, 256, False), ("bn", 256, False)]
    assert layer_signature(build_projector(32, 64, 16))[-2:] == [("linear", 64, 16, False), ("bn", 16, False)]


# --------------------------------------------------------------------------------------------
# Framework
# --------------------------------------------------------------------------------------------
def test_momentum_encoder_is_frozen_copy_without_drop_path() -> None:
    fw = tiny_framework(drop_path_rate=0.1)
    assert isinstance(fw.base.head, nn.Sequential) and isinstance(fw.momentum.head, nn.Sequential)
    for (name, p_b), p_m in zip(fw.base.named_parameters(), fw.momentum.parameters()):
        assert torch.equal(p_b, p_m) and p_b is not p_m, name
        assert p_b.requires_grad and not p_m.requires_grad
    assert any(m.drop_prob > 0 for m in fw.base.modules() if isinstance(m, DropPath))
    assert all(m.drop_prob == 0 for m in fw.momentum.modules() if isinstance(m, DropPath))
    assert fw.key_encoder is fw.momentum
    assert tiny_framework(momentum_encoder=False).key_encoder.head is not None


def test_update_momentum_is_ema_of_parameters() -> None:
    fw = tiny_framework()
    with torch.no_grad():
        for p in fw.momentum.parameters():
            p.normal_()
    base = [p.clone() for p in fw.base.parameters()]
    old = [p.clone() for p in fw.momentum.parameters()]
    fw.update_momentum(0.9)
    for p_m, p_old, p_b, p_now in zip(fw.momentum.parameters(), old, base, fw.base.parameters()):
        torch.testing.assert_close(p_m, p_old * 0.9 + p_b * 0.1)
        assert torch.equal(p_now, p_b)
    fw.update_momentum(0.0)
    assert all(torch.equal(p_m, p_b) for p_m, p_b in zip(fw.momentum.parameters(), base))


def test_update_momentum_without_momentum_encoder_changes_nothing() -> None:
    fw = tiny_framework(momentum_encoder=False)
    before = [p.clone() for p in fw.parameters()]
    fw.update_momentum(0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, fw.parameters()))


@pytest.mark.parametrize("num_crops", [0, 2])
@pytest.mark.parametrize("momentum_encoder", [True, False])
def test_forward_backward(momentum_encoder: bool, num_crops: int) -> None:
    fw = tiny_framework(drop_path_rate=0.1, momentum_encoder=momentum_encoder)
    terms = fw(make_views(num_crops), temperature=0.2)
    names = {"source", "mix", "mix_mix", "loss"} | ({"multi", "multi_mix"} if num_crops else set())
    assert set(terms) == names
    assert all(torch.isfinite(v) and v.ndim == 0 for v in terms.values())
    torch.testing.assert_close(terms["loss"], sum(v for k, v in terms.items() if k != "loss"))
    terms["loss"].backward()
    for name, p in [*fw.base.named_parameters(), *fw.predictor.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    if momentum_encoder:
        assert all(p.grad is None for p in fw.momentum.parameters())


@pytest.mark.parametrize("momentum_encoder,base_calls,momentum_calls", [(True, 4, 3), (False, 6, 0)])
def test_one_encoder_forward_per_view(momentum_encoder: bool, base_calls: int, momentum_calls: int) -> None:
    """v1, mix(v2), all crops, all mixed crops through the base; k1, k2, mix(v1) through the
    momentum encoder. Without one, view 1's key is its query forward's projection (published)."""
    fw = tiny_framework(momentum_encoder=momentum_encoder)
    calls = {"base": 0, "momentum": 0}
    for name in calls:
        if getattr(fw, name) is not None:
            getattr(fw, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    fw(make_views(num_crops=2), temperature=0.2)
    assert calls == {"base": base_calls, "momentum": momentum_calls}


@pytest.mark.parametrize("momentum_encoder", [True, False])
def test_loss_matches_direct_recomputation(momentum_encoder: bool) -> None:
    """Rank 1 of 2 with smoothing (different per contrast, to check which term gets which) and 2
    local crops, mixes fixed by a seeded generator; the momentum encoder is a fresh copy of the
    base, so every key is a base forward."""
    num_mix, tau, rank = 2, 0.2, 1
    smoothing = {"source": 0.1, "mix": 0.05}
    fw = tiny_framework(momentum_encoder=momentum_encoder, num_mix=num_mix, smoothing_source=smoothing["source"],
                        smoothing_mix=smoothing["mix"])
    other_rank_keys = torch.randn(BATCH, 16, generator=torch.Generator().manual_seed(3))

    def gather(keys: torch.Tensor) -> torch.Tensor:
        return torch.cat([other_rank_keys, keys])

    views = make_views(num_crops=2)
    terms = fw(views, tau, gather=gather, rank=rank, generator=torch.Generator().manual_seed(5))
    terms["loss"].backward()
    grads = [p.grad.clone() for p in fw.parameters() if p.requires_grad]
    fw.zero_grad()

    generator = torch.Generator().manual_seed(5)
    v1, v2, c1, c2 = views
    m1, m2, mc1, mc2 = (patchmix(v, PATCH, num_mix, generator=generator)[0] for v in views)
    targets = patchmix_targets(BATCH, num_mix, rank)
    with torch.no_grad():
        k1, k2, mk1 = (gather(fw.base(v)) for v in (v1, v2, m1))

    def query(x: torch.Tensor) -> torch.Tensor:
        return fw.predictor(fw.base(x))

    def ce(q: torch.Tensor, k: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        kind = "source" if target is targets.source else "mix"
        return soft_target_contrastive(q, k, *target, tau, smoothing=smoothing[kind])

    q1, mq2 = query(v1), query(m2)
    q_c1, q_c2 = query(torch.cat([c1, c2])).chunk(2)
    q_mc1, q_mc2 = query(torch.cat([mc1, mc2])).chunk(2)
    expected = {
        "source": ce(q1, k2, targets.source),
        "mix": ce(mq2, k1, targets.mix) / 2,
        "mix_mix": ce(mq2, mk1, targets.mix_mix) / 2,
        "multi": (ce(q_c1, k1, targets.source) + ce(q_c1, k2, targets.source)
                  + ce(q_c2, k1, targets.source) + ce(q_c2, k2, targets.source)) / 2,
        "multi_mix": (ce(q_mc1, k1, targets.mix) + ce(q_mc1, k2, targets.mix)
                      + ce(q_mc2, k1, targets.mix) + ce(q_mc2, k2, targets.mix)) / 2,
    }
    expected["loss"] = sum(expected.values())
    torch.testing.assert_close(terms, expected)
    expected["loss"].backward()
    torch.testing.assert_close(grads, [p.grad for p in fw.parameters() if p.requires_grad])


def test_source_term_is_the_dense_smoothed_cross_entropy() -> None:
    """docs/method.md §2–3 written out densely: target ε/N + (1 − ε)·onehot(g), soft cross-entropy
    of the normalised query of view 1 against the key of view 2, in float64."""
    epsilon, tau = 0.1, 0.2
    fw = tiny_framework(smoothing_source=epsilon, smoothing_mix=0.0)
    v1, v2 = make_views(num_crops=0)
    terms = fw([v1, v2], tau)
    with torch.no_grad():
        q1, k2 = fw.predictor(fw.base(v1)).double(), fw.momentum(v2).double()
    target = torch.full((BATCH, BATCH), epsilon / BATCH, dtype=torch.float64) + (1 - epsilon) * torch.eye(BATCH)
    logits = F.normalize(q1, dim=1) @ F.normalize(k2, dim=1).T / tau
    expected = -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()
    assert terms["source"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_rejects_non_square_patches() -> None:
    encoder = timm.models.VisionTransformer(img_size=32, patch_size=(4, 8), num_classes=0, embed_dim=32,
                                            depth=1, num_heads=2)
    with pytest.raises(ValueError, match="square"):
        PatchMixFramework(encoder, dim=16, mlp_dim=64)


@pytest.mark.slow
def test_framework_compiles_without_graph_breaks() -> None:
    fw = tiny_framework(drop_path_rate=0.1)
    compiled = torch.compile(fw, fullgraph=True, backend="aot_eager")
    terms = compiled(make_views(num_crops=2), 0.2)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])
    assert fw.predictor[0].weight.grad is not None
