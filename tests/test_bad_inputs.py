"""Bad inputs to the converter (issue 13, conversion rows): each is reported as one line on stderr with
exit status 1 and no traceback, and loses nothing; and what the audit found wrong beyond errors: two
converters on one output, code in a CIFAR file, 16-bit and other unusual images, --verify missing damage,
a split that does not exist."""
from __future__ import annotations

import gc
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
from PIL import Image

import convert_datasets
from atomic_write import write_json
from convert.sources.cifar import CIFAR_RELEASES
from convert.writers import write_shard
from loaders.manifest import DatasetNotFoundError, Layout, open_dataset, parse_wds_index
from loaders.shards import ShardSamples, open_converted

REPO = Path(__file__).resolve().parents[1]
ERROR = "convert_datasets.py: error: "


def hold_lock(root: Path) -> subprocess.Popen:
    """A process holding the conversion lock of `root`, as a running converter does."""
    code = ("import sys, time\nfrom pathlib import Path\nfrom convert.lock import exclusive\n"
            "from loaders.manifest import Layout\n"
            "with exclusive(Layout(Path(sys.argv[1]))):\n    print('locked', flush=True)\n    time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "locked\n"
    return process


def copy_of(root: Path, tmp_path: Path) -> Path:
    """A copy of the converted dataset `root` (OUT/NAME) to damage; returns the new OUT."""
    shutil.copytree(root, tmp_path / "out" / root.name)
    return tmp_path / "out"


class Crafted:
    """Unpickling this runs a shell command (what a malicious CIFAR file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return os.system, (f"touch {self.marker}",)


# --------------------------------------------------------------------------------------------------
# One case per row. Each returns (exit status, stderr, what the message must say) and checks that
# nothing was lost or run.

class Env(NamedTuple):
    """What a case works with: pytest's fixtures."""

    tmp_path: Path
    capsys: pytest.CaptureFixture
    converted: Callable[..., Path]
    monkeypatch: pytest.MonkeyPatch
    file_hashes: Callable[[Path], dict[str, str]]


def run(capsys: pytest.CaptureFixture, *args: object) -> subprocess.CompletedProcess:
    """The converter run in this process: its exit status and what it printed."""
    status = convert_datasets.main([str(a) for a in args])
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, printed.out, printed.err)


def permissions_apply(folder: Path) -> bool:
    """False when running as root, who may write into a read-only folder."""
    try:
        (folder / "probe").touch()
    except PermissionError:
        return True
    (folder / "probe").unlink()
    return False


def second_converter(env: Env) -> tuple[int, str, str]:
    holder = hold_lock(env.tmp_path / "digits")
    try:
        result = run(env.capsys, "digits", "--out", env.tmp_path)
        assert sorted(p.name for p in (env.tmp_path / "digits").iterdir()) == [".lock"]  # wrote nothing
    finally:
        holder.kill()
        holder.wait()
    expected = f"another conversion is writing {env.tmp_path / 'digits'} (pid {holder.pid})"
    return result.returncode, result.stderr, expected


def crafted_cifar_file(env: Env) -> tuple[int, str, str]:
    release = CIFAR_RELEASES["cifar10"]
    folder = env.tmp_path / "cifar" / release.folder
    folder.mkdir(parents=True)
    with open(folder / release.meta, "wb") as f:
        pickle.dump({release.names_key: [f"c{i}".encode() for i in range(10)]}, f)
    marker = env.tmp_path / "code-ran"
    for name in (*release.train, *release.test):
        batch = {b"data": np.zeros((2, 3072), np.uint8), release.labels_key: [0, 1]}
        with open(folder / name, "wb") as f:
            pickle.dump({**batch, b"batch_label": Crafted(marker)} if name == "data_batch_3" else batch, f)
    result = run(env.capsys, "cifar10", "--source", env.tmp_path / "cifar", "--out", env.tmp_path / "out")
    assert not marker.exists() and "posix.system" in result.stderr
    return result.returncode, result.stderr, f"{folder / 'data_batch_3'} is not a batch of the official CIFAR release"


def flipped_byte_in_an_unsampled_image(env: Env) -> tuple[int, str, str]:
    out = copy_of(env.converted("digits"), env.tmp_path)
    tar, idx = Layout.shard(Layout(out / "digits").dali_dir("train"), 0)
    image = parse_wds_index(idx.read_text())[1][0]  # sample 1: --verify compares samples 0, 46, 93, ...
    data = bytearray(tar.read_bytes())
    data[image.offset + image.size // 2] ^= 0x01
    tar.write_bytes(data)
    result = run(env.capsys, "digits", "--out", out, "--verify")
    return result.returncode, result.stderr, f"verification failed: {tar}: SHA-256 differs from the manifest's"


def truncated_beton(env: Env) -> tuple[int, str, str]:
    out = copy_of(env.converted("digits"), env.tmp_path)
    beton = Layout(out / "digits").ffcv("train")
    beton.write_bytes(beton.read_bytes()[:beton.stat().st_size // 2])
    result = run(env.capsys, "digits", "--out", out, "--verify")
    return result.returncode, result.stderr, f"verification failed: {beton}: SHA-256 differs"


def damaged_beton(env: Env) -> tuple[int, str, str]:
    out = copy_of(env.converted("digits"), env.tmp_path)
    beton = Layout(out / "digits").ffcv("val")
    data = bytearray(beton.read_bytes())
    data[:64] = bytes(64)  # the header and field descriptions zeroed, as two converters on one file did
    beton.write_bytes(data)
    result = run(env.capsys, "digits", "--out", out, "--verify")
    return result.returncode, result.stderr, f"verification failed: {beton}: SHA-256 differs"


def sixteen_bit_image(path: Path, mean: int = 128) -> None:
    """A 16-bit greyscale PNG (mode I;16) whose mean is `mean` on the 0-255 scale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.full((16, 16), mean * 257, np.uint16)
    values[::2] += 257 * 10
    Image.fromarray(values).save(path)


def wrong_pixels_with_matching_checksums(env: Env) -> tuple[int, str, str]:
    """Output as the old converter wrote it (16-bit clipped to white by PIL's convert), with the manifest's
    checksums updated to match: only an independent decode of the source can tell."""
    source = env.tmp_path / "source"
    for name in ("train/a/0.png", "train/a/1.png", "val/a/2.png"):
        sixteen_bit_image(source / name)
    args = ["imagefolder", "--source", source, "--out", env.tmp_path, "--name", "grey", "--formats", "dali",
            "--workers", 1]
    assert run(env.capsys, *args).returncode == 0
    dataset = open_dataset(env.tmp_path, "grey")
    tar, idx = map(Path, (paths[0] for paths in dataset.dali_files("val")))
    _, _, label = ShardSamples(dataset, "val").read_with_ext(0)
    clipped = Image.open(source / "val/a/2.png").convert("RGB")
    assert np.asarray(clipped).mean() > 250  # what PIL's own conversion gives
    png = env.tmp_path / "clipped.png"
    clipped.save(png)
    record = write_shard(tar, idx, iter([("00000000", "png", png.read_bytes(), label)]))
    for path, digest in ((tar, record["sha256"]["tar"]), (idx, record["sha256"]["index"])):
        dataset.manifest["sha256"][str(path.relative_to(dataset.layout.root))] = digest
    write_json(dataset.layout.manifest, dataset.manifest)
    result = run(env.capsys, *args, "--verify")
    expected = "verification failed: dali val: sample 0 (val/a/2.png): mean pixel difference"
    return result.returncode, result.stderr, expected


def read_only_output(env: Env) -> tuple[int, str, str]:
    out = env.tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    if not permissions_apply(out):  # running as root: refuse as the kernel would for anyone else
        original = Path.mkdir

        def refuse(path: Path, *args: object, **kwargs: object) -> None:
            if out in path.parents:
                raise PermissionError(13, "Permission denied", str(path))
            original(path, *args, **kwargs)

        env.monkeypatch.setattr(Path, "mkdir", refuse)
    result = run(env.capsys, "digits", "--out", out)
    assert list(out.iterdir()) == []
    return result.returncode, result.stderr, f"Permission denied: {out / 'digits'}. What was finished is kept"


def full_disk(env: Env) -> tuple[int, str, str]:
    """A kernel write error part way (a 1 MB file size limit: the shards fit, the .beton does not); the
    rerun on a disk with space keeps the finished shards and gives the same output as a clean run."""
    args = ["digits", "--out", env.tmp_path, "--shard-size", 100, "--workers", 2]
    result = subprocess.run([sys.executable, REPO / "convert_datasets.py", *map(str, args)], cwd=REPO,
                            capture_output=True, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)))
    layout = Layout(env.tmp_path / "digits")
    finished = {p: p.stat().st_mtime_ns for p in layout.dali_dir("train").glob("*.tar")}
    assert len(finished) == 15 and not layout.manifest.exists()
    rerun = run(env.capsys, *args)
    assert rerun.returncode == 0 and "0 images decoded" in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert env.file_hashes(layout.root) == env.file_hashes(env.converted("digits", shard_size=100))
    return result.returncode, result.stderr, f"File too large: while writing {layout.root}. What was finished is kept"


CASES = {
    "second converter on the same output": second_converter,
    "crafted CIFAR file": crafted_cifar_file,
    "--verify: flipped byte in an image it does not sample": flipped_byte_in_an_unsampled_image,
    "--verify: truncated .beton": truncated_beton,
    "--verify: damaged .beton": damaged_beton,
    "--verify: wrong pixels, checksums matching": wrong_pixels_with_matching_checksums,
    "output on a read-only disk": read_only_output,
    "output on a full disk, then resumed": full_disk,
}


@pytest.mark.parametrize("case", CASES)
def test_conversion_problem_is_one_line_and_exit_1(case: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   converted: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
                                                   file_hashes: Callable[[Path], dict[str, str]]) -> None:
    status, err, expected = CASES[case](Env(tmp_path, capsys, converted, monkeypatch, file_hashes))
    errors = [line for line in err.splitlines() if line.startswith(ERROR)]
    assert status == 1 and "Traceback" not in err, err[-2000:]
    assert len(errors) == 1 and expected in errors[0], err[-2000:]
    assert err.rstrip().endswith(errors[0])


# --------------------------------------------------------------------------------------------------
# Beyond the error messages


def test_the_lock_of_a_killed_converter_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    holder = hold_lock(tmp_path / "digits")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "digits" / ".lock").read_text() == f"{holder.pid}\n"  # left behind
    result = run(capsys, "digits", "--out", tmp_path, "--formats", "dali")
    assert result.returncode == 0 and f"(pid {holder.pid}) that was killed" in result.stdout
    assert open_dataset(tmp_path, "digits").count("val") == 360
    assert not (tmp_path / "digits" / ".lock").exists()


def save(image: Image.Image, path: Path, **options: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def palette_with_transparency(path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.putpixel((1, 0), 1)
    save(image, path, transparency=1)


# mode -> (how to write a 1-pixel-high image of that mode, the RGB values it must be stored as)
MODES = {
    "I;16": (lambda p: save(Image.fromarray(np.array([[0, 25700, 32896, 65535]], np.uint16)), p.with_suffix(".png")),
             [[0] * 3, [100] * 3, [128] * 3, [255] * 3]),
    "I;16B": (lambda p: save(Image.fromarray(np.array([[0, 25700, 32896, 65535]], ">u2")), p.with_suffix(".tif")),
              [[0] * 3, [100] * 3, [128] * 3, [255] * 3]),
    "I": (lambda p: save(Image.fromarray(np.array([[-5, 0, 25700, 70000]], np.int32)), p.with_suffix(".tif")),
          [[0] * 3, [0] * 3, [100] * 3, [255] * 3]),
    "F": (lambda p: save(Image.fromarray(np.array([[-0.5, 0, 0.5, 1, 2]], np.float32)), p.with_suffix(".tif")),
          [[0] * 3, [0] * 3, [128] * 3, [255] * 3, [255] * 3]),
    "LA": (lambda p: save(Image.fromarray(np.array([[[200, 0], [200, 255], [200, 128]]], np.uint8), "LA"),
                          p.with_suffix(".png")),
           [[255] * 3, [200] * 3, [227] * 3]),  # over white: 200 * 128/255 + 255 * 127/255
    "P with transparency": (lambda p: palette_with_transparency(p.with_suffix(".png")), [[255, 0, 0], [255] * 3]),
    "CMYK": (lambda p: save(Image.frombytes("CMYK", (4, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0, 0, 0, 0, 255,
                                                                  0, 0, 0, 128])), p.with_suffix(".tif")),
             [[255] * 3, [0, 255, 255], [0] * 3, [127] * 3]),
    "1": (lambda p: save(Image.fromarray(np.array([[False, True]])), p.with_suffix(".png")), [[0] * 3, [255] * 3]),
}


def test_every_pil_mode_is_stored_as_8_bit_rgb_and_verified(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "source"
    for i, (write, _) in enumerate(MODES.values()):
        write(source / "train" / f"m{i}" / "image")
        write(source / "val" / f"m{i}" / "image")
    result = run(capsys, "imagefolder", "--source", source, "--out", tmp_path, "--name", "modes",
                 "--formats", "dali", "--workers", 1, "--verify")
    assert result.returncode == 0 and "verified" in result.stdout, result.stderr
    samples = ShardSamples(open_converted(tmp_path / "modes"), "train")
    assert len(samples) == len(MODES)
    for i, (mode, (_, expected)) in enumerate(MODES.items()):
        image, label = samples.decode(i)
        assert label == i
        assert np.asarray(image).tolist() == [expected], mode


def test_a_split_that_does_not_exist_is_a_clear_error(converted: Callable[..., Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    dataset = open_converted(converted("digits"))
    with pytest.raises(DatasetNotFoundError, match=f"{dataset.layout.root} has no split 'test'; its splits are "
                                                   f"train, val"):
        ShardSamples(dataset, "test")
    with pytest.raises(DatasetNotFoundError, match="has no split 'test'"):
        dataset.count("test")
    gc.collect()
    assert unraisable == []
