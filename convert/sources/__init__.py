"""Dataset readers: each returns a `Source` (classes in label order, the samples of each split in order)."""
from __future__ import annotations

from pathlib import Path

from convert.sources.base import Sample, Source
from convert.sources.cifar import CIFAR_RELEASES, read_cifar
from convert.sources.digits import read_digits
from convert.sources.folder import read_imagefolder
from convert.sources.imagenet import read_imagenet

__all__ = ["Sample", "Source", "read_source"]


def read_source(dataset: str, source: Path | None, download: bool = False) -> Source:
    """The samples of `dataset` (a subcommand of convert_datasets.py) found in the folder `source` (None for digits)."""
    if dataset == "digits":
        return read_digits()
    if dataset in CIFAR_RELEASES:
        return read_cifar(dataset, source, download)
    return read_imagenet(source) if dataset == "imagenet" else read_imagefolder(source)
