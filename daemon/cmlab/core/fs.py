"""Atomic, durable file output: write under a name no watcher matches, fsync, rename into place.

Every producer in cmlab drops files through here (the inbox engine's guarantee 3), so a
consumer never sees half a file and a crash never leaves one behind under the real name."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".~cmlab-"
# The writer's pid is part of the name so that a start-up sweep can tell a leftover of a
# killed process from the work in progress of a live one (a CLI dropping files meanwhile).
_TMP_OWNER = re.compile(r"\.~cmlab-(\d+)-[0-9a-f]{12}-")


def tmp_name_for(path: Path, kind: str = "tmp") -> Path:
    """A sibling name that inbox watchers ignore (dot-prefixed, no drop-file extension)."""
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}-{path.name}.{kind}")


def make_tmp_dir(near: Path, kind: str = "tmp") -> Path:
    """A temporary folder next to `near`, named like tmp_name_for so the sweep finds it."""
    tmp = tmp_name_for(near, kind)
    os.mkdir(tmp, 0o700)
    return tmp


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


def is_stale_tmp(name: str) -> bool:
    """A leftover of a dead writer. Our own pid counts as dead: the sweep runs before this
    process writes anything, so a match is a previous incarnation that had the same pid (the
    usual case in a container, where the daemon gets the same small pid every time)."""
    if not name.startswith(TMP_PREFIX):
        return False
    owner = _TMP_OWNER.match(name)
    if owner is None:
        return True
    pid = int(owner[1])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


def remove_path(path: Path | str) -> bool:
    """Remove a file, a link (never what it points to) or a folder tree (links inside are
    removed, not followed: rmtree is fd-based on Linux). False when it was already gone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def remove_stale_tmp(folder: Path, *, recursive: bool = False) -> int:
    """Remove leftovers (files or folders) of writes a crash interrupted; returns how many.

    Call it before this process starts writing under `folder`. Links are not followed."""
    removed = 0
    pending = [os.fspath(folder)]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            if is_stale_tmp(entry.name):
                with contextlib.suppress(OSError):
                    removed += remove_path(entry.path)
            elif recursive and entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
    return removed


def copy_tree_durable(source: Path, dest: Path) -> None:
    """Copy the folder `source` to a temporary sibling of `dest`, fsynced, then rename it to
    `dest`, replacing an existing `dest` only once the copy is complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tmp_dir(dest, "copy")
    try:
        for dirpath, dirs, files in os.walk(source):
            rel = Path(dirpath).relative_to(source)
            for name in dirs:
                os.mkdir(tmp / rel / name)
            for name in files:
                target = tmp / rel / name
                shutil.copyfile(Path(dirpath, name), target, follow_symlinks=False)
                fd = os.open(target, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(tmp / rel)
        os.chmod(tmp, 0o755)
        if os.path.lexists(dest):
            # The old folder goes aside under a temporary name (the start-up sweep removes it
            # if a crash comes before the last line here).
            aside = tmp_name_for(dest, "old")
            os.rename(dest, aside)
            os.rename(tmp, dest)
            fsync_dir(dest.parent)
            remove_path(aside)
        else:
            os.rename(tmp, dest)
            fsync_dir(dest.parent)
    except BaseException:
        remove_path(tmp)
        raise


def copy_file_durable(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, atomic_output(dest) as out:
        shutil.copyfileobj(src, out, 1024 * 1024)


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, never read through a symbolic
    link (files other sites drop are not trusted to be what their names say). ValueError says
    why not: a link, not a regular file, or larger than `limit`; other OSErrors pass."""
    return read_regular_file_stat(path, limit)[0]


def read_regular_file_stat(path: Path, limit: int) -> tuple[bytes, os.stat_result]:
    """read_regular_file, with the stat of the very file read (its identity: device, inode,
    change time)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{path.name}: is a symbolic link; not followed") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path.name}: not a regular file")
        chunks: list[bytes] = []
        total = 0
        while total <= limit and (chunk := os.read(fd, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > limit:
        raise ValueError(f"{path.name}: larger than {limit} bytes")
    return b"".join(chunks), st
