"""Atomic, durable file output: write under a name no watcher matches, fsync, rename into place.

Every producer in cmlab drops files through here (the inbox engine's guarantee 3), so a
consumer never sees half a file and a crash never leaves one behind under the real name."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".~cmlab-"


def tmp_name_for(path: Path) -> Path:
    """A sibling name that inbox watchers ignore (dot-prefixed, no drop-file extension)."""
    return path.with_name(f"{TMP_PREFIX}{secrets.token_hex(6)}-{path.name}.tmp")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str, *, durable: bool = True) -> None:
    """Write `data` to `path` whole or not at all; the rename is the commit point."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = tmp_name_for(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(payload)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_output(path: Path, *, durable: bool = True) -> Iterator[BinaryIO]:
    """Stream a large output to a temporary sibling; it appears under `path` only on success."""
    tmp = tmp_name_for(path)
    f = open(tmp, "xb")  # noqa: SIM115 - closed below on every path
    try:
        yield f
        f.flush()
        if durable:
            os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def move_durable(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` (same filesystem) and make both directory entries durable."""
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def remove_stale_tmp(folder: Path) -> int:
    """Remove leftovers of writes interrupted by a crash; returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.startswith(TMP_PREFIX) and not entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed += 1
    return removed
