"""Opening source files safely: inside the ingest roots when opened, regular files only, reads with a deadline.

The roots are checked on the file actually opened: the real path of the open descriptor (``/proc/self/fd``), so
a file swapped for a symlink to somewhere else between a listing and its read is caught, whatever the source
kind (folder, manifest row, manifest, tar shard). ``O_NONBLOCK`` makes opening a FIFO return at once, and
``fstat`` refuses anything that is not a regular file before a byte is read. A deadline is checked between the
chunks of every read (a read that never returns cannot be interrupted, but a trickling one is stopped).
"""

from __future__ import annotations

import io
import os
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from indexer.errors import ImageTooLargeError, NotRegularFileError, OutsideRootsError, ReadTimeoutError

CHUNK = 1024 * 1024
_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


def inside(path: Path, roots: Sequence[Path]) -> bool:
    """``path`` (already real) is one of ``roots`` or lies under one (each root resolved)."""
    return any(path == (real := Path(os.path.realpath(root))) or path.is_relative_to(real) for root in roots)


def _real_path(fd: int, path: Path) -> Path:
    """The real path of the file open as ``fd`` (Linux: its /proc link; elsewhere the resolved name, accepted
    only when it is the very file the descriptor holds)."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        real = Path(os.path.realpath(path))
        opened, named = os.fstat(fd), os.stat(real)
        if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
            raise OutsideRootsError(f"{path}: changed while it was being opened") from None
        return real


@contextmanager
def open_regular(path: Path, *, roots: Sequence[Path] | None) -> Iterator[BinaryIO]:
    """``path`` open for reading, when it is a regular file whose real path lies inside ``roots`` (None: any).

    ``NotRegularFileError`` for a FIFO, socket, device or folder (never blocks); ``OutsideRootsError`` when the
    opened file lies outside the roots; ``OSError`` when it cannot be opened."""
    fd = os.open(path, _FLAGS)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(
                f"{path}: not a regular file ({_kind(mode)}); only regular files are read"
            )
        if roots is not None and not inside(_real_path(fd, path), roots):
            raise OutsideRootsError(f"{path}: the file opened is outside the ingest roots")
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):  # fmt: skip
        if test(mode):
            return name
    return "not a file"


class DeadlineReader(io.RawIOBase):
    """A binary stream over ``handle`` whose reads fail with ``ReadTimeoutError`` once ``timeout_s`` has passed
    since the last ``renew()`` (or the start); checked before every chunk."""

    def __init__(self, handle: BinaryIO, timeout_s: float, what: str) -> None:
        self.handle, self.timeout_s, self.what = handle, timeout_s, what
        self.renew()

    def renew(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if time.monotonic() > self.deadline:
            raise ReadTimeoutError(f"{self.what}: reading timed out after {self.timeout_s:g} s")
        view = memoryview(buffer)[:CHUNK]
        data = self.handle.read(len(view))
        view[: len(data)] = data
        return len(data)


def read_regular(path: Path, *, max_bytes: int, roots: Sequence[Path] | None, timeout_s: float) -> bytes:
    """The bytes of the regular file ``path`` (see ``open_regular``), at most ``max_bytes``
    (``ImageTooLargeError``, checked on the size first), read within ``timeout_s`` (``ReadTimeoutError``)."""
    with open_regular(path, roots=roots) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise ImageTooLargeError(
                f"{path.name}: file is {size} bytes, over the limit max_bytes={max_bytes}"
            )
        reader = DeadlineReader(handle, timeout_s, path.name)
        parts, total = [], 0
        while chunk := reader.read(min(CHUNK, max_bytes + 1 - total)):
            parts.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # the file grew since fstat()
                raise ImageTooLargeError(f"{path.name}: file is over the limit max_bytes={max_bytes}")
        return b"".join(parts)


def sniff_head(path: Path, n: int) -> bytes | None:
    """The first ``n`` bytes of ``path`` when it is a regular file (never blocks on a FIFO); None otherwise."""
    try:
        with open_regular(path, roots=None) as handle:
            return handle.read(n)
    except (OSError, NotRegularFileError):
        return None
