"""`cifar10`, `cifar100`: the official Python releases (pickled numpy batches), read without running code."""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convert import ConvertError
from convert.sources.base import Sample, Source


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

# The only globals a CIFAR batch refers to: what numpy needs to rebuild an array (under its NumPy 1 and
# NumPy 2 module names). Everything else in the files (dicts, lists, str, bytes, int) needs no global.
_reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class BatchUnpickler(pickle.Unpickler):
    """pickle.Unpickler that can only build numpy arrays, lists, dicts, str, bytes and int: a crafted file
    (one that would import os.system, say) is refused instead of run."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}")
        return allowed


def unpickle(path: Path) -> dict:
    """A batch of the official release; ConvertError naming the file if it is anything else."""
    try:
        with open(path, "rb") as f:
            batch = BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise ConvertError(f"{path} is not a batch of the official CIFAR release ({error}); it was not loaded. "
                           f"Download the release again (--download)") from error
    arrays = [v for v in batch.values() if isinstance(v, np.ndarray)] if isinstance(batch, dict) else []
    if not isinstance(batch, dict) or any(a.dtype.hasobject for a in arrays):
        raise ConvertError(f"{path} is not a batch of the official CIFAR release (expected a dict of arrays "
                           f"and lists); download the release again (--download)")
    return batch


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
    names = [n.decode() for n in field(unpickle(folder / release.meta), release.names_key, folder / release.meta)]
    classes = sorted(names)
    to_sorted = np.array([classes.index(n) for n in names])  # the identity for the real releases
    splits = {}
    for split, files in (("train", release.train), ("val", release.test)):
        samples = []
        for file in files:
            batch = unpickle(folder / file)
            data, labels = field(batch, b"data", folder / file), field(batch, release.labels_key, folder / file)
            try:
                images = np.ascontiguousarray(np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels = to_sorted[np.asarray(labels)]
            except (ValueError, IndexError, TypeError) as error:
                raise ConvertError(f"{folder / file} does not hold 32x32 RGB images with labels 0..{len(names) - 1} "
                                   f"({error}); download the release again (--download)") from error
            if len(labels) != len(images):
                raise ConvertError(f"{folder / file} has {len(images)} images but {len(labels)} labels")
            samples += [Sample(f"{release.folder}/{file}[{i}]", int(label), image)
                        for i, (image, label) in enumerate(zip(images, labels))]
        splits[split] = samples
    return Source(classes, splits, None)


def field(batch: dict, key: bytes, path: Path) -> Any:
    """`batch[key]`, or ConvertError naming the file that lacks it."""
    if key not in batch:
        raise ConvertError(f"{path} has no {key.decode()!r}: not a batch of the official CIFAR release; "
                           f"download the release again (--download)")
    return batch[key]


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
