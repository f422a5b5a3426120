"""The installation's file work, on cmlab.core.fs: folders walked without following a link,
files opened without following one, copies made while hashing, the backups taken before a
file changes and their restore.

Why it exists: the site's folders are the lab's to break, and an install must never be
tricked into writing outside the site or into changing the installation with bytes it did
not verify. So every path below the site root or the staging folder is walked one component
at a time (a link or a file where a folder should be is an InstallStepError with what to do),
every file is opened with O_NOFOLLOW, and a file is replaced only by renaming a fsynced
temporary sibling over it.

What it promises: each function either finishes or leaves only temporaries that `sweep`
removes (cmlab.core.fs naming, the dead writer's pid); a backup record, once made, is never
made again (the first copy is the original), so a re-run never backs up a half-updated site.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from cmlab.core.errors import CabPathError
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import (
    READ,
    WRITE_NEW,
    copy_hashing,
    fsync_dir,
    open_nofollow,
    remove_path,
    remove_stale_tmp,
    tmp_name_for,
    write_atomic,
)
from cmlab.core.hashing import sha256_fd
from cmlab.site.cab import normalize_member_name
from cmlab.site.installation.context import InstallStepError

__all__ = [
    "copy_to_tmp",
    "drop_tree",
    "existing_dir",
    "file_hash",
    "open_read",
    "record_backup",
    "restore_files",
    "safe_dir",
    "safe_parts",
    "sweep",
]


def safe_parts(rel: str, what: str) -> list[str]:
    """A relative path (`\\` or `/`) as safe components; InstallStepError if it could escape."""
    if not rel:
        return []
    try:
        return normalize_member_name(rel).split("/")
    except CabPathError as exc:
        raise InstallStepError(f"{what}: {exc}") from None


def safe_dir(root: Path, parts: Sequence[str], show: Callable[[Path], str]) -> Path:
    """root/parts..., created if missing; InstallStepError if a component is a link or a file.

    The site's folders are the lab's to break: a link planted in them is refused, never
    followed, so an install cannot be tricked into writing outside the site."""
    found = _walk_dir(root, parts, show, create=True)
    assert found is not None
    return found


def existing_dir(root: Path, parts: Sequence[str], show: Callable[[Path], str]) -> Path | None:
    """As safe_dir, but None when a component is missing (nothing is created)."""
    return _walk_dir(root, parts, show, create=False)


def _walk_dir(
    root: Path, parts: Sequence[str], show: Callable[[Path], str], *, create: bool
) -> Path | None:
    path = Path(root)
    for part in ["", *parts]:
        path = path / part if part else path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(path, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise InstallStepError(
                f"{show(path)} is a symbolic link; cmlab never follows links in the site's "
                "folders. Replace it with a real folder and run the step again."
            )
        if not stat.S_ISDIR(st.st_mode):
            raise InstallStepError(f"{show(path)} is not a folder; move it away and retry.")
    return path


def open_read(path: Path, show: Callable[[Path], str]) -> int | None:
    """A read descriptor of the regular file `path`; None if it does not exist."""
    try:
        fd = open_nofollow(path, READ)  # READ: a planted FIFO must not hang the install
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            raise InstallStepError(
                f"{show(path)} is a symbolic link; cmlab never follows links. Replace it with "
                "the real file (or delete it) and run the step again."
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InstallStepError(f"{show(path)} is not a regular file; move it away and retry.")
    return fd


def file_hash(path: Path, show: Callable[[Path], str]) -> str | None:
    fd = open_read(path, show)
    if fd is None:
        return None
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def copy_to_tmp(src_fd: int, dst: Path, kind: str, limit: int | None = None) -> tuple[Path, str]:
    """Copy `src_fd` to a new temporary sibling of `dst` (fsynced) and return it with the
    SHA-256 of everything read. At most `limit` bytes are written: a longer source cannot be
    the expected file and must not fill the disk."""
    tmp = tmp_name_for(dst, kind)
    out = open_nofollow(tmp, WRITE_NEW)
    try:
        sha256, _ = copy_hashing(src_fd, out, limit, hash_all=True, fsync=True)
    except BaseException:
        os.close(out)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(out)
    return tmp, sha256


def sweep(folder: Path) -> None:
    """Remove the temporaries of a killed run (cmlab.core.fs naming, dead writer's pid)."""
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(os.lstat(folder).st_mode):
            remove_stale_tmp(folder)


def drop_tree(path: Path) -> bool:
    """Remove a folder so that a crash never leaves half of it under its real name: renamed
    to a temporary name first (swept later if the removal is cut short)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    gone = tmp_name_for(path, "drop")
    os.rename(path, gone)
    fsync_dir(path.parent)
    remove_path(gone)
    return True


def record_backup(
    root: Path, backup: Path, parts: Sequence[str], show: Callable[[Path], str]
) -> bool:
    """Back up the site file `parts` before its first change: a copy under
    `backup/files/...`, or an empty marker under `backup/absent/...` when the file does
    not exist yet (rollback deletes it). The first record wins: it is the original.
    Returns True when a record was made now."""
    copy = backup.joinpath("files", *parts)
    marker = backup.joinpath("absent", *parts)
    if os.path.lexists(copy) or os.path.lexists(marker):
        return False
    live = root.joinpath(*parts)
    fd = open_read(live, show)
    if fd is None:
        folder = safe_dir(backup, ["absent", *parts[:-1]], show)
        write_atomic(folder / parts[-1], b"")
    else:
        try:
            folder = safe_dir(backup, ["files", *parts[:-1]], show)
            tmp, _ = copy_to_tmp(fd, folder / parts[-1], "backup")
        finally:
            os.close(fd)
        os.replace(tmp, folder / parts[-1])
        fsync_dir(folder)
    crashpoint("siteinstall.during_backup")
    return True


def restore_files(
    root: Path, backup: Path, say: Callable[[str], None], show: Callable[[Path], str]
) -> tuple[int, int]:
    """Put back every file `backup` saved (`files/...`), then delete every file it marked as
    added (`absent/...`) below `root`; a file that already matches is left alone, so a
    rollback cut short and run again ends the same. Returns (restored, removed)."""
    return _put_back_saved(root, backup, say, show), _remove_added(root, backup, say, show)


def _put_back_saved(
    root: Path, backup: Path, say: Callable[[str], None], show: Callable[[Path], str]
) -> int:
    restored = 0
    files_root = backup / "files"
    for folder, dirs, names in os.walk(files_root):
        dirs.sort()
        rel_dir = Path(folder).relative_to(files_root).parts
        for name in sorted(names):
            if name.startswith(".~cmlab-"):
                continue
            saved = Path(folder) / name
            dst_dir = safe_dir(root, rel_dir, show)
            sweep(dst_dir)
            dst = dst_dir / name
            fd = open_read(saved, show)
            if fd is None:
                continue
            try:
                if file_hash(dst, show) == sha256_fd(fd):
                    continue
                os.lseek(fd, 0, os.SEEK_SET)
                tmp, _ = copy_to_tmp(fd, dst, "restore")
            finally:
                os.close(fd)
            os.replace(tmp, dst)
            fsync_dir(dst_dir)
            restored += 1
            say(f"INFO: Restored {show(dst)}")
            crashpoint("siteinstall.during_rollback")
    return restored


def _remove_added(
    root: Path, backup: Path, say: Callable[[str], None], show: Callable[[Path], str]
) -> int:
    removed = 0
    absent_root = backup / "absent"
    for folder, dirs, names in os.walk(absent_root):
        dirs.sort()
        rel_dir = Path(folder).relative_to(absent_root).parts
        for name in sorted(names):
            if name.startswith(".~cmlab-"):
                continue
            dst = root.joinpath(*rel_dir, name)
            try:
                st = os.lstat(dst)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            os.unlink(dst)
            fsync_dir(dst.parent)
            removed += 1
            say(f"INFO: Removed {show(dst)}, which the update had added")
            crashpoint("siteinstall.during_rollback")
    return removed
