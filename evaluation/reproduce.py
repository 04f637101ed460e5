"""`make reproduce CONFIG=configs/vitt_cifar10.yaml`: pre-training, then kNN, linear probe and fine-tuning
with the matching `configs/eval` YAMLs, then the report; resumable at every stage.

    python -m evaluation.reproduce --config configs/vitt_cifar10.yaml [--nproc 8] [--dry-run] [key=value ...]

The overrides go to train.py (e.g. `data.root=/fast/datasets/cifar10`); the evaluations read the
same `data.root`. Everything lands in the run's `output_dir`: `last.pt`, `eval_results.jsonl`,
`linear/`, `finetune/`, `report.md` and `report.png`. A stage that exits 0 leaves a marker
`OUTPUT/reproduce/STAGE.done`; a rerun skips the stages that have one, and a stage that was
interrupted resumes on its own (train.py, linear and fine-tune continue from their `last.pt`).
The report is rewritten every time (it only reads files). `--dry-run` prints each stage's
command and whether it would run or is done.
"""
import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from configs.schema import ConfigError, load_config
from evaluation.published import dataset_key
from trainer.checkpoint import LAST

REPO = Path(__file__).resolve().parents[1]
EVAL_CONFIGS = REPO / "configs" / "eval"


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One step of the reproduction: its command and the marker that says it finished."""

    name: str
    command: list[str]
    marker: Path | None  # None: always run (the report)

    @property
    def done(self) -> bool:
        return self.marker is not None and self.marker.is_file()


def plan(config_path: str, overrides: list[str], nproc: int) -> list[Stage]:
    """The stages for a pre-training config, with the eval YAMLs matching its dataset and architecture."""
    config = load_config(config_path, overrides)
    dataset, arch = dataset_key(config.data.root), config.model.arch
    evals = {"knn": EVAL_CONFIGS / f"knn_{dataset}.yaml", "linear": EVAL_CONFIGS / f"linear_{arch}_{dataset}.yaml",
             "finetune": EVAL_CONFIGS / f"finetune_{arch}_{dataset}.yaml"}
    missing = [str(path.relative_to(REPO)) for path in evals.values() if not path.is_file()]
    if missing:
        raise ConfigError(f"no published evaluation config for {arch} on {dataset} ({', '.join(missing)} missing): "
                          f"reproduce runs the published settings only (docs/method.md §8)")
    run = Path(config.output_dir)
    weights = str(run / LAST)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    data = [f"data.root={config.data.root}"]

    def evaluation(protocol: str, *extra: str) -> list[str]:
        return [*torchrun, "eval.py", protocol, "--config", str(evals[protocol].relative_to(REPO)), "--weights",
                weights, *data, *extra]

    stages = [
        ("pretrain", [*torchrun, "train.py", "--config", config_path, *overrides]),
        ("knn", evaluation("knn")),
        ("linear", evaluation("linear", f"output_dir={run / 'linear'}")),
        ("finetune", evaluation("finetune", f"output_dir={run / 'finetune'}")),
    ]
    return [*(Stage(name=name, command=command, marker=run / "reproduce" / f"{name}.done") for name, command in stages),
            Stage(name="report", command=[sys.executable, "eval.py", "report", str(run), "--out",
                                          str(run / "report.md")], marker=None)]


def execute(stages: list[Stage], dry_run: bool = False, runner=subprocess.run) -> int:
    """Run every stage that is not done, in order, writing its marker when it exits 0; stop at the
    first failure (its exit code is returned; a rerun starts from that stage)."""
    for stage in stages:
        line = shlex.join(stage.command)
        if stage.done:
            print(f"[{stage.name}] done ({stage.marker}), skipped")
            continue
        print(f"[{stage.name}] {'would run' if dry_run else 'running'}: {line}", flush=True)
        if dry_run:
            continue
        code = runner(stage.command, cwd=REPO).returncode
        if code != 0:
            print(f"[{stage.name}] failed (exit code {code}); fix the cause and rerun: finished stages are skipped",
                  file=sys.stderr)
            return code
        if stage.marker is not None:
            stage.marker.parent.mkdir(parents=True, exist_ok=True)
            stage.marker.write_text(line + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a pre-training YAML, e.g. configs/vitt_cifar10.yaml")
    parser.add_argument("--nproc", type=int, default=8, help="processes (GPUs) per stage")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and what would run")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides for train.py")
    args = parser.parse_args(argv)
    try:
        stages = plan(args.config, args.overrides, args.nproc)
    except ConfigError as error:
        print(f"reproduce: error: {error}", file=sys.stderr)
        return 1
    return execute(stages, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
