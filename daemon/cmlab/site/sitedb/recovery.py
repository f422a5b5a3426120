"""Recover Secondary Site in the site database (docs/hierarchy.md, "Secondary sites").

At the primary: the administrator's request (`request_secondary_recovery`, the console's
action, run by `cmlab recover-secondary`) raises SecondarySiteRecovery.RequestNumber, which
makes SMSDBMon drop `<SiteCode>.RSS` for HMAN; HMAN reads the request, packs its files and
queues a SiteRecovery job (`queue_recovery_job`), or records why it cannot.
At the secondary: its despooler records the version it was reinstalled at and the updates its
parent has installed (`record_recovery`).

Each function runs inside the caller's transaction and is safe to replay."""

from __future__ import annotations

import enum
import sqlite3
from dataclasses import dataclass

from cmlab.core.errors import WorkFailed
from cmlab.site.formats.replication import job_name
from cmlab.site.sitedb import hierarchy, scheduler_jobs, site_server
from cmlab.site.state_codes import PackageState

__all__ = [
    "LocalVersion",
    "NotRecoverable",
    "RecoveryRequest",
    "RecoveryState",
    "UnknownSecondary",
    "local_version",
    "queue_recovery_job",
    "record_recovery",
    "recovery_recorded",
    "recovery_request",
    "request_secondary_recovery",
    "secondary_problem",
    "set_recovery_state",
    "unnoticed_requests",
]


class NotRecoverable(LookupError):
    """Recover Secondary Site refused: the site is not a secondary site of this primary site
    (or this site is not a primary site)."""


class UnknownSecondary(NotRecoverable):
    """Recover Secondary Site refused: this primary site knows no site of that code."""


class RecoveryState(enum.StrEnum):
    """SecondarySiteRecovery.State."""

    REQUESTED = "Requested"
    SENT = "Sent"
    FAILED = "Failed"


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


# -- at the primary site ------------------------------------------------------------------------


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
    Returns the request number; NotRecoverable when `site_code` is not a secondary site of
    this primary site (UnknownSecondary when this primary knows no such site)."""
    code = site_code.upper()
    problem = secondary_problem(conn, code)
    if problem is not None:
        unknown = (
            hierarchy.local_site(conn).site_type == hierarchy.PRIMARY
            and hierarchy.site_by_code(conn, code) is None
        )
        refusal = UnknownSecondary if unknown else NotRecoverable
        raise refusal(f"Cannot recover secondary site {code}: {problem}")
    conn.execute(
        "INSERT INTO SecondarySiteRecovery (SiteCode, RequestNumber, State, Detail) "
        "VALUES (?, 1, ?, NULL) ON CONFLICT (SiteCode) DO UPDATE SET "
        "RequestNumber = RequestNumber + 1, State = excluded.State, Detail = NULL, "
        "RequestTime = strftime('%Y-%m-%d %H:%M:%f', 'now')",
        (code, RecoveryState.REQUESTED),
    )
    row = conn.execute(
        "SELECT RequestNumber FROM SecondarySiteRecovery WHERE SiteCode = ?", (code,)
    ).fetchone()
    return int(row[0])


def recovery_request(conn: sqlite3.Connection, site_code: str) -> RecoveryRequest | None:
    row = conn.execute(
        "SELECT SiteCode, RequestNumber, State FROM SecondarySiteRecovery WHERE SiteCode = ?",
        (site_code,),
    ).fetchone()
    return None if row is None else RecoveryRequest(str(row[0]).upper(), int(row[1]), str(row[2]))


def local_version(conn: sqlite3.Connection) -> LocalVersion:
    """This site's version (its Sites row) and the updates installed here, which a
    secondary site is reinstalled at."""
    local = hierarchy.local_site(conn)
    row = conn.execute(
        "SELECT Version, FullVersion, BuildNumber FROM Sites WHERE SiteCode = ?", (local.code,)
    ).fetchone()
    if row is None:
        raise WorkFailed(f"the site database has no Sites row for this site {local.code}")
    guids = tuple(
        str(r[0]).upper()
        for r in conn.execute(
            "SELECT PackageGuid FROM CM_UpdatePackageSiteStatus WHERE SiteNumber = ? AND "
            "State = ? ORDER BY upper(PackageGuid)",
            (local.number, int(PackageState.INSTALL_SUCCESS)),
        )
    )
    return LocalVersion(str(row[0]), str(row[1]), int(row[2]), guids)


def set_recovery_state(
    conn: sqlite3.Connection, site_code: str, number: int, state: RecoveryState, detail: str
) -> None:
    # Only the request this run handled: a newer request (a new RSS) keeps its own state.
    conn.execute(
        "UPDATE SecondarySiteRecovery SET State = ?, Detail = ? "
        "WHERE SiteCode = ? AND RequestNumber = ?",
        (state, detail, site_code, number),
    )


def queue_recovery_job(
    conn: sqlite3.Connection,
    site_code: str,
    number: int,
    *,
    package_file: str,
    file_size: int,
    file_hash: str,
    content_hash: str,
) -> tuple[int, bool]:
    """The request's SiteRecovery job (unless it has one) and the request's state Sent, in
    one transaction. Returns (JobID, whether it is new)."""
    existing = scheduler_jobs.recovery_job(conn, site_code, number)
    if existing is not None:
        return existing, False
    job_id = scheduler_jobs.add_recovery_job(
        conn,
        site_code,
        number,
        package_file=package_file,
        file_size=file_size,
        file_hash=file_hash,
        content_hash=content_hash,
    )
    set_recovery_state(conn, site_code, number, RecoveryState.SENT, f"job {job_name(job_id)}")
    return job_id, True


def unnoticed_requests(conn: sqlite3.Connection) -> list[str]:
    """Requests still Requested a while after they were made: their `.RSS` normally comes
    within a second; one made while this site's installation had SMSDBMon's triggers removed
    (install steps 5 to 13) never does."""
    return [
        str(r[0]).upper()
        for r in conn.execute(
            "SELECT SiteCode FROM SecondarySiteRecovery WHERE State = ? "
            "AND RequestTime < strftime('%Y-%m-%d %H:%M:%f', 'now', '-2 seconds')",
            (RecoveryState.REQUESTED,),
        )
    ]


# -- at the secondary site ----------------------------------------------------------------------


def record_recovery(
    conn: sqlite3.Connection,
    site_code: str,
    *,
    build: int,
    version: str,
    full_version: str,
    guids: tuple[str, ...],
    registry_keys: tuple[str, ...],
) -> None:
    """A reinstalled secondary's rows: its version (Sites, the services and the registry
    values that carry the build, where they exist) and every update its parent has
    installed, as INSTALL_SUCCESS for this site."""
    site_server.set_installed_version(
        conn,
        site_code,
        build=build,
        version=version,
        full_version=full_version,
        registry_keys=registry_keys,
    )
    site = hierarchy.local_site(conn).number
    for guid in guids:
        # An update this site has not heard of yet (replication brings the full row later).
        conn.execute(
            "INSERT INTO CM_UpdatePackages (PackageGuid, Name) VALUES (?, ?) "
            "ON CONFLICT (PackageGuid) DO NOTHING",
            (guid, guid),
        )
        conn.execute(
            "INSERT INTO CM_UpdatePackageSiteStatus (PackageGuid, SiteNumber, State, Flag, "
            "RunNumber) SELECT PackageGuid, ?, ?, Flag, RunNumber FROM CM_UpdatePackages "
            "WHERE PackageGuid = ? ON CONFLICT (PackageGuid, SiteNumber) DO UPDATE SET "
            "State = excluded.State, UpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') "
            "WHERE State <> excluded.State",
            (site, int(PackageState.INSTALL_SUCCESS), guid),
        )


def recovery_recorded(
    conn: sqlite3.Connection, site_code: str, build: int, guids: tuple[str, ...]
) -> bool:
    """This site's Sites row is at `build` and each of `guids` is INSTALL_SUCCESS here."""
    row = conn.execute("SELECT BuildNumber FROM Sites WHERE SiteCode = ?", (site_code,)).fetchone()
    if row is None or int(row[0]) != build:
        return False
    site = hierarchy.local_site(conn).number
    for guid in guids:
        got = conn.execute(
            "SELECT State FROM CM_UpdatePackageSiteStatus WHERE PackageGuid = ? AND SiteNumber = ?",
            (guid, site),
        ).fetchone()
        if got is None or int(got[0]) != PackageState.INSTALL_SUCCESS:
            return False
    return True
