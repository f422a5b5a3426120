"""The hierarchy as the site database records it: ServerData (one row per known site, this
site's own with IsLocal = 1) and Sites (each site's version). Site numbers are local to one
database; sites name each other by site code in everything they send (docs/hierarchy.md)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from cmlab.site.state_codes import SiteType

CAS, PRIMARY, SECONDARY = SiteType.CAS, SiteType.PRIMARY, SiteType.SECONDARY
TYPE_NAMES: dict[int, str] = {CAS: "cas", PRIMARY: "primary", SECONDARY: "secondary"}


@dataclass(frozen=True)
class SiteRow:
    number: int
    code: str
    parent: str | None
    site_type: int
    server: str
    folder: str  # how this site reaches that site's folder (the address); "" when unknown
    local: bool

    @property
    def role(self) -> str:
        return TYPE_NAMES.get(self.site_type, str(self.site_type))


_COLUMNS = "ID, SiteCode, ParentSiteCode, SiteType, SiteServerName, SiteFolder, IsLocal"


def _row(r: tuple[Any, ...]) -> SiteRow:
    # A SQLite row's values are typed by what the table holds, not statically: Any.
    return SiteRow(
        number=int(r[0]),
        code=str(r[1]).upper(),
        parent=str(r[2]).upper() if r[2] else None,
        site_type=int(r[3]),
        server=str(r[4] or ""),
        folder=str(r[5] or ""),
        local=bool(r[6]),
    )


def all_sites(conn: sqlite3.Connection) -> list[SiteRow]:
    return [_row(r) for r in conn.execute(f"SELECT {_COLUMNS} FROM ServerData ORDER BY ID")]


def local_site(conn: sqlite3.Connection) -> SiteRow:
    r = conn.execute(f"SELECT {_COLUMNS} FROM ServerData WHERE IsLocal = 1").fetchone()
    if r is None:
        raise LookupError("ServerData has no local site row: was the site made by `cmlab init`?")
    return _row(r)


def site_by_code(conn: sqlite3.Connection, code: str) -> SiteRow | None:
    r = conn.execute(f"SELECT {_COLUMNS} FROM ServerData WHERE SiteCode = ?", (code,)).fetchone()
    return None if r is None else _row(r)


def is_top_level(conn: sqlite3.Connection) -> bool:
    """The CAS, or a stand-alone primary: where updates are started and rolled up."""
    return local_site(conn).parent is None


def parent_site(conn: sqlite3.Connection) -> SiteRow | None:
    parent = local_site(conn).parent
    return None if parent is None else site_by_code(conn, parent)


def child_sites(
    conn: sqlite3.Connection, types: tuple[int, ...] = (PRIMARY, SECONDARY)
) -> list[SiteRow]:
    """This site's direct children of the given types."""
    local = local_site(conn)
    return [s for s in all_sites(conn) if s.parent == local.code and s.site_type in types]


def subtree_codes(conn: sqlite3.Connection, code: str) -> set[str]:
    """`code` and every site below it, as far as this database knows them."""
    sites = all_sites(conn)
    found = {code.upper()}
    grew = True
    while grew:
        grew = False
        for s in sites:
            if s.parent in found and s.code not in found:
                found.add(s.code)
                grew = True
    return found


def ensure_site(
    conn: sqlite3.Connection,
    code: str,
    *,
    parent: str | None,
    site_type: int,
    server: str,
    folder: str | None = None,
) -> int:
    """Add or update another site's ServerData row (never the local one); returns its ID. A
    `folder` of None keeps the address already recorded."""
    code = code.upper()
    existing = site_by_code(conn, code)
    if existing is not None and existing.local:
        return existing.number
    if existing is None:
        cur = conn.execute(
            "INSERT INTO ServerData (SiteCode, ParentSiteCode, SiteServerName, SiteType, IsLocal, "
            "SiteFolder) VALUES (?, ?, ?, ?, 0, ?)",
            (code, parent, server, site_type, folder or ""),
        )
        return int(cur.lastrowid or 0)
    conn.execute(
        "UPDATE ServerData SET ParentSiteCode = ?, SiteServerName = ?, SiteType = ?, "
        "SiteFolder = COALESCE(?, SiteFolder) WHERE ID = ? AND (ParentSiteCode IS NOT ? OR "
        "SiteServerName <> ? OR SiteType <> ? OR (? IS NOT NULL AND SiteFolder IS NOT ?))",
        (
            parent,
            server,
            site_type,
            folder,
            existing.number,
            parent,
            server,
            site_type,
            folder,
            folder,
        ),
    )
    return existing.number


def set_site_version(
    conn: sqlite3.Connection,
    code: str,
    *,
    version: str,
    full_version: str,
    build: int,
    reporting_site: str | None,
    server: str,
    site_type: int,
) -> bool:
    """Another site's Sites row (its version, as it reports it). False when unchanged."""
    cur = conn.execute(
        "INSERT INTO Sites (SiteCode, SiteName, Version, FullVersion, BuildNumber, "
        "ReportingSiteCode, ServerName, Type) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (SiteCode) DO UPDATE SET Version = excluded.Version, "
        "FullVersion = excluded.FullVersion, BuildNumber = excluded.BuildNumber, "
        "ReportingSiteCode = excluded.ReportingSiteCode, ServerName = excluded.ServerName, "
        "Type = excluded.Type WHERE Version <> excluded.Version OR "
        "FullVersion <> excluded.FullVersion OR BuildNumber <> excluded.BuildNumber OR "
        "ReportingSiteCode IS NOT excluded.ReportingSiteCode OR Type IS NOT excluded.Type",
        (
            code.upper(),
            f"{code.upper()} lab site",
            version,
            full_version,
            build,
            reporting_site,
            server,
            site_type,
        ),
    )
    return cur.rowcount > 0


@dataclass(frozen=True)
class SiteVersion:
    """A site's version as its Sites row says, and whether it is a top-level site."""

    version: str
    full_version: str
    build: int
    top_level: bool  # it has no parent site


def site_version(conn: sqlite3.Connection, code: str) -> SiteVersion | None:
    """None when the site has no Sites (or no ServerData) row."""
    row = conn.execute(
        "SELECT s.Version, s.FullVersion, s.BuildNumber, sd.ParentSiteCode FROM Sites s "
        "JOIN ServerData sd ON sd.SiteCode = s.SiteCode WHERE s.SiteCode = ?",
        (code,),
    ).fetchone()
    if row is None:
        return None
    return SiteVersion(str(row[0]), str(row[1]), int(row[2]), top_level=not row[3])
