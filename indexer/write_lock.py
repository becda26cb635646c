"""One writer per data directory: an advisory ``flock`` that a second writer finds busy at once."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from indexer.errors import IndexBusyError


@contextmanager
def write_lock(data_dir: Path, *, purpose: str = "ingest") -> Iterator[None]:
    """Hold the data directory's write lock, or raise ``IndexBusyError`` naming the holder."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "write.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(path).read_text(errors="replace").strip() or "another process"
            raise IndexBusyError(
                f"the index in {data_dir} is busy: {holder} is writing to it; "
                "wait for it to finish and run this again (nothing was changed)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{purpose} (pid {os.getpid()})".encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
