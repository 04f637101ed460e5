"""eval.py: kNN against hand-computed and brute-force references, weights formats, timm export."""
import json
import math
import os
import stat
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import eval as eval_cli
import train
from evaluation.knn import chunk_rows, knn_classify
from evaluation.weights import export_encoder, load_encoder
from model.vit import ARCHS, create_vit

REPO = Path(__file__).resolve().parents[1]


def test_knn_on_a_hand_computed_example():
    # Two train points per class on the unit circle; the test point at 10° sits next to class 0's 0°.
    angles = torch.tensor([0.0, 20.0, 90.0, 180.0])
    train = torch.stack([torch.cos(angles * math.pi / 180), torch.sin(angles * math.pi / 180)], 1)
    labels = torch.tensor([0, 0, 1, 2])
    test = torch.tensor([[math.cos(math.pi / 18), math.sin(math.pi / 18)]])
    # k = 1: nearest is 0° or 20° (both cos 10°): class 0. k = 3 adds 90° (class 1, cos 80°):
    # votes class 0: 2·exp(cos10°/0.07), class 1: exp(cos80°/0.07): class 0 wins, class 1 second.
    result = knn_classify(train, labels, test, torch.tensor([1]), num_classes=3, ks=(1, 3))
    assert result[1] == (0.0, 0.0)  # k = 1: only class 0 got a vote
    assert result[3] == (0.0, 100.0)  # k = 3: class 1 is second
    result = knn_classify(train, labels, test, torch.tensor([0]), num_classes=3, ks=(1, 3, 200))
    assert result == {1: (100.0, 100.0), 3: (100.0, 100.0), 200: (100.0, 100.0)}


def brute_force(train, train_labels, test, test_labels, num_classes, k, temperature):
    """Every test row against every train row, votes by a Python loop."""
    train, test = F.normalize(train.double(), dim=1), F.normalize(test.double(), dim=1)
    top1 = top5 = 0
    for row, truth in zip(test, test_labels.tolist()):
        similarity = train @ row
        order = similarity.argsort(descending=True)[:k]
        votes = torch.zeros(num_classes, dtype=torch.double)
        for j in order.tolist():
            votes[train_labels[j]] += math.exp(similarity[j].item() / temperature)
        ranked = votes.argsort(descending=True).tolist()
        top1 += ranked[0] == truth
        top5 += bool(truth in ranked[:5] and votes[truth] > 0)
    return 100 * top1 / len(test), 100 * top5 / len(test)


@pytest.mark.parametrize("num_test, budget_gb", [(37, 1.0), (300, 64 * 2**-30 * (500 + 3 * 200 + 2 * 10))])
def test_knn_matches_brute_force(num_test, budget_gb):
    gen = torch.Generator().manual_seed(num_test)
    centres = torch.randn(10, 16, generator=gen)
    train_labels = torch.randint(0, 10, (500,), generator=gen)
    test_labels = torch.randint(0, 10, (num_test,), generator=gen)
    train = centres[train_labels] + 1.5 * torch.randn(500, 16, generator=gen)
    test = centres[test_labels] + 1.5 * torch.randn(num_test, 16, generator=gen)
    if num_test == 300:
        assert chunk_rows(500, 10, 200, budget_gb) == 16  # the second case really runs in 19 chunks
    result = knn_classify(train, train_labels, test, test_labels, 10, memory_budget_gb=budget_gb)
    for k in (10, 20, 100, 200):
        expected = brute_force(train, train_labels, test, test_labels, 10, k, 0.07)
        assert result[k] == pytest.approx(expected, abs=1e-4), k  # one sample is >= 0.33 %


def encoder_keys(encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in encoder.state_dict().items()}


@pytest.mark.parametrize("prefix, wrapper", [
    ("module.momentum_encoder.", "state_dict"), ("momentum_encoder.", None), ("base_encoder.", "model"),
])
def test_released_checkpoint_formats(tmp_path, prefix, wrapper):
    encoder = create_vit("vit_tiny", 32, 2)
    state = encoder_keys(encoder, prefix)
    state[f"{prefix}head.0.weight"] = torch.zeros(3, 3)  # the projector is dropped
    if prefix != "base_encoder.":  # the base encoder is ignored when a momentum encoder is present
        state.update(encoder_keys(create_vit("vit_tiny", 32, 2), "module.base_encoder." if "module" in prefix
                                  else "base_encoder."))
    path = tmp_path / "released.pth.tar"
    torch.save({wrapper: state} if wrapper else state, path)
    loaded, spec, _ = load_encoder(path)
    assert (spec.arch, spec.img_size, spec.patch_size) == ("vit_tiny", 32, 2)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in encoder.state_dict().items())


def test_unknown_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="no ViT encoder found"):
        load_encoder(tmp_path / "x.pt")


@pytest.mark.parametrize("arch, size, patch", [("vit_small", 224, 16), ("vit_tiny", 32, 2), ("vit_mini", 32, 8)])
def test_export_round_trips_through_timm(tmp_path, arch, size, patch):
    encoder = create_vit(arch, size, patch).eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {**encoder_keys(encoder, "momentum."), **encoder_keys(create_vit(arch, size, patch), "base.")}},
               path)
    spec = export_encoder(path, tmp_path / "encoder.safetensors")
    name, kwargs = spec.timm_args()
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    model.load_state_dict(load_file(tmp_path / "encoder.safetensors"), strict=True)
    assert model.blocks[0].attn.num_heads == ARCHS[arch]["num_heads"]
    x = torch.randn(2, 3, size, size)
    assert torch.equal(model(x), encoder.forward_head(encoder.forward_features(x), pre_logits=True))


@pytest.fixture(scope="module")
def trained_run(cifar_root, tmp_path_factory) -> Path:
    """A real train.py run folder: 4 PatchMix steps of a small vit_mini/8 (momentum encoder on) on 300
    CIFAR images; its last.pt holds the config, so eval.py needs no --config."""
    out = tmp_path_factory.mktemp("trained")
    assert train.main(["--config", str(REPO / "configs" / "smoke.yaml"), f"data.root={cifar_root}", f"output_dir={out}",
                       "model.mlp_dim=64", "model.dim=32", "data.workers=0", "epochs=1", "batch_size=64",
                       "log_every=1"]) == 0
    return out


def test_the_trained_checkpoint_is_trained(trained_run):
    """The momentum encoder (what eval.py evaluates) is the EMA of a base encoder that AdamW moved: both
    start from the same weights, so after training they differ, and the EMA lies between."""
    state = torch.load(trained_run / "last.pt", weights_only=True)
    assert state["step"] == 300 // 64
    base = {k[len("base."):]: v for k, v in state["model"].items() if k.startswith("base.")}
    momentum = {k[len("momentum."):]: v for k, v in state["model"].items() if k.startswith("momentum.")}
    assert base.keys() == momentum.keys() and "cls_token" in momentum
    moved = [k for k in momentum if not torch.equal(base[k], momentum[k])]
    assert len(moved) > len(momentum) // 2, moved
    losses = [json.loads(line)["loss"] for line in (trained_run / "log.jsonl").read_text().splitlines()
              if "loss" in line]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


def test_eval_cli_knn_and_export_on_a_trained_checkpoint(trained_run, tmp_path, capsys, monkeypatch):
    weights = trained_run / "last.pt"
    encoder, spec, _ = load_encoder(weights)
    state = torch.load(weights, weights_only=True)["model"]
    assert all(torch.equal(v, state[f"momentum.{k}"]) for k, v in encoder.state_dict().items())  # the trained EMA

    out = tmp_path / "e.safetensors"
    assert eval_cli.main(["export", "--weights", str(weights), "--out", str(out)]) == 0
    assert "timm.create_model('vit_tiny_patch16_224'" in capsys.readouterr().out
    name, kwargs = spec.timm_args()
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    model.load_state_dict(load_file(out), strict=True)
    x = torch.randn(2, 3, 32, 32)
    encoder.eval()
    assert torch.equal(model(x), encoder.forward_head(encoder.forward_features(x), pre_logits=True))

    # kNN with the checkpoint's own config (its dataset, size and backend): features cached on the first run.
    cache = tmp_path / "cache"
    assert eval_cli.main(["knn", "--weights", str(weights), f"cache_dir={cache}"]) == 0
    assert sorted(p.name for p in cache.iterdir()) == ["last-train.pt", "last-val.pt"]
    cached = torch.load(cache / "last-val.pt", weights_only=True)
    assert cached["features"].shape == (50, 128) and cached["labels"].tolist() == sorted(cached["labels"].tolist())

    # The second run must read the cache: extracting is made impossible, and doctored cached features
    # (every validation feature replaced by the first training feature) must change the result.
    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted although they are cached")

    monkeypatch.setattr(eval_cli, "extract_features", no_extraction)
    assert eval_cli.main(["knn", "--weights", str(weights), f"cache_dir={cache}"]) == 0
    train_cache = torch.load(cache / "last-train.pt", weights_only=True)
    doctored = train_cache["features"][:1].expand(50, -1).clone()
    torch.save({"features": doctored, "labels": cached["labels"]}, cache / "last-val.pt")
    assert eval_cli.main(["knn", "--weights", str(weights), f"cache_dir={cache}"]) == 0
    rows = [json.loads(line) for line in (trained_run / "eval_results.jsonl").read_text().splitlines()]
    assert [r["k"] for r in rows] == [10, 20, 100, 200] * 3
    assert all((r["protocol"], r["arch"], r["patch_size"], r["dataset"]) == ("knn", "vit_mini", 8, "cifar10")
               for r in rows)
    assert rows[:4] == rows[4:8]  # the cache gives back exactly what was extracted
    # Every doctored query has the same neighbours, so one class is predicted for all 50 (5 per class).
    expected = torch.tensor([knn_classify(train_cache["features"], train_cache["labels"], doctored, cached["labels"],
                                          10, ks=(k,))[k][0] for k in (10, 20, 100, 200)])
    assert [r["top1"] for r in rows[8:]] == pytest.approx(expected.tolist()) and all(r["top1"] == 10.0
                                                                                     for r in rows[8:])


@pytest.mark.slow
def test_knn_similarity_and_results_file_on_real_images(cifar_folder, tmp_path, monkeypatch):
    import convert_datasets

    assert convert_datasets.main(["imagefolder", "--source", str(cifar_folder), "--out", str(tmp_path),
                                  "--name", "cifar", "--workers", "1"]) == 0
    torch.save({"momentum_encoder." + k: v for k, v in create_vit("vit_mini", 32, 8).state_dict().items()},
               tmp_path / "released.pth")
    args = ["--weights", str(tmp_path / "released.pth"), f"data.root={tmp_path / 'cifar'}", "data.backend=memory",
            "data.image_size=32", f"cache_dir={tmp_path / 'cache'}"]
    assert eval_cli.main(["knn", *args]) == 0
    with monkeypatch.context() as patch:  # the second run reads the cached features: it cannot extract any
        patch.setattr(eval_cli, "extract_features", lambda *a, **k: pytest.fail("extracted despite the cache"))
        assert eval_cli.main(["knn", *args]) == 0
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    rows = [json.loads(line) for line in (tmp_path / "eval_results.jsonl").read_text().splitlines()]
    assert [r["k"] for r in rows] == [10, 20, 100, 200] * 2
    assert all(r["protocol"] == "knn" and 0 <= r["top1"] <= r["top5"] <= 100 for r in rows)
    assert rows[:4] == rows[4:]
    out = tmp_path / "picture.png"
    assert eval_cli.main(["similarity", "--weights", str(tmp_path / "released.pth"), "--data", str(tmp_path / "cifar"),
                          "--query", "3", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_export_has_the_permissions_of_a_new_file(tmp_path, umask, mode):
    """0666 minus the umask, like any file the user creates (not the 0600 of a private temporary)."""
    torch.save({"model": encoder_keys(create_vit("vit_mini", 32, 8), "momentum.")}, tmp_path / "w.pt")
    previous = os.umask(umask)
    try:
        export_encoder(tmp_path / "w.pt", tmp_path / "e.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "e.safetensors").stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors", "w.pt"]  # no temporary left


def test_random_projection_of_the_class_token_as_the_released_knn_script_uses():
    """docs/evaluation.md's figures: a 1000-d Gaussian projection (the released script's random head) of
    192-d features (ViT-T) moves cosines by ~1/sqrt(1000)·0.8 on average; with isotropic clusters whose
    neighbours' cosines are close together, that reorders neighbours and costs kNN points."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 192, generator=gen)
    train_labels, test_labels = torch.randint(0, 10, (5000,), generator=gen), torch.randint(0, 10, (1000,), generator=gen)
    train = centres[train_labels] + 3.0 * torch.randn(5000, 192, generator=gen)
    test = centres[test_labels] + 3.0 * torch.randn(1000, 192, generator=gen)
    projection = torch.randn(192, 1000, generator=gen)
    cosines = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    projected = F.normalize(test @ projection, dim=1) @ F.normalize(train @ projection, dim=1).T
    assert (cosines - projected).abs().mean().item() == pytest.approx(0.025, abs=0.001)
    token = knn_classify(train, train_labels, test, test_labels, 10, ks=(20,))[20][0]
    random_head = knn_classify(train @ projection, train_labels, test @ projection, test_labels, 10, ks=(20,))[20][0]
    assert (token, random_head) == pytest.approx((98.3, 96.6), abs=0.01)
