"""Flushing a batch of new files at once: one syncfs instead of one fsync per file.

Why it exists: a CAB extraction or a content library store writes hundreds or thousands of
files that must all be on disk before one rename makes them reachable. fsyncing them one by
one costs a journal commit each (5,000 files: 0.1 s with one syncfs against 1.9 s on ext4),
so the callers write everything unflushed, hand large files to the kernel's writeback as
they go, and flush the lot here once.

What it promises: when make_durable returns, every file and folder it was given (and the
root) is on disk, by syncfs where Linux has it and by an fsync of each elsewhere; links are
never followed to a file.

Interface:
  make_durable(root, files, folders)   flush a tree built under `root` before its rename
  start_writeback(path)                start writing a large new file out now (advisory)
  syncfs(fd) -> bool                   flush the filesystem holding `fd`; False if unavailable
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cmlab.core.fs import DIR, fsync_dir, open_nofollow

__all__ = ["make_durable", "start_writeback", "syncfs"]

_syncfs_fn: Callable[[int], int] | None = None
_syncfs_probed = False


def syncfs(fd: int) -> bool:
    """Flush the whole filesystem holding `fd` (Linux syncfs); False where unavailable."""
    global _syncfs_fn, _syncfs_probed
    if not _syncfs_probed:
        _syncfs_probed = True
        if os.name == "posix":
            with contextlib.suppress(OSError, AttributeError):
                fn = ctypes.CDLL(None, use_errno=True).syncfs
                fn.argtypes = [ctypes.c_int]
                fn.restype = ctypes.c_int
                _syncfs_fn = fn
    if _syncfs_fn is None:
        return False
    if _syncfs_fn(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs failed: {os.strerror(err)}")
    return True


_sfr_fn: Callable[[int, int, int, int], int] | None = None
_sfr_probed = False
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(path: Path) -> None:
    """Ask the kernel to start writing `path` out now, without waiting (Linux
    sync_file_range). The final syncfs then finds little left to flush, instead of flushing
    the whole payload at the end (7-15% of a 256 MB extraction, measured in bench_cab)."""
    global _sfr_fn, _sfr_probed
    if not _sfr_probed:
        _sfr_probed = True
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sfr_fn = fn
    if _sfr_fn is None:
        return
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except OSError:
        return
    try:
        _sfr_fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # advisory: durability comes from syncfs
    finally:
        os.close(fd)


def make_durable(root: Path, files: list[Path], folders: list[Path]) -> None:
    """Get every file and folder of a tree built under `root` to disk before the tree is
    renamed into place: one syncfs covers them all; without it, each file, then each folder
    deepest first, then `root` is fsynced."""
    fd = os.open(root, DIR)  # our own folder: a link to it is followed, as fsync_dir does
    try:
        if syncfs(fd):
            return
    finally:
        os.close(fd)
    for file in files:
        fd = open_nofollow(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        fsync_dir(folder)
    fsync_dir(root)
