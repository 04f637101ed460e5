"""The DALI backend (`loaders.dali_backend`) on CPU pipelines, on real CIFAR-10 and ImageNet images
converted with convert_datasets.py: counts, order and rank sharding against `loaders.sampling`,
determinism per epoch, mid-epoch resume, evaluation against torchvision's transform, each view's
ops against torchvision with certain decisions, the recipe's rates and crop areas, the CUDA
graph's operator counts (built, not run), and flat memory."""
from __future__ import annotations

import dataclasses
import gc
import io
import resource
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms.v2.functional._color import _rgb_to_hsv

pytest.importorskip("nvidia.dali", reason="the DALI backend needs nvidia-dali (not installed here)")

from nvidia.dali import fn, types  # noqa: E402
from nvidia.dali.pipeline import Pipeline  # noqa: E402

import convert_datasets  # noqa: E402
from configs.schema import DataConfig  # noqa: E402
from loaders.augment import ViewSpec, recipe_views  # noqa: E402
from loaders.eval_view import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from loaders.builder import build_loader  # noqa: E402
from loaders import dali_backend  # noqa: E402
from loaders.dali_backend import DaliLoader, _jitter, _train_view, gpu_to_cpu_copies, operator_counts  # noqa: E402
from loaders.dali_params import DECISIONS, colour_maps, draw_view, view_inputs  # noqa: E402
from loaders.sampling import num_batches  # noqa: E402
from loaders.shards import ShardSamples, open_converted  # noqa: E402
from loaders.eval_view import eval_view  # noqa: E402

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def convert(source: Path, out: Path, name: str) -> str:
    assert convert_datasets.main(["imagefolder", "--source", str(source), "--out", str(out), "--name", name,
                                  "--workers", "2", "--shard-size", "64"]) == 0
    return str(out / name)


@pytest.fixture(scope="module")
def cifar(cifar_root: str) -> str:
    """300 train / 50 val CIFAR-10 images in 64-sample shards (the session's conversion)."""
    return cifar_root


@pytest.fixture(scope="module")
def imagenet(imagenet_folder, tmp_path_factory: pytest.TempPathFactory) -> str:
    """ImageNet JPEGs of varied sizes (up to 512 px): 200 classes as train, 40 of them as val."""
    return convert(imagenet_folder(200, 40), tmp_path_factory.mktemp("out"), "imagenet")


FLAGS = DECISIONS[1:]


def loader(root: str, *, train: bool = True, batch_size: int = 32, decisions: bool = True, **options) -> DaliLoader:
    """A DALI loader (reporting `Batch.params` unless `decisions=False`); `options` go to
    DataConfig, or to build_loader for seed/rank/world_size/dtype."""
    keys = {"seed", "rank", "world_size", "dtype"}
    data = DataConfig(root=root, backend="dali", workers=2,
                      **{k: v for k, v in options.items() if k not in keys})
    built = build_loader(data, split="train" if train else "val", train=train, batch_size=batch_size,
                         **{k: v for k, v in options.items() if k in keys})
    return DaliLoader(built.settings, with_decisions=True) if decisions else built


def cifar_loader(root: str, **options):
    """CIFAR-sized views: 32-px global views (the recipe's CIFAR scale) and, when asked, 16-px locals."""
    return loader(root, image_size=32, global_scale=(0.1, 1.0), local_size=16, **options)


def levels(view: torch.Tensor) -> torch.Tensor:
    """A normalised view back in 0..255 units."""
    return (view.float() * STD + MEAN) * 255


def run_pipeline(images: list[np.ndarray], graph) -> list[list[np.ndarray]]:
    """Run `graph(images_node)` once on a batch of HWC uint8 images; its outputs per sample."""
    pipeline = Pipeline(batch_size=len(images), num_threads=1, device_id=None, seed=7)
    with pipeline:
        pipeline.set_outputs(*graph(fn.external_source(source=lambda: images, layout="HWC")))
    pipeline.build()
    return [[np.array(output[i]) for i in range(len(images))] for output in pipeline.run()]


def decoded(root: str, split: str, count: int) -> list[np.ndarray]:
    samples = ShardSamples(open_converted(root), split)
    return [np.array(samples.decode(i)[0]) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Counts, order, sharding, determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_training_batches_shapes_dtypes_and_counts(cifar: str, dtype: torch.dtype) -> None:
    batches = list(cifar_loader(cifar, local_crops=2, batch_size=64, dtype=dtype))
    assert len(batches) == num_batches(300, 64, train=True) == 4
    for batch in batches:
        assert [tuple(v.shape) for v in batch.views] == [(64, 3, 32, 32)] * 2 + [(64, 3, 16, 16)] * 2
        assert all(v.dtype == dtype and v.device.type == "cpu" for v in batch.views)
        assert batch.labels.dtype == batch.indices.dtype == torch.int64 and batch.labels.shape == (64,)
        assert len(batch.params) == 4
        for params in batch.params:
            assert set(params) == {"area", *FLAGS} and params["area"].dtype == torch.float32
            assert all(params[name].dtype == torch.bool and params[name].shape == (64,) for name in FLAGS)


def test_resumed_epoch_yields_the_tail_of_the_full_epoch_starting_at_its_batch(cifar: str) -> None:
    """`set_epoch(epoch, k)` yields batches k.. of the epoch, equal to a whole epoch's, and the
    source's first batch is batch k (batches 0..k-1 are never read); an iteration left early
    leaves the pipeline ready for the next one."""
    data = cifar_loader(cifar, local_crops=1, batch_size=50, seed=4)
    data.set_epoch(3)
    full = list(data)
    assert len(full) == len(data) == 6
    for start in (2, 5, 6):
        data.set_epoch(3, start_batch=start)
        tail = list(data)
        assert len(tail) == 6 - start
        for x, y in zip(tail, full[start:]):
            assert torch.equal(x.indices, y.indices) and torch.equal(x.labels, y.labels)
            assert all(torch.equal(u, v) for u, v in zip(x.views, y.views))
            assert all(torch.equal(p[k], q[k]) for p, q in zip(x.params, y.params) for k in p)
    data.set_epoch(3, start_batch=1)
    for _ in data:
        break  # left after one batch
    data.set_epoch(3)
    assert all(torch.equal(x.views[0], y.views[0]) for x, y in zip(list(data), full))
    data.state.set(3, 4, 6)  # what set_epoch(3, 4) gives the workers
    assert data.source(0)[2].tolist() == full[4].indices.tolist()
    with pytest.raises(ValueError, match=r"start_batch must be in \[0, 6\]"):
        data.set_epoch(0, start_batch=7)


def test_trainer_loader_reports_no_decisions(cifar: str) -> None:
    batch = next(iter(cifar_loader(cifar, local_crops=1, decisions=False)))
    assert batch.params == [] and len(batch.views) == 3


# ---------------------------------------------------------------------------------------------
# Pixels


@pytest.mark.parametrize("dataset, size", [("cifar", 32), ("imagenet", 224)])
def test_evaluation_matches_torchvision_eval_view(dataset: str, size: int, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(dataset)
    samples = ShardSamples(open_converted(root), "val")
    batches = list(loader(root, train=False, image_size=size, batch_size=16))
    indices = torch.cat([b.indices for b in batches])
    assert indices.tolist() == list(range(len(samples)))
    views = torch.cat([b.views[0] for b in batches])
    reference = torch.stack([eval_view(samples.decode(i)[0], size) for i in indices.tolist()])
    difference = (levels(views) - levels(reference)).abs()
    # PIL rounds and clips to uint8 after each pass, DALI resamples in float: below one level on
    # average, and only pixels at strong edges more than a few.
    assert difference.mean() < 0.5
    assert torch.quantile(difference.flatten()[::7], 0.999) < 4 and difference.max() < 16


# Point ranges (scale, ratio, sigma): the whole 32-px image as crop, sigma exactly 1.
CERTAIN = ViewSpec(32, (1.0, 1.0), ratio=(1.0, 1.0), jitter_prob=0.0, grayscale_prob=1.0, blur_prob=1.0,
                   blur_sigma=(1.0, 1.0), solarize_prob=1.0, flip_prob=1.0)


@pytest.mark.parametrize("spec", [CERTAIN, dataclasses.replace(CERTAIN, grayscale_prob=0.0, blur_prob=0.0,
                                                                 solarize_prob=0.0, flip_prob=0.0)],
                         ids=["all-ops", "no-ops"])
def test_view_applies_its_decisions_like_torchvision(cifar: str, spec: ViewSpec) -> None:
    """With the whole image as crop (area 1, same size) and every decision certain, a view is
    torchvision's grayscale → blur(σ=1) → solarize → flip → normalise, or just normalise."""
    images = decoded(cifar, "val", 16)
    sizes = torch.tensor([image.shape[:2] for image in images])
    inputs, decisions = draw_view(sizes[:, 0], sizes[:, 1], spec, torch.Generator().manual_seed(0))
    assert np.allclose(decisions[:, 0], 1.0)  # the area
    expected = dict(jitter=0.0, grayscale=spec.grayscale_prob, blur=spec.blur_prob,
                    solarize=spec.solarize_prob, flip=spec.flip_prob)
    assert {name: float(np.mean(values)) for name, values in zip(FLAGS, decisions[:, 1:].T)} == expected

    def graph(x):
        def feed(name: str):
            return fn.external_source(source=lambda: inputs[name], batch=True)

        return [_train_view(x, {name: feed(name) for name in view_inputs(spec)}, feed("grey"), feed("invert"),
                            spec, types.FLOAT)]

    [view] = run_pipeline(images, graph)
    for image, actual in zip(images, view):
        x = torch.from_numpy(image).permute(2, 0, 1)
        if spec.grayscale_prob:
            x = TF.hflip(TF.solarize(TF.gaussian_blur(TF.rgb_to_grayscale(x, 3), [7, 7], [1.0, 1.0]), 128))
        difference = (levels(torch.from_numpy(actual)) - x.float()).abs()
        assert difference.max() <= (2.5 if spec.grayscale_prob else 1e-3)


def test_jitter_is_torchvisions_brightness_contrast_saturation_and_turns_hue(imagenet: str) -> None:
    """Brightness, contrast, saturation (0: grayscale) against torchvision's float ops in the order
    brightness → contrast → saturation (brightness <= 1 first, so torchvision clips nothing before
    the last op and the order cannot matter); hue as the turn of each pixel's HSV hue, luma kept."""
    images = [image[:128, :128].copy() for image in decoded(imagenet, "val", 12)]
    factors = (1.3, 1.0, 1.0, 0.0), (0.9, 0.7, 1.35, 0.0), (1.0, 1.0, 0.0, 0.0), (1.0, 1.0, 1.0, 0.08), \
        (1.0, 1.0, 1.0, -0.05)
    true = torch.ones(len(images), dtype=torch.bool)

    def colour_map(f: tuple[float, ...]) -> tuple:
        matrix, grey = colour_maps(torch.tensor(f).expand(len(images), 4), true, ~true)
        return (fn.external_source(source=lambda: matrix.numpy(), batch=True),
                fn.external_source(source=lambda: grey.numpy(), batch=True))

    outputs = run_pipeline(images, lambda x: [_jitter(x, *colour_map(f)) for f in factors])

    def floats(batch: list[np.ndarray]) -> torch.Tensor:
        return torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in batch]).float() / 255

    x = floats(images)
    for (brightness, contrast, saturation, hue), jittered in zip(factors, outputs):
        actual = floats(jittered)
        if hue:
            turn = (_rgb_to_hsv(actual)[:, 0] - _rgb_to_hsv(x)[:, 0] + 0.5) % 1 - 0.5
            coloured = (_rgb_to_hsv(x)[:, 1] > 0.2) & (actual.amax(dim=1) < 1) & (actual.amin(dim=1) > 0)
            assert abs(turn[coloured].median() - hue) < 0.005
            assert (turn[coloured] - hue).abs().quantile(0.9) < 0.012
            luma = TF.rgb_to_grayscale(actual) - TF.rgb_to_grayscale(x)
            assert luma[coloured[:, None]].abs().mean() * 255 < 0.5
        else:
            expected = TF.adjust_contrast(TF.adjust_brightness(x, brightness), contrast)
            difference = (actual - TF.adjust_saturation(expected, saturation)).abs() * 255
            assert difference.mean() < 0.3 and difference.max() <= 1  # rounded once


# ---------------------------------------------------------------------------------------------
# The recipe's statistics


def test_crop_areas_stay_in_each_views_scale_distributed_like_torchvision(imagenet: str) -> None:
    samples = ShardSamples(open_converted(imagenet), "train")
    batches = list(loader(imagenet, local_crops=2, batch_size=50, seed=5))
    assert len(batches) == 4
    indices = torch.cat([b.indices for b in batches]).tolist()
    sizes = [Image.open(io.BytesIO(samples.read(i)[0])).size for i in indices]
    torch.manual_seed(0)
    for view, spec in enumerate(recipe_views(224, (0.35, 1.0), 2)):
        areas = torch.cat([b.params[view]["area"] for b in batches])
        windows = [T.RandomResizedCrop.get_params(torch.empty(0, height, width), spec.scale, spec.ratio)
                   for width, height in sizes * 5]
        reference = torch.tensor([h * w for _, _, h, w in windows]) / torch.tensor([w * h for w, h in sizes * 5])
        # Windows are whole pixels, so areas are within rounding (< 1 % here) of the scale.
        assert spec.scale[0] - 0.01 <= areas.min() and areas.max() <= spec.scale[1] + 0.01
        quantiles = torch.tensor([0.1, 0.5, 0.9])
        assert (areas.quantile(quantiles) - reference.quantile(quantiles)).abs().max() < 0.06
        assert tuple(batches[0].views[view].shape[-2:]) == (spec.size, spec.size)


def _assert_rate(flags: torch.Tensor, p: float) -> None:
    n = len(flags)
    assert abs(flags.float().mean().item() - p) <= 4.5 * (p * (1 - p) / n) ** 0.5 + 1e-9, (flags.float().mean(), p)


def test_decision_rates_follow_the_recipe_and_grayscale_shows_in_the_pixels(cifar: str) -> None:
    data = cifar_loader(cifar, local_crops=2, batch_size=100)
    batches = []
    for epoch in range(3):  # 900 samples per view
        data.set_epoch(epoch)
        batches += list(data)
    for view, spec in enumerate(recipe_views(32, (0.1, 1.0), 2, 16)):
        params = {k: torch.cat([b.params[view][k] for b in batches]) for k in FLAGS}
        for name in FLAGS:
            _assert_rate(params[name], getattr(spec, f"{name}_prob"))
        views = torch.cat([b.views[view] for b in batches])
        pixels = levels(views)
        grey = (pixels.amax(dim=1) - pixels.amin(dim=1)).amax(dim=(1, 2)) < 1.5  # R = G = B everywhere
        assert grey[params["grayscale"]].all() and grey[~params["grayscale"]].float().mean() < 0.02
        assert views.mean().abs() < 0.2 and 0.8 < views.std() < 1.3  # normalised


@pytest.mark.parametrize("train", [True, False])
def test_cuda_graph_has_few_cpu_operators_and_no_copy_back_to_the_host(imagenet: str, train: bool) -> None:
    """The ImageNet recipe's CUDA graph (2×224 + 8×96 views; before host-drawn parameters: 1,358
    CPU, 1 mixed and 133 GPU operators, 10 GPU→CPU copies): only the source's outputs on the CPU,
    one decoder, every view's ops on the GPU; DALI accepts the graph (building it needs a GPU)."""
    data = loader(imagenet, train=train, local_crops=8, batch_size=128, decisions=False)
    counts = operator_counts(data.settings)
    views = 10 if train else 1
    # CPU (the source's outputs): encoded, labels, indices; per view the ROI's start and end, and
    # in training the colour map, blur sigma and window, plus the grey offsets and solarize masks
    # of all views together. GPU: per view resize and normalise, and in training the colour map
    # (7: its grey offset from the mean and the map) and blur; view 2's solarize (4).
    assert counts == {"cpu": 3 + (5 * views + 2 if train else 2), "mixed": 1, "gpu": 10 * views + 4 if train else 2}
    assert counts["cpu"] <= 60 and gpu_to_cpu_copies(data.settings) == 0
    pipeline, outputs = data._define(torch.device("cuda", 0))
    pipeline.set_outputs(*outputs)
    assert pipeline.device_id == 0 and len(outputs) == 2 + views


def test_gpu_to_cpu_copies_counts_views_brought_back_to_the_host(cifar: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = cifar_loader(cifar, local_crops=1, decisions=False)
    normalise = dali_backend._normalise
    monkeypatch.setattr(dali_backend, "_normalise", lambda x, dtype: normalise(x, dtype).cpu())
    assert gpu_to_cpu_copies(data.settings) == 3  # one per view


# ---------------------------------------------------------------------------------------------
# Memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.slow
def test_memory_stays_flat_over_epochs_and_abandoned_iterations(cifar: str) -> None:
    data = cifar_loader(cifar, local_crops=2, batch_size=50)
    rss = []
    for epoch in range(12):
        data.set_epoch(epoch)
        for number, _ in enumerate(data):
            if epoch % 3 == 2 and number == 1:
                break  # an iteration left mid-epoch must release its pipeline too
        gc.collect()
        rss.append(_rss_mb())
    assert max(rss[4:]) - rss[3] < 20, rss
