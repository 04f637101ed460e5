"""`eval.py report`: our numbers next to the paper's (docs/method.md §8), pre-training throughput and
wall-clock, and one PNG of the training curves, from run folders.

A run folder is a pre-training `output_dir`: `config.yaml` and `log.jsonl` (train.py) and
`eval_results.jsonl` (eval.py, appended next to the weights `RUN/last.pt`). An evaluation that is
not in `eval_results.jsonl` is reported as "not run", never as a number.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from atomic_write import atomic_path, write_atomic
from evaluation.published import PROTOCOLS, RESULTS_FILE, dataset_key, published

KNN_K = 20  # the kNN row set against the paper; the best k is shown too
LABELS = {"knn": "kNN", "linear": "linear", "finetune": "fine-tune"}


class ReportError(ValueError):
    """A run folder the report cannot read; the message names it and says what is expected."""


@dataclass
class RunData:
    """What one run folder holds."""

    path: Path
    dataset: str
    arch: str
    patch_size: int
    epochs: int
    log: list[dict] = field(default_factory=list)  # log.jsonl records, in file order
    results: list[dict] = field(default_factory=list)  # eval_results.jsonl rows, in file order

    @property
    def name(self) -> str:
        return self.path.name


def read_jsonl(path: Path) -> list[dict]:
    """The JSON lines of `path` ([] when it does not exist); a malformed line is a `ReportError`."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ReportError(f"{path}:{number} is not a JSON line: fix or remove that line") from None
    return rows


def read_run(path: Path) -> RunData:
    """A run folder's config, training log and evaluation results."""
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise ReportError(f"{path} is not a pre-training run folder (no config.yaml): pass train.py's output_dir")
    try:
        config = yaml.safe_load(config_path.read_text())
        described = dict(dataset=dataset_key(config["data"]["root"]), arch=config["model"]["arch"],
                         patch_size=int(config["model"]["patch_size"]), epochs=int(config["epochs"]))
    except (yaml.YAMLError, LookupError, TypeError, ValueError):
        raise ReportError(f"{config_path} is not a training config train.py wrote (data.root, model.arch, "
                          f"model.patch_size, epochs): pass train.py's output_dir") from None
    return RunData(path=path, **described, log=read_jsonl(path / "log.jsonl"),
                   results=read_jsonl(path / RESULTS_FILE))


def latest(rows: list[dict], protocol: str, random_init: bool) -> list[dict]:
    """The rows of the last evaluation of `protocol` (a kNN evaluation writes one row per k)."""
    found = [r for r in rows if r.get("protocol") == protocol and bool(r.get("random_init")) == random_init]
    if protocol != "knn":
        return found[-1:]
    by_k: dict[int, dict] = {}
    for row in found:
        by_k[row["k"]] = row  # a later evaluation replaces an earlier one
    return list(by_k.values())


def fmt(value: float | None, signed: bool = False) -> str:
    return "—" if value is None else f"{value:+.2f}" if signed else f"{value:.2f}"


def evaluation_rows(run: RunData) -> list[list[str]]:
    """Table rows: each protocol's result next to the paper's, "not run" where there is none."""
    table = []
    for protocol in PROTOCOLS:
        for random_init in (False, True):
            rows = latest(run.results, protocol, random_init)
            if not rows and random_init:
                continue
            first = rows[0] if rows else {}
            dataset, arch = first.get("dataset", run.dataset), first.get("arch", run.arch)
            patch = first.get("patch_size", run.patch_size)
            model = f"{arch}/{patch}"
            paper = None if random_init else published(dataset, arch, patch, protocol)
            suffix = ", random init" if random_init else ""
            label = LABELS[protocol] + suffix
            if not rows:
                table.append([run.name, dataset, model, label, "not run", "—", fmt(paper), "—"])
            elif protocol == "knn":
                by_k = {r["k"]: r["top1"] for r in rows}
                k = KNN_K if KNN_K in by_k else min(by_k)
                best_k = max(by_k, key=by_k.get)
                ours = by_k[k]
                table.append([run.name, dataset, model, f"kNN k={k}{suffix}", fmt(ours),
                              f"{fmt(by_k[best_k])} (k={best_k})", fmt(paper),
                              fmt(None if paper is None else ours - paper, signed=True)])
            else:
                row = rows[0]
                table.append([run.name, dataset, model, label, fmt(row["top1"]),
                              f"{fmt(row['best_top1'])} (epoch {row['best_epoch']})", fmt(paper),
                              fmt(None if paper is None else row["top1"] - paper, signed=True)])
                if protocol == "finetune" and "ema_top1" in row:
                    table.append([run.name, dataset, model, f"fine-tune EMA{suffix}", fmt(row["ema_top1"]),
                                  f"{fmt(row['ema_best_top1'])} (epoch {row['ema_best_epoch']})", "—", "—"])
    return table


def training_records(log: list[dict]) -> list[dict]:
    """The log's training-step records (those with throughput), without the kNN records."""
    return [r for r in log if "images_per_s" in r and "step_time_s" in r]


def pretraining_summary(run: RunData) -> dict:
    """Steps, time-weighted images/s, mean MFU and estimated wall-clock of the logged training.

    Wall-clock is the sum over log records of (steps since the previous record × that window's
    mean step time): the time spent in training steps, without start-up, checkpoints and kNN
    passes. Records whose step does not advance (a resume re-logging steps) add nothing.
    """
    records = training_records(run.log)
    seconds = images = mfu_time = mfu_seconds = 0.0
    previous = 0
    for record in records:
        steps = record["step"] - previous
        previous = record["step"]
        if steps <= 0:
            continue
        window = steps * record["step_time_s"]
        seconds += window
        images += window * record["images_per_s"]
        if record.get("mfu") is not None:
            mfu_time += window * record["mfu"]
            mfu_seconds += window
    knn = [r["knn_top1"] for r in run.log if "knn_top1" in r]
    return {"steps": records[-1]["step"] if records else None, "seconds": seconds if records else None,
            "images_per_s": images / seconds if seconds else None,
            "mfu": mfu_time / mfu_seconds if mfu_seconds else None,
            "loss": records[-1].get("loss") if records else None, "knn_top1": knn[-1] if knn else None}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def plot_curves(runs: list[RunData], out: Path) -> None:
    """One PNG: loss terms, lr, kNN top-1 (when logged) and images/s over steps, every run overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = {"loss terms": axes[0, 0], "lr": axes[0, 1], "kNN top-1 (%)": axes[1, 0], "images/s": axes[1, 1]}
    for run in runs:
        records = training_records(run.log)
        steps = [r["step"] for r in records]
        terms = [k for k in (records[0] if records else {}) if k == "loss" or k.startswith("loss/")]  # train.log_step
        for term in terms:
            panels["loss terms"].plot(steps, [r[term] for r in records], label=f"{run.name}: {term}")
        panels["lr"].plot(steps, [r["lr"] for r in records], label=run.name)
        panels["images/s"].plot(steps, [r["images_per_s"] for r in records], label=run.name)
        knn = [r for r in run.log if "knn_top1" in r]
        if knn:
            panels["kNN top-1 (%)"].plot([r["step"] for r in knn], [r["knn_top1"] for r in knn], "o-", label=run.name)
    for title, axis in panels.items():
        axis.set_title(title)
        axis.set_xlabel("step")
        if axis.lines:
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)


def duration(seconds: float | None) -> str:
    """Seconds as s / min / h, whichever reads best."""
    if seconds is None:
        return "—"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.2f} h"


def write_report(run_dirs: list[str], out: str) -> str:
    """Write the Markdown report to `out` and the curves next to it (`out` with .png); returns the Markdown."""
    out_path = Path(out)
    if out_path.is_dir() or not out_path.parent.is_dir():
        raise ReportError(f"--out {out_path}: pass a file name in an existing folder")
    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir)
        if not path.is_dir():
            raise ReportError(f"{path} is not a folder: pass pre-training output folders (train.py's output_dir)")
        runs.append(read_run(path))
    png = out_path.with_suffix(".png")
    evaluation = [row for run in runs for row in evaluation_rows(run)]
    pretraining = []
    for run in runs:
        s = pretraining_summary(run)
        steps = "no log.jsonl" if s["steps"] is None else str(s["steps"])
        paper_epochs = published(run.dataset, run.arch, run.patch_size, "pretrain_epochs")
        pretraining.append([run.name, run.dataset, f"{run.arch}/{run.patch_size}", str(run.epochs),
                            "—" if paper_epochs is None else str(paper_epochs), steps,
                            "—" if s["images_per_s"] is None else f"{s['images_per_s']:.1f}",
                            "—" if s["mfu"] is None else f"{100 * s['mfu']:.1f} %", duration(s["seconds"]),
                            "—" if s["loss"] is None or not math.isfinite(s["loss"]) else f"{s['loss']:.4f}",
                            fmt(s["knn_top1"])])
    text = "\n\n".join([
        "# Results report",
        "Runs: " + ", ".join(f"`{run.path}`" for run in runs) + ". Paper: the published top-1 (docs/method.md §8). "
        f"kNN is set against the paper at k={KNN_K} (the best k is shown too); linear and fine-tune at the last "
        "epoch (the best epoch is shown too). \"not run\": no such evaluation in the run's eval_results.jsonl.",
        "## Evaluation (top-1 %)",
        markdown_table(["run", "dataset", "model", "protocol", "ours", "best", "paper", "ours − paper"], evaluation),
        "## Pre-training",
        "Images/s and MFU are averaged over the logged steps, weighted by time; wall-clock is the estimated time "
        "in training steps (steps × logged step time; start-up, checkpoints and kNN passes not included).",
        markdown_table(["run", "dataset", "model", "epochs", "paper epochs", "steps logged", "images/s", "MFU", "wall-clock",
                        "last loss", "last kNN top-1"], pretraining),
        "## Training curves",
        f"![training curves]({png.name})",
    ]) + "\n"
    plot_curves(runs, png)
    write_atomic(out_path, text)
    return text
