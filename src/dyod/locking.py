"""One writer at a time: a lock on a run folder while it trains and on an output folder while it is written.

Two `dyod sample ... --out X` at once each wrote images and the record of their own, the last one winning; two
`dyod fit --resume` on one run both trained, each step logged twice. The lock is an advisory ``flock`` on a file kept
under dyod's cache (``$DYOD_CACHE/locks``, keyed by the folder's real path), so no folder is made or littered before
a command may run; the kernel releases it when its process ends however it ends, so a lock left by a killed process
is simply taken by the next one, with no stale-lock guessing. Who holds it is written in the file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import DyodError


def lock_dir() -> Path:
    return Path(os.environ.get("DYOD_CACHE", Path.home() / ".cache" / "dyod")) / "locks"


def lock_path(folder: str | os.PathLike) -> Path:
    real = os.path.realpath(folder)
    return lock_dir() / f"{hashlib.sha1(real.encode()).hexdigest()[:20]}.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "folder", command: str | None = None):
    """Hold ``folder`` for this process for the ``with`` block, or refuse at once naming the process that holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock, as before
        yield
        return
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            raise DyodError(f"{what} {folder} is in use by another dyod process ({holder}): one writer at a time; wait "
                            "for it to finish (or stop it) and run this command again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "folder": os.path.realpath(folder),
                                  "command": command or " ".join(["dyod", *sys.argv[1:]]),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "its record is being written"
    return f"pid {info.get('pid')} on {info.get('host')}, `{info.get('command')}` since {info.get('since')}"
