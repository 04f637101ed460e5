"""eval.py on a user's mistakes: one line on stderr naming the problem and the fix, exit code 1, nothing
lost (the weights, an existing output and the results file are left as they were), and never the
advice to unpickle. One case per row of docs/evaluation.md's "what happens when" table."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

import eval as eval_cli
from model.vit import create_vit

REPO = Path(__file__).resolve().parents[1]


def write_checkpoint(path: Path) -> Path:
    """A training-style checkpoint of a vit_mini/8 momentum encoder at 32 px."""
    torch.manual_seed(0)
    torch.save({"model": {f"momentum.{k}": v for k, v in create_vit("vit_mini", 32, 8).state_dict().items()}}, path)
    return path


def random_bytes(tmp: Path, _: str) -> list[str]:
    (tmp / "w.pt").write_bytes(os.urandom(4096))
    return ["export", "--weights", str(tmp / "w.pt"), "--out", str(tmp / "e.safetensors")]


def text_file(tmp: Path, _: str) -> list[str]:
    (tmp / "w.pt").write_text("these are not weights\n")
    return ["knn", "--weights", str(tmp / "w.pt"), "data.root=x"]


def pickled_objects(tmp: Path, _: str) -> list[str]:
    torch.save({"model": {"cls_token": numpy.zeros(3)}}, tmp / "w.pt")  # unpickling would need numpy's globals
    return ["knn", "--weights", str(tmp / "w.pt"), "data.root=x"]


def text_named_safetensors(tmp: Path, _: str) -> list[str]:
    (tmp / "w.safetensors").write_text("these are not weights either\n")
    return ["export", "--weights", str(tmp / "w.safetensors"), "--out", str(tmp / "e.safetensors")]


def arch_mismatch(tmp: Path, _: str) -> list[str]:
    return ["linear", "--weights", str(write_checkpoint(tmp / "w.pt")), "data.root=x", "arch=vit_small",
            f"output_dir={tmp / 'out'}"]


def missing_split_knn(tmp: Path, root: str) -> list[str]:
    return ["knn", "--weights", str(write_checkpoint(tmp / "w.pt")), f"data.root={root}", "data.backend=memory",
            "data.image_size=32", "data.val_split=validation"]


def missing_split_linear(tmp: Path, root: str) -> list[str]:
    return ["linear", "--weights", str(write_checkpoint(tmp / "w.pt")), f"data.root={root}", "arch=vit_mini",
            "patch_size=8", "data.image_size=32", "data.train_split=training", f"output_dir={tmp / 'out'}"]


def unresized_view_of_another_size(tmp: Path, root: str) -> list[str]:
    return ["finetune", "--weights", str(write_checkpoint(tmp / "w.pt")), f"data.root={root}", "arch=vit_mini",
            "patch_size=8", "data.image_size=64", "eval_resize_crop=false", "lr=1e-3", f"output_dir={tmp / 'out'}"]


def export_into_missing_folder(tmp: Path, _: str) -> list[str]:
    return ["export", "--weights", str(write_checkpoint(tmp / "w.pt")), "--out", str(tmp / "no" / "e.safetensors")]


def export_onto_directory(tmp: Path, _: str) -> list[str]:
    (tmp / "exported").mkdir()
    (tmp / "exported" / "keep.txt").write_text("kept")
    return ["export", "--weights", str(write_checkpoint(tmp / "w.pt")), "--out", str(tmp / "exported")]


def results_not_appendable(tmp: Path, root: str) -> list[str]:
    (tmp / "eval_results.jsonl").mkdir()  # where the results would go
    return ["knn", "--weights", str(write_checkpoint(tmp / "w.pt")), f"data.root={root}", "data.backend=memory",
            "data.image_size=32"]


def missing_weights(tmp: Path, _: str) -> list[str]:
    return ["knn", "--weights", str(tmp / "nope.pt"), "data.root=x"]


CASES = [  # (make the mistake, what the message must say)
    (random_bytes, r"w\.pt cannot be read as weights \(not a torch checkpoint of tensors\): pass our last\.pt"),
    (text_file, r"w\.pt cannot be read as weights \(not a torch checkpoint of tensors\): pass"),
    (pickled_objects, r"w\.pt cannot be read as weights \(it holds objects other than tensors and plain "
                      r"containers, which are never unpickled here\)"),
    (text_named_safetensors, r"w\.safetensors is not a valid safetensors file \(.*\): pass"),
    (arch_mismatch, r"the config expects arch='vit_small' but .* holds a vit_mini .* pass arch=vit_mini"),
    (missing_split_knn, r"has no split 'validation' \(it has train, val\): set data.train_split"),
    (missing_split_linear, r"has no split 'training' \(it has train, val\): set data.train_split"),
    (unresized_view_of_another_size, r"eval_resize_crop=false validates the stored images as they are, but one "
                                     r"is 32x32, not 64x64: set eval_resize_crop=true"),
    (export_into_missing_folder, r"the folder .*/no does not exist; create it first"),
    (export_onto_directory, r"--out .*/exported is a directory: pass a file name"),
    (results_not_appendable, r"cannot append results to .*eval_results\.jsonl \(Is a directory\): make it writable"),
    (missing_weights, r"nope\.pt does not exist: pass"),
]
NEEDS_DATA = {missing_split_knn, missing_split_linear, unresized_view_of_another_size, results_not_appendable}


@pytest.mark.parametrize("mistake, message", CASES, ids=[case.__name__ for case, _ in CASES])
def test_a_mistake_is_one_line_exit_1_nothing_lost(mistake, message, request, tmp_path, capsys, monkeypatch,
                                                    file_hashes):
    root = request.getfixturevalue("cifar_root") if mistake in NEEDS_DATA else "unused"
    argv = mistake(tmp_path, root)
    before = file_hashes(tmp_path)
    capsys.readouterr()  # the dataset fixture's conversion output

    def never(*args, **kwargs):
        raise AssertionError("features were computed before the mistake was reported")

    monkeypatch.setattr(eval_cli, "knn_accuracy", never)
    assert eval_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eval.py: error: "), err
    assert "weights_only" not in err and "Traceback" not in err
    assert re.search(message, err), err
    assert file_hashes(tmp_path) == before  # nothing written, nothing lost, no temporary file left


def test_a_mistake_prints_no_traceback_from_the_command_line(tmp_path):
    """The same contract through the real entry point (a subprocess), for the unreadable-weights case."""
    argv = random_bytes(tmp_path, "")
    done = subprocess.run([sys.executable, "eval.py", *argv], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("eval.py: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "weights_only" not in done.stderr
