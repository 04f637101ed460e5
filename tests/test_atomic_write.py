"""atomic_write: a file under its final name is the old version or the complete new one, never a mix;
failed writes leave no temporary files; a killed writer leaves only a recognisable temporary file."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from atomic_write import atomic_path, is_temporary, write_atomic

REPO = Path(__file__).resolve().parents[1]


def test_write_replaces_the_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    write_atomic(target, "old\n")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]


def test_an_error_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "train.beton"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_a_full_disk_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    """A real write error from the kernel: a file size limit (EFBIG), as a full disk gives ENOSPC."""
    target = tmp_path / "shard.tar"
    target.write_bytes(b"old")
    code = f"from atomic_write import write_atomic; write_atomic({str(target)!r}, bytes(1 << 20))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)))
    assert result.returncode == 1 and "File too large" in result.stderr
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_a_killed_writer_leaves_the_old_file_and_only_a_temporary(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    code = (f"import os, signal; from atomic_write import atomic_path\n"
            f"with atomic_path({str(target)!r}) as tmp:\n"
            f"    tmp.write_bytes(b'half')\n"
            f"    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert result.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert target.read_bytes() == b"old" and len(leftovers) == 1 and is_temporary(leftovers[0])
    assert leftovers[0].name.startswith("checkpoint.pt.")


def test_concurrent_writers_use_different_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "index.idx"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first"  # the outer block finishes last
    assert list(tmp_path.iterdir()) == [target]


def test_the_file_gets_the_usual_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "encoder.safetensors", b"weights")
    finally:
        os.umask(umask)
    assert (tmp_path / "encoder.safetensors").stat().st_mode & 0o777 == 0o644
