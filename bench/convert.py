"""Dataset conversion throughput: convert_datasets.py with worker processes vs a single-process PIL loop.

Both do the same work per image of the ImageNet sample (shared/data/imagenet-sample.tar, arranged as
ILSVRC2012: all 1,000 images in train/, every 10th also in val/<wnid>/): decode, convert to RGB, shrink
to at most --max-resolution on the longer side and encode as JPEG at --jpeg-quality. The converter also
writes both formats to disk (DALI shards with their index, then the FFCV .beton); the baseline keeps its
JPEG bytes in memory. Throughput is images per second of wall-clock time, median of --repeats runs.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from PIL import Image

from bench.harness import measure, report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "imagenet-sample.tar"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"ImageNet sample tar (default {DEFAULT_DATA})")
    parser.add_argument("--workers", type=int, default=2, help="converter worker processes (default 2)")
    parser.add_argument("--max-resolution", type=int, default=512)
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each method (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method (default 3)")


def arrange_ilsvrc(data: Path, root: Path) -> list[Path]:
    """Extract the sample's train/<wnid>/*.JPEG under `root`, link every 10th image into val/<wnid>/ and
    return all image paths (val links included), i.e. exactly what the converter will convert."""
    with tarfile.open(data) as tar:
        tar.extractall(root, filter="data")
    train = sorted((root / "train").glob("*/*.JPEG"))
    for image in train[::10]:
        link = root / "val" / image.parent.name / image.name
        link.parent.mkdir(parents=True)
        link.symlink_to(image)
    return train + sorted((root / "val").glob("*/*.JPEG"))


def pil_loop(files: list[Path], max_resolution: int, jpeg_quality: int) -> None:
    """The baseline: one process, the plain PIL calls, no draft-mode decoding, nothing written to disk."""
    for path in files:
        with Image.open(path) as image:
            image = image.convert("RGB")
        if max(image.size) > max_resolution:
            scale = max_resolution / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        image.save(io.BytesIO(), "JPEG", quality=jpeg_quality)


def run(args: argparse.Namespace) -> dict:
    from convert.cli import main as convert_main

    if not args.data.is_file():
        sys.exit(f"{args.data} not found: pass --data (see shared/data/README.md)")
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "ILSVRC2012", Path(tmp) / "out"
        files = arrange_ilsvrc(args.data, source)
        argv = ["imagenet", "--source", str(source), "--out", str(out), "--workers", str(args.workers),
                "--max-resolution", str(args.max_resolution), "--jpeg-quality", str(args.jpeg_quality)]

        def convert() -> None:
            shutil.rmtree(out, ignore_errors=True)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                status = convert_main(argv)
            if status != 0:
                raise RuntimeError(f"convert_datasets.py {' '.join(argv)} failed")

        timings = {
            f"convert_datasets.py, {args.workers} workers": measure(convert, warmup=args.warmup, repeats=args.repeats),
            "PIL loop, 1 process": measure(lambda: pil_loop(files, args.max_resolution, args.jpeg_quality),
                                           warmup=args.warmup, repeats=args.repeats),
        }
    baseline = timings["PIL loop, 1 process"]["median_s"]
    results = [{"method": method, "images": len(files), **timing, "images_per_s": len(files) / timing["median_s"],
                "speedup": baseline / timing["median_s"]} for method, timing in timings.items()]
    settings = {"data": str(args.data), "images": len(files), "workers": args.workers,
                "max_resolution": args.max_resolution, "jpeg_quality": args.jpeg_quality,
                "warmup": args.warmup, "repeats": args.repeats}
    return report("convert", settings, results,
                  ["method", "images", "median_s", "min_s", "max_s", "images_per_s", "speedup"], args.json)
