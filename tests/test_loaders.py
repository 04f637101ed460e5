"""The loader contract, checked the same way for every backend on real converted CIFAR-10 images,
and the recipe's augmentation statistics of each backend against the torchvision reference."""
import gc
import importlib
import math
import weakref
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from configs.schema import DataConfig, load_config
from loaders import builder
from loaders.builder import build_loader
from loaders.sampling import epoch_indices
from loaders.shards import ShardSamples, open_converted
from loaders.eval_view import eval_view

BACKENDS = ["memory", "torchvision", "ffcv", "dali"]
# FFCV compiles its decoding pipeline with numba for every loader (~10 s) and DALI starts a pipeline
# and its worker processes (~4 s): their first contract test runs in the fast suite, the rest only
# in the full one.
SLOW_HERE = {"ffcv", "dali"}
REST_OF_CONTRACT = [pytest.param(b, marks=pytest.mark.slow) if b in SLOW_HERE else b for b in BACKENDS]
BATCH = 32


def require_backend(backend: str) -> None:
    """Skip when the backend's module or its library is not installed (e.g. no DALI on a GPU image)."""
    try:
        importlib.import_module(f"loaders.{backend}_backend")
    except ImportError as error:
        pytest.skip(f"the {backend} backend is unavailable here: {error}")


def data_config(root: str, backend: str, **overrides) -> DataConfig:
    return replace(DataConfig(root=root, backend=backend, workers=2, image_size=32, global_scale=(0.1, 1.0),
                              local_size=16), **overrides)


def with_params(loader):
    """The loader reporting `Batch.params`: DALI's does so only when asked (the trainer needs none)."""
    if type(loader).__module__ == "loaders.dali_backend":
        return type(loader)(loader.settings, with_decisions=True)
    return loader


def batches(loader, epoch: int = 0) -> list:
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_epoch_shapes_labels_and_order(backend, cifar_root):
    require_backend(backend)
    loader = with_params(build_loader(data_config(cifar_root, backend, local_crops=2), split="train", train=True,
                                      batch_size=BATCH, seed=3))
    samples = ShardSamples(open_converted(cifar_root), "train")
    got = batches(loader, epoch=1)
    assert len(loader) == len(got) == 300 // BATCH
    indices = torch.cat([b.indices.cpu() for b in got])
    assert torch.equal(indices, epoch_indices(300, BATCH, train=True, seed=3, epoch=1))
    for batch in got:
        assert [tuple(v.shape) for v in batch.views] == [(BATCH, 3, 32, 32)] * 2 + [(BATCH, 3, 16, 16)] * 2
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in batch.views)
        assert batch.labels.tolist() == [samples.read(i)[1] for i in batch.indices.tolist()]
        assert len(batch.params) == 4


@pytest.mark.parametrize("backend", REST_OF_CONTRACT)
def test_set_epoch_is_reproducible_and_changes_the_order(backend, cifar_root):
    require_backend(backend)
    loader = build_loader(data_config(cifar_root, backend), split="train", train=True, batch_size=BATCH, seed=0)
    first, again, other = batches(loader, 2), batches(loader, 2), batches(loader, 3)
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(first, again))
    assert all(torch.equal(va, vb) for a, b in zip(first, again) for va, vb in zip(a.views, b.views))
    assert not torch.equal(first[0].indices, other[0].indices)


@pytest.mark.parametrize("backend", REST_OF_CONTRACT)
def test_ranks_are_disjoint_and_equal_in_training(backend, cifar_root):
    require_backend(backend)
    data = data_config(cifar_root, backend)
    per_rank = [torch.cat([b.indices.cpu() for b in batches(
        build_loader(data, split="train", train=True, batch_size=BATCH, rank=r, world_size=3))]) for r in range(3)]
    assert [len(p) for p in per_rank] == [300 // (3 * BATCH) * BATCH] * 3
    assert len(set(torch.cat(per_rank).tolist())) == sum(len(p) for p in per_rank)


@pytest.mark.parametrize("backend", REST_OF_CONTRACT)
def test_eval_sees_every_sample_once_and_matches_torchvision(backend, cifar_root):
    require_backend(backend)
    data = data_config(cifar_root, backend)
    samples = ShardSamples(open_converted(cifar_root), "val")
    seen = []
    for rank in range(2):
        loader = build_loader(data, split="val", train=False, batch_size=16, rank=rank, world_size=2)
        got = batches(loader)
        assert len(got) == len(loader) == 2  # 25 samples per rank: 16 + 9, the last batch kept
        for batch in got:
            (view,) = batch.views
            expected = torch.stack([eval_view(samples.decode(i)[0], 32) for i in batch.indices.tolist()])
            # ≈ 3/255 of a pixel on average: resampling kernels (FFCV: INTER_AREA) and JPEG decoders differ
            assert (view.cpu() - expected).abs().mean() < 0.05
            assert batch.labels.tolist() == [samples.read(i)[1] for i in batch.indices.tolist()]
            seen += batch.indices.tolist()
    assert sorted(seen) == list(range(50))


@pytest.mark.parametrize("backend", REST_OF_CONTRACT)
def test_a_dropped_loader_is_freed_at_once(backend, cifar_root):
    """No reference cycle keeps a loader (and its workers or threads) alive once dropped mid-epoch.
    A DataLoader left to the cycle collector has its queues closed before its workers are told to
    stop, and each worker then costs DataLoader's 5-second join timeout."""
    require_backend(backend)
    loader = build_loader(data_config(cifar_root, backend), split="train", train=True, batch_size=BATCH)
    batches = iter(loader)
    next(batches)
    freed = weakref.ref(loader)
    gc.disable()
    try:
        del loader, batches
        assert freed() is None, gc.get_referrers(freed())
    finally:
        gc.enable()


def collect(backend: str, root: str, epochs: int) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """Per view: the concatenated decisions of `epochs` epochs, and the channel mean/std of the views."""
    loader = with_params(build_loader(data_config(root, backend), split="train", train=True, batch_size=BATCH,
                                      seed=11))
    decisions: list[dict[str, list]] = [{}, {}]
    moments: list[list[torch.Tensor]] = [[], []]
    for epoch in range(epochs):
        for batch in batches(loader, epoch):
            for v, (view, params) in enumerate(zip(batch.views, batch.params)):
                for key, value in params.items():
                    decisions[v].setdefault(key, []).append(value.cpu().float())
                moments[v].append(torch.stack([view.mean(dim=(0, 2, 3)), view.std(dim=(0, 2, 3))]).cpu())
    stats = [{k: torch.cat(v) for k, v in d.items()} for d in decisions]
    return stats, [torch.stack(m).mean(0) for m in moments]


def assert_rate(values: torch.Tensor, p: float, name: str) -> None:
    """The observed rate is within 5 binomial standard deviations of `p`."""
    n = len(values)
    tolerance = 5 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9
    assert abs(values.mean().item() - p) <= tolerance, f"{name}: {values.mean().item():.3f} vs {p} (n={n})"


@pytest.fixture(scope="module")
def reference_stats(cifar_root):
    """The torchvision reference's decisions and view moments over 4 epochs."""
    return collect("torchvision", cifar_root, epochs=4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_augmentation_statistics_follow_the_recipe_and_the_reference(backend, cifar_root, reference_stats):
    require_backend(backend)
    stats, moments = collect(backend, cifar_root, epochs=8)  # 8 × 288 = 2304 samples per view
    reference, reference_moments = reference_stats
    expected = [{"jitter": 0.8, "grayscale": 0.2, "blur": 1.0, "solarize": 0.0, "flip": 0.5},
                {"jitter": 0.8, "grayscale": 0.2, "blur": 0.1, "solarize": 0.2, "flip": 0.5}]
    for view, rates in enumerate(expected):
        params = stats[view]
        for key, p in rates.items():
            assert_rate(params[key], p, f"view {view + 1} {key}")
        area = params["area"]
        assert area.min() >= 0.1 - 0.02 and area.max() <= 1.0  # scale (0.1, 1), up to pixel rounding
        # torchvision rejects boxes that do not fit, so the area is not uniform: compare with it
        assert abs(area.mean() - reference[view]["area"].mean()) < 0.04
        assert abs(area.std() - reference[view]["area"].std()) < 0.04
        # normalised views: per-channel mean/std agree with the reference
        assert torch.allclose(moments[view], reference_moments[view], atol=0.1), (moments[view], reference_moments[view])
    assert moments[0][0].abs().max() < 0.5 and (moments[0][1] - 1).abs().max() < 0.35


@pytest.mark.parametrize("backend", [b for b in REST_OF_CONTRACT if b != "dali"])
def test_set_epoch_start_batch_yields_the_rest_of_the_epoch_unchanged(backend, cifar_root):
    """Mid-epoch resume: batches `start..` of an epoch, equal to those of the full epoch."""
    require_backend(backend)
    loader = build_loader(data_config(cifar_root, backend), split="train", train=True, batch_size=BATCH, seed=5)
    full = batches(loader, epoch=1)
    start = 5
    loader.set_epoch(1, start_batch=start)
    rest = list(loader)
    assert len(loader) == len(full) and len(rest) == len(full) - start
    for got, expected in zip(rest, full[start:], strict=True):
        assert torch.equal(got.indices, expected.indices) and torch.equal(got.labels, expected.labels)
        assert all(torch.equal(a, b) for a, b in zip(got.views, expected.views, strict=True))
        assert all(torch.equal(a[k], b[k]) for a, b in zip(got.params, expected.params) for k in a)
    assert len(batches(loader, epoch=1)) == len(full)  # set_epoch(epoch) starts at batch 0 again


def test_memory_loader_steady_state_batch_has_no_sync_prone_op(cifar_root):
    """The memory backend's per-batch work (2 global + 2 local views; then an evaluation batch),
    counted in eager mode: nothing that would make the host wait for a GPU (`bench.dispatch.OpCounter`)."""
    from bench.dispatch import OpCounter

    loader = build_loader(data_config(cifar_root, "memory", local_crops=2), split="train", train=True,
                          batch_size=BATCH)
    loader.set_epoch(0)
    it = iter(loader)
    next(it)
    with OpCounter() as counter:
        next(it)
    assert counter.total > 500  # every view's crop and augmentations were seen
    assert counter.sync_prone == {}, counter.sync_prone
    evaluation = iter(build_loader(data_config(cifar_root, "memory"), split="val", train=False, batch_size=BATCH))
    next(evaluation)
    with OpCounter() as counter:
        next(evaluation)
    assert counter.total > 10 and counter.sync_prone == {}, counter.sync_prone


def test_memory_batch_launches_two_ops_per_view_besides_its_compiled_views(cifar_root):
    """With the views compiled (on CUDA), what a batch still runs eagerly is the resident tensor's
    gathers and, per view, the two `torch.rand` calls of its uniforms: drawing the boxes and the
    parameters happens inside each view's graph. Counted with the view function stubbed out of the
    count (dynamo refuses dispatch modes, so the compiled graph itself cannot run under one)."""
    from torch.utils._python_dispatch import _disable_current_modes

    from bench.dispatch import OpCounter

    loader = build_loader(data_config(cifar_root, "memory", local_crops=2), split="train", train=True,
                          batch_size=BATCH)
    make_view = loader.make_view

    def uncounted(*args):
        with _disable_current_modes():
            return make_view(*args)

    loader.make_view = uncounted
    loader.set_epoch(0)
    it = iter(loader)
    next(it)
    with OpCounter() as counter:
        next(it)
    assert counter.ops == {"aten.rand": 2 * 4, "aten.index": 2}, counter.ops  # 4 views; images and labels


@pytest.mark.parametrize("footprint,device,installed,expected", [
    (300 * 3 * 32 * 32, "cpu", {"ffcv", "nvidia.dali"}, "memory"),
    (300 * 3 * 32 * 32, "cuda", {"ffcv", "nvidia.dali"}, "memory"),
    (None, "cuda", {"ffcv", "nvidia.dali"}, "dali"),  # images of many sizes (JPEG datasets)
    (None, "cuda", {"ffcv"}, "ffcv"),
    (None, "cpu", {"ffcv", "nvidia.dali"}, "ffcv"),
    (None, "cpu", set(), "torchvision"),
    (8 * 2**30, "cuda", {"ffcv", "nvidia.dali"}, "dali"),  # one size, but over the memory budget
    (8 * 2**30, "cpu", {"ffcv"}, "ffcv"),
])
def test_auto_backend_decision_table(monkeypatch, footprint, device, installed, expected):
    monkeypatch.setattr(builder, "split_footprint", lambda root, split: footprint)
    monkeypatch.setattr(builder, "_available", lambda module: module in installed)
    assert builder.resolve_backend(DataConfig(root="unused"), "train", torch.device(device)) == expected
    explicit = DataConfig(root="unused", backend="torchvision")
    assert builder.resolve_backend(explicit, "train", torch.device(device)) == "torchvision"


@pytest.mark.parametrize("setting,device,train,max_resolution,expected", [
    (None, "cuda", True, 512, True),  # the converter's default size
    (None, "cuda", True, 1024, True),
    (None, "cuda", True, 2048, False),  # too large to ship whole: cut on the host
    (None, "cpu", True, 512, False),  # OpenCV beats the dense resampling matrices on a CPU
    (None, "cpu", False, 512, True),  # evaluation: the recipe's filter on every device
    (None, "cpu", False, 2048, False),
    (True, "cpu", True, 2048, True),  # a value wins
    (False, "cuda", False, 512, False),
])
def test_device_crops_decision_table(monkeypatch, setting, device, train, max_resolution, expected):
    import loaders.shards

    dataset = SimpleNamespace(manifest={"options": {"max_resolution": max_resolution}})
    monkeypatch.setattr(loaders.shards, "open_converted", lambda root: dataset)
    data = DataConfig(root="unused", device_crops=setting)
    assert builder.resolve_device_crops(data, torch.device(device), train) is expected


CIFAR_CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*cifar*.yaml"))


@pytest.mark.parametrize("config", CIFAR_CONFIGS, ids=lambda p: p.stem)
def test_cifar_configs_get_the_memory_backend(config, cifar_root):
    data = load_config(config, [f"data.root={cifar_root}"]).data
    assert data.backend == "auto"
    assert builder.split_footprint(cifar_root, "train") == 300 * 3 * 32 * 32
    assert builder.resolve_backend(data, "train", torch.device("cuda")) == "memory"


def test_split_footprint_is_none_for_images_of_many_sizes(imagenet_folder, tmp_path):
    import convert_datasets

    assert convert_datasets.main(["imagefolder", "--source", str(imagenet_folder(4, 1)), "--out", str(tmp_path),
                                  "--name", "mixed", "--formats", "dali", "--workers", "1"]) == 0
    assert builder.split_footprint(tmp_path / "mixed", "train") is None


def test_workers_zero_means_cores_per_local_rank(monkeypatch):
    monkeypatch.setattr(builder.os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert builder.worker_threads(0) == 2 and builder.worker_threads(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert builder.worker_threads(0) == 1
