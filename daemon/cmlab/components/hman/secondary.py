"""HMAN's Recover Secondary Site (docs/hierarchy.md, "Secondary sites").

Secondary sites are never updated automatically: after a primary site installs an update, the
administrator runs Recover Secondary Site (`cmlab recover-secondary PRIMARY_DIR SITECODE`,
`request_secondary_recovery` below), which raises SecondarySiteRecovery.RequestNumber at the
primary. SMSDBMon drops `<SiteCode>.RSS` into hman.box; HMAN packs the primary's `bin/x64`
files as `SMSPKG/<SiteCode>.RCV.<n>` and adds a SiteRecovery job for the Scheduler and Sender,
which deliver it to the secondary's despooler (cmlab.components.despooler reinstalls the site).

The instruction carries the version the secondary is reinstalled at and the updates the
primary has installed (`Recovery`). The job row has no column for them, so HMAN writes them
beside the package as `SMSPKG/<SiteCode>.RCV.<n>.json` ({"Build", "Version", "FullVersion",
"InstalledUpdates"}), where the Scheduler reads them to build the instruction.

Replays converge: a request that already has its job is not packed again (the job's FileHash
must stay the package's), and the package, its sidecar, the job and the new state are written
so that a crash before the transaction leaves only files the next run rewrites.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cmlab.core.errors import CmlabError
from cmlab.core.fs import make_tmp_dir, remove_path, write_atomic
from cmlab.core.hashing import folder_hash
from cmlab.site.cab import extract_cab
from cmlab.site.component import Component
from cmlab.site.file_replication import build_package_file
from cmlab.site.formats.ids import is_site_code
from cmlab.site.formats.replication import (
    SITE_RECOVERY,
    Recovery,
    job_name,
    recovery_sidecar_path,
    render_recovery_sidecar,
)
from cmlab.site.inbox import BadInput, Outcome
from cmlab.site.installation import INSTALL_DIR, installed_build
from cmlab.site.sitedb import hierarchy
from cmlab.site.statecodes import PackageState

INSTALL_SUCCESS = int(PackageState.INSTALL_SUCCESS)
REQUESTED, SENT, FAILED = "Requested", "Sent", "Failed"


@dataclass(frozen=True)
class RecoveryRequest:
    site_code: str
    number: int
    state: str


@dataclass(frozen=True)
class LocalVersion:
    version: str
    full_version: str
    build: int  # the Sites row's
    installed_updates: tuple[str, ...]


def rcv_name(site_code: str, number: int) -> str:
    """`SEC.RCV.1`: the package of a secondary site's recovery request, in SMSPKG."""
    return f"{site_code.upper()}.RCV.{number}"


def secondary_problem(conn: sqlite3.Connection, site_code: str) -> str | None:
    """Why this site cannot recover `site_code` (None when it can): only a primary site
    recovers, and only its own direct secondary sites."""
    code = site_code.upper()
    local = hierarchy.local_site(conn)
    if local.site_type != hierarchy.PRIMARY:
        return (
            f"{local.code} is a {local.role} site; Recover Secondary Site runs at the secondary "
            "site's parent primary site"
        )
    site = hierarchy.site_by_code(conn, code)
    if site is None:
        return f"site {code} is not known at {local.code} (no ServerData row)"
    if site.site_type != hierarchy.SECONDARY:
        return f"site {code} is a {site.role} site, not a secondary site"
    if site.parent != local.code:
        return f"secondary site {code} is a child of {site.parent}, not of {local.code}"
    return None


def request_secondary_recovery(conn: sqlite3.Connection, site_code: str) -> int:
    """The console's Recover Secondary Site, inside the caller's transaction at the primary:
    a new request number for `site_code` (whose change makes SMSDBMon drop `<SiteCode>.RSS`).
    Returns the request number; LookupError when `site_code` is not a secondary site of this
    primary site."""
    code = site_code.upper()
    problem = secondary_problem(conn, code)
    if problem is not None:
        raise LookupError(f"Cannot recover secondary site {code}: {problem}")
    conn.execute(
        "INSERT INTO SecondarySiteRecovery (SiteCode, RequestNumber, State, Detail) "
        "VALUES (?, 1, ?, NULL) ON CONFLICT (SiteCode) DO UPDATE SET "
        "RequestNumber = RequestNumber + 1, State = excluded.State, Detail = NULL, "
        "RequestTime = strftime('%Y-%m-%d %H:%M:%f', 'now')",
        (code, REQUESTED),
    )
    row = conn.execute(
        "SELECT RequestNumber FROM SecondarySiteRecovery WHERE SiteCode = ?", (code,)
    ).fetchone()
    return int(row[0])


def _request(conn: sqlite3.Connection, site_code: str) -> RecoveryRequest | None:
    row = conn.execute(
        "SELECT SiteCode, RequestNumber, State FROM SecondarySiteRecovery WHERE SiteCode = ?",
        (site_code,),
    ).fetchone()
    return None if row is None else RecoveryRequest(str(row[0]).upper(), int(row[1]), str(row[2]))


def _job_of(conn: sqlite3.Connection, site_code: str, number: int) -> int | None:
    row = conn.execute(
        "SELECT JobID FROM SchedulerJobs WHERE JobType = ? AND PkgID = ? AND Version = ? "
        "ORDER BY JobID LIMIT 1",
        (SITE_RECOVERY, site_code, number),
    ).fetchone()
    return None if row is None else int(row[0])


def _local_version(conn: sqlite3.Connection) -> LocalVersion:
    local = hierarchy.local_site(conn)
    row = conn.execute(
        "SELECT Version, FullVersion, BuildNumber FROM Sites WHERE SiteCode = ?", (local.code,)
    ).fetchone()
    if row is None:
        raise CmlabError(f"the site database has no Sites row for this site {local.code}")
    guids = tuple(
        str(r[0]).upper()
        for r in conn.execute(
            "SELECT PackageGuid FROM CM_UpdatePackageSiteStatus WHERE SiteNumber = ? AND "
            "State = ? ORDER BY upper(PackageGuid)",
            (local.number, INSTALL_SUCCESS),
        )
    )
    return LocalVersion(str(row[0]), str(row[1]), int(row[2]), guids)


def _set_state(
    conn: sqlite3.Connection, site_code: str, number: int, state: str, detail: str
) -> None:
    # Only the request this run handled: a newer request (a new RSS) keeps its own state.
    conn.execute(
        "UPDATE SecondarySiteRecovery SET State = ?, Detail = ? "
        "WHERE SiteCode = ? AND RequestNumber = ?",
        (state, detail, site_code, number),
    )


@dataclass(frozen=True)
class _Packed:
    size: int
    sha256: str
    content_hash: str


def _pack(bin_dir: Path, rcv: Path) -> _Packed:
    """The CAB of `bin_dir`'s files at `rcv`. Its content hash is taken from the CAB itself
    (extracted to a temporary folder), not from `bin_dir`: what the secondary's despooler
    checks is what the package carries, even if a file changed while it was packed."""
    packed = build_package_file(bin_dir, rcv)
    work = make_tmp_dir(rcv, "verify")
    try:
        extract_cab(rcv, work / "content")
        digest = folder_hash(work / "content")
    finally:
        remove_path(work)
    return _Packed(packed.size, packed.sha256, digest)


def _add_job(
    conn: sqlite3.Connection,
    site_code: str,
    number: int,
    package_file: str,
    packed: _Packed,
) -> tuple[int, bool]:
    """The SiteRecovery job (unless the request has one) and the request's state, in one
    transaction. Returns (JobID, whether it is new)."""
    existing = _job_of(conn, site_code, number)
    if existing is not None:
        return existing, False
    cur = conn.execute(
        "INSERT INTO SchedulerJobs (JobType, PkgID, Version, DestSite, PackageFile, FileSize, "
        "FileHash, ContentHash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            SITE_RECOVERY,
            site_code,
            number,
            site_code,
            package_file,
            packed.size,
            packed.sha256,
            packed.content_hash,
        ),
    )
    _set_state(conn, site_code, number, SENT, f"job {job_name(int(cur.lastrowid or 0))}")
    return int(cur.lastrowid or 0), True


def _unnoticed_requests(conn: sqlite3.Connection) -> list[str]:
    """Requests still Requested a while after they were made: their `.RSS` normally comes
    within a second; one made while this site's installation had SMSDBMon's triggers removed
    (install steps 5 to 13) never does."""
    return [
        str(r[0]).upper()
        for r in conn.execute(
            "SELECT SiteCode FROM SecondarySiteRecovery WHERE State = ? "
            "AND RequestTime < strftime('%Y-%m-%d %H:%M:%f', 'now', '-2 seconds')",
            (REQUESTED,),
        )
    ]


class SecondarySiteHandlers(Component):
    """Mixed into HierarchyManager."""

    async def start(self) -> None:
        await super().start()
        self.every(self.config.intervals.rescan, self._sweep_requests, "read the recovery requests")

    async def _sweep_requests(self) -> None:
        for code in await self.db.read(_unnoticed_requests):
            self.wake(
                self.paths.hman_box / f"{code}.RSS",
                f"Recover secondary site {code}: request found without a notification.",
            )

    async def on_recover_secondary(self, path: Path) -> Outcome:
        code = path.name[: -len(".RSS")].upper()
        if not is_site_code(code):
            raise BadInput(f"{path.name}: the file name is not <SiteCode>.RSS")
        request = await self.db.read(_request, code)
        if request is None:
            self.say(
                f"ERROR: Recover secondary site {code}: no recovery was requested for it "
                "(SecondarySiteRecovery has no row).",
                level="error",
            )
            return Outcome.DONE
        number = request.number
        problem = await self.db.read(secondary_problem, code)
        if problem is not None:
            return await self._refuse(code, number, problem)
        job = await self.db.read(_job_of, code, number)
        if job is not None:
            # A replayed notification: the request is packed and queued already.
            self.say(
                f"Recover secondary site {code}: request {number} is already queued as job "
                f"{job_name(job)}."
            )
            return Outcome.DONE
        local = await self.db.read(_local_version)
        build = await self.in_thread(installed_build, self.paths.root)
        if build != local.build:
            return await self._refuse(
                code,
                number,
                f"this site's files are build {build} but its Sites row says build "
                f"{local.build} (an installation is in progress or was rolled back); run "
                "Recover Secondary Site again once the site is at one version",
            )
        self.say(
            f"Recover secondary site {code}: reinstalling it with this site's files "
            f"(Configuration Manager {local.full_version}, build {build})."
        )
        rcv = self.paths.smspkg / rcv_name(code, number)
        bin_dir = self.paths.root.joinpath(*INSTALL_DIR)
        recovery = Recovery(build, local.version, local.full_version, local.installed_updates)
        try:
            rcv.parent.mkdir(parents=True, exist_ok=True)
            packed = await self.in_thread(_pack, bin_dir, rcv)
            # The sidecar before the job: the Scheduler reads it once the job row exists.
            await self.in_thread(
                write_atomic,
                recovery_sidecar_path(rcv),
                render_recovery_sidecar(recovery),
            )
        except CmlabError as exc:
            return await self._refuse(code, number, f"cannot pack {self.show(bin_dir)}: {exc}")
        self.say(
            f"Created package {self.show(rcv)} ({packed.size} bytes) of the files in "
            f"{self.show(bin_dir)}; content hash {packed.content_hash}."
        )
        package_file = f"SMSPKG/{rcv.name}"
        job, new = await self.db.tx(_add_job, code, number, package_file, packed)
        if new:
            self.say(
                f"Created site recovery job {job_name(job)} to send {self.show(rcv)} to site "
                f"{code} (request {number}, {len(local.installed_updates)} installed updates)."
            )
        return Outcome.DONE

    async def _refuse(self, code: str, number: int, problem: str) -> Outcome:
        self.say(f"ERROR: Recover secondary site {code}: {problem}.", level="error")
        await self.db.tx(_set_state, code, number, FAILED, problem)
        return Outcome.DONE
