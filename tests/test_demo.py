"""`make demo`, end to end: convert digits, pre-train, kNN of the encoder vs a random one."""
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


@pytest.mark.slow
def test_make_demo_on_your_own_image_folder(tmp_path):
    """README: `make demo DATA=/path/to/imagefolder` converts `train/<class>/*`, `val/<class>/*` and runs."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 48), ("val", 12)):
        for name, colour in (("reds", (200, 40, 40)), ("blues", (40, 40, 200))):
            folder = tmp_path / "photos" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                noise = rng.integers(-40, 40, size=(40, 48, 3))
                Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    done = subprocess.run(["make", "--no-print-directory", "demo", f"DATA={tmp_path / 'photos'}",
                           f"DEMO_OUT={tmp_path / 'run'}", f"DATASETS={tmp_path / 'datasets'}",
                           "DEMO_ARGS=epochs=2 batch_size=32 data.workers=1 log_every=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "datasets" / "demo-data" / "manifest.json").read_text())
    assert manifest["classes"] == ["blues", "reds"]
    assert {split: manifest["splits"][split]["count"] for split in ("train", "val")} == {"train": 96, "val": 24}
    assert (tmp_path / "run" / "last.pt").is_file()
    assert re.search(r"kNN top-1 \(k=20\): pre-trained [\d.]+% vs random init [\d.]+%", done.stdout), done.stdout[-2000:]
