"""File-based replication between sites (docs/hierarchy.md): what DistMgr, the Scheduler, the
Sender and the Despooler share.

The instruction (`schedule.box/tosend/<JobID>.Idb` at the parent, delivered as
`despoolr.box/receive/<JobID>.INS` at the child) is UTF-8 JSON of at most 64 KiB. It crosses
a site boundary, so the reader trusts nothing: every key is required, typed and bounded,
unknown keys and duplicate keys are refused, and names that become file names carry no path
separator.

Public API (the despooler imports the first two; keep their names and signatures):

- `parse_instruction(data: bytes, *, where: str = "instruction") -> Instruction`
  Raises `cmlab.site.inbox.BadInput` (the message says what is wrong, prefixed by `where`).
- `verify_package_file(path: Path, size: int, sha256: str) -> None`
  Raises `DamagedPackage` (a `BadInput`) when `path` is missing, a link, not a regular file,
  not `size` bytes long, or its SHA-256 (upper- or lower-case hex accepted) differs.
- `read_instruction(path: Path) -> Instruction`: parse_instruction of a file, never following
  a link and never reading more than the cap (+1 byte to tell it is too big).
- `build_instruction(instr: Instruction) -> bytes`: the JSON (validated as parse would).
- `pck_name(pkg_id, version) -> str`: `CAS10001.PCK.1`.
- `job_name(job_id: int) -> str` / `parse_job_name(text: str) -> int`: `00000391`.
- `build_pck(library, pkg_id, version, smspkg) -> PackageFile`: the stored content version
  as an MSZIP CAB at `smspkg/<PkgID>.PCK.<version>`, written under a temporary name and
  renamed; byte-identical for the same content (fixed member order and timestamps).
- `build_package_file(source, dst) -> PackageFile`: the files of a folder as a CAB at `dst`
  (the SiteRecovery `.RCV` package).
- `package_file_ok(path, size, sha256) -> bool`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sqlite3
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmlab.core.errors import CmlabError
from cmlab.core.fs import make_tmp_dir, read_regular_file, remove_path
from cmlab.core.hashing import _sha256_fd, folder_records
from cmlab.core.strictjson import strict_loads
from cmlab.site.cab import DEFAULT_CAB_MTIME, create_cab
from cmlab.site.content_library import ContentLibrary
from cmlab.site.formats.ids import (
    GUID_RE,
    JOB_ID_RE,
    PACKAGE_ID_RE,
    SITE_CODE_RE,
    UPPER_SHA256_RE,
    is_job_id,
    is_package_id,
)
from cmlab.site.inbox import BadInput
from cmlab.site.sitedb import servicing
from cmlab.site.statecodes import PackageState

__all__ = [
    "INSTRUCTION_MAX",
    "JOB_TYPES",
    "DamagedPackage",
    "Instruction",
    "PackageFile",
    "Recovery",
    "build_instruction",
    "build_package_file",
    "build_pck",
    "job_name",
    "package_file_ok",
    "parse_instruction",
    "parse_job_name",
    "pck_name",
    "read_instruction",
    "verify_package_file",
]

INSTRUCTION_MAX = 64 * 1024
JOB_TYPES = ("SWD", "SiteRecovery")
SWD, SITE_RECOVERY = JOB_TYPES

VERSION_TEXT_RE = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9}){0,3}")

MAX_VERSION = 2**31 - 1  # a SQL int, as SMSPackages.SourceVersion
MAX_FILE_SIZE = 2**63 - 1
MAX_TEXT = 1024  # PackageName, Source, PackageFile: a path or a name, never longer
MAX_INSTALLED = 1000  # Recovery.InstalledUpdates: one GUID per update ever installed

_KEYS = (
    "Job",
    "JobType",
    "SourceSite",
    "DestSite",
    "PackageID",
    "Version",
    "PackageGuid",
    "PackageName",
    "Source",
    "PackageFile",
    "FileSize",
    "FileHash",
    "ContentHash",
)
_RECOVERY_KEYS = ("Build", "Version", "FullVersion", "InstalledUpdates")
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class DamagedPackage(BadInput):
    """A package file that is not the one its instruction describes (size, hash, type)."""


@dataclass(frozen=True)
class Recovery:
    """SiteRecovery only: the version the secondary site is reinstalled at."""

    build: int
    version: str
    full_version: str
    installed_updates: tuple[str, ...] = ()


@dataclass(frozen=True)
class Instruction:
    job: str  # 8 upper-case hex digits
    job_type: str  # SWD or SiteRecovery
    source_site: str
    dest_site: str
    package_id: str  # SWD: CAS10001; SiteRecovery: the secondary's site code
    version: int  # SWD: the content version; SiteRecovery: the request number
    package_guid: str  # SWD: the update's GUID; SiteRecovery: "" allowed
    package_name: str
    source: str  # SWD: \\<server>\EasySetupPayLoad\<GUID>
    package_file: str  # as the sender's log shows it
    file_size: int
    file_hash: str  # SHA-256 of the package file, upper-case hex
    content_hash: str  # folder hash of the content (SWD: the parent's StoredPkgHash)
    recovery: Recovery | None = field(default=None)

    @property
    def job_id(self) -> int:
        return int(self.job, 16)


@dataclass(frozen=True)
class PackageFile:
    path: Path
    size: int
    sha256: str  # upper-case hex


# -- names -------------------------------------------------------------------------------------


def job_name(job_id: int) -> str:
    """A SchedulerJobs.JobID as the files name it: 8 upper-case hex digits."""
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 0 < job_id <= 0xFFFFFFFF:
        raise ValueError(f"job ID {job_id!r} is not 1..0xFFFFFFFF")
    return f"{job_id:08X}"


def parse_job_name(text: str) -> int:
    """`00000391` -> 0x391; BadInput for anything but 8 hex digits (either case) naming a
    job above 0."""
    if not is_job_id(text.upper()) or not text.isascii():
        raise BadInput(f"{text[:80]!r} is not a job ID (8 hex digits)")
    value = int(text, 16)
    if value == 0:
        raise BadInput(f"{text!r} is not a job ID (job IDs start at 1)")
    return value


def job_of_drop_file(path: Path, ext: str) -> int:
    """The job a `<JobID>.<ext>` drop file names (the Scheduler's `.JOB`, the Sender's
    `.SRQ`); BadInput for any other name."""
    stem, dot, found = path.name.rpartition(".")
    if not dot or found.upper() != ext:
        raise BadInput(f"{path.name}: the file name is not <JobID>.{ext}")
    try:
        return parse_job_name(stem)
    except BadInput as exc:
        raise BadInput(f"{path.name}: the file name is not <JobID>.{ext} ({exc})") from None


def pck_name(pkg_id: str, version: int) -> str:
    """The compressed copy of a package version in SMSPKG: `CAS10001.PCK.1`."""
    pkg = pkg_id.upper()
    if not is_package_id(pkg):
        raise ValueError(f"{pkg_id!r} is not a PackageID")
    _check_version(version, "version")
    return f"{pkg}.PCK.{version}"


def _check_version(version: object, what: str) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 0 < version <= MAX_VERSION:
        raise ValueError(f"{what} {version!r} is not 1..{MAX_VERSION}")
    return version


# -- the instruction ---------------------------------------------------------------------------


def _text(value: object, key: str, *, empty: bool = False, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    if not value and not empty:
        raise ValueError(f"{key} is empty")
    if len(value) > limit:
        raise ValueError(f"{key} is longer than {limit} characters")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ValueError(f"{key} contains control characters")
    return value


def _matching(value: object, key: str, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise ValueError(f"{key} {shown!r} is not {what}")
    return value


def _integer(value: object, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key} must be an integer from {low} to {high}")
    return value


def _recovery(value: object) -> Recovery:
    if not isinstance(value, dict):
        raise ValueError("Recovery must be an object")
    _exact_keys(value, _RECOVERY_KEYS, "Recovery")
    updates = value["InstalledUpdates"]
    if not isinstance(updates, list) or len(updates) > MAX_INSTALLED:
        raise ValueError(f"Recovery.InstalledUpdates must be a list of at most {MAX_INSTALLED}")
    guids = tuple(
        _matching(g, "Recovery.InstalledUpdates[]", GUID_RE, "a GUID").upper() for g in updates
    )
    return Recovery(
        build=_integer(value["Build"], "Recovery.Build", 1, MAX_VERSION),
        version=_matching(value["Version"], "Recovery.Version", VERSION_TEXT_RE, "a version"),
        full_version=_matching(
            value["FullVersion"], "Recovery.FullVersion", VERSION_TEXT_RE, "a version"
        ),
        installed_updates=guids,
    )


def _exact_keys(obj: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{where} has no {', '.join(missing)}")
    extra = sorted(k for k in obj if k not in keys)
    if extra:
        raise ValueError(f"{where} has unknown keys: {', '.join(k[:40] for k in extra[:5])}")


def _validate(obj: dict[str, Any]) -> Instruction:
    job_type = obj.get("JobType")
    if job_type not in JOB_TYPES:
        shown = job_type[:40] if isinstance(job_type, str) else type(job_type).__name__
        raise ValueError(f"JobType {shown!r} is not SWD or SiteRecovery")
    keys = (*_KEYS, "Recovery") if job_type == SITE_RECOVERY else _KEYS
    _exact_keys(obj, keys, "the instruction")
    job = _matching(obj["Job"], "Job", JOB_ID_RE, "8 upper-case hex digits")
    if int(job, 16) == 0:
        raise ValueError("Job 00000000 is not a job ID")
    source_site = _matching(obj["SourceSite"], "SourceSite", SITE_CODE_RE, "a site code")
    dest_site = _matching(obj["DestSite"], "DestSite", SITE_CODE_RE, "a site code")
    if source_site == dest_site:
        raise ValueError(f"SourceSite and DestSite are both {source_site}")
    if job_type == SWD:
        package_id = _matching(obj["PackageID"], "PackageID", PACKAGE_ID_RE, "a PackageID")
        guid = _matching(obj["PackageGuid"], "PackageGuid", GUID_RE, "a GUID")
    else:
        package_id = _matching(obj["PackageID"], "PackageID", SITE_CODE_RE, "a site code")
        guid = obj["PackageGuid"]
        if guid != "":
            guid = _matching(guid, "PackageGuid", GUID_RE, "a GUID")
    name = _text(obj["PackageName"], "PackageName")
    if "/" in name or "\\" in name:
        raise ValueError("PackageName contains a path separator")
    instr = Instruction(
        job=job,
        job_type=job_type,
        source_site=source_site,
        dest_site=dest_site,
        package_id=package_id,
        version=_integer(obj["Version"], "Version", 1, MAX_VERSION),
        package_guid=guid,
        package_name=name,
        source=_text(obj["Source"], "Source", empty=job_type != SWD),
        package_file=_text(obj["PackageFile"], "PackageFile"),
        file_size=_integer(obj["FileSize"], "FileSize", 0, MAX_FILE_SIZE),
        file_hash=_matching(
            obj["FileHash"], "FileHash", UPPER_SHA256_RE, "64 upper-case hex digits"
        ),
        content_hash=_matching(
            obj["ContentHash"], "ContentHash", UPPER_SHA256_RE, "64 upper-case hex digits"
        ),
        recovery=_recovery(obj["Recovery"]) if job_type == SITE_RECOVERY else None,
    )
    return instr


def parse_instruction(data: bytes, *, where: str = "instruction") -> Instruction:
    """The instruction in `data`, fully validated; BadInput("<where>: <what is wrong>")."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadInput(f"{where}: not bytes")
    if len(data) > INSTRUCTION_MAX:
        raise BadInput(f"{where}: larger than {INSTRUCTION_MAX} bytes")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise BadInput(f"{where}: empty")
    try:
        obj = strict_loads(text)
    except ValueError as exc:  # JSONDecodeError is one
        raise BadInput(f"{where}: not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{where}: not a JSON object")
    try:
        return _validate(obj)
    except ValueError as exc:
        raise BadInput(f"{where}: {exc}") from None


def read_instruction(path: Path) -> Instruction:
    """parse_instruction of the file at `path`; a link or a special file is BadInput."""
    try:
        data = read_regular_file(path, INSTRUCTION_MAX)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    return parse_instruction(data, where=path.name)


def instruction_dict(instr: Instruction) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "Job": instr.job,
        "JobType": instr.job_type,
        "SourceSite": instr.source_site,
        "DestSite": instr.dest_site,
        "PackageID": instr.package_id,
        "Version": instr.version,
        "PackageGuid": instr.package_guid,
        "PackageName": instr.package_name,
        "Source": instr.source,
        "PackageFile": instr.package_file,
        "FileSize": instr.file_size,
        "FileHash": instr.file_hash,
        "ContentHash": instr.content_hash,
    }
    if instr.recovery is not None:
        r = instr.recovery
        obj["Recovery"] = {
            "Build": r.build,
            "Version": r.version,
            "FullVersion": r.full_version,
            "InstalledUpdates": list(r.installed_updates),
        }
    return obj


def build_instruction(instr: Instruction) -> bytes:
    """The instruction's JSON; raises ValueError for what parse_instruction would refuse, so
    a site never sends what its peer must reject."""
    data = json.dumps(instruction_dict(instr), indent=1, ensure_ascii=False).encode() + b"\n"
    try:
        parse_instruction(data)
    except BadInput as exc:
        raise ValueError(str(exc)) from None
    return data


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
    pattern = re.compile(re.escape(pkg_id.upper()) + r"\.PCK\.([1-9][0-9]{0,9})")
    found = []
    try:
        entries = list(os.scandir(smspkg))
    except FileNotFoundError:
        return []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is not None:
            found.append((int(m[1]), Path(entry.path)))
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


def read_recovery_sidecar(package: Path) -> Recovery:
    """`<package>.json` beside a SiteRecovery package (HMAN writes it; the job row has no
    column for it): {"Build", "Version", "FullVersion", "InstalledUpdates"}, validated as
    the instruction's `Recovery`. ValueError when it is missing or malformed."""
    sidecar = package.with_name(package.name + ".json")
    try:
        data = read_regular_file(sidecar, INSTRUCTION_MAX)
    except OSError as exc:
        raise ValueError(f"{sidecar.name}: {exc.strerror or exc}") from None
    try:
        return _recovery(strict_loads(data))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ValueError(f"{sidecar.name}: {str(exc)[:200]}") from None
