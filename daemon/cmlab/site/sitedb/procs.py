"""The guide's stored procedures, as Python functions with their names.

Each takes an open connection and runs inside the caller's transaction, so a handler can make
several calls and commit them with its drop file's other effects at once. State updates are
conditional, so replaying a drop file after a crash changes nothing (idempotent)."""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from cmlab.site.state_codes import IsComplete, PackageState, SubStage

# States the applicability check may (re)write: a package that went further is left alone.
APPLICABILITY_STATES = (
    PackageState.UNKNOWN,
    PackageState.APPLICABILITY_CHECKING,
    PackageState.APPLICABILITY_SUCCESS,
    PackageState.APPLICABILITY_HIDE,
    PackageState.APPLICABILITY_NA,
    PackageState.APPLICABILITY_FAILED,
)


def _in(states: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in states) + ")"


def local_site_number(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT ID FROM ServerData WHERE IsLocal = 1").fetchone()
    if row is None:
        raise LookupError("ServerData has no local site row: was the site made by `cmlab init`?")
    return int(row[0])


@dataclass(frozen=True)
class ManifestPackageRow:
    guid: str
    name: str
    description: str
    update_number: str
    package_type: int
    full_version: str
    min_cm_version: str
    max_cm_version: str
    more_info_link: str
    content_url: str
    content_hash: str
    payload_hash: str
    redist_manifest_url: str
    language_pack_manifest_url: str
    applicability_check: str
    applicability_hash: str
    date_released: str


def spCMUUpsertManifestPackage(conn: sqlite3.Connection, p: ManifestPackageRow) -> bool:
    """Record a package from the manifest as APPLICABILITY_CHECKING. Returns False (and leaves
    the row alone) when the package is already past the applicability stage."""
    row = conn.execute(
        "SELECT State FROM CM_UpdatePackages WHERE PackageGuid = ?", (p.guid,)
    ).fetchone()
    values = (
        p.name,
        p.description,
        p.update_number,
        p.package_type,
        p.full_version,
        p.min_cm_version,
        p.max_cm_version,
        p.more_info_link,
        p.content_url,
        p.content_hash,
        p.payload_hash,
        p.redist_manifest_url,
        p.language_pack_manifest_url,
        p.applicability_check,
        p.applicability_hash,
        p.date_released,
    )
    if row is None:
        conn.execute(
            "INSERT INTO CM_UpdatePackages (PackageGuid, Name, Description, UpdateNumber, "
            "PackageType, FullVersion, MinCMVersion, MaxCMVersion, MoreInfoLink, ContentUrl, "
            "ContentHash, PayloadHash, RedistManifestUrl, LanguagePackManifestUrl, "
            "ApplicabilityCheck, ApplicabilityHash, DateReleased, State) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (p.guid, *values, int(PackageState.APPLICABILITY_CHECKING)),
        )
        return True
    if int(row[0]) not in APPLICABILITY_STATES:
        return False
    conn.execute(
        "UPDATE CM_UpdatePackages SET Name = ?, Description = ?, UpdateNumber = ?, "
        "PackageType = ?, FullVersion = ?, MinCMVersion = ?, MaxCMVersion = ?, MoreInfoLink = ?, "
        "ContentUrl = ?, ContentHash = ?, PayloadHash = ?, RedistManifestUrl = ?, "
        "LanguagePackManifestUrl = ?, "
        "ApplicabilityCheck = ?, ApplicabilityHash = ?, DateReleased = ?, State = ?, "
        "LastUpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE PackageGuid = ?",
        (*values, int(PackageState.APPLICABILITY_CHECKING), p.guid),
    )
    return True


def spCMUSetApplicability(conn: sqlite3.Connection, guid: str, state: PackageState) -> bool:
    cur = conn.execute(
        "UPDATE CM_UpdatePackages SET State = ?, "
        "LastUpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') "
        f"WHERE PackageGuid = ? AND State IN {_in(APPLICABILITY_STATES)}",
        (int(state), guid),
    )
    return cur.rowcount > 0


def spCMUSetUpdatePackageState(conn: sqlite3.Connection, guid: str, state: int) -> bool:
    """Set a package's state; on DOWNLOAD_SUCCESS or DOWNLOAD_FAILED the GUID leaves
    CM_UpdatePackagesToDownload, as the guide says."""
    cur = conn.execute(
        "UPDATE CM_UpdatePackages SET State = ?, "
        "LastUpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE PackageGuid = ?",
        (int(state), guid),
    )
    if cur.rowcount == 0:
        return False
    site = local_site_number(conn)
    conn.execute(
        "INSERT INTO CM_UpdatePackageSiteStatus (PackageGuid, SiteNumber, State) VALUES (?, ?, ?) "
        "ON CONFLICT (PackageGuid, SiteNumber) DO UPDATE SET State = excluded.State, "
        "UpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now')",
        (guid, site, int(state)),
    )
    if int(state) in (PackageState.DOWNLOAD_SUCCESS, PackageState.DOWNLOAD_FAILED):
        conn.execute("DELETE FROM CM_UpdatePackagesToDownload WHERE PackageGuid = ?", (guid,))
    return True


# States from which an administrator (or auto-download) may start a download: "Available to
# download", a failed download to retry, or one in progress to re-request (a no-op).
DOWNLOADABLE_STATES = (
    PackageState.APPLICABILITY_SUCCESS,
    PackageState.DOWNLOAD_FAILED,
    PackageState.DOWNLOAD_IN_PROGRESS,
)


class UnknownPackage(LookupError):
    """An administrator's request names a package that CM_UpdatePackages does not hold: "not
    found", where a refusal means "not from this state" (the command line's exit codes 5 and
    4). The refusals raise it through their own subclasses (NoPackageToDownload here,
    servicing.NoPackageToInitiate), so `except NotDownloadable` and `except NotInitiable` still
    catch a missing package."""


class NotDownloadable(LookupError):
    """spAddPackageToDownload refused: no such package, or not in a downloadable state."""


class NoPackageToDownload(UnknownPackage, NotDownloadable):
    """spAddPackageToDownload refused: no such package."""


def spAddPackageToDownload(conn: sqlite3.Connection, guid: str) -> bool:
    """Queue a package for DMPDownloader; returns False if it was already queued."""
    row = conn.execute(
        "SELECT State, Name FROM CM_UpdatePackages WHERE PackageGuid = ?", (guid,)
    ).fetchone()
    if row is None:
        raise NoPackageToDownload(f"no update package {guid} in CM_UpdatePackages")
    state = int(row[0])
    if state not in DOWNLOADABLE_STATES:
        raise NotDownloadable(
            f"{row[1]} ({guid}) is {PackageState.name_of(state)} ({state}): only a package "
            "that is APPLICABILITY_SUCCESS or DOWNLOAD_FAILED can be downloaded"
        )
    cur = conn.execute(
        "INSERT INTO CM_UpdatePackagesToDownload (PackageGuid) VALUES (?) "
        "ON CONFLICT (PackageGuid) DO NOTHING",
        (guid,),
    )
    return cur.rowcount > 0


def newest_applicable(conn: sqlite3.Connection, guids: Iterable[str]) -> str | None:
    """Auto-download's choice among `guids`: the applicable package with the highest version."""
    best: tuple[tuple[int, ...], str] | None = None
    for guid in guids:
        row = conn.execute(
            "SELECT FullVersion FROM CM_UpdatePackages WHERE PackageGuid = ? AND State = ?",
            (guid, int(PackageState.APPLICABILITY_SUCCESS)),
        ).fetchone()
        if row is None:
            continue
        key = tuple(int(x) for x in str(row[0]).split(".") if x.isdigit())
        if best is None or key > best[0]:
            best = (key, guid)
    return None if best is None else best[1]


@dataclass(frozen=True)
class DownloadRow:
    """What DMPDownloader needs of a package, read from CM_UpdatePackages."""

    guid: str
    name: str
    state: int
    content_url: str
    content_hash: str
    payload_hash: str
    redist_manifest_url: str
    language_pack_manifest_url: str
    request_time: str  # of its CM_UpdatePackagesToDownload row ("" when not queued)


def download_row(conn: sqlite3.Connection, guid: str) -> DownloadRow | None:
    row = conn.execute(
        "SELECT p.PackageGuid, p.Name, p.State, p.ContentUrl, p.ContentHash, p.PayloadHash, "
        "p.RedistManifestUrl, p.LanguagePackManifestUrl, d.RequestTime FROM CM_UpdatePackages p "
        "LEFT JOIN CM_UpdatePackagesToDownload d ON d.PackageGuid = p.PackageGuid "
        "WHERE p.PackageGuid = ?",
        (guid,),
    ).fetchone()
    if row is None:
        return None
    return DownloadRow(
        guid=str(row[0]),
        name=str(row[1]),
        state=int(row[2]),
        content_url=str(row[3] or ""),
        content_hash=str(row[4] or "").upper(),
        payload_hash=str(row[5] or "").upper(),
        redist_manifest_url=str(row[6] or ""),
        language_pack_manifest_url=str(row[7] or ""),
        request_time=str(row[8] or ""),
    )


def spCMUCheckAvailableUpdates(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT d.PackageGuid FROM CM_UpdatePackagesToDownload d "
        "JOIN CM_UpdatePackages p ON p.PackageGuid = d.PackageGuid ORDER BY d.RequestTime"
    ).fetchall()
    return [str(r[0]) for r in rows]


def spCMUReportUpdateStatus(
    conn: sqlite3.Connection,
    guid: str,
    substage: SubStage,
    is_complete: IsComplete,
    progress: int,
    applicable: int = 1,
) -> None:
    site = local_site_number(conn)
    conn.execute(
        "INSERT INTO CM_UpdatePackage_MonitoringStatus "
        "(PackageGuid, SiteNumber, SubStageID, IsComplete, Progress, Applicable) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (PackageGuid, SiteNumber, SubStageID) DO UPDATE SET "
        "IsComplete = excluded.IsComplete, Progress = excluded.Progress, "
        "Applicable = excluded.Applicable, MessageTime = strftime('%Y-%m-%d %H:%M:%f', 'now')",
        (guid, site, int(substage), int(is_complete), progress, applicable),
    )


def spRecordStateMessage(
    conn: sqlite3.Connection,
    *,
    file_name: str,
    component: str,
    machine: str,
    topic_id: str,
    state_id: int,
    state_name: str,
    message_time: str,
) -> bool:
    """statesys: one row per .SMX file; a replayed file is ignored (its name is unique)."""
    cur = conn.execute(
        "INSERT INTO StateMessages (FileName, Component, MachineName, TopicID, StateID, "
        "StateName, MessageTime) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (FileName) DO NOTHING",
        (file_name, component, machine, topic_id, state_id, state_name, message_time),
    )
    return cur.rowcount > 0


class SyncReason(enum.StrEnum):
    """SyncHistory.Reason: who asked for a synchronization."""

    ADMIN = "admin"  # `cmlab sync`, the console's "Check for updates"
    INTERVAL = "interval"  # DMPDownloader's sync timer


def spRequestSync(conn: sqlite3.Connection, reason: SyncReason = SyncReason.ADMIN) -> int:
    """ "Check for updates": SMSDBMon's trigger wakes DMPDownloader with SYNC.DMP."""
    cur = conn.execute("INSERT INTO SyncHistory (Reason) VALUES (?)", (reason,))
    return int(cur.lastrowid or 0)


def pending_syncs(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    rows = conn.execute(
        "SELECT ID, Reason FROM SyncHistory WHERE Finished IS NULL ORDER BY ID"
    ).fetchall()
    return [(int(r[0]), str(r[1])) for r in rows]


def start_syncs(conn: sqlite3.Connection, ids: list[int]) -> None:
    conn.executemany(
        "UPDATE SyncHistory SET Started = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE ID = ?",
        [(i,) for i in ids],
    )


def finish_syncs(conn: sqlite3.Connection, ids: list[int], result: str) -> None:
    conn.executemany(
        "UPDATE SyncHistory SET Finished = strftime('%Y-%m-%d %H:%M:%f', 'now'), Result = ? "
        "WHERE ID = ?",
        [(result, i) for i in ids],
    )


def seconds_since_last_sync(conn: sqlite3.Connection) -> float | None:
    row = conn.execute(
        "SELECT (julianday('now') - julianday(MAX(Requested))) * 86400.0 FROM SyncHistory"
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def package_state(conn: sqlite3.Connection, guid: str) -> int | None:
    row = conn.execute(
        "SELECT State FROM CM_UpdatePackages WHERE PackageGuid = ?", (guid,)
    ).fetchone()
    return None if row is None else int(row[0])
