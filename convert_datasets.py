#!/usr/bin/env python3
"""Convert ImageNet, CIFAR-10/100, any image folder or scikit-learn's digits into FFCV and DALI formats.

    python convert_datasets.py {imagenet,cifar10,cifar100,imagefolder,digits} --out DIR [--source DIR] ...

Writes DIR/NAME/ffcv/{train,val}.beton, DIR/NAME/dali/{train,val}/shard-NNNNN.{tar,idx} and, last,
DIR/NAME/manifest.json. User guide: docs/converting.md.

How: worker processes decode every image once with PIL, convert it to RGB, shrink it to --max-resolution
and encode it once: as JPEG, or as lossless PNG when it is small (CIFAR, digits). The main process writes
the results in source order into WebDataset shards, one shard at a time, each committed by renaming; the
FFCV file is then packed from the shards' bytes, so both formats hold the same pixels in the same order.
Shards a killed run finished are checked and kept on the next run.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import importlib.metadata
import io
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import sys
import tarfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import PIL
from PIL import Image
from tqdm import tqdm

from loaders.manifest import (FORMATS, IMAGE_EXT, LABEL_EXT, MANIFEST_VERSION, SPLITS, WDS_INDEX_VERSION,
                              ConvertedDataset, IndexEntry, Layout, format_wds_index, open_dataset,
                              parse_wds_index)

# Bumped whenever a change to this file changes the bytes written: older outputs then need --overwrite.
CONVERTER_VERSION = 1
# Images whose longer side is at most this many pixels are stored losslessly (FFCV raw, PNG in the shards).
RAW_MAX_SIDE = 64
TMP_SUFFIX = ".tmp"
# --verify compares this many evenly spaced samples per split with the source, pixel by pixel.
VERIFY_SAMPLES = 32
# Different JPEG decoders (PIL, FFCV's libjpeg-turbo with fast DCT, DALI) may differ by a few grey levels
# on the same file; a wrong or misplaced image differs by tens (mean absolute difference, 0-255 scale).
JPEG_DECODE_TOLERANCE = 3.0
# sklearn's digits are 8x8 with values 0-16; stored as 32x32 RGB so that CIFAR-sized models and crops apply.
DIGITS_SIZE = 32


class ConvertError(Exception):
    """A problem with the input or the existing output: reported as one message, without a traceback."""


# --------------------------------------------------------------------------------------------------
# Sources: what to convert, in a deterministic order


@dataclass(frozen=True)
class Sample:
    """One image: a file (`name` relative to the source root) or pixels already in memory (CIFAR, digits)."""

    name: str  # also how the sample is listed in the manifest when it is skipped
    label: int
    pixels: np.ndarray | None = None


@dataclass(frozen=True)
class Source:
    """What a dataset reader found: class names in label order and the samples of each split."""

    classes: list[str]
    splits: dict[str, list[Sample]]
    root: Path | None  # the folder Sample.name is relative to; None when all pixels are in memory


@dataclass(frozen=True)
class CifarRelease:
    """Where the official Python release of CIFAR-10 or CIFAR-100 keeps what."""

    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    names_key: bytes
    labels_key: bytes
    torchvision_class: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, *self.test, self.meta)


CIFAR_RELEASES = {
    "cifar10": CifarRelease("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                            "batches.meta", b"label_names", b"labels", "CIFAR10"),
    "cifar100": CifarRelease("cifar-100-python", ("train",), ("test",), "meta",
                             b"fine_label_names", b"fine_labels", "CIFAR100"),
}
IMAGENET_LOC_CSV = "LOC_val_solution.csv"  # Kaggle's ImageNet Object Localization Challenge
IMAGENET_DEVKIT = "ILSVRC2012_devkit_t12"  # image-net.org's devkit, as a folder or .tar.gz
IMAGENET_KAGGLE_ROOT = Path("ILSVRC/Data/CLS-LOC")


def require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise ConvertError(f"{what} {path} does not exist or is not a folder")


def list_files(folder: Path, root: Path) -> list[str]:
    """Every file below `folder` (recursively, hidden ones excluded), sorted, relative to `root`.
    Nothing is filtered by extension: a file that is not an image is reported as skipped, not silently lost."""
    names = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        names += [os.path.relpath(os.path.join(directory, f), root) for f in files if not f.startswith(".")]
    return sorted(names)


def visible_entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def class_folder_samples(split_dir: Path, root: Path, classes: list[str] | None) -> tuple[list[str], list[Sample]]:
    """Samples of `split_dir/<class>/...`. The train split defines the classes (sorted folder names);
    later splits pass them in and may use a subset."""
    entries = visible_entries(split_dir)
    stray = [p.name for p in entries if not p.is_dir()]
    if stray or not entries:
        found = f"files {', '.join(stray[:5])}" if stray else "nothing"
        raise ConvertError(f"{split_dir} should contain class folders (<class>/<image>), but has {found}")
    names = [p.name for p in entries]
    classes = names if classes is None else classes
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ConvertError(f"{split_dir} has classes that the train split lacks: {', '.join(unknown[:5])}")
    label = {c: i for i, c in enumerate(classes)}
    samples = []
    for folder in entries:
        files = list_files(folder, root)
        if not files:
            raise ConvertError(f"class folder {folder} is empty; every class folder needs at least one image")
        samples += [Sample(f, label[folder.name]) for f in files]
    return classes, samples


def read_imagefolder(source: Path) -> Source:
    """`train/<class>/*` and `val/<class>/*` (or `test/<class>/*`)."""
    require_dir(source, "source folder")
    held_out = [source / n for n in ("val", "test") if (source / n).is_dir()]
    if not (source / "train").is_dir() or len(held_out) != 1:
        found = ", ".join(p.name + ("/" if p.is_dir() else "") for p in visible_entries(source)[:8]) or "nothing"
        raise ConvertError(f"{source} should contain train/<class>/<image> and either val/<class>/<image> or "
                           f"test/<class>/<image>; it has {found}")
    classes, train = class_folder_samples(source / "train", source, None)
    _, val = class_folder_samples(held_out[0], source, classes)
    return Source(classes, {"train": train, "val": val}, source)


def read_imagenet(source: Path) -> Source:
    """ILSVRC2012: train/<wnid>/*.JPEG; val/ either as val/<wnid>/*.JPEG or flat with a ground-truth file
    (see `imagenet_val_truth`). Kaggle's ILSVRC/Data/CLS-LOC/{train,val} is accepted as well."""
    require_dir(source, "source folder")
    root = source / IMAGENET_KAGGLE_ROOT if (source / IMAGENET_KAGGLE_ROOT).is_dir() else source
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise ConvertError(f"{source} should contain train/<wnid>/*.JPEG and val/ (ILSVRC2012 layout, or Kaggle's "
                           f"{IMAGENET_KAGGLE_ROOT}/train and val)")
    classes, train = class_folder_samples(root / "train", root, None)
    val_dir = root / "val"
    if not visible_entries(val_dir):
        raise ConvertError(f"{val_dir} is empty")
    if any(p.is_dir() for p in visible_entries(val_dir)):
        _, val = class_folder_samples(val_dir, root, classes)
    else:
        truth, truth_file = imagenet_val_truth([source, root, val_dir])
        val = flat_val_samples(val_dir, root, classes, truth, truth_file)
    return Source(classes, {"train": train, "val": val}, root)


def flat_val_samples(val_dir: Path, root: Path, classes: list[str], truth: dict[str, str], truth_file: Path
                     ) -> list[Sample]:
    """Samples of a flat val/, labelled by the ground truth (image name without extension -> wnid)."""
    files = list_files(val_dir, root)
    unlabelled = [f for f in files if Path(f).stem not in truth]
    if unlabelled:
        raise ConvertError(f"{truth_file} has no label for {len(unlabelled)} images of {val_dir}, "
                           f"e.g. {', '.join(unlabelled[:3])}")
    unknown = sorted({truth[Path(f).stem] for f in files} - set(classes))
    if unknown:
        raise ConvertError(f"{truth_file} labels images of {val_dir} with classes that train/ lacks: "
                           f"{', '.join(unknown[:5])}")
    label = {c: i for i, c in enumerate(classes)}
    return [Sample(f, label[truth[Path(f).stem]]) for f in files]


def imagenet_val_truth(folders: list[Path]) -> tuple[dict[str, str], Path]:
    """Image name (without extension) -> wnid for a flat val/, from the first ground-truth file found in
    `folders`: Kaggle's LOC_val_solution.csv, or the ILSVRC2012 devkit (folder or .tar.gz) whose
    data/ILSVRC2012_validation_ground_truth.txt gives the class number of image k on line k and whose
    data/meta.mat maps class numbers to wnids."""
    for folder in folders:
        if (folder / IMAGENET_LOC_CSV).is_file():
            with open(folder / IMAGENET_LOC_CSV, newline="") as f:
                return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}, \
                    folder / IMAGENET_LOC_CSV
        if (folder / IMAGENET_DEVKIT).is_dir():
            return read_devkit(lambda name: (folder / IMAGENET_DEVKIT / name).read_bytes()), folder / IMAGENET_DEVKIT
        archive = folder / f"{IMAGENET_DEVKIT}.tar.gz"
        if archive.is_file():
            with tarfile.open(archive) as tar:
                return read_devkit(lambda name: tar.extractfile(f"{IMAGENET_DEVKIT}/{name}").read()), archive
    raise ConvertError(
        f"val/ is flat (no class folders) but no ground truth was found in {', '.join(map(str, folders))}: "
        f"expected {IMAGENET_LOC_CSV} (Kaggle) or {IMAGENET_DEVKIT}/ or {IMAGENET_DEVKIT}.tar.gz (image-net.org) "
        f"next to train/ and val/; or sort val/ into val/<wnid>/ folders")


def read_devkit(read: Callable[[str], bytes]) -> dict[str, str]:
    """Validation labels from the ILSVRC2012 devkit; `read` returns a file of the devkit by relative name."""
    from scipy.io import loadmat  # scipy comes with scikit-learn; only this layout needs it

    synsets = loadmat(io.BytesIO(read("data/meta.mat")), squeeze_me=True)["synsets"]
    wnids = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    numbers = read("data/ILSVRC2012_validation_ground_truth.txt").split()
    return {f"ILSVRC2012_val_{k:08d}": wnids[int(n)] for k, n in enumerate(numbers, start=1)}


def read_cifar(kind: str, source: Path, download: bool) -> Source:
    """The official Python release of CIFAR-10/100 (pickled numpy batches; CIFAR-100's fine labels)."""
    release = CIFAR_RELEASES[kind]
    folder = source if (source / release.meta).is_file() else source / release.folder
    if download and not all((folder / f).is_file() for f in release.files):
        download_cifar(kind, source)
        folder = source / release.folder
    missing = [f for f in release.files if not (folder / f).is_file()]
    if missing:
        url = getattr(cifar_torchvision_class(release), "url", "the CIFAR web page")
        raise ConvertError(
            f"{kind}: the official Python release was not found: {folder} lacks {', '.join(missing)}. "
            f"Re-run with --download, or download {url} and extract it into {source} "
            f"(so that {source / release.folder / release.meta} exists)")
    names = [n.decode() for n in unpickle(folder / release.meta)[release.names_key]]
    classes = sorted(names)
    to_sorted = np.array([classes.index(n) for n in names])  # the identity for the real releases
    splits = {}
    for split, files in (("train", release.train), ("val", release.test)):
        samples = []
        for file in files:
            batch = unpickle(folder / file)
            images = np.ascontiguousarray(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)
                                          .transpose(0, 2, 3, 1))
            labels = to_sorted[np.asarray(batch[release.labels_key])]
            samples += [Sample(f"{release.folder}/{file}[{i}]", int(label), image)
                        for i, (image, label) in enumerate(zip(images, labels))]
        splits[split] = samples
    return Source(classes, splits, None)


def cifar_torchvision_class(release: CifarRelease) -> Any:
    import torchvision.datasets  # only for --download and its error message

    return getattr(torchvision.datasets, release.torchvision_class)


def download_cifar(kind: str, source: Path) -> None:
    """Fetch and extract the release into `source` with torchvision (which checks its MD5)."""
    release = CIFAR_RELEASES[kind]
    dataset_class = cifar_torchvision_class(release)
    source.mkdir(parents=True, exist_ok=True)
    try:
        dataset_class(root=str(source), train=True, download=True)
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError
        raise ConvertError(
            f"could not download {kind} ({error}). Without internet access, download {dataset_class.url} "
            f"elsewhere and extract it into {source} (so that {source / release.folder / release.meta} exists)"
        ) from error


def unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")  # the official release's format (trusted input)


def read_digits() -> Source:
    """scikit-learn's bundled 1,797 handwritten digits, upscaled to 32x32 RGB, split 80/20 stratified by
    class with a fixed seed (1,437 train, 360 val). Offline; the demo dataset."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    grey = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(g).resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BICUBIC)
                                  .convert("RGB")) for g in grey])
    train, val = train_test_split(np.arange(len(images)), test_size=0.2, stratify=digits.target, random_state=0)
    splits = {split: [Sample(f"digits[{i}]", int(digits.target[i]), images[i]) for i in sorted(indices)]
              for split, indices in (("train", train), ("val", val))}
    return Source([str(d) for d in range(10)], splits, None)


def read_source(args: argparse.Namespace) -> Source:
    if args.dataset == "digits":
        return read_digits()
    if args.dataset in CIFAR_RELEASES:
        return read_cifar(args.dataset, args.source, args.download)
    return read_imagenet(args.source) if args.dataset == "imagenet" else read_imagefolder(args.source)


# --------------------------------------------------------------------------------------------------
# Decoding and encoding (runs in the worker processes)


def fit_within(size: tuple[int, int], limit: int) -> tuple[int, int]:
    """`size` scaled down, aspect kept, so that its longer side is at most `limit`."""
    longer = max(size)
    if longer <= limit:
        return size
    return tuple(max(1, round(side * limit / longer)) for side in size)


def load_rgb(sample: Sample, root: Path | None, max_resolution: int) -> Image.Image:
    """Decode the sample once into RGB no larger than `max_resolution`. PIL identifies formats by content,
    so a PNG named .JPEG decodes; greyscale, CMYK and palette images are converted. Raises for a corrupt
    or truncated file. (EXIF orientation is ignored, as torchvision's and FFCV's ImageNet loaders do.)"""
    image = Image.fromarray(sample.pixels) if sample.pixels is not None else Image.open(root / sample.name)
    with image:
        target = fit_within(image.size, max_resolution)
        if target != image.size:
            # JPEG only: libjpeg decodes at 1/2..1/8 scale, kept at least twice the target for quality
            # (what PIL's thumbnail() does).
            image.draft(None, (2 * target[0], 2 * target[1]))
        rgb = image.convert("RGB")  # the full decode: raises here for corrupt data
    return rgb if rgb.size == target else rgb.resize(target, Image.Resampling.BICUBIC)


def encode(image: Image.Image, jpeg_quality: int) -> tuple[str, bytes]:
    """(extension, bytes): lossless PNG for small images, else JPEG at `jpeg_quality` (4:2:0, as FFCV does)."""
    buffer = io.BytesIO()
    if max(image.size) <= RAW_MAX_SIDE:
        image.save(buffer, "PNG")
        return "png", buffer.getvalue()
    image.save(buffer, "JPEG", quality=jpeg_quality)
    return "jpg", buffer.getvalue()


def convert_sample(sample: Sample, root: Path | None, max_resolution: int, jpeg_quality: int
                   ) -> tuple[str | None, bytes | str]:
    """Worker task: (extension, encoded bytes), or (None, reason) for an image PIL cannot decode."""
    try:
        image = load_rgb(sample, root, max_resolution)
    except Exception as error:  # PIL raises many types for corrupt data: OSError, SyntaxError, ValueError...
        if isinstance(error, OSError) and error.errno is not None:
            raise  # a missing or unreadable file is a problem of the machine, not of the image: stop
        return None, f"{type(error).__name__}: {error}"
    return encode(image, jpeg_quality)


def convert_chunk(samples: list[Sample], **settings: Any) -> list[tuple[str | None, bytes | str]]:
    """Worker task: `convert_sample` over a few samples (fewer round trips for small images)."""
    return [convert_sample(sample, **settings) for sample in samples]


def ordered_map(executor: ProcessPoolExecutor, fn: Callable[[list], list], items: Iterable, chunksize: int,
                ahead: int) -> Iterator:
    """`fn` over chunks of `items` in the executor's processes, results one by one in input order, with at
    most `ahead` chunks queued (Executor.map would queue the whole dataset at once). A worker that dies
    (killed, out of memory) raises BrokenProcessPool here; multiprocessing.Pool would wait forever."""
    items = iter(items)
    chunks = iter(lambda: list(itertools.islice(items, chunksize)), [])
    pending = deque(executor.submit(fn, chunk) for chunk in itertools.islice(chunks, ahead))
    while pending:
        results = pending.popleft().result()
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append(executor.submit(fn, chunk))
        yield from results


def init_worker() -> None:
    """Worker initializer: leave Ctrl-C to the main process (which then stops the workers), and exit as soon
    as the main process is gone (kill -9) instead of waiting for work forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    threading.Thread(target=exit_when_ready, args=(parent.sentinel,), daemon=True).start()


def exit_when_ready(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


# --------------------------------------------------------------------------------------------------
# Writing: atomic files, shards, the FFCV file


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds, flush it to disk and rename it to
    `path`, otherwise delete it. So no file under a final name is ever incomplete."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[str, int, int, str]:
    """Append one file with fixed metadata (so shards are byte-identical across runs); return its index entry."""
    info = tarfile.TarInfo(name)  # mtime 0, mode 0644, no owner
    info.size = len(data)
    header_offset = tar.offset
    tar.addfile(info, io.BytesIO(data))
    return name.split(".", 1)[1], header_offset + tarfile.BLOCKSIZE, len(data), name  # USTAR: one header block


def write_shard(tar_path: Path, idx_path: Path, samples: Iterator[tuple[str, str, bytes, int]]
                ) -> tuple[list[str], int]:
    """Write (key, extension, image bytes, label) samples as a WebDataset tar and its DALI index, each
    atomically, the index last. Returns the keys written and the tar's size; writes nothing if no samples."""
    first = next(samples, None)
    if first is None:
        return [], 0
    index: list[IndexEntry] = []
    with atomic_output(tar_path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, ext, payload, label in itertools.chain([first], samples):
            index.append([add_member(tar, f"{key}.{ext}", payload),
                          add_member(tar, f"{key}.{LABEL_EXT}", str(label).encode())])
    with atomic_output(idx_path) as tmp:
        tmp.write_text(format_wds_index(index))
    return [sample[0][3].split(".", 1)[0] for sample in index], tar_path.stat().st_size


def finished_shard(record_path: Path, tar_path: Path, idx_path: Path) -> dict | None:
    """The record of a shard that an earlier run finished, if the shard's files check out against it
    (sizes, index, and the tar's own member list); None means: write the shard again."""
    try:
        record = json.loads(record_path.read_text())
        if not record["keys"]:
            return record
        index = parse_wds_index(idx_path.read_text())
        if tar_path.stat().st_size != record["tar_bytes"]:
            return None
        with tarfile.open(tar_path) as tar:
            members = [(m.name, m.offset_data, m.size) for m in tar]
    except (OSError, ValueError, KeyError, tarfile.TarError):
        return None
    listed = [(name, offset, size) for sample in index for _, offset, size, name in sample]
    keys = [sample[0][3].split(".", 1)[0] for sample in index]
    return record if members == listed and keys == record["keys"] else None


def shard_samples(tar_path: Path, idx_path: Path) -> Iterator[tuple[str, bytes, int]]:
    """(image extension, image bytes, label) of each sample of a finished shard, read through its index."""
    with open(tar_path, "rb") as f:
        for sample in parse_wds_index(idx_path.read_text()):
            parts = {}
            for ext, offset, size, _ in sample:
                f.seek(offset)
                parts[ext] = f.read(size)
            label = int(parts.pop(LABEL_EXT))
            (ext, payload), = parts.items()
            yield ext, payload, label


class EncodedImage:
    """Writes our already-encoded image into an FFCV RGBImageField slot: JPEG bytes as they are (FFCV's own
    field would re-encode: a second, lossy pass), PNG as raw pixels through FFCV's own raw path."""

    def __init__(self) -> None:
        from ffcv.fields import RGBImageField
        from ffcv.fields.rgb_image import IMAGE_MODES

        self.raw = RGBImageField(write_mode="raw")
        self.jpg_mode = int(IMAGE_MODES["jpg"])  # a numba dict: slow to index, so read once

    def encode(self, destination: np.ndarray, sample: tuple[str, bytes], malloc: Callable) -> None:
        ext, payload = sample
        with Image.open(io.BytesIO(payload)) as image:
            if ext == "png":
                self.raw.encode(destination, np.asarray(image.convert("RGB")), malloc)
                return
            destination["width"], destination["height"] = image.size  # header only: no decoding
        destination["mode"] = self.jpg_mode
        destination["data_ptr"], storage = malloc(len(payload))
        storage[:] = np.frombuffer(payload, np.uint8)


def write_beton(path: Path, shards: list[tuple[Path, Path]], count: int) -> None:
    """Pack the shards' samples, in order, into an FFCV .beton with fields `image` and `label`.
    Uses FFCV's own writer pieces, but in this process, so the file is written in one deterministic pass
    from bytes already encoded (FFCV's DatasetWriter would re-encode in subprocesses)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter, handle_sample

    largest = max((size for tar, idx in shards for sample in parse_wds_index(idx.read_text())
                   for _, _, size, _ in sample), default=1)
    page_size = max(4 * MIN_PAGE_SIZE, 1 << (largest - 1).bit_length())  # FFCV's default, or what fits
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        writer = DatasetWriter(str(tmp), {"image": RGBImageField(), "label": IntField()}, page_size=page_size)
        writer.num_samples = count
        writer.prepare()  # header, field descriptions; metadata table in shared memory
        metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
        try:
            allocator = MemoryAllocator(str(tmp), writer.data_region_start, page_size)
            encoders = {"image": EncodedImage(), "label": writer.fields["label"]}
            with allocator:
                samples = (((ext, payload), label) for tar, idx in shards
                           for ext, payload, label in shard_samples(tar, idx))
                for i, sample in enumerate(tqdm(samples, total=count, desc=f"ffcv {path.stem}", unit="img")):
                    handle_sample(sample, i, writer.metadata_type.names, metadata, allocator, encoders)
            writer.finalize(allocator.allocations)
        finally:
            del metadata
            writer.metadata_sm.close()
            writer.metadata_sm.unlink()


def beton_count(path: Path) -> int | None:
    """Number of samples in an existing .beton, None if there is none or it cannot be read."""
    from ffcv.reader import Reader

    try:
        return int(Reader(str(path)).num_samples)
    except (OSError, ValueError, AssertionError, IndexError):
        return None


# --------------------------------------------------------------------------------------------------
# The conversion


@dataclass(frozen=True)
class SplitResult:
    """A split's shards (in order) and what became of its samples."""

    shards: list[tuple[Path, Path]]  # (tar, idx) of the non-empty shards
    keys: list[str]  # sample keys (the sample's position in the source split) in order
    skipped: list[dict]
    encoded: int  # samples decoded in this run (the others came from shards an earlier run finished)


def kept_samples(samples: list[Sample], part: range, results: Iterator, skipped: list[dict], progress: tqdm
                 ) -> Iterator[tuple[str, str, bytes, int]]:
    """(key, extension, bytes, label) of the decodable samples of `part`, taking the workers' `results`
    in order; the others are appended to `skipped`."""
    for i in part:
        ext, payload = next(results)
        progress.update()
        if ext is None:
            skipped.append({"path": samples[i].name, "reason": payload})
        else:
            yield f"{i:08d}", ext, payload, samples[i].label


def encode_split(split: str, samples: list[Sample], source: Source, shard_dir: Path, record_dir: Path,
                 args: argparse.Namespace, executor: ProcessPoolExecutor) -> SplitResult:
    """Decode and encode the split's samples in the `executor` and write them, in order, into shards of
    --shard-size source samples each; a record per shard (keys, skipped) marks it finished."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    record_dir.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(samples), args.shard_size)
    paths = [Layout.shard(shard_dir, n) for n in range(len(starts))]
    records = {n: finished_shard(record_dir / f"{n:05d}.json", *paths[n]) for n in range(len(starts))}
    todo = [n for n, record in records.items() if record is None]
    todo_slices = [range(starts[n], min(starts[n] + args.shard_size, len(samples))) for n in todo]
    work = functools.partial(convert_chunk, root=source.root, max_resolution=args.max_resolution,
                             jpeg_quality=args.jpeg_quality)
    results = ordered_map(executor, work, (samples[i] for part in todo_slices for i in part), chunksize=8,
                          ahead=4 * args.workers)
    done = len(samples) - sum(map(len, todo_slices))
    with tqdm(total=len(samples), initial=done, desc=split, unit="img") as progress:
        for n, part in zip(todo, todo_slices):
            skipped: list[dict] = []
            keys, tar_bytes = write_shard(*paths[n], kept_samples(samples, part, results, skipped, progress))
            records[n] = {"keys": keys, "skipped": skipped, "tar_bytes": tar_bytes}
            write_json(record_dir / f"{n:05d}.json", records[n])
    ordered = [records[n] for n in range(len(starts))]
    return SplitResult(shards=[p for p, r in zip(paths, ordered) if r["keys"]],
                       keys=[k for r in ordered for k in r["keys"]],
                       skipped=[s for r in ordered for s in r["skipped"]],
                       encoded=sum(map(len, todo_slices)))


def convert(source: Source, layout: Layout, options: dict, args: argparse.Namespace) -> None:
    """Write both formats and, last, the manifest; resumes from the shards of an unfinished earlier run."""
    write_json(layout.partial / "options.json", options)
    for stale in layout.root.rglob("*" + TMP_SUFFIX):  # left by a killed run
        stale.unlink()
    formats = options["formats"]
    started = time.perf_counter()
    results = {}
    # forkserver: workers start from a clean process, never a copy of a threaded one (DALI, numba, torch).
    executor = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("forkserver"),
                                   initializer=init_worker)
    try:
        for split in SPLITS:
            shard_dir = layout.dali_dir(split) if "dali" in formats else layout.partial / "shards" / split
            results[split] = encode_split(split, source.splits[split], source, shard_dir, layout.partial / split,
                                          args, executor)
    except BrokenProcessPool as error:
        raise ConvertError(f"a worker process died ({error}); was it killed, or out of memory? Finished shards "
                           f"are kept: run the same command again to resume") from error
    finally:
        executor.shutdown(cancel_futures=True)
    seconds = time.perf_counter() - started
    empty = [split for split, result in results.items() if not result.keys]
    if empty:
        raise ConvertError(f"no image of the {' and '.join(empty)} split could be decoded; see {layout.partial}")
    if "ffcv" in formats:
        for split, result in results.items():
            if beton_count(layout.ffcv(split)) != len(result.keys):  # else: an earlier run finished it
                write_beton(layout.ffcv(split), result.shards, len(result.keys))
    manifest = build_manifest(source, layout, options, results)
    write_json(layout.manifest, manifest)
    shutil.rmtree(layout.partial)
    print_summary(layout, manifest, sum(r.encoded for r in results.values()), seconds)


def build_manifest(source: Source, layout: Layout, options: dict, results: dict[str, SplitResult]) -> dict:
    formats = options["formats"]
    splits = {}
    for split, result in results.items():
        labels = Counter(source.splits[split][int(key)].label for key in result.keys)
        splits[split] = {
            "count": len(result.keys),
            "per_class": {name: labels[i] for i, name in enumerate(source.classes)},
            "skipped": result.skipped,
            "ffcv": str(layout.ffcv(split).relative_to(layout.root)) if "ffcv" in formats else None,
            "dali": [{"tar": str(tar.relative_to(layout.root)), "index": str(idx.relative_to(layout.root))}
                     for tar, idx in result.shards] if "dali" in formats else None,
        }
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": layout.root.name,
        "classes": source.classes,
        "splits": splits,
        "options": options,
        "formats": format_versions(formats),
    }


def format_versions(formats: list[str]) -> dict:
    versions: dict[str, Any] = {"encoder": {"pillow": PIL.__version__, "lossless_max_side": RAW_MAX_SIDE}}
    if "ffcv" in formats:
        from ffcv.types import CURRENT_VERSION

        versions["ffcv"] = {"library": importlib.metadata.version("ffcv"), "file_version": int(CURRENT_VERSION),
                            "fields": {"image": "RGBImageField", "label": "IntField"}}
    if "dali" in formats:
        versions["dali"] = {"container": "webdataset tar", "index_version": WDS_INDEX_VERSION,
                            "ext": [IMAGE_EXT, LABEL_EXT], "label_encoding": "ASCII decimal class index"}
    return versions


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def print_summary(layout: Layout, manifest: dict, encoded: int, seconds: float) -> None:
    print(f"converted {manifest['name']} into {layout.root}: {encoded} images decoded in {seconds:.1f} s "
          f"({encoded / max(seconds, 1e-9):.0f} images/s)")
    for split, entry in manifest["splits"].items():
        print(f"  {split}: {entry['count']} images, {len(entry['skipped'])} skipped")
        for skipped in entry["skipped"][:5]:
            print(f"    skipped {skipped['path']}: {skipped['reason']}")
        if len(entry["skipped"]) > 5:
            print(f"    ... all {len(entry['skipped'])} are listed in {layout.manifest}")
    sizes = [f"{fmt} {folder_bytes(layout.root / fmt) / 1e6:.1f} MB" for fmt in manifest["options"]["formats"]]
    print(f"  output: {', '.join(sizes)}")


# --------------------------------------------------------------------------------------------------
# Existing output


def check_existing(layout: Layout, options: dict, overwrite: bool) -> bool:
    """True if a finished conversion with these options is already there. Refuses (naming the
    differences) to touch output written with other options, unless `overwrite`, which deletes it."""
    if overwrite:
        for path in (layout.manifest, layout.root / "ffcv", layout.root / "dali", layout.partial):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        return False
    for path, key in ((layout.manifest, "options"), (layout.partial / "options.json", None)):
        if path.is_file():
            existing = json.loads(path.read_text())
            existing = existing[key] if key else existing
            differences = [f"{k}: existing {existing.get(k)!r}, requested {options.get(k)!r}"
                           for k in sorted(set(existing) | set(options)) if existing.get(k) != options.get(k)]
            if differences:
                raise ConvertError(f"{layout.root} was written with different options ({'; '.join(differences)}). "
                                   f"Use --overwrite to replace it, or --out/--name to write elsewhere")
    if not layout.manifest.is_file():
        return False
    shutil.rmtree(layout.partial, ignore_errors=True)  # a run killed right after its manifest
    missing = [p for p in ConvertedDataset(layout, json.loads(layout.manifest.read_text())).files() if not p.is_file()]
    if missing:
        print(f"{len(missing)} files listed in {layout.manifest} are missing, e.g. {missing[0]}; converting again")
        layout.manifest.unlink()
    return not missing


# --------------------------------------------------------------------------------------------------
# Verification: read both formats back with their own readers


def read_ffcv(path: Path, picks: Iterable[int], workers: int = 1) -> tuple[list[int], dict[int, np.ndarray]]:
    """All labels, and the decoded images of samples `picks`, read with FFCV's Loader."""
    from dataclasses import replace

    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.allocation_query import AllocationQuery

    class AnySizeRGBDecoder(SimpleRGBImageDecoder):
        """FFCV's plain decoder, allowing images of different sizes: each is decoded into the start of
        a buffer of the largest size (as FFCV's cropping decoders do) and cut out afterwards."""

        def declare_state_and_memory(self, previous_state: Any) -> tuple[Any, Any]:
            shape = (int(self.metadata["height"].max()), int(self.metadata["width"].max()), 3)
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                    AllocationQuery(shape, np.dtype("<u1")))

    def loader(pipelines: dict, indices: list[int] | None = None) -> Any:
        return Loader(str(path), batch_size=64, num_workers=workers, order=OrderOption.SEQUENTIAL,
                      drop_last=False, indices=indices, pipelines=pipelines)

    labels = [int(y) for (batch,) in loader({"image": None, "label": [IntDecoder()]}) for y in batch.ravel()]
    picks = sorted(picks)
    images = {}
    if picks:
        read = loader({"image": [AnySizeRGBDecoder()], "label": None}, picks)
        sizes = read.reader.metadata[f"f{read.reader.field_names.index('image')}"]
        buffers = (image for (batch,) in read for image in batch)
        for i, buffer in zip(picks, buffers):
            height, width = int(sizes[i]["height"]), int(sizes[i]["width"])
            images[i] = buffer.reshape(-1)[:height * width * 3].reshape(height, width, 3).copy()
    return labels, images


def read_dali(reader_args: dict, picks: Iterable[int], workers: int = 1) -> tuple[list[int], dict[int, np.ndarray]]:
    """All labels, and the decoded images of samples `picks`, read with DALI's webdataset reader (every
    sample, in order) and its image decoder (the picked ones only), on the CPU."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=64, num_threads=workers, device_id=None)
    def read_all() -> Any:
        return tuple(fn.readers.webdataset(**reader_args, missing_component_behavior="error", name="reader"))

    pipe = read_all()
    pipe.build()
    count = pipe.epoch_size("reader")
    picks = set(picks)
    labels, encoded = [], {}
    while len(labels) < count:
        images, label_batch = pipe.run()
        for j in range(min(len(label_batch), count - len(labels))):
            if len(labels) in picks:
                encoded[len(labels)] = np.array(images.at(j))
            labels.append(int(np.array(label_batch.at(j)).tobytes()))
    if not encoded:
        return labels, {}
    order = sorted(encoded)

    @pipeline_def(batch_size=len(order), num_threads=workers, device_id=None)
    def decode() -> Any:
        return fn.decoders.image(fn.external_source(source=lambda: [encoded[i] for i in order]),
                                 device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (decoded,) = pipe.run()
    return labels, {i: np.array(decoded.at(j)) for j, i in enumerate(order)}


def compare_pixels(ext: str, expected: np.ndarray, actual: np.ndarray) -> str | None:
    """Why `actual` does not match: PNG (lossless) must be exact, JPEG within decoder differences."""
    if actual.shape != expected.shape:
        return f"shape {actual.shape}, expected {expected.shape}"
    difference = np.abs(actual.astype(np.int16) - expected).mean()
    limit = JPEG_DECODE_TOLERANCE if ext == "jpg" else 0.0
    return f"mean pixel difference {difference:.2f} > {limit}" if difference > limit else None


def verify(dataset: ConvertedDataset, source: Source, args: argparse.Namespace) -> None:
    """Re-read every format: counts and labels of all samples, and the pixels of VERIFY_SAMPLES evenly
    spaced samples per split against the source (decoded, resized and encoded again, deterministically)."""
    problems = []
    options = dataset.manifest["options"]
    for split in SPLITS:
        entry = dataset.manifest["splits"][split]
        skipped = {s["path"] for s in entry["skipped"]}
        kept = [s for s in source.splits[split] if s.name not in skipped]
        picks = sorted(set(np.linspace(0, len(kept) - 1, min(VERIFY_SAMPLES, len(kept))).round().astype(int)))
        expected = {}
        for i in picks:
            ext, payload = encode(load_rgb(kept[i], source.root, options["max_resolution"]), options["jpeg_quality"])
            expected[i] = ext, np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
        readers = {"ffcv": lambda: read_ffcv(dataset.ffcv_file(split), picks, args.workers),
                   "dali": lambda: read_dali(dataset.dali_reader_args(split), picks, args.workers)}
        for fmt in options["formats"]:
            labels, images = readers[fmt]()
            where = f"{fmt} {split}"
            if len(labels) != entry["count"] or len(labels) != len(kept):
                problems.append(f"{where}: {len(labels)} samples, manifest says {entry['count']}, "
                                f"source has {len(kept)} decodable")
                continue
            wrong = [i for i, (label, sample) in enumerate(zip(labels, kept)) if label != sample.label]
            if wrong:
                problems.append(f"{where}: {len(wrong)} labels differ from the source, first sample {wrong[0]} "
                                f"({kept[wrong[0]].name}): {labels[wrong[0]]}, expected {kept[wrong[0]].label}")
            problems += [f"{where}: sample {i} ({kept[i].name}): {why}" for i in picks
                         if (why := compare_pixels(*expected[i], images[i])) is not None]
    if problems:
        raise ConvertError("verification failed:\n  " + "\n  ".join(problems[:20]))
    print(f"verified {dataset.layout.root}: {', '.join(options['formats'])}: counts, labels and "
          f"{VERIFY_SAMPLES} images per split match the source")


# --------------------------------------------------------------------------------------------------
# Command line


def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high if high is not None else ''}")
        return value
    return parse


def format_list(text: str) -> list[str]:
    requested = [f.strip() for f in text.split(",") if f.strip()]
    unknown = sorted(set(requested) - set(FORMATS))
    if unknown or not requested:
        raise argparse.ArgumentTypeError(f"{text!r}: choose one or more of {','.join(FORMATS)}")
    return [f for f in FORMATS if f in requested]


def dataset_name(text: str) -> str:
    if not text or text.startswith(".") or "/" in text or os.sep in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain folder name")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_datasets.py", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True, help="output folder; the dataset goes to OUT/NAME")
    common.add_argument("--name", type=dataset_name, help="dataset folder name (default: the subcommand)")
    common.add_argument("--formats", type=format_list, default=list(FORMATS), help="ffcv, dali or ffcv,dali (default)")
    common.add_argument("--workers", type=int_in_range(1), default=os.cpu_count(),
                        help="decoding processes (default: all cores)")
    common.add_argument("--max-resolution", type=int_in_range(1), default=512,
                        help="shrink images to at most this many pixels on the longer side (default 512)")
    common.add_argument("--jpeg-quality", type=int_in_range(1, 100), default=90, help="JPEG quality (default 90)")
    common.add_argument("--shard-size", type=int_in_range(1), default=2000,
                        help="source images per DALI shard (default 2000)")
    common.add_argument("--overwrite", action="store_true", help="replace output written with other options")
    common.add_argument("--verify", action="store_true", help="re-read both formats and compare with the source")
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{imagenet,cifar10,cifar100,imagefolder,digits}")
    helps = {"imagenet": "ILSVRC2012: train/<wnid>/*.JPEG, val/ in class folders or flat with ground truth",
             "cifar10": "CIFAR-10, official Python release (cifar-10-batches-py)",
             "cifar100": "CIFAR-100 (fine labels), official Python release (cifar-100-python)",
             "imagefolder": "train/<class>/* and val/<class>/* (or test/<class>/*)",
             "digits": "scikit-learn's bundled 8x8 digits as 32x32 RGB (offline demo dataset)"}
    for name, text in helps.items():
        command = sub.add_parser(name, parents=[common], help=text, description=text)
        if name != "digits":
            command.add_argument("--source", type=Path, required=True, help="folder holding the dataset")
        if name in CIFAR_RELEASES:
            command.add_argument("--download", action="store_true",
                                 help="fetch the release into --source with torchvision if it is not there")
    return parser


def conversion_options(args: argparse.Namespace, source: Source) -> dict:
    """Everything that determines the output; a rerun must match it to resume or to do nothing."""
    listing = hashlib.sha256()  # catches files added, removed or relabelled between runs
    for split in SPLITS:
        for sample in source.splits[split]:
            listing.update(f"{split}\t{sample.name}\t{sample.label}\n".encode())
    source_dir = getattr(args, "source", None)
    return {
        "dataset": args.dataset,
        "source": str(source_dir.resolve()) if source_dir else None,
        "source_listing_sha256": listing.hexdigest(),
        "formats": args.formats,
        "max_resolution": args.max_resolution,
        "jpeg_quality": args.jpeg_quality,
        "shard_size": args.shard_size,
        "converter_version": CONVERTER_VERSION,
    }


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1: a reported error, 130: interrupted)."""
    args = build_parser().parse_args(argv)
    args.name = args.name or args.dataset
    layout = Layout(args.out / args.name)
    try:
        source = read_source(args)
        options = conversion_options(args, source)
        if check_existing(layout, options, args.overwrite):
            print(f"{layout.root} is already converted with these options; nothing to do")
        else:
            convert(source, layout, options, args)
        if args.verify:
            verify(open_dataset(args.out, args.name), source, args)
    except ConvertError as error:
        print(f"convert_datasets.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
