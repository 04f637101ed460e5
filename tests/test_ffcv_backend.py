"""The `ffcv` backend (`loaders.ffcv_backend`) on real CIFAR-10 and ImageNet JPEGs converted to `.beton`:
order, shards, labels, shapes, reproducibility, one decode per sample, crop areas, the recipe's rates,
the evaluation transform against torchvision's, flat memory over epochs, and with `data.device_crops`
whole images shipped and cut on the device. CPU only."""
from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

import convert_datasets  # noqa: E402
import loaders.ffcv_backend as ffcv_backend  # noqa: E402
from configs.schema import DataConfig  # noqa: E402
from ffcv.loader.epoch_iterator import EpochIterator  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from loaders.eval_view import IMAGENET_STD  # noqa: E402
from loaders.builder import Batch, build_loader  # noqa: E402
from loaders.crop import padded_images, random_view, random_views  # noqa: E402
from loaders.shards import ShardSamples, open_converted  # noqa: E402
from loaders.eval_view import eval_view  # noqa: E402

CIFAR_BATCH = 16  # per rank: 300 samples, 2 ranks -> 9 batches each, 12 samples dropped
SEED = 7


def convert(source: Path, out: Path, name: str) -> str:
    assert convert_datasets.main(["imagefolder", "--source", str(source), "--out", str(out), "--name", name,
                                  "--workers", "2"]) == 0
    return str(out / name)


def loader(root: str, *, train: bool = True, batch_size: int = CIFAR_BATCH, rank: int = 0, world_size: int = 1,
           workers: int = 1, **data: object) -> ffcv_backend.FfcvLoader:
    config = DataConfig(root=root, backend="ffcv", workers=workers, **data)
    return build_loader(config, split="train" if train else "val", train=train, batch_size=batch_size, seed=SEED,
                        rank=rank, world_size=world_size)


def run_epoch(it: ffcv_backend.FfcvLoader, epoch: int, batches: int | None = None) -> list[Batch]:
    it.set_epoch(epoch)
    return [batch for _, batch in zip(range(batches or len(it)), it)]


@pytest.fixture(scope="module")
def imagenet_root(imagenet_folder, tmp_path_factory: pytest.TempPathFactory) -> str:
    """64 full-size ImageNet JPEGs for train and 16 of them for val, stored as JPEG in the .beton."""
    return convert(imagenet_folder(64, 16), tmp_path_factory.mktemp("ffcv-imagenet"), "imagenet")


@pytest.fixture(scope="module")
def cifar_ranks(cifar_root: str) -> list:
    """Rank 0 and rank 1 of 2 over the CIFAR train split, 32-px views."""
    return [loader(cifar_root, rank=rank, world_size=2, image_size=32, global_scale=(0.1, 1.0))
            for rank in (0, 1)]


@pytest.fixture(scope="module")
def cifar_epochs(cifar_ranks: list) -> dict[tuple[int, int], list[Batch]]:
    """(rank, epoch) -> that epoch's batches, for epochs 0 and 1."""
    return {(rank, epoch): run_epoch(it, epoch) for rank, it in enumerate(cifar_ranks) for epoch in (0, 1)}


def test_more_workers_than_cores(cifar_root: str) -> None:
    """data.workers defaults to 8; numba refuses more threads than cores, so the loader uses fewer."""
    assert len(loader(cifar_root, workers=4 * os.cpu_count())) == 300 // CIFAR_BATCH


def test_building_a_loader_keeps_torch_thread_count(cifar_root: str) -> None:
    """FFCV sets torch's CPU thread count (to 1 on import, to its workers' per Loader); `build_loader`
    puts it back, so a training process keeps its own."""
    torch.set_num_threads(3)
    loader(cifar_root, workers=1)
    assert torch.get_num_threads() == 3


IMAGENET_VIEWS = dict(batch_size=16, image_size=128, local_crops=2, local_size=96)  # 64 samples: 4 batches


@pytest.fixture(scope="module")
def imagenet_epoch(imagenet_root: str) -> list[Batch]:
    """Epoch 0 of the ImageNet train split with 2 global and 2 local views, decoded in 2 threads."""
    return run_epoch(loader(imagenet_root, workers=2, **IMAGENET_VIEWS), 0)


def test_local_crops_from_full_size_jpegs(imagenet_epoch: list[Batch]) -> None:
    """2 global views and 2 local 96-px crops from every image; each crop's area inside its scale."""
    assert len(imagenet_epoch) == 4
    for batch in imagenet_epoch:
        assert [tuple(v.shape) for v in batch.views] == [(16, 3, 128, 128)] * 2 + [(16, 3, 96, 96)] * 2
        assert all(torch.isfinite(v).all() for v in batch.views)
        for params, (low, high) in zip(batch.params, [(0.35, 1.0)] * 2 + [(0.05, 0.35)] * 2):
            assert ((params["area"] >= low * 0.97) & (params["area"] <= high * 1.03)).all()
        assert (batch.params[0]["area"] != batch.params[1]["area"]).all()  # each view has its own crop


def test_each_image_is_decoded_once_for_all_views(imagenet_root: str, imagenet_epoch: list[Batch],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With FFCV's compiler off the decoder runs as Python, so its JPEG decodes can be counted: one per
    sample for 4 views. That serial Python run also gives exactly the batches of the compiled decoder
    on 2 threads: crops are seeded per sample, not per thread."""
    calls, imdecode = [], ffcv_backend.imdecode

    def counting_imdecode(*args):
        calls.append(args)
        return imdecode(*args)

    monkeypatch.setattr(ffcv_backend, "imdecode", counting_imdecode)
    Compiler.set_enabled(False)
    try:
        python = run_epoch(loader(imagenet_root, **IMAGENET_VIEWS), 0)
    finally:
        Compiler.set_enabled(True)
    assert len(calls) == 64  # FFCV decodes only this epoch's samples, each once
    for a, b in zip(python, imagenet_epoch, strict=True):
        assert torch.equal(a.indices, b.indices) and all(torch.equal(x, y) for x, y in zip(a.views, b.views))
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a.params, b.params) for k in x)


@pytest.mark.slow
@pytest.mark.parametrize("device_crops,mean,worst", [(True, 1.2, 1.5), (False, 3, 8)])
def test_evaluation_covers_every_sample_once_and_matches_torchvision(imagenet_root: str, device_crops: bool,
                                                                     mean: float, worst: float) -> None:
    """Two ranks, batches of 3 (partial last batches): every val sample exactly once, with its label, and
    close to torchvision's Resize(256, bicubic) + CenterCrop(224) of the PIL image. In /255 of a pixel:
    cut on the device (the default for evaluation), the difference is the JPEG decoders' and the
    rounding's; cut on the host it is also OpenCV's area filter, which is not PIL's bicubic."""
    samples = ShardSamples(open_converted(imagenet_root), "val")
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    seen, differences = [], []
    for rank in (0, 1):
        it = loader(imagenet_root, train=False, batch_size=3, rank=rank, world_size=2, image_size=224,
                    device_crops=device_crops)
        assert it.device_crops is device_crops
        batches = run_epoch(it, 0)
        assert len(batches) == len(it) == 3 and [len(b.indices) for b in batches] == [3, 3, 2]
        for batch in batches:
            assert batch.params == [] and len(batch.views) == 1
            for image, index, label in zip(batch.views[0], batch.indices.tolist(), batch.labels.tolist()):
                reference, true_label = samples.decode(index)
                assert label == true_label
                differences.append(((image - eval_view(reference, 224)) * std).abs().mean().item() * 255)
            seen += batch.indices.tolist()
    assert sorted(seen) == list(range(16))
    assert max(differences) < worst and sum(differences) / len(differences) < mean, differences


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_stays_flat_across_epochs(cifar_ranks: list) -> None:
    """8 epochs, two of them abandoned: mid-way, and once FFCV's thread has decoded the whole epoch. No
    FFCV epoch (its thread and the batch buffers it allocates) outlives its epoch, and the resident memory
    does not grow."""
    it = cifar_ranks[0]
    abandoned = {2: 2, 5: len(it) - 2}  # epoch -> batches taken
    rss = []
    for epoch in range(8):
        run_epoch(it, epoch, batches=abandoned.get(epoch))
        assert not any(isinstance(t, EpochIterator) for t in threading.enumerate())
        rss.append(_rss_mib())
    gc.collect()
    assert EpochIterator not in {type(o) for o in gc.get_objects()}
    assert max(rss[3:]) - rss[2] < 20, rss



def test_device_stage_has_no_sync_prone_op(cifar_root: str, cifar_ranks: list, cifar_epochs: dict) -> None:
    """FFCV's GPU stage (move the uint8 views, areas, labels and indices, then augment; or with
    `data.device_crops`, the whole images and their sizes, then cut and augment, or in evaluation
    resize and centre-crop), counted in eager
    mode on a steady-state batch: nothing that would make the host wait for a GPU. It also remakes
    the batch's decisions exactly."""
    from bench.dispatch import OpCounter

    it, batch = cifar_ranks[0], cifar_epochs[0, 0][1]
    it.set_epoch(0)
    pixels = torch.randint(0, 256, (CIFAR_BATCH, int(it.decoder.offsets[-1])), dtype=torch.uint8)
    areas = torch.stack([p["area"] for p in batch.params], dim=1)
    with OpCounter() as counter:
        again = it._device_stage(pixels, areas, batch.labels, batch.indices, 1)
    assert counter.total > 200 and counter.sync_prone == {}, counter.sync_prone
    # the same per-batch seed: the same decisions as the loader's batch 1
    assert all(torch.equal(a[k], b[k]) for a, b in zip(again.params, batch.params) for k in a)

    whole = loader(cifar_root, rank=0, world_size=2, image_size=32, global_scale=(0.1, 1.0), device_crops=True)
    pixels = torch.randint(0, 256, (CIFAR_BATCH, 32 * 32 * 3), dtype=torch.uint8)
    sizes = torch.full((CIFAR_BATCH, 2), 32)
    with OpCounter() as counter:
        whole._device_stage(pixels, sizes, batch.labels, batch.indices, 1)
    assert counter.total > 200 and counter.sync_prone == {}, counter.sync_prone

    evaluation = loader(cifar_root, train=False, image_size=32, device_crops=True)
    with OpCounter() as counter:
        (view,) = evaluation._device_stage(pixels, sizes, batch.labels, batch.indices, 0).views
    assert view.shape == (CIFAR_BATCH, 3, 32, 32) and counter.total > 20 and counter.sync_prone == {}


def _host_batches(it: ffcv_backend.FfcvLoader) -> list[tuple[torch.Tensor, ...]]:
    """Epoch 0's host stage, each batch's tensors copied (FFCV refills its buffers)."""
    it.set_epoch(0)
    return [tuple(t.clone() for t in host) for _, *host in it.host_batches()]


def test_device_crops_ship_each_image_whole_and_decoded_once(imagenet_root: str, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """With `data.device_crops` FFCV's host stage is one decode per sample and nothing else: each row
    holds its sample's image whole (as `padded_images` unpacks it: libjpeg-turbo's decode of the
    sample's JPEG, within ~1/255 of Pillow's, whose IDCT differs) and the sizes its height and
    width. The decodes are counted with FFCV's compiler off (Python); the compiled decoder on 2
    threads gives the same images."""
    compiled = _host_batches(loader(imagenet_root, workers=2, device_crops=True, **IMAGENET_VIEWS))
    calls, imdecode = [], ffcv_backend.imdecode
    monkeypatch.setattr(ffcv_backend, "imdecode", lambda *args: calls.append(args) or imdecode(*args))
    Compiler.set_enabled(False)
    try:
        it = loader(imagenet_root, device_crops=True, **IMAGENET_VIEWS)
        python = _host_batches(it)
    finally:
        Compiler.set_enabled(True)
    assert len(calls) == 64
    for (pixels, *rest), (compiled_pixels, *compiled_rest) in zip(python, compiled, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(rest, compiled_rest))  # sizes, labels, indices
        for row, compiled_row, (h, w) in zip(pixels, compiled_pixels, rest[0].tolist()):
            assert torch.equal(row[:h * w * 3], compiled_row[:h * w * 3])  # the rest of a row is left as it was
    samples = ShardSamples(open_converted(imagenet_root), "train")
    height, width = it.decoder.height, it.decoder.width
    assert (height, width) == (max(samples.decode(i)[0].height for i in range(64)),
                               max(samples.decode(i)[0].width for i in range(64)))
    for pixels, sizes, labels, indices in python:
        images = padded_images(pixels, sizes, height, width)
        for image, (h, w), label, index in zip(images, sizes.tolist(), labels.tolist(), indices.tolist()):
            (jpeg, true_label), pillow = samples.read(index), samples.decode(index)[0]
            decoded = np.empty((h, w, 3), dtype=np.uint8)
            imdecode(np.frombuffer(jpeg, np.uint8), decoded, h, w, h, w, 0, 0, 1, 1, False, False)
            assert (w, h) == pillow.size and label == true_label
            assert torch.equal(image[:, :h, :w], torch.from_numpy(decoded).permute(2, 0, 1) / 255)
            assert np.abs(decoded.astype(np.int16) - np.asarray(pillow)).mean() < 1.5


def test_device_crops_are_random_views_of_the_whole_images(imagenet_root: str) -> None:
    """The views made on the device from the whole images: `random_view` of the unpacked batch with
    uniforms from the batch's `(seed, epoch, rank, batch)` generator, exactly as the memory backend
    draws them; each crop's area inside its view's scale."""
    it = loader(imagenet_root, workers=2, device_crops=True, **IMAGENET_VIEWS)
    hosts, batches = _host_batches(it), run_epoch(it, 0)
    assert len(batches) == 4 and isinstance(it.decoder, ffcv_backend.WholeRGBImageDecoder)
    for number, ((pixels, sizes, labels, indices), batch) in enumerate(zip(hosts, batches, strict=True)):
        generator = torch.Generator().manual_seed(it.settings.batch_seed(0, number))
        images = padded_images(pixels, sizes, it.decoder.height, it.decoder.width)
        views, params = random_views(random_view, images, it.specs, generator, torch.float32, sizes)
        assert torch.equal(batch.labels, labels) and torch.equal(batch.indices, indices)
        assert [tuple(v.shape) for v in batch.views] == [(16, 3, 128, 128)] * 2 + [(16, 3, 96, 96)] * 2
        assert all(torch.equal(a, b) for a, b in zip(batch.views, views, strict=True))
        for got, expected, (low, high) in zip(batch.params, params, [(0.35, 1.0)] * 2 + [(0.05, 0.35)] * 2):
            assert all(torch.equal(got[k], expected[k]) for k in expected)
            assert ((got["area"] >= low * 0.97) & (got["area"] <= high * 1.03)).all()
