"""What the administrator's commands read to show a site (`cmlab status`, the demo's
running account): the packages and their states, the synchronizations, the hierarchy with
each site's state per update, the state messages and the site's state history."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

__all__ = [
    "PackageRow",
    "SiteStates",
    "SyncRow",
    "current_site_version",
    "hierarchy_states",
    "last_sync",
    "packages",
    "packages_to_download",
    "site_history_after",
    "state_messages_after",
    "unfinished_syncs",
]


@dataclass(frozen=True)
class PackageRow:
    guid: str
    name: str
    state: int
    flag: int


def packages(conn: sqlite3.Connection) -> list[PackageRow]:
    """Every CM_UpdatePackages row, by name."""
    return [
        PackageRow(*r)
        for r in conn.execute(
            "SELECT PackageGuid, Name, State, Flag FROM CM_UpdatePackages ORDER BY Name"
        ).fetchall()
    ]


def current_site_version(conn: sqlite3.Connection) -> object:
    return conn.execute("SELECT fnCurrentSiteVersion()").fetchone()[0]


def packages_to_download(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT PackageGuid FROM CM_UpdatePackagesToDownload")]


@dataclass(frozen=True)
class SyncRow:
    id: int
    reason: str
    requested: str
    finished: str | None
    result: str | None


def last_sync(conn: sqlite3.Connection) -> SyncRow | None:
    row = conn.execute(
        "SELECT ID, Reason, Requested, Finished, Result FROM SyncHistory ORDER BY ID DESC LIMIT 1"
    ).fetchone()
    return None if row is None else SyncRow(*row)


def unfinished_syncs(conn: sqlite3.Connection) -> int:
    return int(
        conn.execute("SELECT COUNT(*) FROM SyncHistory WHERE Finished IS NULL").fetchone()[0]
    )


@dataclass(frozen=True)
class SiteStates:
    """A site as this database knows it, with its state for every update that has a site
    status row for it (the guide's query over ServerData)."""

    code: str
    parent: str | None
    site_type: int
    local: bool
    version: str | None
    folder: str
    states: dict[str, int]  # PackageGuid -> State, by PackageGuid


def hierarchy_states(conn: sqlite3.Connection) -> list[SiteStates]:
    """Every site, this site first."""
    return [
        SiteStates(
            code=r[0],
            parent=r[1],
            site_type=int(r[2]),
            local=bool(r[3]),
            version=r[4],
            folder=r[5] or "",
            states={
                str(g): int(st)
                for g, st in conn.execute(
                    "SELECT PackageGuid, State FROM CM_UpdatePackageSiteStatus "
                    "WHERE SiteNumber = ? ORDER BY PackageGuid",
                    (r[6],),
                )
            },
        )
        for r in conn.execute(
            "SELECT sd.SiteCode, sd.ParentSiteCode, sd.SiteType, sd.IsLocal, s.Version, "
            "sd.SiteFolder, sd.ID FROM ServerData sd "
            "LEFT JOIN Sites s ON s.SiteCode = sd.SiteCode ORDER BY sd.IsLocal DESC, sd.ID"
        ).fetchall()
    ]


def state_messages_after(conn: sqlite3.Connection, last_id: int) -> list[tuple[int, str, str]]:
    """(StateID, StateName, TopicID) of the state messages after ID `last_id`, in order."""
    return conn.execute(
        "SELECT StateID, StateName, TopicID FROM StateMessages WHERE ID > ? ORDER BY ID",
        (last_id,),
    ).fetchall()


def site_history_after(conn: sqlite3.Connection, last_id: int) -> list[tuple[int, str, int]]:
    """(ID, PackageGuid, State) of CM_UpdatePackageSiteStatus_HIST after ID `last_id`."""
    return conn.execute(
        "SELECT ID, PackageGuid, State FROM CM_UpdatePackageSiteStatus_HIST WHERE ID > ? "
        "ORDER BY ID",
        (last_id,),
    ).fetchall()


def notifications_pending(conn: sqlite3.Connection) -> bool:
    """A change SMSDBMon has still to turn into a drop file (a TableChangeNotifications row)."""
    return conn.execute("SELECT 1 FROM TableChangeNotifications LIMIT 1").fetchone() is not None


def sync_finished(conn: sqlite3.Connection, sync_id: int) -> str | None:
    """SyncHistory's Result for `sync_id` once DMPDownloader finished it; None until then."""
    row = conn.execute(
        "SELECT Finished, Result FROM SyncHistory WHERE ID = ?", (sync_id,)
    ).fetchone()
    if row is None or row[0] is None:
        return None
    return str(row[1] or "")


def site_states(conn: sqlite3.Connection, guid: str) -> dict[str, int]:
    """Site code -> state for `guid`, as this database knows every site: the guide's
    Installation-stage query (`CM_UpdatePackageSiteStatus` joined to `ServerData`)."""
    return {
        str(code): int(state)
        for code, state in conn.execute(
            "select ServerData.SiteCode, cmupss.State from CM_UpdatePackageSiteStatus cmupss "
            "Left join serverdata on cmupss.SiteNumber=ServerData.ID "
            "where cmupss.PackageGuid = ?",
            (guid,),
        )
    }


def site_history(conn: sqlite3.Connection, guid: str, site_code: str) -> list[int]:
    """Every state site `site_code`'s status row for `guid` passed through, in order
    (CM_UpdatePackageSiteStatus_HIST, as this database knows that site)."""
    return [
        int(r[0])
        for r in conn.execute(
            "SELECT h.State FROM CM_UpdatePackageSiteStatus_HIST h "
            "JOIN ServerData s ON s.ID = h.SiteNumber "
            "WHERE h.PackageGuid = ? AND s.SiteCode = ? ORDER BY h.ID",
            (guid, site_code),
        )
    ]
