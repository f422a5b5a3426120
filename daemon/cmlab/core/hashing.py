"""SHA-256 in the guide's spelling (upper-case hex), for files, bytes and whole folders.

`folder_hash` is the one algorithm behind both the content library hash of an Easy Setup
Package and CMUpdate's `Staging folder has hash = ...`; docs/formats.md defines it with a
worked example. Never change it without changing that document.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from cmlab.core.errors import BadInput, CabPathError, UnsafeFile
from cmlab.core.fs import READ, copy_hashing, open_nofollow

__all__ = [
    "EMPTY_SHA256",
    "folder_hash",
    "folder_hash_of_records",
    "folder_records",
    "sha256_bytes",
    "sha256_fd",
    "sha256_file",
    "staging_hash",
]

EMPTY_SHA256 = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest().upper()


def sha256_fd(fd: int) -> str:
    """SHA-256 of what is left to read from the descriptor `fd` (cmlab.core.fs.copy_hashing
    with no destination: one reusable 1 MiB buffer whatever the file size)."""
    return copy_hashing(fd, None).sha256


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's content, streamed in 1 MiB chunks."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def _walk(root: Path, rel: bytes, records: list[tuple[bytes, bool]]) -> None:
    """Collect (relative path, is_file) for regular files and empty folders, no links."""
    folder = os.path.join(root, os.fsdecode(rel)) if rel else os.fspath(root)
    with os.scandir(folder) as it:
        children = list(it)
    if not children and rel:
        records.append((rel, False))
    for child in children:
        name = os.fsencode(child.name)
        if b"\n" in name or b"\r" in name:
            raise BadInput(f"{child.path}: a name with a line break cannot be hashed")
        child_rel = rel + b"/" + name if rel else name
        st = child.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise CabPathError(f"{child.path}: symbolic link in a hashed folder")
        if stat.S_ISDIR(st.st_mode):
            _walk(root, child_rel, records)
        elif stat.S_ISREG(st.st_mode):
            records.append((child_rel, True))
        else:
            raise UnsafeFile(f"{child.path}: not a regular file or folder")


def folder_records(path: Path) -> list[tuple[bytes, bool]]:
    """(relative path, is_file) for every regular file and empty folder below `path`, sorted
    as the folder hash sorts them, with the folder hash's refusals (links, special files,
    names with a line break)."""
    root = Path(path)
    st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode):
        raise CabPathError(f"{root}: is a symbolic link; not followed")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeFile(f"{root}: not a folder")
    records: list[tuple[bytes, bool]] = []
    _walk(root, b"", records)
    records.sort(key=lambda r: r[0])
    return records


def _record(rel: bytes, sha: str | None) -> bytes:
    return rel + b"\n" + sha.encode("ascii") + b"\n" if sha is not None else rel + b"/\n"


def folder_hash_of_records(records: Iterable[tuple[bytes, str | None]]) -> str:
    """The folder hash of a tree known by its records: (relative path, SHA-256 in upper-case
    hex) for a file, (relative path, None) for an empty folder; any order. For a copy of a
    tree (the content library) whose file hashes were taken while the bytes were copied."""
    digest = hashlib.sha256()
    for rel, sha in sorted(records, key=lambda r: r[0]):
        digest.update(_record(rel, sha))
    return digest.hexdigest().upper()


def folder_hash(path: Path, *, exclude: frozenset[bytes] = frozenset()) -> str:
    """The folder hash defined in docs/formats.md ("Folder hash").

    For every regular file, sorted by relative posix path compared as UTF-8 bytes:
    `relpath + "\\n" + SHA256(content) + "\\n"`; for every empty folder: `relpath + "/\\n"`;
    all fed into one SHA-256, printed upper-case. Links and special files are errors.
    Files named in `exclude` (relative paths) are left out.
    """
    root = Path(path)
    records = folder_records(root)
    digest = hashlib.sha256()
    for rel, is_file in records:
        if rel in exclude:
            continue
        if is_file:
            fd = open_nofollow(os.path.join(root, os.fsdecode(rel)), READ)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise UnsafeFile(f"{root / os.fsdecode(rel)}: changed while hashing")
                digest.update(_record(rel, sha256_fd(fd)))
            finally:
                os.close(fd)
        else:
            digest.update(_record(rel, None))
    return digest.hexdigest().upper()


UPDATE_MAP = b"SMSSetup/update.map"


def staging_hash(path: Path) -> str:
    """CMUpdate's `Staging folder has hash = ...`: the folder hash of `CMUStaging/<GUID>`
    without `SMSSetup/update.map`, the file CMUpdate extracts there itself from the signed
    `SMSSetup/update.map.cab` (which is hashed). So a staging folder CMUpdate has used still
    matches the content library's hash (docs/formats.md, "Staging folder hash")."""
    root = Path(path)
    derived = os.path.lexists(root / "SMSSetup" / "update.map.cab")
    return folder_hash(root, exclude=frozenset({UPDATE_MAP}) if derived else frozenset())
