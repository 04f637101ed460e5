"""convert_datasets.py: real CIFAR-10 and ImageNet JPEGs converted and read back with FFCV's Loader and
DALI's webdataset reader; broken and unusual images; kill -9 and resume; fake CIFAR releases; option
changes; error messages. CPU only."""
from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

import convert_datasets
from atomic_write import write_json
from convert.sources.cifar import CIFAR_RELEASES
from convert.sources.digits import read_digits
from convert.sources.imagenet import read_imagenet
from convert.verify import read_dali, read_ffcv
from loaders.manifest import (ConvertedDataset, DatasetNotFoundError, IndexEntry, Layout, format_wds_index,
                              open_dataset, parse_wds_index)
from loaders.shards import ShardSamples

REPO = Path(__file__).resolve().parents[1]


def convert(*args: object) -> None:
    """Run the converter in this process; it must succeed."""
    assert convert_datasets.main([str(a) for a in args]) == 0


def convert_error(capsys: pytest.CaptureFixture, *args: object) -> str:
    """Run the converter expecting a reported error (exit status 1); return the message."""
    assert convert_datasets.main([str(a) for a in args]) == 1
    return capsys.readouterr().err


def usage_error(capsys: pytest.CaptureFixture, *args: object) -> str:
    """Run the converter expecting a command-line error (argparse, exit status 2); return the message."""
    with pytest.raises(SystemExit) as exit_info:
        convert_datasets.main([str(a) for a in args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int16) - b).mean())


def read_both(dataset: ConvertedDataset, split: str) -> tuple[list[int], dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Labels (identical in both formats) and every decoded image, from FFCV and from DALI."""
    everything = range(dataset.count(split))
    ffcv_labels, ffcv_images = read_ffcv(dataset.ffcv_file(split), everything)
    dali_labels, dali_images = read_dali(dataset.dali_reader_args(split), everything)
    assert ffcv_labels == dali_labels
    return ffcv_labels, ffcv_images, dali_images


def small_image(path: Path, colour: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (colour, 0, 0)).save(path, "PNG")


# --------------------------------------------------------------------------------------------------
# CIFAR-10 JPEGs as an image folder: small images, stored losslessly, so pixels must be exact


@pytest.fixture(scope="module")
def cifar_converted(converted: Callable[..., Path]) -> ConvertedDataset:
    """The session's `cifar_folder` conversion (shards of 64), checked once more by a rerun with --verify."""
    root = converted("cifar", shard_size=64)
    dataset = open_dataset(root.parent, root.name)
    convert("imagefolder", "--source", dataset.manifest["options"]["source"], "--out", root.parent, "--name",
            root.name, "--shard-size", 64, "--verify")
    return dataset


def folder_samples(root: Path, split_dir: str) -> list[tuple[Path, int]]:
    """(file, label) in the order the converter must keep: sorted classes, then sorted files."""
    classes = sorted(p.name for p in (root / "train").iterdir())
    return [(p, classes.index(p.parent.name)) for p in sorted((root / split_dir).glob("*/*"))]


def test_cifar_folder_manifest(cifar_converted: ConvertedDataset, cifar_folder: Path) -> None:
    manifest = cifar_converted.manifest
    classes = sorted(p.name for p in (cifar_folder / "train").iterdir())
    assert manifest["name"] == cifar_converted.layout.root.name and manifest["classes"] == classes
    assert set(manifest["splits"]) == {"train", "val"}  # test/ becomes val
    for split, per_class in (("train", 30), ("val", 5)):
        entry = manifest["splits"][split]
        assert entry["count"] == 10 * per_class and entry["skipped"] == []
        assert entry["per_class"] == {name: per_class for name in classes}
    assert len(manifest["splits"]["train"]["dali"]) == 5  # 300 images in shards of 64
    assert manifest["options"]["formats"] == ["ffcv", "dali"] and manifest["options"]["jpeg_quality"] == 90
    assert manifest["formats"]["ffcv"]["fields"] == {"image": "RGBImageField", "label": "IntField"}
    root = cifar_converted.layout.root
    assert manifest["sha256"] == {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                                  for p in cifar_converted.files()}
    assert sorted(p.name for p in cifar_converted.layout.root.iterdir()) == ["dali", "ffcv", "manifest.json"]
    assert not list(cifar_converted.layout.root.rglob("*.tmp"))


def test_cifar_folder_ffcv_loader_gives_exact_pixels(cifar_converted: ConvertedDataset, cifar_folder: Path) -> None:
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    for split, folder in (("train", "train"), ("val", "test")):
        loader = Loader(str(cifar_converted.ffcv_file(split)), batch_size=50, num_workers=1, drop_last=False,
                        order=OrderOption.SEQUENTIAL,
                        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
        images, labels = [], []
        for image_batch, label_batch in loader:
            images += [image.copy() for image in image_batch]  # the loader reuses its buffers
            labels += label_batch.ravel().tolist()
        expected = folder_samples(cifar_folder, folder)
        assert labels == [label for _, label in expected]
        for image, (path, _) in zip(images, expected):
            np.testing.assert_array_equal(image, rgb(path))


def test_cifar_folder_dali_reader_gives_exact_pixels(cifar_converted: ConvertedDataset, cifar_folder: Path) -> None:
    from nvidia.dali import fn, pipeline_def, types

    for split, folder in (("train", "train"), ("val", "test")):
        @pipeline_def(batch_size=50, num_threads=2, device_id=None)
        def pipeline():
            encoded, label = fn.readers.webdataset(**cifar_converted.dali_reader_args(split), name="reader")
            return fn.decoders.image(encoded, device="cpu", output_type=types.RGB), label

        pipe = pipeline()
        pipe.build()
        expected = folder_samples(cifar_folder, folder)
        assert pipe.epoch_size("reader") == len(expected)
        for start in range(0, len(expected), 50):
            images, labels = pipe.run()
            for j, (path, label) in enumerate(expected[start:start + 50]):
                assert int(np.array(labels.at(j)).tobytes()) == label
                np.testing.assert_array_equal(np.array(images.at(j)), rgb(path))


def test_dali_index_files_match_dalis_own_indexer(cifar_converted: ConvertedDataset, tmp_path: Path) -> None:
    from wds2idx import IndexCreator  # DALI's tools/wds2idx.py, installed with DALI

    for tar, idx in zip(*cifar_converted.dali_files("train")):
        with IndexCreator(tar, str(tmp_path / "reference.idx"), verbose=False) as creator:
            creator.create_index()
        assert Path(idx).read_text() == (tmp_path / "reference.idx").read_text()


# --------------------------------------------------------------------------------------------------
# The ImageNet sample arranged as ILSVRC2012, with the awkward files real ImageNet has


def greyscale_wnid(sample: Path) -> str:
    """A class of the ImageNet sample whose JPEG is greyscale (the sample has 23)."""
    for path in sorted(sample.glob("train/*/*.JPEG")):
        with Image.open(path) as image:
            if image.mode == "L":
                return path.parent.name
    raise AssertionError("the ImageNet sample should contain greyscale JPEGs")


def largest_wnid(sample: Path) -> str:
    def pixels(path: Path) -> int:
        with Image.open(path) as image:
            return image.size[0] * image.size[1]
    return max(sample.glob("train/*/*.JPEG"), key=pixels).parent.name


def build_ilsvrc(sample: Path, root: Path, val_layout: str) -> dict:
    """ILSVRC2012 from the sample: 16 classes (with a greyscale and the largest image), plus a truncated
    JPEG, a CMYK JPEG, a PNG named .JPEG and a text file; val/ holds 8 of the train images, either in
    class folders or flat with Kaggle's LOC_val_solution.csv. Returns what the converter should find."""
    wnids = sorted({*sorted(p.name for p in (sample / "train").iterdir())[:14], greyscale_wnid(sample),
                    largest_wnid(sample)})
    originals = {}
    for wnid in wnids:
        (original,) = (sample / "train" / wnid).glob("*.JPEG")
        (root / "train" / wnid).mkdir(parents=True)
        (root / "train" / wnid / original.name).symlink_to(original)
        originals[wnid] = original
    special = {name: root / "train" / wnids[i] / f"zz_{name}" for i, name in
               enumerate(["truncated.JPEG", "cmyk.JPEG", "png.JPEG", "notes.txt"])}
    data = originals[wnids[0]].read_bytes()
    special["truncated.JPEG"].write_bytes(data[:len(data) // 2])
    with Image.open(originals[wnids[1]]) as image:
        image.convert("CMYK").save(special["cmyk.JPEG"], "JPEG", quality=95)
    with Image.open(originals[wnids[2]]) as image:
        image.save(special["png.JPEG"], "PNG")
    special["notes.txt"].write_text("not an image\n")

    val = {f"ILSVRC2012_val_{k:08d}": wnids[(5 * k) % len(wnids)] for k in range(1, 9)}
    for stem, wnid in val.items():
        folder = root / "val" / (wnid if val_layout == "folders" else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.JPEG").symlink_to(originals[wnid])
    if val_layout == "flat":
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ImageId", "PredictionString"])
            for stem, wnid in {**val, "ILSVRC2012_val_00049999": wnids[0]}.items():  # lists more than exist
                writer.writerow([stem, f"{wnid} 10 20 30 40 {wnid} 1 2 3 4"])
    return {"wnids": wnids, "originals": originals, "special": special, "val": val}


@pytest.fixture(scope="module", params=["flat", "folders"])
def imagenet_converted(request: pytest.FixtureRequest, imagenet_sample: Path,
                       tmp_path_factory: pytest.TempPathFactory) -> tuple[ConvertedDataset, Path, dict]:
    root = tmp_path_factory.mktemp(f"ilsvrc-{request.param}")
    expected = build_ilsvrc(imagenet_sample, root, request.param)
    out = tmp_path_factory.mktemp("out")
    convert("imagenet", "--source", root, "--out", out, "--workers", 2, "--shard-size", 5, "--verify")
    return open_dataset(out, "imagenet"), root, expected


def test_imagenet_counts_labels_and_skipped_files(imagenet_converted: tuple) -> None:
    dataset, root, expected = imagenet_converted
    wnids, special = expected["wnids"], expected["special"]
    assert dataset.classes == wnids
    skipped = {s["path"]: s["reason"] for s in dataset.manifest["splits"]["train"]["skipped"]}
    assert set(skipped) == {str(special[n].relative_to(root)) for n in ("truncated.JPEG", "notes.txt")}
    assert "truncated" in skipped[str(special["truncated.JPEG"].relative_to(root))]
    assert "cannot identify image file" in skipped[str(special["notes.txt"].relative_to(root))]

    kept = sorted(p for p in (root / "train").glob("*/*") if p not in (special["truncated.JPEG"], special["notes.txt"]))
    labels, _, _ = read_both(dataset, "train")
    assert labels == [wnids.index(p.parent.name) for p in kept]
    assert dataset.count("train") == len(kept) == len(wnids) + 2
    val_labels, _, _ = read_both(dataset, "val")
    val_files = sorted((root / "val").rglob("*.JPEG"))  # flat: by name; in class folders: by class, then name
    assert val_labels == [wnids.index(expected["val"][p.stem]) for p in val_files]
    assert sum(dataset.manifest["splits"]["val"]["per_class"].values()) == 8


def test_imagenet_pixels_are_close_to_the_source_in_both_formats(imagenet_converted: tuple) -> None:
    dataset, root, expected = imagenet_converted
    _, ffcv_images, dali_images = read_both(dataset, "train")
    shards = ShardSamples(dataset, "train")
    stored = [shards.read(i)[0] for i in range(len(shards))]
    special = expected["special"]
    kept = sorted(p for p in (root / "train").glob("*/*") if p not in (special["truncated.JPEG"], special["notes.txt"]))
    # The source each image came from: the converted CMYK and PNG files were made from these originals.
    sources = {special["cmyk.JPEG"]: expected["originals"][expected["wnids"][1]],
               special["png.JPEG"]: expected["originals"][expected["wnids"][2]]}
    origins = [sources.get(path, path).resolve() for path in kept]
    references = []
    for i, path in enumerate(kept):
        source = rgb(origins[i])
        height, width = source.shape[:2]
        scale = min(1.0, 512 / max(height, width))
        size = (round(width * scale), round(height * scale))
        reference = np.asarray(Image.fromarray(source).resize(size, Image.Resampling.BICUBIC))
        references.append(reference)
        assert max(reference.shape) <= 512
        from_bytes = rgb(io.BytesIO(stored[i]))
        assert stored[i][:2] == b"\xff\xd8"  # every sample of ImageNet is stored as JPEG
        # both readers decode the stored JPEG like PIL does, give or take decoder rounding...
        assert mean_difference(ffcv_images[i], from_bytes) < 3 and mean_difference(dali_images[i], from_bytes) < 3
        # ...and the stored JPEG is the source image at quality 90
        assert mean_difference(from_bytes, reference) < 16
    # each image is far closer to its own source than to any other (nothing shifted or swapped)
    for i, image in ffcv_images.items():
        for j, other in enumerate(references):
            if origins[j] != origins[i] and other.shape == image.shape:
                assert mean_difference(image, other) > 2 * mean_difference(image, references[i])
    greyscale = ffcv_images[kept.index(next(p for p in kept if p.parent.name == greyscale_wnid(root)))]
    assert np.abs(greyscale.astype(np.int16) - greyscale[..., :1]).mean() < 2  # R = G = B
    largest = ffcv_images[kept.index(next(p for p in kept if p.parent.name == largest_wnid(root)))]
    assert max(largest.shape[:2]) == 512


def write_devkit(root: Path, val: dict[str, str], wnids: list[str]) -> None:
    """A minimal ILSVRC2012 devkit: meta.mat numbers the classes in an order unlike the sorted one."""
    from scipy.io import savemat

    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    number = {wnid: len(wnids) - i for i, wnid in enumerate(wnids)}
    synsets = np.array([(number[w], w, 0) for w in wnids] + [(len(wnids) + 1, "n00001740", 3)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    savemat(data / "meta.mat", {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{number[val[f'ILSVRC2012_val_{k:08d}']]}\n" for k in range(1, len(val) + 1)))


@pytest.mark.parametrize("packed", [False, True], ids=["devkit-folder", "devkit-tar.gz"])
def test_imagenet_flat_val_with_the_image_net_devkit(imagenet_sample: Path, tmp_path: Path, packed: bool) -> None:
    expected = build_ilsvrc(imagenet_sample, tmp_path, "flat")
    (tmp_path / "LOC_val_solution.csv").unlink()
    write_devkit(tmp_path, expected["val"], expected["wnids"])
    if packed:
        with tarfile.open(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
            tar.add(tmp_path / "ILSVRC2012_devkit_t12", "ILSVRC2012_devkit_t12")
        os.rename(tmp_path / "ILSVRC2012_devkit_t12", tmp_path / "unused")
    val = read_imagenet(tmp_path).splits["val"]
    assert [(s.name, s.label) for s in val] == [(f"val/{stem}.JPEG", expected["wnids"].index(wnid))
                                                for stem, wnid in sorted(expected["val"].items())]


def test_imagenet_kaggle_layout(imagenet_sample: Path, tmp_path: Path) -> None:
    """Kaggle's download: ILSVRC/Data/CLS-LOC/{train,val} with LOC_val_solution.csv at the top."""
    expected = build_ilsvrc(imagenet_sample, tmp_path / "ILSVRC" / "Data" / "CLS-LOC", "flat")
    (tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "LOC_val_solution.csv").rename(tmp_path / "LOC_val_solution.csv")
    source = read_imagenet(tmp_path)
    assert source.classes == expected["wnids"]
    assert source.root == tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    assert [(s.name, s.label) for s in source.splits["val"]] == [(f"val/{stem}.JPEG", expected["wnids"].index(wnid))
                                                                 for stem, wnid in sorted(expected["val"].items())]


# --------------------------------------------------------------------------------------------------
# Interrupted runs


@pytest.fixture
def sample_folder(imagenet_sample: Path, tmp_path: Path) -> Path:
    """An image folder with all 1,000 ImageNet sample images in train/ and 10 of them in val/."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "train").symlink_to(imagenet_sample / "train")
    for original in sorted(imagenet_sample.glob("train/*/*.JPEG"))[:10]:
        (source / "val" / original.parent.name).mkdir(parents=True)
        (source / "val" / original.parent.name / original.name).symlink_to(original)
    return source


def interrupt_conversion(args: list, layout: Layout, interrupt: Callable[[subprocess.Popen], None],
                         after_shard: int = 0) -> subprocess.CompletedProcess:
    """Run the converter as a process and `interrupt` it once it has written shard `after_shard` (as
    early as the test allows: on a loaded machine the rest of a small conversion takes under a second)."""
    process = subprocess.Popen([sys.executable, REPO / "convert_datasets.py", *map(str, args)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not Layout.shard(layout.dali_dir("train"), after_shard)[1].exists() and process.poll() is None:
            assert time.monotonic() < deadline, "the conversion did not get going"
            time.sleep(0.005)
        interrupt(process)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert not layout.manifest.exists(), "the conversion finished before it could be interrupted"
    return subprocess.CompletedProcess(process.args, process.returncode, None, stderr)


def child_processes(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if not children.exists():
        pytest.skip("needs Linux's /proc/<pid>/task/<pid>/children to find the worker processes")
    return [int(child) for child in children.read_text().split()]


@pytest.mark.slow
def test_killed_conversion_leaves_nothing_complete_and_resumes_to_identical_output(
        sample_folder: Path, tmp_path: Path, file_hashes: Callable[[Path], dict[str, str]]) -> None:
    args = ["imagefolder", "--source", sample_folder, "--workers", 2, "--shard-size", 25, "--name", "sample"]
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    layout = Layout(killed / "sample")
    # Killed once shard 2 is written, so shard 1 is surely finished (its record follows its files).
    interrupt_conversion([*args, "--out", killed], layout, lambda process: process.send_signal(signal.SIGKILL),
                         after_shard=2)

    # Nothing looks complete: no manifest, no .beton; every shard with an index is intact.
    assert not list(layout.root.rglob("*.beton"))
    for idx in layout.dali_dir("train").glob("*.idx"):
        members = [(s[0].name, s[0].offset) for s in parse_wds_index(idx.read_text())]
        with tarfile.open(idx.with_suffix(".tar")) as tar:
            assert [(m.name, m.offset_data) for m in tar if not m.name.endswith(".cls")] == members
    # Damage finished shard 0; shard 1 must be checked and kept as it is.
    tar0, _ = Layout.shard(layout.dali_dir("train"), 0)
    tar0.write_bytes(tar0.read_bytes()[:-3000])
    tar1, _ = Layout.shard(layout.dali_dir("train"), 1)
    before = tar1.stat()
    (layout.root / "ffcv").mkdir(exist_ok=True)
    (layout.root / "ffcv" / "train.beton.tmp").write_bytes(b"left by a killed run")

    convert(*args, "--out", killed)
    assert (tar1.stat().st_ino, tar1.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    convert(*args, "--out", reference)
    assert file_hashes(killed / "sample") == file_hashes(reference / "sample")
    assert not list(killed.rglob("*.tmp")) and not layout.partial.exists()


@pytest.mark.slow
def test_a_dead_worker_stops_the_run_with_a_clear_error(sample_folder: Path, tmp_path: Path) -> None:
    def kill_a_worker(process: subprocess.Popen) -> None:
        # the workers are the children of the converter's forkserver (one of its own children)
        workers = [worker for child in child_processes(process.pid) for worker in child_processes(child)]
        os.kill(workers[0], signal.SIGKILL)

    args = ["imagefolder", "--source", sample_folder, "--workers", 2, "--shard-size", 25, "--out", tmp_path]
    result = interrupt_conversion(args, Layout(tmp_path / "imagefolder"), kill_a_worker)
    assert result.returncode == 1 and "a worker process died" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_rerun_resumes(sample_folder: Path, tmp_path: Path) -> None:
    args = ["imagefolder", "--source", sample_folder, "--workers", 2, "--shard-size", 25, "--out", tmp_path,
            "--formats", "dali"]
    layout = Layout(tmp_path / "imagefolder")
    result = interrupt_conversion(args, layout, lambda process: process.send_signal(signal.SIGINT))
    assert result.returncode == 130 and "run the same command again to resume" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(layout.root.rglob("*.tmp"))
    finished = sorted(layout.dali_dir("train").glob("*.idx"))
    convert(*args)
    assert open_dataset(tmp_path, "imagefolder").count("train") == 1000
    assert set(finished) <= set(layout.dali_dir("train").glob("*.idx"))


# --------------------------------------------------------------------------------------------------
# In-memory sources: digits and the official CIFAR releases (small images: exact pixels)


def test_digits_split_labels_and_pixels(converted: Callable[..., Path]) -> None:
    dataset = open_dataset(converted("digits").parent, "digits")
    assert dataset.classes == [str(d) for d in range(10)]
    assert (dataset.count("train"), dataset.count("val")) == (1437, 360)
    assert all(35 <= n <= 37 for n in dataset.manifest["splits"]["val"]["per_class"].values())  # stratified
    source = read_digits()
    for split in ("train", "val"):
        labels, ffcv_images, dali_images = read_both(dataset, split)
        assert labels == [s.label for s in source.splits[split]]
        for i, sample in enumerate(source.splits[split]):
            assert sample.pixels.shape == (32, 32, 3)
            np.testing.assert_array_equal(ffcv_images[i], sample.pixels)
            np.testing.assert_array_equal(dali_images[i], sample.pixels)


def test_output_does_not_depend_on_the_number_of_workers(converted: Callable[..., Path], tmp_path: Path,
                                                          file_hashes: Callable[[Path], dict[str, str]]) -> None:
    convert("digits", "--out", tmp_path, "--workers", 1)
    assert file_hashes(tmp_path / "digits") == file_hashes(converted("digits"))


def write_fake_cifar(root: Path, kind: str) -> tuple[list[str], dict[str, tuple[np.ndarray, list[str]]]]:
    """A tiny release in the official pickle format with class names in scrambled order. Returns the
    sorted class names and, per split, the images (N, 32, 32, 3) and their class names."""
    rng = np.random.default_rng(0)
    n_classes = 10 if kind == "cifar10" else 100
    names = [f"class_{i:03d}" for i in rng.permutation(n_classes)]
    release = CIFAR_RELEASES[kind]
    folder = root / release.folder
    folder.mkdir(parents=True)
    with open(folder / release.meta, "wb") as f:
        pickle.dump({release.names_key: [n.encode() for n in names]}, f)
    expected = {}
    for split, files in (("train", release.train), ("val", release.test)):
        images, classes = [], []
        for file in files:
            labels = rng.integers(0, n_classes, 12 if kind == "cifar10" else 150).tolist()
            data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
            with open(folder / file, "wb") as f:
                pickle.dump({b"data": data, release.labels_key: labels, b"coarse_labels": labels}, f)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            classes += [names[label] for label in labels]
        expected[split] = (np.concatenate(images), classes)
    return sorted(names), expected


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_fake_cifar_release(tmp_path: Path, kind: str) -> None:
    classes, expected = write_fake_cifar(tmp_path / "cifar", kind)
    convert(kind, "--source", tmp_path / "cifar", "--out", tmp_path / "out", "--workers", 2)
    dataset = open_dataset(tmp_path / "out", kind)
    assert dataset.classes == classes
    for split, (images, names) in expected.items():
        labels, ffcv_images, dali_images = read_both(dataset, split)
        assert labels == [classes.index(n) for n in names]
        np.testing.assert_array_equal(np.stack([ffcv_images[i] for i in range(len(images))]), images)
        np.testing.assert_array_equal(np.stack([dali_images[i] for i in range(len(images))]), images)


def test_cifar_download_offline_says_where_to_put_the_files(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    message = convert_error(capsys, "cifar10", "--source", tmp_path / "cifar", "--out", tmp_path, "--download")
    assert "could not download cifar10" in message and "cifar-10-python.tar.gz" in message
    assert str(tmp_path / "cifar" / "cifar-10-batches-py" / "batches.meta") in message


# --------------------------------------------------------------------------------------------------
# Existing output, formats, loaders.manifest


def test_a_finished_conversion_is_found_and_verified_without_the_lock(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished dataset on a read-only mount: the lock file cannot be created there, and need not be."""
    convert("digits", "--out", tmp_path, "--formats", "dali")
    capsys.readouterr()

    def unwritable(layout: Layout):
        raise PermissionError(13, "Permission denied", str(layout.lock))

    monkeypatch.setattr("convert.cli.exclusive", unwritable)
    convert("digits", "--out", tmp_path, "--formats", "dali", "--verify")
    assert "nothing to do" in capsys.readouterr().out
    index = Layout.shard(Layout(tmp_path / "digits").dali_dir("val"), 0)[1]
    index.unlink()  # unfinished after all: converting needs the lock, and says why it cannot have it
    assert "Permission denied" in convert_error(capsys, "digits", "--out", tmp_path, "--formats", "dali")


def test_existing_output_with_other_options_is_refused_unless_overwrite(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    convert("digits", "--out", tmp_path, "--formats", "dali")
    message = convert_error(capsys, "digits", "--out", tmp_path, "--formats", "dali", "--jpeg-quality", "80")
    assert "jpeg_quality: existing 90, requested 80" in message and "--overwrite" in message
    convert("digits", "--out", tmp_path, "--formats", "dali")
    assert "nothing to do" in capsys.readouterr().out
    index = Layout.shard(Layout(tmp_path / "digits").dali_dir("val"), 0)[1]
    index.unlink()  # an output file deleted by hand: converted again, not "nothing to do"
    convert("digits", "--out", tmp_path, "--formats", "dali")
    assert "missing" in capsys.readouterr().out and index.is_file()
    convert("digits", "--out", tmp_path, "--formats", "dali", "--jpeg-quality", "80", "--overwrite")
    assert open_dataset(tmp_path, "digits").manifest["options"]["jpeg_quality"] == 80
    # an unfinished run's options count too
    layout = Layout(tmp_path / "digits")
    layout.manifest.unlink()
    write_json(layout.partial / "options.json", {"dataset": "digits", "shard_size": 7})
    message = convert_error(capsys, "digits", "--out", tmp_path, "--formats", "dali")
    assert "shard_size: existing 7, requested 2000" in message


def test_changed_source_files_are_not_mixed_with_earlier_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "source"
    small_image(source / "train" / "dog" / "a.png")
    small_image(source / "val" / "dog" / "b.png")
    convert("imagefolder", "--source", source, "--out", tmp_path, "--formats", "dali")
    small_image(source / "train" / "dog" / "c.png")
    message = convert_error(capsys, "imagefolder", "--source", source, "--out", tmp_path, "--formats", "dali")
    assert "source_listing_sha256: existing" in message


@pytest.mark.parametrize("only", ["ffcv", "dali"])
def test_a_single_format_leaves_no_staging_files(tmp_path: Path, only: str) -> None:
    convert("digits", "--out", tmp_path, "--formats", only, "--verify")
    dataset = open_dataset(tmp_path, "digits")
    other = "dali" if only == "ffcv" else "ffcv"
    assert sorted(p.name for p in dataset.layout.root.iterdir()) == sorted([only, "manifest.json"])
    with pytest.raises(DatasetNotFoundError, match=f"without the {other} format"):
        dataset.ffcv_file("train") if other == "ffcv" else dataset.dali_files("train")


def test_open_dataset_says_how_to_create_a_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=f"python convert_datasets.py cifar10 .*--out {tmp_path}"):
        open_dataset(tmp_path, "cifar10")
    with pytest.raises(DatasetNotFoundError, match=f"imagefolder --source .* --out {tmp_path} --name flowers"):
        open_dataset(tmp_path, "flowers")
    Layout(tmp_path / "digits").partial.mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="did not finish; run the same command again"):
        open_dataset(tmp_path, "digits")


def test_wds_index_round_trip_and_truncation() -> None:
    samples = [[IndexEntry("jpg", 512, 100, "00000000.jpg"), IndexEntry("cls", 1536, 1, "00000000.cls")],
               [IndexEntry("png", 2560, 30, "00000001.png"), IndexEntry("cls", 3584, 2, "00000001.cls")]]
    text = format_wds_index(samples)
    assert text.splitlines()[0] == "v1.2 2" and parse_wds_index(text) == samples
    assert [sample[0].key for sample in samples] == ["00000000", "00000001"]
    with pytest.raises(ValueError):
        parse_wds_index("\n".join(text.splitlines()[:2]))


# --------------------------------------------------------------------------------------------------
# Error messages


def test_unknown_subcommand_and_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "invalid choice: 'mnist'" in usage_error(capsys, "mnist", "--out", tmp_path)
    message = usage_error(capsys, "digits", "--out", tmp_path, "--formats", "tfrecord")
    assert "choose one or more of ffcv,dali" in message
    assert "101 is not in 1..100" in usage_error(capsys, "digits", "--out", tmp_path, "--jpeg-quality", "101")
    assert "the following arguments are required: --source" in usage_error(capsys, "imagenet", "--out", tmp_path)
    assert "unrecognized arguments: --source" in usage_error(capsys, "digits", "--out", tmp_path, "--source", tmp_path)


def layout_problem(kind: str, root: Path) -> str:
    """Build a broken source of kind `kind` under `root`; return the substring the error must contain."""
    if kind == "missing":
        return "does not exist"
    if kind == "no train folder":
        small_image(root / "images" / "a.png")
        return "should contain train/<class>/<image> and either val/<class>/<image>"
    small_image(root / "train" / "dog" / "a.png")
    small_image(root / "val" / "dog" / "b.png")
    if kind == "empty class":
        (root / "train" / "cat").mkdir()
        return f"class folder {root / 'train' / 'cat'} is empty"
    if kind == "loose file":
        small_image(root / "train" / "c.png")
        return "should contain class folders (<class>/<image>), but has files c.png"
    if kind == "unknown val class":
        small_image(root / "val" / "emu" / "c.png")
        return "has classes that the train split lacks: emu"
    small_image(root / "test" / "dog" / "c.png")
    return "either val/<class>/<image> or test/<class>/<image>; it has test/, train/, val/"


@pytest.mark.parametrize("kind", ["missing", "no train folder", "empty class", "loose file", "unknown val class",
                                  "val and test"])
def test_image_folder_layout_errors(tmp_path: Path, capsys: pytest.CaptureFixture, kind: str) -> None:
    expected = layout_problem(kind, tmp_path / "source")
    message = convert_error(capsys, "imagefolder", "--source", tmp_path / "source", "--out", tmp_path / "out")
    assert expected in message
    assert not (tmp_path / "out").exists()  # nothing written before the source is understood


def test_imagenet_flat_val_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    small_image(tmp_path / "train" / "n01" / "a.JPEG")
    small_image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    message = convert_error(capsys, "imagenet", "--source", tmp_path, "--out", tmp_path / "out")
    assert "no ground truth was found" in message and "LOC_val_solution.csv" in message
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000002,n01 1 2 3 4\n")
    message = convert_error(capsys, "imagenet", "--source", tmp_path, "--out", tmp_path / "out")
    assert "has no label for 1 images" in message and "val/ILSVRC2012_val_00000001.JPEG" in message


def test_missing_cifar_release_says_where_to_put_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    message = convert_error(capsys, "cifar100", "--source", tmp_path, "--out", tmp_path / "out")
    assert "--download" in message and "cifar-100-python.tar.gz" in message
    assert str(tmp_path / "cifar-100-python" / "meta") in message
