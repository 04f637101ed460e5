"""Evaluate a pre-trained encoder with the published protocols (docs/method.md §7), draw the
inter-instance similarity picture, or export the encoder for timm.

    python eval.py knn        --config configs/eval/knn_cifar10.yaml --weights CKPT [key=value ...]
    torchrun eval.py linear   --config configs/eval/linear_vit_small_cifar10.yaml --weights CKPT
    torchrun eval.py finetune --config configs/eval/finetune_vit_small_cifar10.yaml --weights CKPT
    python eval.py similarity --weights CKPT --data DIR --query N --out picture.png
    python eval.py export     --weights CKPT --out encoder.safetensors
    python eval.py report     RUN_DIR [RUN_DIR ...] [--out report.md]

`--weights` takes our checkpoints, an exported encoder or the paper's released checkpoints (the
momentum encoder is used when present). `--config` may be left out when the checkpoint's own
config names the dataset. `--random-init` evaluates an untrained encoder of the same shape.
Results are printed and appended as JSON lines to `eval_results.jsonl` next to the weights.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

from atomic_write import atomic_path
from configs.schema import ConfigError, load_config
from evaluation.knn import KnnConfig, extract_features, knn_classify
from evaluation.protocol import ProtocolError
from evaluation.published import RESULTS_FILE, dataset_key
from evaluation.weights import EncoderSpec, export_encoder, load_encoder
from loaders.builder import build_loader
from loaders.manifest import DatasetNotFoundError
from loaders.shards import open_converted
from trainer.distributed import init_process

def config_from_checkpoint(extra: dict) -> list[str]:
    """Overrides that point an evaluation at the dataset and input size the encoder was trained on."""
    trained = extra.get("config")
    if not trained:
        return []
    data = trained["data"]
    return [f"data.root={data['root']}", f"data.image_size={data['image_size']}", f"data.backend={data['backend']}"]


def load_protocol_config(args: argparse.Namespace, schema: type, extra: dict):
    """The protocol's config: schema defaults ← the checkpoint's dataset ← --config ← overrides."""
    overrides = config_from_checkpoint(extra) if args.config is None else []
    try:
        return load_config(args.config, overrides + args.overrides, schema=schema)
    except ConfigError as error:
        hint = "" if args.config or extra.get("config") else " (this checkpoint has no config: pass --config)"
        raise ConfigError(f"{error}{hint}") from None


def describe(spec: EncoderSpec, root: str) -> dict:
    """What a result row says about the model and the data (`eval.py report` matches on these)."""
    return {"arch": spec.arch, "patch_size": spec.patch_size, "dataset": dataset_key(root)}


def results_path(weights: str) -> Path:
    """`eval_results.jsonl` next to the weights, checked appendable before anything is computed."""
    path = Path(weights).resolve().parent / RESULTS_FILE
    try:
        if path.exists():
            with path.open("a"):
                pass
        elif not os.access(path.parent, os.W_OK | os.X_OK):
            raise PermissionError(f"the folder {path.parent} is not writable")
    except OSError as error:
        reason = error.strerror or str(error)
        raise OSError(f"cannot append results to {path} ({reason}): make it writable, or evaluate a copy "
                      f"of the weights in a writable folder") from None
    return path


def record(path: Path, weights: str, result: dict) -> None:
    """Print the result as a small table and append it to `path` (eval_results.jsonl next to the weights)."""
    rows = result.pop("rows", None) or [result]
    keys = [k for k in rows[0] if k != "weights" and not isinstance(rows[0][k], (list, dict))]  # not history
    print("  ".join(f"{k:>10}" for k in keys))
    for row in rows:
        print("  ".join(f"{row[k]:>10.2f}" if isinstance(row[k], float) else f"{str(row[k]):>10}" for k in keys))
    with path.open("a") as out:
        for row in rows:
            out.write(json.dumps({"weights": str(Path(weights).resolve()), **row}) + "\n")
    print(f"appended to {path}")


def knn_accuracy(encoder: torch.nn.Module, config: KnnConfig, process, dataset, cache_tag: str) -> dict:
    """Extract (or read cached) features of both splits and run the weighted kNN vote."""
    encoder = encoder.to(process.device)

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        cache = Path(config.cache_dir) / f"{cache_tag}-{split}.pt" if config.cache_dir else None
        if cache is not None and cache.is_file():
            saved = torch.load(cache, weights_only=True)
            return saved["features"].to(process.device), saved["labels"].to(process.device)
        loader = build_loader(config.data, split=split, train=False, batch_size=config.batch_size,
                              rank=process.rank, world_size=process.world_size, device=process.device)
        feats, labels = extract_features(encoder, loader, process.device, dataset.count(split))
        if cache is not None and process.is_main:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache) as tmp:
                torch.save({"features": feats.cpu(), "labels": labels.cpu()}, tmp)
        return feats, labels

    train_features, train_labels = features(config.data.train_split)
    val_features, val_labels = features(config.data.val_split)
    return knn_classify(train_features, train_labels, val_features, val_labels, len(dataset.classes),
                        tuple(config.ks), config.temperature, config.memory_budget_gb)


def run_knn(args: argparse.Namespace) -> None:
    encoder, spec, extra = load_encoder(args.weights, random_init=args.random_init)
    results = results_path(args.weights)
    config: KnnConfig = load_protocol_config(args, KnnConfig, extra)
    dataset = open_converted(config.data.root, config.data.train_split, config.data.val_split)
    process = init_process()
    runs = [(args.random_init, encoder)]
    if args.compare_random and not args.random_init:
        runs.append((True, load_encoder(args.weights, random_init=True)[0]))
    rows = []
    for random_init, model in runs:
        tag = f"{Path(args.weights).stem}{'-random' if random_init else ''}"
        accuracy = knn_accuracy(model, config, process, dataset, tag)
        rows += [{"protocol": "knn", "k": k, "top1": top1, "top5": top5, "random_init": random_init,
                  **describe(spec, config.data.root)} for k, (top1, top5) in accuracy.items()]
    if process.is_main:
        record(results, args.weights, {"rows": rows})
        if len(runs) == 2:
            k = 20 if 20 in config.ks else config.ks[0]
            trained, random = (next(r["top1"] for r in rows if r["k"] == k and r["random_init"] is flag)
                               for flag in (False, True))
            print(f"kNN top-1 (k={k}): pre-trained {trained:.2f}% vs random init {random:.2f}% "
                  f"({trained - random:+.2f} points)")


def run_trained_protocol(args: argparse.Namespace) -> None:
    """linear / finetune: the protocol modules do the training; this names the weights and records."""
    if args.command == "linear":
        from evaluation.linear import run_linear as run
        from evaluation.protocol_config import LinearConfig as schema
    else:
        from evaluation.finetune import run_finetune as run
        from evaluation.protocol_config import FinetuneConfig as schema
    _, spec, extra = load_encoder(args.weights)
    results = results_path(args.weights)
    config = load_protocol_config(args, schema, extra)
    result = run(config, args.weights, random_init=args.random_init)
    if int(os.environ.get("RANK", 0)) == 0:  # the protocol has left the process group by now
        record(results, args.weights, {**result, "random_init": args.random_init, **describe(spec, config.data.root)})


def run_similarity(args: argparse.Namespace) -> None:
    from evaluation.similarity import similarity_picture

    similarity_picture(args.weights, args.data, args.query, args.out, split=args.split, keys=args.keys)
    print(f"wrote {args.out}")


def run_export(args: argparse.Namespace) -> None:
    spec = export_encoder(args.weights, args.out)
    name, kwargs = spec.timm_args()
    arguments = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    print(f"wrote {args.out} ({spec.arch}, {spec.img_size}px, patch {spec.patch_size}). Load it with timm:\n"
          f"    model = timm.create_model('{name}', {arguments})\n"
          f"    model.load_state_dict(safetensors.torch.load_file('{args.out}'), strict=True)")


def run_report(args: argparse.Namespace) -> None:
    from evaluation.report import write_report

    print(write_report(args.run_dirs, args.out), end="")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("knn", "linear", "finetune"):
        p = sub.add_parser(name, help=f"{name} evaluation (docs/method.md §7)")
        p.add_argument("--config", help="a YAML in configs/eval/ (optional when the checkpoint names its dataset)")
        p.add_argument("--weights", required=True)
        p.add_argument("--random-init", action="store_true", help="evaluate an untrained encoder of the same shape")
        if name == "knn":
            p.add_argument("--compare-random", action="store_true",
                           help="also evaluate a random encoder of the same shape and print both")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p = sub.add_parser("similarity", help="query image and key images with their embedding similarity (PNG)")
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True, help="a converted dataset folder")
    p.add_argument("--query", type=int, required=True, help="index of the query image in --split")
    p.add_argument("--split", default="val")
    p.add_argument("--keys", type=int, default=8, help="how many key images")
    p.add_argument("--out", required=True)
    p = sub.add_parser("export", help="the encoder as timm-loadable safetensors")
    p.add_argument("--weights", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("report", help="our results next to the paper's, throughput, training curves (Markdown + PNG)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="pre-training output folders")
    p.add_argument("--out", default="report.md", help="the Markdown file; the curves go next to it as .png")
    return parser


COMMANDS = {"knn": run_knn, "linear": run_trained_protocol, "finetune": run_trained_protocol,
            "similarity": run_similarity, "export": run_export, "report": run_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ConfigError, DatasetNotFoundError, ProtocolError, ValueError, OSError) as error:
        print(f"eval.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
