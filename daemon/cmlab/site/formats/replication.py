"""The file-based replication formats (docs/hierarchy.md): what a parent site's DistMgr,
Scheduler and Sender write and a child's Despooler (and the parent's DistMgr again) read.

- The instruction: `schedule.box/tosend/<JobID>.Idb` at the parent, delivered as
  `despoolr.box/receive/<JobID>.INS` at the child, UTF-8 JSON of at most 64 KiB. It crosses a
  site boundary, so the reader trusts nothing: every key is required, typed and bounded,
  unknown keys and duplicate keys are refused, and names that become file names carry no path
  separator. A SiteRecovery job's `Recovery` object comes from the sidecar
  `SMSPKG/<SiteCode>.RCV.<n>.json` HMAN writes beside the package.
- Job names: a SchedulerJobs.JobID as 8 upper-case hex digits (`00000391`), in `<JobID>.JOB`
  (SMSDBMon, for the Scheduler), `<JobID>.Idb`, `<JobID>.SRQ`, `<JobID>.INS`, and the
  delivered package `ds_<jobid>.pkg` (lower case, as the guide shows it).
- The send request `outboxes/LAN/<JobID>.SRQ` (Scheduler -> Sender): the lines
  `Job=<JobID>` and `Instruction=tosend/<JobID>.Idb`.
- The compressed package `SMSPKG/<PkgID>.PCK.<version>` (DistMgr).
- The resend request `<ChildSite>_<PkgID>_<Version>.RSQ` a child's Despooler drops in its
  parent's `distmgr.box`: one line, the reason.

Interface:

- `parse_instruction(data, *, where="instruction") -> Instruction`, `read_instruction(path)`
  (never follows a link, reads at most the cap + 1 byte), `build_instruction(instr) -> bytes`
  (ValueError for what parse would refuse, so a site never sends what its peer must reject),
  `instruction_dict(instr)`.
- `job_name(job_id) -> str`, `parse_job_name(text) -> int`, `job_of_drop_file(name, ext)`,
  `idb_name`, `srq_name`, `ins_name`, `delivered_package_name`.
- `render_send_request(job_id) -> str`, `parse_send_request(name, data) -> int`.
- `pck_name(pkg_id, version) -> str`, `pck_version(name, pkg_id) -> int | None`.
- `resend_request_name(site, pkg_id, version)`, `parse_resend_request_name(name)`,
  `render_resend_request(reason)`, `parse_resend_reason(name, data) -> str`.
- `recovery_sidecar_path(package)`, `render_recovery_sidecar(recovery) -> str`,
  `read_recovery_sidecar(package) -> Recovery` (ValueError when missing or malformed: the
  Scheduler then fails the job).

Bad input raises ReplicationFormatError whose message says what is wrong (prefixed by the file
name or `where`); `job_name` and `pck_name` raise ValueError for a value no file may carry.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmlab.core.errors import BadInput
from cmlab.core.fs import read_regular_file
from cmlab.core.strict_json import strict_loads
from cmlab.site.formats.ids import (
    GUID_RE,
    JOB_ID_RE,
    PACKAGE_ID,
    PACKAGE_ID_RE,
    SITE_CODE,
    SITE_CODE_RE,
    UPPER_SHA256_RE,
    is_job_id,
    is_package_id,
)

__all__ = [
    "INSTRUCTION_MAX",
    "JOB_TYPES",
    "MAX_VERSION",
    "RSQ_MAX",
    "SITE_RECOVERY",
    "SRQ_MAX",
    "SWD",
    "Instruction",
    "Recovery",
    "ReplicationFormatError",
    "build_instruction",
    "delivered_package_name",
    "idb_name",
    "ins_name",
    "instruction_dict",
    "job_name",
    "job_of_drop_file",
    "parse_instruction",
    "parse_job_name",
    "parse_resend_reason",
    "parse_resend_request_name",
    "parse_send_request",
    "pck_name",
    "pck_version",
    "read_instruction",
    "read_recovery_sidecar",
    "recovery_sidecar_path",
    "render_recovery_sidecar",
    "render_resend_request",
    "render_send_request",
    "resend_request_name",
    "srq_name",
]

INSTRUCTION_MAX = 64 * 1024
JOB_TYPES = ("SWD", "SiteRecovery")
SWD, SITE_RECOVERY = JOB_TYPES
SRQ_MAX = 1024
RSQ_MAX = 4096  # the reason a child's despooler gives; more is not a resend request

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


class ReplicationFormatError(BadInput):
    """A replication drop file (instruction, send or resend request) or job name that does
    not follow its format."""


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


# -- names ---------------------------------------------------------------------------------------


def job_name(job_id: int) -> str:
    """A SchedulerJobs.JobID as the files name it: 8 upper-case hex digits."""
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 0 < job_id <= 0xFFFFFFFF:
        raise ValueError(f"job ID {job_id!r} is not 1..0xFFFFFFFF")
    return f"{job_id:08X}"


def parse_job_name(text: str) -> int:
    """`00000391` -> 0x391; ReplicationFormatError for anything but 8 hex digits (either
    case) naming a job above 0."""
    if not is_job_id(text.upper()) or not text.isascii():
        raise ReplicationFormatError(f"{text[:80]!r} is not a job ID (8 hex digits)")
    value = int(text, 16)
    if value == 0:
        raise ReplicationFormatError(f"{text!r} is not a job ID (job IDs start at 1)")
    return value


def job_of_drop_file(name: str, ext: str) -> int:
    """The job a `<JobID>.<ext>` drop file names (the Scheduler's `.JOB`, the Sender's
    `.SRQ`); ReplicationFormatError for any other name."""
    stem, dot, found = name.rpartition(".")
    if not dot or found.upper() != ext:
        raise ReplicationFormatError(f"{name}: the file name is not <JobID>.{ext}")
    try:
        return parse_job_name(stem)
    except ReplicationFormatError as exc:
        raise ReplicationFormatError(
            f"{name}: the file name is not <JobID>.{ext} ({exc})"
        ) from None


def idb_name(job: str) -> str:
    """`<JobID>.Idb`, the instruction in the Scheduler's `tosend` folder."""
    return f"{job}.Idb"


def srq_name(job: str) -> str:
    """`<JobID>.SRQ`, the send request in the Sender's outbox."""
    return f"{job}.SRQ"


def ins_name(job: str) -> str:
    """`<JobID>.INS`, the instruction as delivered into the child's `despoolr.box/receive`."""
    return f"{job.upper()}.INS"


def delivered_package_name(job: str) -> str:
    """`ds_<jobid>.pkg`, the package file delivered beside `<JobID>.INS`."""
    return f"ds_{job.lower()}.pkg"


def render_send_request(job_id: int) -> str:
    """The body of `<JobID>.SRQ`."""
    name = job_name(job_id)
    return f"Job={name}\nInstruction=tosend/{idb_name(name)}\n"


def parse_send_request(name: str, data: bytes) -> int:
    """The job a `<JobID>.SRQ` named `name` asks to send; ReplicationFormatError for a wrong
    name or a body that is not the Scheduler's (`Job=<JobID>` and
    `Instruction=tosend/<JobID>.Idb` lines)."""
    job_id = job_of_drop_file(name, "SRQ")
    if len(data) > SRQ_MAX:
        raise ReplicationFormatError(f"{name}: larger than {SRQ_MAX} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ReplicationFormatError(f"{name}: not UTF-8 text") from None
    pairs: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, eq, value = line.partition("=")
        if not eq or key not in ("Job", "Instruction") or key in pairs:
            raise ReplicationFormatError(f"{name}: unexpected line {line[:80]!r}")
        pairs[key] = value
    job = f"{job_id:08X}"
    if pairs.get("Job", "").upper() != job:
        raise ReplicationFormatError(f"{name}: the request names job {pairs.get('Job', '')[:20]!r}")
    if pairs.get("Instruction", f"tosend/{job}.Idb") != f"tosend/{job}.Idb":
        raise ReplicationFormatError(f"{name}: the instruction is not tosend/{job}.Idb")
    return job_id


def pck_name(pkg_id: str, version: int) -> str:
    """The compressed copy of a package version in SMSPKG: `CAS10001.PCK.1`."""
    pkg = pkg_id.upper()
    if not is_package_id(pkg):
        raise ValueError(f"{pkg_id!r} is not a PackageID")
    _check_version(version, "version")
    return f"{pkg}.PCK.{version}"


def pck_version(name: str, pkg_id: str) -> int | None:
    """n when `name` is `<pkg_id>.PCK.<n>` (the PackageID upper case, as pck_name writes
    it), else None."""
    m = re.fullmatch(re.escape(pkg_id.upper()) + r"\.PCK\.([1-9][0-9]{0,9})", name)
    return None if m is None else int(m[1])


_RSQ_RE = re.compile(rf"({SITE_CODE})_({PACKAGE_ID})_([1-9][0-9]{{0,9}})\.RSQ", re.I)


def resend_request_name(site_code: str, pkg_id: str, version: int) -> str:
    """`<ChildSite>_<PkgID>_<Version>.RSQ`, upper case."""
    return f"{site_code.upper()}_{pkg_id.upper()}_{version}.RSQ"


def parse_resend_request_name(name: str) -> tuple[str, str, int]:
    """(child site, PackageID, version) of a resend request, upper-cased; the name is matched
    in either case, as drop-file names are."""
    m = _RSQ_RE.fullmatch(name)
    if m is None:
        raise ReplicationFormatError(
            f"{name}: the file name is not <ChildSite>_<PkgID>_<Version>.RSQ"
        )
    return m[1].upper(), m[2].upper(), int(m[3])


def render_resend_request(reason: str) -> str:
    """The body of a resend request: the reason, one line."""
    return reason + "\n"


def parse_resend_reason(name: str, data: bytes) -> str:
    """The reason in a resend request's body, on one line with every run of white space or
    unprintable characters made one space (it is written into distmgr.log)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ReplicationFormatError(f"{name}: the reason is not UTF-8 text") from None
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


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
    """The instruction in `data`, fully validated; ReplicationFormatError("<where>: <what is
    wrong>")."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ReplicationFormatError(f"{where}: not bytes")
    if len(data) > INSTRUCTION_MAX:
        raise ReplicationFormatError(f"{where}: larger than {INSTRUCTION_MAX} bytes")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReplicationFormatError(
            f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    if not text.strip():
        raise ReplicationFormatError(f"{where}: empty")
    try:
        obj = strict_loads(text)
    except ValueError as exc:  # JSONDecodeError is one
        raise ReplicationFormatError(f"{where}: not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise ReplicationFormatError(f"{where}: not a JSON object")
    try:
        return _validate(obj)
    except ValueError as exc:
        raise ReplicationFormatError(f"{where}: {exc}") from None


def read_instruction(path: Path) -> Instruction:
    """parse_instruction of the file at `path`; a link or a special file is
    ReplicationFormatError."""
    try:
        data = read_regular_file(path, INSTRUCTION_MAX)
    except ValueError as exc:  # a link, not a regular file, too big
        raise ReplicationFormatError(str(exc)) from None
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
        obj["Recovery"] = _recovery_dict(instr.recovery)
    return obj


def _recovery_dict(recovery: Recovery) -> dict[str, Any]:
    return {
        "Build": recovery.build,
        "Version": recovery.version,
        "FullVersion": recovery.full_version,
        "InstalledUpdates": list(recovery.installed_updates),
    }


def build_instruction(instr: Instruction) -> bytes:
    """The instruction's JSON; raises ValueError for what parse_instruction would refuse, so
    a site never sends what its peer must reject."""
    data = json.dumps(instruction_dict(instr), indent=1, ensure_ascii=False).encode() + b"\n"
    try:
        parse_instruction(data)
    except ReplicationFormatError as exc:
        raise ValueError(str(exc)) from None
    return data


# -- the recovery sidecar ----------------------------------------------------------------------


def recovery_sidecar_path(package: Path) -> Path:
    """`<package>.json`, beside a SiteRecovery package (the job row has no column for it)."""
    return package.with_name(package.name + ".json")


def render_recovery_sidecar(recovery: Recovery) -> str:
    """{"Build", "Version", "FullVersion", "InstalledUpdates"}, as HMAN writes it."""
    return json.dumps(_recovery_dict(recovery), indent=1) + "\n"


def read_recovery_sidecar(package: Path) -> Recovery:
    """`<package>.json` beside a SiteRecovery package (HMAN writes it; the job row has no
    column for it): {"Build", "Version", "FullVersion", "InstalledUpdates"}, validated as
    the instruction's `Recovery`. ValueError when it is missing or malformed."""
    sidecar = recovery_sidecar_path(package)
    try:
        data = read_regular_file(sidecar, INSTRUCTION_MAX)
    except OSError as exc:
        raise ValueError(f"{sidecar.name}: {exc.strerror or exc}") from None
    try:
        return _recovery(strict_loads(data))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ValueError(f"{sidecar.name}: {str(exc)[:200]}") from None
