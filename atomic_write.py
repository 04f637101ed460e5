"""Atomic file writes: a file under its final name is either the old version or the complete new one.

    with atomic_path(path) as tmp:       # streamed writes, by any writer that takes a path
        tarfile.open(tmp, "w") ...       # (tarfile, FFCV's DatasetWriter, torch.save, safetensors)
    write_atomic(path, b"bytes" or "text")
    write_json(path, {"any": "JSON-able data"})

The data goes to a temporary file with a unique name in the same folder (so the rename cannot cross
file systems and two writers never share one), is flushed to disk, renamed over `path`, and the
folder is flushed too, so that the rename itself survives a power cut. If the block raises (a full
disk, Ctrl-C), the temporary file is deleted and `path` is left as it was. Only a killed process
(kill -9, power loss) can leave a temporary file behind: `is_temporary` recognises those, for whoever
owns the folder to delete them.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

TMP_SUFFIX = ".tmp"


def is_temporary(path: Path) -> bool:
    """Whether `path` has the name of a temporary file this module creates (or created, then got killed)."""
    return path.name.endswith(TMP_SUFFIX)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a new, empty temporary file next to `path` to write; when the block succeeds, make it `path`.

    The temporary file is created with the usual permissions (0666 less the umask), like `open(path, "w")`
    would, not with mkstemp's 0600."""
    path = Path(path)
    while True:
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path | str, data: bytes | str) -> None:
    """Replace `path` by `data` (text is written as UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(path: Path | str, data: Any) -> None:
    """Write `data` as indented JSON to `path` (its folders made first), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2) + "\n")
