"""The site functions as registered SQL functions, and the small T-SQL shim that lets the
guide's queries (`SELECT dbo.fnCurrentSiteVersion()`, `SELECT TOP 1 ...`) run on SQLite."""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path


class SiteFunctions:
    """Reads the local site's version through its own read-only connection: SQLite forbids a
    function from querying the connection that is calling it."""

    def __init__(self, db_file: Path, site_code: str) -> None:
        self.db_file = db_file
        self.site_code = site_code
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(f"file:{self.db_file}?mode=ro", uri=True, timeout=30)
            self._local.conn = conn
        return conn

    def _row(self) -> tuple[str, str, int] | None:
        row = (
            self._conn()
            .execute(
                "SELECT Version, FullVersion, BuildNumber FROM Sites WHERE SiteCode = ?",
                (self.site_code,),
            )
            .fetchone()
        )
        return None if row is None else (str(row[0]), str(row[1]), int(row[2]))

    def current_site_version(self) -> str | None:
        row = self._row()
        return None if row is None else row[0]

    def setup_full_version(self) -> str | None:
        row = self._row()
        return None if row is None else row[1]

    def current_site_version_int(self) -> int | None:
        row = self._row()
        return None if row is None else version_to_int(row[0])

    def secondary_site_cmupdate_status(self, site_code: object) -> int | None:
        """fnGetSecondarySiteCMUpdateStatus('<code>') (the hotfix note): 1 when the secondary
        site has installed every update this site has installed, else 0; NULL when the code
        is not one of this site's secondary sites. What a secondary has installed is its own
        status rows, replicated up by the CMUpdates group."""
        conn = self._conn()
        row = conn.execute(
            "SELECT s.ID FROM ServerData s JOIN ServerData l ON l.IsLocal = 1 "
            "WHERE s.SiteCode = ? AND s.SiteType = 1 AND s.ParentSiteCode = l.SiteCode",
            (str(site_code),),
        ).fetchone()
        if row is None:
            return None
        missing = conn.execute(
            "SELECT COUNT(*) FROM CM_UpdatePackageSiteStatus mine "
            "JOIN ServerData l ON l.ID = mine.SiteNumber AND l.IsLocal = 1 "
            "WHERE mine.State = 196612 AND NOT EXISTS (SELECT 1 FROM CM_UpdatePackageSiteStatus "
            "theirs WHERE theirs.PackageGuid = mine.PackageGuid AND theirs.SiteNumber = ? "
            "AND theirs.State = 196612)",
            (int(row[0]),),
        ).fetchone()
        return 0 if int(missing[0]) else 1


def version_to_int(version: str) -> int:
    """5.00.9135.1000 -> 5009135 (the guide's `500nnnn`)."""
    parts = version.split(".")
    if len(parts) < 3 or not all(p.isdigit() for p in parts[:3]):
        raise ValueError(f"not a ConfigMgr version: {version!r}")
    return int(parts[0]) * 1_000_000 + int(parts[1]) * 10_000 + int(parts[2])


def compare_versions(a: str, b: str) -> int:
    ta = tuple(int(x) for x in a.split("."))
    tb = tuple(int(x) for x in b.split("."))
    return (ta > tb) - (ta < tb)


def register(
    conn: sqlite3.Connection,
    funcs: SiteFunctions,
    *,
    print_sink: Callable[[str], None] | None = None,
) -> None:
    conn.create_function("fnCurrentSiteVersion", 0, funcs.current_site_version)
    conn.create_function("fnSetupFullVersion", 0, funcs.setup_full_version)
    conn.create_function("fnCurrentSiteVersion_INT", 0, funcs.current_site_version_int)
    conn.create_function(
        "fnGetSecondarySiteCMUpdateStatus", 1, funcs.secondary_site_cmupdate_status
    )
    conn.create_function("fnCompareVersions", 2, compare_versions, deterministic=True)
    conn.create_function("fnVersionToInt", 1, version_to_int, deterministic=True)

    def _print(message: object) -> int:
        # T-SQL's PRINT: applicability scripts explain themselves through it (`SQL MESSAGE:`).
        if print_sink is not None:
            print_sink("" if message is None else str(message))
        return 0

    conn.create_function("PRINT", 1, _print)


_DBO = re.compile(r"\bdbo\.", re.IGNORECASE)
_TOP = re.compile(r"^\s*SELECT\s+TOP\s+(\d+)\s+", re.IGNORECASE)
_CONVERT = re.compile(r"\bconvert\s*\(\s*N?VARCHAR\s*\(\s*\d+\s*\)\s*,\s*([^)]+?)\s*\)", re.I)


def tsql_to_sqlite(query: str) -> str:
    """Just enough T-SQL for the guide's queries: `dbo.` prefixes, `SELECT TOP n`, and
    `convert(NVARCHAR(n), x)`. Anything else is passed to SQLite as written."""
    q = _DBO.sub("", query.strip().rstrip(";"))
    q = _CONVERT.sub(r"CAST(\1 AS TEXT)", q)
    m = _TOP.match(q)
    if m:
        q = "SELECT " + q[m.end() :] + f" LIMIT {m.group(1)}"
    return q
