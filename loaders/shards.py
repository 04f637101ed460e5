"""Random access to the samples of a split's WebDataset shards, through their DALI index files.

The torchvision and memory backends read the encoded images from here (they need neither FFCV
nor DALI installed); sample `i` is the `i`-th sample of the shards in order, the same order as
the split's `.beton` file and the manifest's counts.
"""
from __future__ import annotations

import bisect
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from loaders.manifest import IMAGE_EXT, LABEL_EXT, ConvertedDataset, DatasetNotFoundError, open_dataset, parse_wds_index

IMAGE_EXTS = tuple(IMAGE_EXT.split(";"))


def open_converted(root: str | Path, *splits: str) -> ConvertedDataset:
    """The converted dataset at `root` (= OUT/NAME, the folder holding manifest.json), checked to hold
    each of `splits` (the ones a config's `data.train_split` / `data.val_split` name): a missing one
    is a DatasetNotFoundError naming the splits there are, before any work starts."""
    root = Path(root)
    dataset = open_dataset(root.parent, root.name)
    for split in splits:
        if split not in dataset.manifest["splits"]:
            raise DatasetNotFoundError(f"{root} has no split {split!r} (it has {', '.join(dataset.manifest['splits'])}): "
                                       f"set data.train_split / data.val_split to one of those")
    return dataset


class ShardSamples:
    """`len()` and `read(i) -> (encoded image bytes, label)` over one split's shards.

    File descriptors are opened lazily and per process, so instances can be sent to DataLoader
    workers; reads use `os.pread`, so threads can share them.
    """

    def __init__(self, dataset: ConvertedDataset, split: str) -> None:
        self._files: dict[int, int] = {}  # first: __del__ runs even when the lines below raise
        self._open(*dataset.dali_files(split))

    @classmethod
    def of_files(cls, tars: Sequence[str | Path], indexes: Sequence[str | Path]) -> ShardSamples:
        """The samples of these shards (tar files and their index files, in order), without a manifest."""
        samples = cls.__new__(cls)
        samples._files = {}
        samples._open(tars, indexes)
        return samples

    def _open(self, tars: Sequence[str | Path], indexes: Sequence[str | Path]) -> None:
        self.tars = [str(tar) for tar in tars]
        self.entries = [parse_wds_index(Path(index).read_text()) for index in indexes]
        self.starts = np.cumsum([0] + [len(e) for e in self.entries]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def __del__(self) -> None:
        for fd in self._files.values():
            os.close(fd)

    def _component(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files.setdefault(shard, os.open(self.tars[shard], os.O_RDONLY))
        return os.pread(fd, size, offset)

    def read(self, i: int) -> tuple[bytes, int]:
        """The encoded image and the integer label of sample `i`."""
        _, data, label = self.read_with_ext(i)
        return data, label

    def read_with_ext(self, i: int) -> tuple[str, bytes, int]:
        """The image's extension (`jpg` or `png`), the encoded image and the integer label of sample `i`."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a split of {len(self)}")
        shard = bisect.bisect_right(self.starts, i) - 1
        parts = {part.ext: (part.offset, part.size) for part in self.entries[shard][i - self.starts[shard]]}
        image_ext = next(ext for ext in IMAGE_EXTS if ext in parts)
        label = int(self._component(shard, *parts[LABEL_EXT]).decode())
        return image_ext, self._component(shard, *parts[image_ext]), label

    def decode(self, i: int) -> tuple[Image.Image, int]:
        """Sample `i` as an RGB PIL image and its label."""
        data, label = self.read(i)
        return Image.open(io.BytesIO(data)).convert("RGB"), label
