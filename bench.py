"""Throughput benchmarks: `python bench.py {kernel,convert,loader,step,train,all} [options] [--json FILE]`.

Each benchmark times our implementation against its baseline in the same run and reports the
ratio, so numbers stay comparable across noisy machines. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "kernel": "bench.kernel",
    "convert": "bench.convert",
    "loader": "bench.loader",
    "step": "bench.step",
    "train": "bench.train",
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
    sub.add_parser("all", help="kernel, step and (with --data) loader and train, each with its defaults") \
        .add_argument("--data", help="a converted dataset for the loader and train benchmarks")
    args = parser.parse_args()
    if args.benchmark == "all":
        run_all(modules, args.data)
    else:
        modules[args.benchmark].run(args)


def run_all(modules: dict, data: str | None) -> None:
    """Every benchmark with its defaults, JSON into bench-results/."""
    names = ["kernel", "step"] + (["loader", "train"] if data else [])
    for name in names:
        print(f"== {name}")
        parser = argparse.ArgumentParser()
        modules[name].add_arguments(parser)
        parser.add_argument("--json")
        argv = (["--data", data] if name in ("loader", "train") else []) + ["--json", f"bench-results/{name}.json"]
        modules[name].run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
