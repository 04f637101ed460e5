"""`make reproduce`: the stages and their commands, and the resume logic (a rerun skips what finished)."""
import subprocess
import sys
from pathlib import Path

from evaluation.reproduce import execute, main, plan

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/vitt_cifar10.yaml"


class Runner:
    """Stands in for subprocess.run: records each stage's command and fails the one named `fail`."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail, self.ran = fail, []

    def __call__(self, command: list[str], cwd: Path) -> subprocess.CompletedProcess:
        stage = "report" if "report" in command else "pretrain" if "train.py" in command else command[command.index(
            "eval.py") + 1]
        self.ran.append(stage)
        return subprocess.CompletedProcess(command, 3 if stage == self.fail else 0)


def test_the_stages_use_the_matching_published_eval_configs(tmp_path):
    stages = plan(CONFIG, [f"output_dir={tmp_path}", "data.root=/fast/cifar10"], nproc=8)
    assert [s.name for s in stages] == ["pretrain", "knn", "linear", "finetune", "report"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8"]
    weights = ["--weights", str(tmp_path / "last.pt"), "data.root=/fast/cifar10"]
    assert [s.command for s in stages] == [
        [*torchrun, "train.py", "--config", CONFIG, f"output_dir={tmp_path}", "data.root=/fast/cifar10"],
        [*torchrun, "eval.py", "knn", "--config", "configs/eval/knn_cifar10.yaml", *weights],
        [*torchrun, "eval.py", "linear", "--config", "configs/eval/linear_vit_tiny_cifar10.yaml", *weights,
         f"output_dir={tmp_path / 'linear'}"],
        [*torchrun, "eval.py", "finetune", "--config", "configs/eval/finetune_vit_tiny_cifar10.yaml", *weights,
         f"output_dir={tmp_path / 'finetune'}"],
        [sys.executable, "eval.py", "report", str(tmp_path), "--out", str(tmp_path / "report.md")],
    ]


def test_a_rerun_skips_finished_stages_and_resumes_at_the_failed_one(tmp_path, capsys):
    stages = plan(CONFIG, [f"output_dir={tmp_path}"], nproc=1)
    first = Runner(fail="linear")
    assert execute(stages, runner=first) == 3
    assert first.ran == ["pretrain", "knn", "linear"]
    assert sorted(p.name for p in (tmp_path / "reproduce").iterdir()) == ["knn.done", "pretrain.done"]
    assert "[linear] failed (exit code 3)" in capsys.readouterr().err

    second = Runner()
    assert execute(stages, runner=second) == 0
    assert second.ran == ["linear", "finetune", "report"]  # the report is always rewritten
    out = capsys.readouterr().out
    assert "[pretrain] done" in out and "[knn] done" in out and "skipped" in out

    third = Runner()
    assert execute(stages, runner=third) == 0 and third.ran == ["report"]


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, capsys):
    (tmp_path / "reproduce").mkdir()
    (tmp_path / "reproduce" / "pretrain.done").write_text("done\n")
    assert main(["--config", CONFIG, "--nproc", "2", "--dry-run", f"output_dir={tmp_path}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[pretrain] done")
    assert [line.split(":")[0] for line in lines[1:]] == [f"[{s}] would run" for s in
                                                          ("knn", "linear", "finetune", "report")]
    assert "--nproc_per_node 2" in lines[1] and "configs/eval/knn_cifar10.yaml" in lines[1]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["pretrain.done", "reproduce"]


def test_a_config_without_published_evaluations_is_one_line(capsys):
    assert main(["--config", "configs/demo.yaml", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("reproduce: error: no published evaluation config for vit_mini") and err.count("\n") == 1


def test_make_reproduce_calls_the_stage_script():
    done = subprocess.run(["make", "-n", "--no-print-directory", "reproduce", f"CONFIG={CONFIG}", "NPROC=4",
                           "ARGS=data.root=/x"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert f"-m evaluation.reproduce --config {CONFIG} --nproc 4 data.root=/x" in done.stdout
