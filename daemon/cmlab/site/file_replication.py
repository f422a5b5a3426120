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
- SchedulerJobs: `SchedulerJob`, `scheduler_job`, `open_job_count`, `fail_job`, and
  `package_file_path` (a job's site-relative PackageFile as a path under SMSPKG).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

from cmlab.core.errors import CmlabError
from cmlab.core.fs import make_tmp_dir, remove_path
from cmlab.core.hashing import _sha256_fd, folder_records
from cmlab.site.cab import DEFAULT_CAB_MTIME, create_cab
from cmlab.site.content_library import ContentLibrary
from cmlab.site.formats.replication import SWD, job_name, pck_name, pck_version
from cmlab.site.inbox import BadInput
from cmlab.site.sitedb import servicing
from cmlab.site.statecodes import PackageState

__all__ = [
    "INSTALL_FAILED",
    "OPEN_STATES",
    "DamagedPackage",
    "PackageFile",
    "SchedulerJob",
    "build_package_file",
    "build_pck",
    "fail_job",
    "old_pck_versions",
    "open_job_count",
    "package_file_ok",
    "package_file_path",
    "scheduler_job",
    "verify_package_file",
]

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


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
        fd = os.open(path, _READ)
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
        digest = _sha256_fd(fd)
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
        return PackageFile(path=path, size=st.st_size, sha256=_sha256_fd(fd))
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
        raise CmlabError(f"{source}: no files to pack")
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


# -- SchedulerJobs -----------------------------------------------------------------------------

OPEN_STATES = ("Pending", "Sending")
INSTALL_FAILED = 3  # ObjectDistributionState.State


@dataclass(frozen=True)
class SchedulerJob:
    """A SchedulerJobs row."""

    job_id: int
    job_type: str
    pkg_id: str
    version: int
    dest_site: str
    package_file: str  # site-relative: SMSPKG/CAS10001.PCK.1
    file_size: int
    file_hash: str
    content_hash: str
    state: str
    attempts: int
    last_error: str

    @property
    def name(self) -> str:
        return job_name(self.job_id)


def scheduler_job(conn: sqlite3.Connection, job_id: int) -> SchedulerJob | None:
    r = conn.execute(
        "SELECT JobID, JobType, PkgID, Version, DestSite, PackageFile, FileSize, FileHash, "
        "ContentHash, State, Attempts, LastError FROM SchedulerJobs WHERE JobID = ?",
        (job_id,),
    ).fetchone()
    if r is None:
        return None
    return SchedulerJob(
        job_id=int(r[0]),
        job_type=str(r[1]),
        pkg_id=str(r[2]).upper(),
        version=int(r[3]),
        dest_site=str(r[4]).upper(),
        package_file=str(r[5]),
        file_size=int(r[6]),
        file_hash=str(r[7]).upper(),
        content_hash=str(r[8] or "").upper(),
        state=str(r[9]),
        attempts=int(r[10]),
        last_error=str(r[11] or ""),
    )


def open_job_count(conn: sqlite3.Connection) -> int:
    """Jobs neither Complete nor Failed: the Scheduler's "jobs found in job source"."""
    row = conn.execute(
        "SELECT count(*) FROM SchedulerJobs WHERE State NOT IN ('Complete', 'Failed')"
    ).fetchone()
    return int(row[0])


def package_file_path(site_root: Path, package_file: str) -> Path:
    """A job's site-relative PackageFile as a path under the site; ValueError for anything
    that would leave SMSPKG (the column is ours, but a path is never taken on trust)."""
    parts = package_file.replace("\\", "/").split("/")
    if len(parts) != 2 or parts[0] != "SMSPKG" or parts[1] in ("", ".", ".."):
        raise ValueError(f"PackageFile {package_file[:80]!r} is not SMSPKG/<file>")
    return site_root / "SMSPKG" / parts[1]


def fail_job(conn: sqlite3.Connection, job: SchedulerJob, error: str) -> bool:
    """The job is Failed with `error` (SMSDBMon then drops its JOB for the Scheduler). For a
    SWD job the destination site's content replication failed too: CONTENT_REPLICATION_FAILED
    in its status row here and INSTALL_FAILED (3) in ObjectDistributionState. False when the
    job had ended already."""
    cur = conn.execute(
        "UPDATE SchedulerJobs SET State = 'Failed', LastError = ?, "
        "Updated = strftime('%Y-%m-%d %H:%M:%f', 'now') "
        "WHERE JobID = ? AND State NOT IN ('Complete', 'Failed')",
        (error, job.job_id),
    )
    if cur.rowcount == 0:
        return False
    if job.job_type == SWD:
        esp = servicing.easy_setup_package_by_id(conn, job.pkg_id)
        if esp is not None and esp.package_guid:
            with contextlib.suppress(LookupError):  # a site this database does not know
                servicing.spCMUSetSiteState(
                    conn,
                    esp.package_guid,
                    PackageState.CONTENT_REPLICATION_FAILED,
                    site_code=job.dest_site,
                )
        servicing.set_distribution_state(
            conn, job.pkg_id, job.dest_site, INSTALL_FAILED, job.version, error[:500]
        )
    return True
