"""`eval.py report` on run folders written the way train.py and eval.py write them: the Markdown tables
next to docs/method.md §8, "not run" for a missing evaluation, throughput and wall-clock, the PNG."""
import json
import re
from pathlib import Path

import pytest
import torch

import eval as eval_cli
import train
from configs.schema import load_config, to_yaml
from evaluation.protocol import summary
from evaluation.report import duration
from evaluation.weights import EncoderSpec
from trainer.monitor import Monitor, Throughput
from trainer.schedules import Schedules

REPO = Path(__file__).resolve().parents[1]
SPEC = EncoderSpec("vit_tiny", 32, 2)


def pretraining_run(folder: Path, *, logged: bool) -> Path:
    """A vit_tiny/2 CIFAR-10 output_dir: config.yaml as train.py writes it and, if `logged`, a log.jsonl
    made by train.py's own log_step and Monitor (30 steps logged every 10, a kNN record at step 20)."""
    folder.mkdir()
    config = load_config(REPO / "configs" / "vitt_cifar10.yaml", [f"output_dir={folder}", "data.root=/data/cifar10"])
    (folder / "config.yaml").write_text(to_yaml(config))
    if logged:
        monitor = Monitor(folder, total_steps=30, start_step=0)
        throughput = Throughput(config.batch_size)
        schedules = Schedules.build(config.optim, epochs=3, steps_per_epoch=10, global_batch=config.batch_size)
        for step in (10, 20, 30):
            for _ in throughput.timed(range(10)):
                pass
            terms = {"source": torch.tensor(5.0 - step / 10), "mix": torch.tensor(2.0), "mix_mix": torch.tensor(1.0)}
            terms["loss"] = sum(terms.values())
            train.log_step(monitor, step, 30, terms, throughput, schedules, None, None, torch.device("cpu"))
            if step == 20:
                monitor.log(step, {"knn_top1": 41.5})  # as train.knn_monitor logs it
        monitor.close()
    return folder


def evaluated(run: Path) -> None:
    """eval_results.jsonl as eval.py writes it: a kNN run (rerun: the second one counts), its random-init
    comparison, and a 2-epoch linear probe."""
    results = eval_cli.results_path(str(run / "last.pt"))
    for top1_at_20 in (30.0, 44.5):
        rows = [{"protocol": "knn", "k": k, "top1": top1, "top5": 90.0, "random_init": False,
                 **eval_cli.describe(SPEC, "/data/cifar10")}
                for k, top1 in ((10, 43.0), (20, top1_at_20), (100, 46.25), (200, 45.0))]
        eval_cli.record(results, str(run / "last.pt"), {"rows": rows})
    rows = [{"protocol": "knn", "k": k, "top1": 10.0, "top5": 50.0, "random_init": True,
             **eval_cli.describe(SPEC, "/data/cifar10")} for k in (10, 20, 100, 200)]
    eval_cli.record(results, str(run / "last.pt"), {"rows": rows})
    history = [{"epoch": 1, "loss": 2.0, "lr": 0.1, "top1": 61.0, "top5": 95.0},
               {"epoch": 2, "loss": 1.5, "lr": 0.0, "top1": 60.5, "top5": 96.0}]
    eval_cli.record(results, str(run / "last.pt"), {**summary("linear", history), "backbone_unchanged": True,
                                                     "random_init": False, **eval_cli.describe(SPEC, "/data/cifar10")})


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    done = pretraining_run(tmp_path / "done", logged=True)
    evaluated(done)
    return done, pretraining_run(tmp_path / "fresh", logged=False)


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell} |")]


def test_report_sets_ours_next_to_the_paper(runs, tmp_path, capsys):
    done, fresh = runs
    out = tmp_path / "report.md"
    assert eval_cli.main(["report", str(done), str(fresh), "--out", str(out)]) == 0
    text = out.read_text()
    assert capsys.readouterr().out.startswith(text)
    evaluation = table_rows(text.split("## Pre-training")[0], "done")
    # docs/method.md §8, CIFAR-10 ViT-T/2: fine-tune 97.5, linear 94.4, kNN 92.9.
    assert evaluation == [
        ["done", "cifar10", "vit_tiny/2", "kNN k=20", "44.50", "46.25 (k=100)", "92.90", "-48.40"],
        ["done", "cifar10", "vit_tiny/2", "kNN k=20, random init", "10.00", "10.00 (k=10)", "—", "—"],
        ["done", "cifar10", "vit_tiny/2", "linear", "60.50", "61.00 (epoch 1)", "94.40", "-33.90"],
        ["done", "cifar10", "vit_tiny/2", "fine-tune", "not run", "—", "97.50", "—"],
    ]
    assert table_rows(text.split("## Pre-training")[0], "fresh") == [
        ["fresh", "cifar10", "vit_tiny/2", label, "not run", "—", paper, "—"]
        for label, paper in (("kNN", "92.90"), ("linear", "94.40"), ("fine-tune", "97.50"))]


def test_pretraining_throughput_and_wall_clock_from_the_log(runs, tmp_path):
    done, fresh = runs
    out = tmp_path / "r.md"
    assert eval_cli.main(["report", str(done), str(fresh), "--out", str(out)]) == 0
    text = out.read_text()
    records = [json.loads(line) for line in (done / "log.jsonl").read_text().splitlines()]
    training = [r for r in records if "images_per_s" in r]
    assert [r["step"] for r in training] == [10, 20, 30] and len(records) == 4
    seconds = sum(10 * r["step_time_s"] for r in training)  # every record closes a window of 10 steps
    images = sum(10 * r["step_time_s"] * r["images_per_s"] for r in training)
    pretraining = table_rows(text.split("## Pre-training")[1], "done")
    assert pretraining == [["done", "cifar10", "vit_tiny/2", "800", "800", "30", f"{images / seconds:.1f}", "—",
                            duration(seconds), f"{training[-1]['loss']:.4f}", "41.50"]]
    assert table_rows(text.split("## Pre-training")[1], "fresh") == [
        ["fresh", "cifar10", "vit_tiny/2", "800", "800", "no log.jsonl", "—", "—", "—", "—", "—"]]


def test_report_draws_the_training_curves(runs, tmp_path):
    out = tmp_path / "report.md"
    assert eval_cli.main(["report", *map(str, runs), "--out", str(out)]) == 0
    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    assert "![training curves](report.png)" in out.read_text()


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", r"missing is not a folder: pass pre-training output folders"),
    (lambda tmp: tmp, r"is not a pre-training run folder \(no config.yaml\)"),
])
def test_report_on_a_wrong_folder_is_one_line(tmp_path, capsys, make, message):
    assert eval_cli.main(["report", str(make(tmp_path)), "--out", str(tmp_path / "r.md")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eval.py: error: ")
    assert re.search(message, err)
    assert not (tmp_path / "r.md").exists()
