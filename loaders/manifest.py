"""Where a converted dataset's files live, and reading its manifest.json.

`convert_datasets.py` (the `convert` package) writes, under OUT/NAME:

    manifest.json                          written last: present only when the conversion finished;
                                           lists every file below with its SHA-256
    ffcv/{train,val}.beton                 fields `image` (RGBImageField) and `label` (IntField)
    dali/{train,val}/shard-NNNNN.tar       WebDataset shards: <key>.jpg or <key>.png, and <key>.cls
    dali/{train,val}/shard-NNNNN.idx       their index files for DALI's fn.readers.webdataset

Loaders call `open_dataset(out, name)`; the converter uses `Layout` and the index-file
helpers, so both sides agree on every path and on the DALI index format.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple


MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")
FORMATS = ("ffcv", "dali")
# A sample's image is a JPEG (`jpg`) or, for small images kept lossless, a PNG (`png`); DALI's reader
# takes either for one output when the extensions are joined with ";". Labels are ASCII decimal text.
IMAGE_EXT = "jpg;png"
LABEL_EXT = "cls"
WDS_INDEX_VERSION = "v1.2"  # the format of DALI's own tools/wds2idx.py

# How to create each dataset, for the error a loader gives when it is missing.
_COMMANDS = {
    "imagenet": "python convert_datasets.py imagenet --source /path/to/ILSVRC2012 --out {out}",
    "cifar10": "python convert_datasets.py cifar10 --source /path/to/cifar --download --out {out}",
    "cifar100": "python convert_datasets.py cifar100 --source /path/to/cifar --download --out {out}",
    "digits": "python convert_datasets.py digits --out {out}",
}
_FOLDER_COMMAND = "python convert_datasets.py imagefolder --source /path/to/folder --out {out} --name {name}"


class IndexEntry(NamedTuple):
    """One component (image or label) of a sample in a DALI index file; a sample is a list of them."""

    ext: str
    offset: int  # of the data in the tar file (past the member's header)
    size: int
    name: str  # the tar member: <key>.<ext>

    @property
    def key(self) -> str:
        """The sample's key: the member name without its extension."""
        return self.name.split(".", 1)[0]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset (or one of its formats) has not been converted; the message says which command creates it."""


@dataclass(frozen=True)
class Layout:
    """The paths of one converted dataset, OUT/NAME; valid before the dataset exists."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def lock(self) -> Path:
        """Held (flock) by the conversion writing into `root`; holds its process id."""
        return self.root / ".lock"

    @property
    def partial(self) -> Path:
        """State of an unfinished conversion (per-shard records); removed once the manifest is written."""
        return self.root / ".partial"

    def ffcv(self, split: str) -> Path:
        return self.root / "ffcv" / f"{split}.beton"

    def dali_dir(self, split: str) -> Path:
        return self.root / "dali" / split

    @staticmethod
    def shard(directory: Path, number: int) -> tuple[Path, Path]:
        """The tar file and DALI index file of shard `number` in `directory`."""
        stem = directory / f"shard-{number:05d}"
        return stem.with_suffix(".tar"), stem.with_suffix(".idx")


def format_wds_index(samples: list[list[IndexEntry]]) -> str:
    """The text of a DALI WebDataset index file: a `v1.2 <count>` header, then one line per sample
    listing `ext offset size name` for each of its components (offsets point at the data, past the header)."""
    lines = [f"{WDS_INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample) for sample in samples]
    return "\n".join(lines) + "\n"


def parse_wds_index(text: str) -> list[list[IndexEntry]]:
    """Parse what `format_wds_index` writes; ValueError if the text is not a complete v1.2 index."""
    header, *lines = text.splitlines()
    version, count = header.split()
    if version != WDS_INDEX_VERSION or int(count) != len(lines):
        raise ValueError(f"not a complete {WDS_INDEX_VERSION} index with {count} samples")
    samples = []
    for line in lines:
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ValueError(f"malformed index line: {line!r}")
        samples.append([IndexEntry(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                        for i in range(0, len(fields), 4)])
    return samples


def convert_command(out: Path | str, name: str) -> str:
    """The convert_datasets.py command that creates dataset `name` under `out`."""
    return _COMMANDS.get(name, _FOLDER_COMMAND).format(out=out, name=name)


@dataclass(frozen=True)
class ConvertedDataset:
    """A finished conversion: its manifest and the files of each split and format."""

    layout: Layout
    manifest: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        """Class names in label order."""
        return self.manifest["classes"]

    def split(self, split: str) -> dict[str, Any]:
        """The manifest's entry for `split`; DatasetNotFoundError naming the splits there are if it has none."""
        if split not in self.manifest["splits"]:
            raise DatasetNotFoundError(f"{self.layout.root} has no split {split!r}; its splits are "
                                       f"{', '.join(self.manifest['splits'])}")
        return self.manifest["splits"][split]

    def count(self, split: str) -> int:
        return self.split(split)["count"]

    def _split_format(self, split: str, fmt: str) -> Any:
        entry = self.split(split)[fmt]
        if entry is None:
            raise DatasetNotFoundError(
                f"{self.layout.root} was converted without the {fmt} format; re-run convert_datasets.py "
                f"with --formats {','.join(FORMATS)} --overwrite to add it")
        return entry

    def ffcv_file(self, split: str) -> Path:
        """The split's .beton file."""
        return self.layout.root / self._split_format(split, "ffcv")

    def dali_files(self, split: str) -> tuple[list[str], list[str]]:
        """The split's shard tar files and their index files, in sample order."""
        shards = self._split_format(split, "dali")
        return ([str(self.layout.root / s["tar"]) for s in shards],
                [str(self.layout.root / s["index"]) for s in shards])

    def format_files(self, split: str, fmt: str) -> list[Path]:
        """The files of one split in one format: the .beton, or the shards and their index files."""
        if fmt == "ffcv":
            return [self.ffcv_file(split)]
        tars, indexes = self.dali_files(split)
        return [Path(path) for path in (*tars, *indexes)]

    def files(self) -> list[Path]:
        """Every data file the manifest lists, in all splits and formats (the keys of its `sha256`)."""
        names = []
        for entry in self.manifest["splits"].values():
            names += [entry["ffcv"]] if entry["ffcv"] else []
            names += [name for shard in entry["dali"] or [] for name in (shard["tar"], shard["index"])]
        return [self.layout.root / name for name in names]

    def dali_reader_args(self, split: str) -> dict[str, Any]:
        """Keyword arguments for `nvidia.dali.fn.readers.webdataset`: outputs (encoded image, label text)."""
        paths, index_paths = self.dali_files(split)
        return {"paths": paths, "index_paths": index_paths, "ext": [IMAGE_EXT, LABEL_EXT]}


def open_dataset(out: Path | str, name: str) -> ConvertedDataset:
    """Read OUT/NAME/manifest.json; DatasetNotFoundError (with the command to run) if it is missing."""
    layout = Layout(Path(out) / name)
    if not layout.manifest.is_file():
        state = ("a conversion into it was started but did not finish; run the same command again to resume it:"
                 if layout.partial.exists() else "create it with:")
        raise DatasetNotFoundError(
            f"dataset {name!r} not found: {layout.manifest} does not exist; {state} {convert_command(out, name)}")
    try:
        manifest = json.loads(layout.manifest.read_text())
    except ValueError as error:  # also UnicodeDecodeError
        raise DatasetNotFoundError(f"{layout.manifest} is damaged ({error}); convert it again with --overwrite: "
                                   f"{convert_command(out, name)}") from error
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise DatasetNotFoundError(
            f"{layout.manifest} has manifest version {manifest.get('manifest_version')}, this code reads "
            f"version {MANIFEST_VERSION}; convert it again with --overwrite: {convert_command(out, name)}")
    return ConvertedDataset(layout, manifest)
