"""Writing the output: WebDataset shards with their DALI index, the FFCV file, and the SHA-256 of each.
Every file is written atomically (`atomic_write`), so no file under its final name is ever incomplete."""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from atomic_write import atomic_path, write_atomic
from loaders.manifest import LABEL_EXT, IndexEntry, format_wds_index, parse_wds_index
from loaders.shards import ShardSamples

HASH_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashingWriter:
    """A write-only file that hashes what goes through it (tarfile writes strictly in order)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> IndexEntry:
    """Append one file with fixed metadata (so shards are byte-identical across runs); return its index entry."""
    info = tarfile.TarInfo(name)  # mtime 0, mode 0644, no owner
    info.size = len(data)
    header_offset = tar.offset
    tar.addfile(info, io.BytesIO(data))
    return IndexEntry(name.split(".", 1)[1], header_offset + tarfile.BLOCKSIZE, len(data), name)  # USTAR: 1 header


def write_shard(tar_path: Path, idx_path: Path, samples: Iterator[tuple[str, str, bytes, int]]) -> dict:
    """Write (key, extension, image bytes, label) samples as a WebDataset tar and its DALI index, each
    atomically, the index last. Returns the shard's record: the keys written and the files' SHA-256
    (none if there were no samples: then nothing is written)."""
    first = next(samples, None)
    if first is None:
        return {"keys": [], "sha256": {}}
    index: list[list[IndexEntry]] = []
    with atomic_path(tar_path) as tmp, open(tmp, "wb") as f:
        hashing = HashingWriter(f)
        with tarfile.open(fileobj=hashing, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, ext, payload, label in itertools.chain([first], samples):
                index.append([add_member(tar, f"{key}.{ext}", payload),
                              add_member(tar, f"{key}.{LABEL_EXT}", str(label).encode())])
    text = format_wds_index(index).encode()
    write_atomic(idx_path, text)
    return {"keys": [sample[0].key for sample in index],
            "sha256": {"tar": hashing.digest.hexdigest(), "index": hashlib.sha256(text).hexdigest()}}


def finished_shard(record_path: Path, tar_path: Path, idx_path: Path) -> dict | None:
    """The record of a shard that an earlier run finished, if its files still have the SHA-256 it recorded
    and its index lists the recorded keys; None means: write the shard again."""
    try:
        record = json.loads(record_path.read_text())
        if not record["keys"]:
            return record
        if file_sha256(tar_path) != record["sha256"]["tar"] or file_sha256(idx_path) != record["sha256"]["index"]:
            return None
        keys = [sample[0].key for sample in parse_wds_index(idx_path.read_text())]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if keys == record["keys"] else None


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


def write_beton(path: Path, shards: list[tuple[Path, Path]]) -> None:
    """Pack the samples of `shards` (tar, index; at least one), in order, into an FFCV .beton with fields `image` and `label`.
    Uses FFCV's own writer pieces, but in this process, so the file is written in one deterministic pass
    from bytes already encoded (FFCV's DatasetWriter would re-encode in subprocesses)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter, handle_sample

    samples = ShardSamples.of_files(*zip(*shards))
    count = len(samples)
    largest = max(part.size for entries in samples.entries for sample in entries for part in sample)
    page_size = max(4 * MIN_PAGE_SIZE, 1 << (largest - 1).bit_length())  # FFCV's default, or what fits
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        writer = DatasetWriter(str(tmp), {"image": RGBImageField(), "label": IntField()}, page_size=page_size)
        writer.num_samples = count
        writer.prepare()  # header, field descriptions; metadata table in shared memory
        metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
        try:
            allocator = MemoryAllocator(str(tmp), writer.data_region_start, page_size)
            encoders: dict[str, Any] = {"image": EncodedImage(), "label": writer.fields["label"]}
            with allocator:
                for i in tqdm(range(count), desc=f"ffcv {path.stem}", unit="img"):
                    ext, payload, label = samples.read_with_ext(i)
                    handle_sample(((ext, payload), label), i, writer.metadata_type.names, metadata, allocator,
                                  encoders)
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
    except (OSError, ValueError, AssertionError, IndexError, TypeError):
        return None
