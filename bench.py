"""Throughput benchmarks: `python bench.py {kernel,convert,loader,step,train,all} [options] [--json FILE]`.

Each benchmark times our implementation against its baseline in the same run and reports the
ratio, so numbers stay comparable across noisy machines. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

BENCHMARKS = {
    "kernel": "bench.kernel",
    "convert": "bench.convert",
    "loader": "bench.loader",
    "step": "bench.step",
    "train": "bench.train",
}


# `all`: each benchmark with its defaults; the loader and train ones on prepared data (bench/loader.py)
# unless --data names a converted dataset. `{cifar10}` is the prepared CIFAR-10.
ALL_RUNS = {
    "kernel": ("kernel", []),
    "convert": ("convert", []),
    "step": ("step", []),
    "loader_cifar10": ("loader", ["--prepare", "cifar10", "--size", "32", "--scale", "0.1", "1.0", "--batch", "256"]),
    "loader_imagenet": ("loader", ["--prepare", "imagenet", "--local-crops", "8", "--host"]),
    "train": ("train", ["--data", "{cifar10}"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    modules = {}
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0])
        module.add_arguments(p)
        p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    every = sub.add_parser("all", help="every benchmark with its defaults, loader and train on prepared data")
    every.add_argument("--data", help="a converted dataset for the loader and train benchmarks "
                                      "(default: CIFAR-10 and the ImageNet sample, prepared from ../shared/data)")
    every.add_argument("--json", metavar="FILE", help="also write every benchmark's results as one JSON to FILE")
    args = parser.parse_args()
    if args.benchmark == "all":
        run_all(modules, args.data, args.json)
    else:
        modules[args.benchmark].run(args)


def run_all(modules: dict, data: str | None, json_path: str | None) -> dict:
    """Every run of `ALL_RUNS` in turn, each also written to bench-results/all/NAME.json; one record
    `{"benchmark": "all", "runs": {name: record}}`."""
    from bench.harness import environment, save_record
    from bench.loader import prepare

    cifar10 = data or str(prepare("cifar10", Path("bench-results/data"), replicate=1))
    runs = {}
    for name, (benchmark, argv) in ALL_RUNS.items():
        print(f"== {name}", flush=True)
        parser = argparse.ArgumentParser()
        modules[benchmark].add_arguments(parser)
        parser.add_argument("--json")
        argv = [arg.format(cifar10=cifar10) for arg in argv]
        if data and "--prepare" in argv:
            at = argv.index("--prepare")
            argv[at:at + 2] = ["--data", data]
        own_json = Path("bench-results/all") / f"{name}.json"
        runs[name] = modules[benchmark].run(parser.parse_args(argv + ["--json", str(own_json)]))
    record = {"benchmark": "all", "environment": environment(), "runs": runs}
    if json_path:
        save_record(record, json_path)
    return record


if __name__ == "__main__":
    main()
