"""Files that survive a crash and never follow a link: the one home of cmlab's durable I/O.

Why it exists: the inbox engine's guarantee 1 ("nothing lost") and 3 ("producers write
atomically") rest on a handful of file operations that must be done the same way everywhere:
write under a name no watcher matches, fsync, rename, fsync the folder; open what others
dropped without following a link; copy and hash in one pass with a cap. Each is written once,
here; no other module keeps its own copy (nor its own O_NOFOLLOW flag set).

What it promises:
- A file or folder written through this module appears under its real name whole or not at
  all; when a durable call returns, the data and the folder entry naming it are on disk.
- Temporaries are named by tmp_name_for (dot-prefixed, the writer's pid inside): inbox
  watchers ignore them and the start-up sweep (remove_stale_tmp) removes what a crash left.
- open_nofollow never follows a symbolic link in the last component and never hangs on a
  FIFO (READ is non-blocking); read_regular_file refuses links, special files and files over
  their cap.

Interface:
  READ, WRITE_NEW, DIR             flag sets for open_nofollow (a flag an OS lacks counts 0)
  open_nofollow(path, flags, mode=0o644, *, dir_fd=None) -> int
  read_regular_file(path, limit) -> bytes;  read_regular_file_stat(...) -> (bytes, stat)
                                   (UnsafeFile for a link, a special file, over `limit`)
  copy_hashing(src, dst, limit=None, *, hash_all, resume, fsync, on_chunk) -> Copied
  TMP_PREFIX, tmp_name_for, make_tmp_dir, is_stale_tmp, remove_stale_tmp, remove_path
  fsync_dir, write_atomic, atomic_output, move_durable, put_in_place,
  copy_file_durable, copy_tree_durable
A batch of many new files is flushed by one syncfs instead: cmlab.core.flush.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from cmlab.core.errors import UnsafeFile

__all__ = [
    "DIR",
    "READ",
    "TMP_PREFIX",
    "WRITE_NEW",
    "Copied",
    "atomic_output",
    "copy_file_durable",
    "copy_hashing",
    "copy_tree_durable",
    "fsync_dir",
    "is_stale_tmp",
    "make_tmp_dir",
    "move_durable",
    "open_nofollow",
    "put_in_place",
    "read_regular_file",
    "read_regular_file_stat",
    "remove_path",
    "remove_stale_tmp",
    "tmp_name_for",
    "write_atomic",
]

# ---------------------------------------------------------------------------------------
# Opening without following links

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# O_NONBLOCK: a FIFO planted under a file's name opens at once (and is then refused as not a
# regular file) instead of hanging the reader; on a regular file it changes nothing.
READ = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
WRITE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL
DIR = os.O_RDONLY | _DIRECTORY
_CHUNK = 1024 * 1024


def open_nofollow(
    path: Path | str, flags: int, mode: int = 0o644, *, dir_fd: int | None = None
) -> int:
    """os.open with `flags` (READ, WRITE_NEW, DIR, or the caller's own access flags) that
    never follows a link in the last component (OSError ELOOP on Linux and macOS) and is
    closed on exec."""
    return os.open(path, flags | _NOFOLLOW | _CLOEXEC, mode, dir_fd=dir_fd)


# ---------------------------------------------------------------------------------------
# Temporary names and durable output

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
    """Make the entries of the folder `path` durable (a rename into it, a file created in it).
    A link to the folder is followed: the caller names the folder, no input does. Nothing to
    do on Windows, which cannot open a folder for fsync (NTFS journals renames itself)."""
    if os.name == "nt":
        return
    fd = os.open(path, DIR | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str, *, durable: bool = True) -> None:
    """Write `data` to `path` whole or not at all; the rename is the commit point."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = tmp_name_for(path)
    fd = open_nofollow(tmp, WRITE_NEW)
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


def put_in_place(new: Path, dest: Path) -> None:
    """Move `new` (a complete file or folder) to `dest`, replacing whatever is there only now.
    File over file is one atomic rename; when a folder is involved the old `dest` goes aside
    under a temporary name first (the sweep removes it after a crash), then is removed. The
    caller fsyncs `dest`'s folder (done here too when something went aside)."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        os.rename(new, dest)
        return
    if not stat.S_ISDIR(st.st_mode) and not os.path.isdir(new):
        os.replace(new, dest)  # file over file (or link): atomic
        return
    aside = tmp_name_for(dest, "old")
    os.rename(dest, aside)
    try:
        os.rename(new, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(aside, dest)
        raise
    fsync_dir(dest.parent)
    remove_path(aside)


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


# ---------------------------------------------------------------------------------------
# Reading what others dropped


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, never read through a symbolic
    link (files other sites drop are not trusted to be what their names say). UnsafeFile (a
    BadInput, and a ValueError) says why not: a link, not a regular file, or larger than
    `limit`; other OSErrors pass."""
    return read_regular_file_stat(path, limit)[0]


def read_regular_file_stat(path: Path, limit: int) -> tuple[bytes, os.stat_result]:
    """read_regular_file, with the stat of the very file read (its identity: device, inode,
    change time)."""
    try:
        fd = open_nofollow(path, READ)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(f"{path.name}: is a symbolic link; not followed") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{path.name}: not a regular file")
        chunks: list[bytes] = []
        total = 0
        while total <= limit and (chunk := os.read(fd, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > limit:
        raise UnsafeFile(f"{path.name}: larger than {limit} bytes")
    return b"".join(chunks), st


# ---------------------------------------------------------------------------------------
# Copying while hashing


class Copied(NamedTuple):
    sha256: str  # upper-case hex, as the guide prints hashes
    size: int  # bytes hashed: a resumed copy's kept bytes, then every byte read from src


def copy_hashing(
    src: int,
    dst: int | None,
    limit: int | None = None,
    *,
    hash_all: bool = False,
    resume: int | None = None,
    fsync: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> Copied:
    """Copy the descriptor `src`, from where it stands, to `dst` in one pass that hashes every
    byte read; with `dst` None, only hash. The one streaming loop of cmlab: one reusable
    1 MiB buffer, so memory does not grow with the file, and hashlib releases the GIL on
    each chunk.

    - `limit`: at most `limit` bytes reach `dst` (a longer source cannot be the expected
      file and must not fill the disk). Reading stops after the chunk that passed it, and
      `size > limit` tells the caller; with `hash_all` it reads on to the end without
      writing, so the hash is the whole source's (the one a log line shows).
    - `resume`: `dst` (opened read-write at its start) already holds a first part: up to
      `resume` of its bytes are hashed as they are, not as `src` has them, `dst` is cut
      after them and the copy goes on from that offset in both.
    - `fsync`: fsync `dst` once everything is written.
    - `on_chunk(n)`: called after each chunk read from `src` is written (progress, or a
      crash test's failpoint).
    """
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    total = 0
    if resume is not None:
        assert dst is not None, "only a copy resumes"
        with open(dst, "rb", buffering=0, closefd=False) as part:
            while total < resume and (n := part.readinto(view[: min(_CHUNK, resume - total)])):
                digest.update(view[:n])
                total += n
        os.ftruncate(dst, total)
        os.lseek(dst, total, os.SEEK_SET)
        os.lseek(src, total, os.SEEK_SET)
    written = total
    with open(src, "rb", buffering=0, closefd=False) as f:
        while (hash_all or limit is None or total <= limit) and (n := f.readinto(buf)):
            digest.update(view[:n])
            total += n
            if dst is not None:
                keep = n if limit is None else max(0, min(n, limit - written))
                chunk = view[:keep]
                while chunk:
                    chunk = chunk[os.write(dst, chunk) :]
                written += keep
            if on_chunk is not None:
                on_chunk(n)
    if fsync and dst is not None:
        os.fsync(dst)
    return Copied(digest.hexdigest().upper(), total)
