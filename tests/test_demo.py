"""`make demo`, end to end: convert digits, pre-train, kNN of the encoder vs a random one."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_demo_pretrained_beats_random(tmp_path):
    done = subprocess.run(["make", "--no-print-directory", "demo", f"DEMO_OUT={tmp_path / 'run'}",
                           f"DATASETS={tmp_path / 'datasets'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"throughput [\d.]+ images/s", done.stdout)
    found = re.search(r"kNN top-1 \(k=20\): pre-trained ([\d.]+)% vs random init ([\d.]+)%", done.stdout)
    assert found, done.stdout[-2000:]
    trained, random = map(float, found.groups())
    assert trained >= random + 2.0, (trained, random)
