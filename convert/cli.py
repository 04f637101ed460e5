"""The command line of convert_datasets.py."""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Callable

from convert import ConvertError
from convert.lock import exclusive
from convert.pipeline import CONVERTER_VERSION, check_existing, convert, is_finished
from convert.sources import Source, read_source
from convert.sources.cifar import CIFAR_RELEASES
from convert.verify import verify
from loaders.manifest import FORMATS, SPLITS, DatasetNotFoundError, Layout, open_dataset

DESCRIPTION = "Convert ImageNet, CIFAR-10/100, any image folder or scikit-learn's digits into FFCV and DALI formats."


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
    parser = argparse.ArgumentParser(prog="convert_datasets.py", description=DESCRIPTION)
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
    common.add_argument("--verify", action="store_true",
                        help="check every file's SHA-256, re-read both formats and compare with the source")
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


def run(args: argparse.Namespace) -> None:
    """Convert (or find the finished conversion) and verify. Writing holds the output folder's lock; a
    finished conversion is only read, so one on a read-only mount can still be found and verified."""
    layout = Layout(args.out / args.name)
    source = read_source(args.dataset, getattr(args, "source", None), getattr(args, "download", False))
    options = conversion_options(args, source)
    finished = not args.overwrite and is_finished(layout, options)
    if not finished:
        with exclusive(layout):
            finished = check_existing(layout, options, args.overwrite)  # another run may have finished it
            if not finished:
                convert(source, layout, options, args.workers)
    if finished:
        print(f"{layout.root} is already converted with these options; nothing to do")
    if args.verify:
        verify(open_dataset(args.out, args.name), source, args.workers)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1: a reported error, 130: interrupted)."""
    args = build_parser().parse_args(argv)
    args.name = args.name or args.dataset
    try:
        run(args)
    except (ConvertError, DatasetNotFoundError) as error:
        return report(str(error))
    except OSError as error:  # the machine's: a full or read-only disk, a file that cannot be read
        where = error.filename or f"while writing {args.out / args.name}"
        return report(f"{error.strerror or error}: {where}. What was finished is kept: fix this and run the same "
                      f"command again to resume")
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def report(message: str) -> int:
    """Print a one-line error; return the exit status 1."""
    print(f"convert_datasets.py: error: {' '.join(message.split())}", file=sys.stderr)
    return 1
