"""The conversion: worker processes decode and encode, the main process writes shards in source order,
one at a time, each committed by renaming and recorded in OUT/NAME/.partial/; the FFCV file is then
packed from the shards' bytes, so both formats hold the same pixels in the same order; the manifest,
with the SHA-256 of every file, comes last. A rerun keeps the shards a killed run finished."""
from __future__ import annotations

import functools
import importlib.metadata
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import PIL
from tqdm import tqdm

from atomic_write import is_temporary, write_json
from convert import ConvertError
from convert.encode import RAW_MAX_SIDE, convert_chunk
from convert.sources import Sample, Source
from convert.writers import beton_count, file_sha256, finished_shard, write_beton, write_shard
from loaders.manifest import (IMAGE_EXT, LABEL_EXT, MANIFEST_VERSION, SPLITS, WDS_INDEX_VERSION, ConvertedDataset,
                              Layout)

# Bumped whenever a change to the converter changes the bytes written: older outputs then need --overwrite.
# 2: 16-bit, float and transparent images converted to RGB properly; SHA-256 of every file in the manifest.
CONVERTER_VERSION = 2


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


@dataclass(frozen=True)
class SplitResult:
    """A split's shards (in order) and what became of its samples."""

    shards: list[tuple[Path, Path]]  # (tar, idx) of the non-empty shards
    keys: list[str]  # sample keys (the sample's position in the source split) in order
    skipped: list[dict]
    sha256: dict[Path, str]  # of each shard file
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
                 options: dict, workers: int, executor: ProcessPoolExecutor) -> SplitResult:
    """Decode and encode the split's samples in the `executor` and write them, in order, into shards of
    `shard_size` source samples each; a record per shard (keys, skipped, SHA-256) marks it finished."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    record_dir.mkdir(parents=True, exist_ok=True)
    shard_size = options["shard_size"]
    starts = range(0, len(samples), shard_size)
    paths = [Layout.shard(shard_dir, n) for n in range(len(starts))]
    records = {n: finished_shard(record_dir / f"{n:05d}.json", *paths[n]) for n in range(len(starts))}
    todo = [n for n, record in records.items() if record is None]
    todo_slices = [range(starts[n], min(starts[n] + shard_size, len(samples))) for n in todo]
    work = functools.partial(convert_chunk, root=source.root, max_resolution=options["max_resolution"],
                             jpeg_quality=options["jpeg_quality"])
    results = ordered_map(executor, work, (samples[i] for part in todo_slices for i in part), chunksize=8,
                          ahead=4 * workers)
    done = len(samples) - sum(map(len, todo_slices))
    with tqdm(total=len(samples), initial=done, desc=split, unit="img") as progress:
        for n, part in zip(todo, todo_slices):
            skipped: list[dict] = []
            records[n] = {**write_shard(*paths[n], kept_samples(samples, part, results, skipped, progress)),
                          "skipped": skipped}
            write_json(record_dir / f"{n:05d}.json", records[n])
    ordered = [(paths[n], records[n]) for n in range(len(starts))]
    return SplitResult(shards=[p for p, r in ordered if r["keys"]],
                       keys=[k for _, r in ordered for k in r["keys"]],
                       skipped=[s for _, r in ordered for s in r["skipped"]],
                       sha256={path: r["sha256"][kind] for (tar, idx), r in ordered if r["keys"]
                               for path, kind in ((tar, "tar"), (idx, "index"))},
                       encoded=sum(map(len, todo_slices)))


def convert(source: Source, layout: Layout, options: dict, workers: int) -> None:
    """Write the formats and, last, the manifest; resumes from the shards of an unfinished earlier run.
    The caller holds the lock of `layout` (so every temporary file in it is a killed run's)."""
    write_json(layout.partial / "options.json", options)
    for stale in [p for p in layout.root.rglob("*") if is_temporary(p)]:
        stale.unlink()
    formats = options["formats"]
    started = time.perf_counter()
    results = {}
    # forkserver: workers start from a clean process, never a copy of a threaded one (DALI, numba, torch).
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                                   initializer=init_worker)
    try:
        for split in SPLITS:
            shard_dir = layout.dali_dir(split) if "dali" in formats else layout.partial / "shards" / split
            results[split] = encode_split(split, source.splits[split], source, shard_dir, layout.partial / split,
                                          options, workers, executor)
    except BrokenProcessPool as error:
        raise ConvertError(f"a worker process died ({error}); was it killed, or out of memory? Finished shards "
                           f"are kept: run the same command again to resume") from error
    finally:
        executor.shutdown(cancel_futures=True)
    seconds = time.perf_counter() - started
    empty = [split for split, result in results.items() if not result.keys]
    if empty:
        raise ConvertError(f"no image of the {' and '.join(empty)} split could be decoded; see {layout.partial}")
    sha256 = {path: digest for result in results.values() for path, digest in result.sha256.items()}
    if "ffcv" in formats:
        for split, result in results.items():
            if beton_count(layout.ffcv(split)) != len(result.keys):  # else: an earlier run finished it
                write_beton(layout.ffcv(split), result.shards)
            sha256[layout.ffcv(split)] = file_sha256(layout.ffcv(split))
    manifest = build_manifest(source, layout, options, results, sha256)
    write_json(layout.manifest, manifest)
    shutil.rmtree(layout.partial)
    print_summary(layout, manifest, sum(r.encoded for r in results.values()), seconds)


def build_manifest(source: Source, layout: Layout, options: dict, results: dict[str, SplitResult],
                   sha256: dict[Path, str]) -> dict:
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
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "name": layout.root.name,
        "classes": source.classes,
        "splits": splits,
        "options": options,
        "formats": format_versions(formats),
    }
    files = ConvertedDataset(layout, manifest).files()
    return {**manifest, "sha256": {str(path.relative_to(layout.root)): sha256[path] for path in files}}


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


def is_finished(layout: Layout, options: dict) -> bool:
    """Whether a finished conversion with exactly these options is there, judged by reading alone
    (no lock, no write: a dataset on a read-only mount can be found finished and verified)."""
    if not layout.manifest.is_file() or layout.partial.exists():
        return False
    try:
        manifest = json.loads(layout.manifest.read_text())
        return manifest["options"] == options and all(p.is_file() for p in ConvertedDataset(layout, manifest).files())
    except (ValueError, KeyError, TypeError):
        return False  # check_existing, under the lock, says what is wrong


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
    parsed = {}
    for path, key in ((layout.manifest, "options"), (layout.partial / "options.json", None)):
        if path.is_file():
            try:
                parsed[path] = json.loads(path.read_text())
                existing = parsed[path][key] if key else parsed[path]
            except (ValueError, KeyError, TypeError) as error:
                raise ConvertError(f"{path} is damaged ({error}); use --overwrite to convert again") from error
            differences = [f"{k}: existing {existing.get(k)!r}, requested {options.get(k)!r}"
                           for k in sorted(set(existing) | set(options)) if existing.get(k) != options.get(k)]
            if differences:
                raise ConvertError(f"{layout.root} was written with different options ({'; '.join(differences)}). "
                                   f"Use --overwrite to replace it, or --out/--name to write elsewhere")
    if layout.manifest not in parsed:
        return False
    shutil.rmtree(layout.partial, ignore_errors=True)  # a run killed right after its manifest
    missing = [p for p in ConvertedDataset(layout, parsed[layout.manifest]).files() if not p.is_file()]
    if missing:
        print(f"{len(missing)} files listed in {layout.manifest} are missing, e.g. {missing[0]}; converting again")
        layout.manifest.unlink()
    return not missing
