"""One conversion at a time per output folder: an exclusive flock on OUT/NAME/.lock for the whole run.

The kernel releases a flock when its process dies, however it dies, so a lock left by a killed run is
taken over by the next one; the file holds the holder's process id, for the message a second
converter gets."""
from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

from convert import ConvertError
from loaders.manifest import Layout


@contextlib.contextmanager
def exclusive(layout: Layout) -> Iterator[None]:
    """Hold the lock of `layout.root` (creating the folder) for the block, or raise ConvertError at once if
    another process holds it. Afterwards the lock file is removed, and so are the folders this call
    created if nothing was written into them."""
    created = [p for p in (layout.root, *layout.root.parents) if not p.exists()]
    layout.root.mkdir(parents=True, exist_ok=True)
    fd = acquire(layout)
    try:
        yield
    finally:
        layout.lock.unlink(missing_ok=True)  # before closing: a process waiting on this file retries (see acquire)
        os.close(fd)
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):  # not empty: keep it
                folder.rmdir()


def acquire(layout: Layout) -> int:
    """Lock `layout.lock`, write our pid into it and return its file descriptor."""
    while True:
        fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConvertError(f"another conversion is writing {layout.root} (pid {holder}); wait for it to "
                               f"finish, or stop it") from None
        try:
            same = os.stat(layout.lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else its holder removed the file between our open and our flock: try the new one
            break
        os.close(fd)
    stale = os.pread(fd, 32, 0).decode(errors="replace").strip()
    if stale:
        print(f"taking over {layout.root} from an earlier conversion (pid {stale}) that was killed")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
