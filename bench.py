"""Throughput benchmarks: `python bench.py {kernel,convert,loader,step} [options] [--json FILE]`.

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
    args = parser.parse_args()
    modules[args.benchmark].run(args)


if __name__ == "__main__":
    main()
