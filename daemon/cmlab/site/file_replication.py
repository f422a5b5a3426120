"""File-based replication between sites (docs/hierarchy.md): what DistMgr, the Scheduler, the
Sender and the Despooler share besides the formats (those, the instruction, job names, send and
resend requests, are cmlab.site.formats.replication).

Public API:

- `verify_package_file(path: Path, size: int, sha256: str) -> None`
  Raises `DamagedPackage` (a `BadInput`) when `path` is missing, a link, not a regular file,
  not `size` bytes long, or its SHA-256 (upper- or lower-case hex accepted) differs.
- `package_file_ok(path, size, sha256) -> bool`.
- `build_pck(library, pkg_id, version, smspkg) -> PackageFile`: the stored content version
  as an MSZIP CAB at `smspkg/<PkgID>.PCK.<version>`, written under a temporary name and
  renamed; byte-identical for the same content (fixed member order and timestamps).
- `build_package_file(source, dst) -> PackageFile`: the files of a folder as a CAB at `dst`
  (the SiteRecovery `.RCV` package).
- `old_pck_versions(smspkg, pkg_id)`: the `<PkgID>.PCK.<n>` files in SMSPKG.
- `package_file_path(site_root, package_file)`: a job's site-relative PackageFile as a path
  under SMSPKG (the SchedulerJobs queries are cmlab.site.sitedb.scheduler_jobs).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cmlab.core.errors import BadInput, WorkFailed
from cmlab.core.fs import READ, make_tmp_dir, open_nofollow, remove_path
from cmlab.core.hashing import folder_records, sha256_fd
from cmlab.site.cab import DEFAULT_CAB_MTIME, create_cab
from cmlab.site.content_library import ContentLibrary
from cmlab.site.formats.replication import pck_name, pck_version

__all__ = [
    "DamagedPackage",
    "PackageFile",
    "build_package_file",
    "build_pck",
    "old_pck_versions",
    "package_file_ok",
    "package_file_path",
    "verify_package_file",
]


class DamagedPackage(BadInput):
    """A package file that is not the one its instruction describes (size, hash, type)."""


@dataclass(frozen=True)
class PackageFile:
    path: Path
    size: int
    sha256: str  # upper-case hex


# -- package files -----------------------------------------------------------------------------


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    try:
        fd = open_nofollow(path, READ)
    except FileNotFoundError:
        raise DamagedPackage(f"{path.name}: the package file is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DamagedPackage(f"{path.name}: is a symbolic link; not followed") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DamagedPackage(f"{path.name}: not a regular file")
    return fd, st


def verify_package_file(path: Path, size: int, sha256: str) -> None:
    """DamagedPackage unless `path` is a regular file of `size` bytes whose SHA-256 is
    `sha256`. The size is checked first: a truncated copy costs no hashing."""
    fd, st = _open_regular(Path(path))
    try:
        if st.st_size != size:
            raise DamagedPackage(
                f"{Path(path).name}: {st.st_size} bytes, the instruction says {size}"
            )
        digest = sha256_fd(fd)
    finally:
        os.close(fd)
    if digest != sha256.upper():
        raise DamagedPackage(
            f"{Path(path).name}: SHA-256 {digest}, the instruction says {sha256.upper()}"
        )


def package_file_ok(path: Path, size: int, sha256: str) -> bool:
    try:
        verify_package_file(path, size, sha256)
    except DamagedPackage:
        return False
    return True


def file_digest(path: Path) -> PackageFile:
    fd, st = _open_regular(path)
    try:
        return PackageFile(path=path, size=st.st_size, sha256=sha256_fd(fd))
    finally:
        os.close(fd)


def build_package_file(source: Path, dst: Path) -> PackageFile:
    """The files below `source` as an MSZIP CAB at `dst` (written to a temporary sibling and
    renamed by create_cab), members in sorted order with one fixed timestamp so the same
    content always gives the same bytes, hence the same FileHash on a rebuild. A CAB holds
    files only: an empty folder is not carried."""
    files = {
        rel.decode("utf-8", "surrogateescape"): source / os.fsdecode(rel)
        for rel, is_file in folder_records(source)
        if is_file
    }
    if not files:
        raise WorkFailed(f"{source}: no files to pack")
    create_cab(dict(sorted(files.items())), dst, mtime=DEFAULT_CAB_MTIME)
    return file_digest(dst)


def build_pck(library: ContentLibrary, pkg_id: str, version: int, smspkg: Path) -> PackageFile:
    """`smspkg/<PkgID>.PCK.<version>`: the stored content version (verified byte by byte as
    it is extracted to a temporary folder in SMSPKG, removed after) packed as a CAB."""
    dst = smspkg / pck_name(pkg_id, version)
    smspkg.mkdir(parents=True, exist_ok=True)
    work = make_tmp_dir(dst, "content")
    try:
        tree = work / "content"
        library.extract(pkg_id.upper(), version, tree)
        return build_package_file(tree, dst)
    finally:
        remove_path(work)


def old_pck_versions(smspkg: Path, pkg_id: str) -> list[tuple[int, Path]]:
    """The `<PkgID>.PCK.<n>` files in SMSPKG, as (n, path)."""
    found = []
    try:
        entries = list(os.scandir(smspkg))
    except FileNotFoundError:
        return []
    for entry in entries:
        n = pck_version(entry.name, pkg_id)
        if n is not None:
            found.append((n, Path(entry.path)))
    return sorted(found)


def package_file_path(site_root: Path, package_file: str) -> Path:
    """A job's site-relative PackageFile as a path under the site; ValueError for anything
    that would leave SMSPKG (the column is ours, but a path is never taken on trust)."""
    parts = package_file.replace("\\", "/").split("/")
    if len(parts) != 2 or parts[0] != "SMSPKG" or parts[1] in ("", ".", ".."):
        raise ValueError(f"PackageFile {package_file[:80]!r} is not SMSPKG/<file>")
    return site_root / "SMSPKG" / parts[1]
