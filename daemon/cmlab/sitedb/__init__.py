"""The site database: SQLite in WAL mode, one file per site, the guide's names."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from cmlab.sitedb import functions, triggers
from cmlab.sitedb.schema import SCHEMA, SCHEMA_VERSION

T = TypeVar("T")

SITE_TYPES = {"cas": 4, "primary": 2, "secondary": 1}


def connect(
    db_file: Path,
    site_code: str,
    *,
    durability: str = "process",
    print_sink: Callable[[str], None] | None = None,
) -> sqlite3.Connection:
    """A connection with the site functions registered. Autocommit mode: callers open their
    own transactions (`transaction()`), so nothing is committed by accident."""
    conn = sqlite3.connect(db_file, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    # In WAL mode NORMAL loses no committed transaction when the *process* dies; FULL also
    # survives power loss, at one fsync per commit.
    conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'power' else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 30000")
    functions.register(
        conn, functions.SiteFunctions(db_file, site_code.upper()), print_sink=print_sink
    )
    return conn


class transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


def create_site_db(
    db_file: Path,
    *,
    site_code: str,
    role: str,
    server: str,
    build: int,
    minor_build: int,
    parent_code: str | None = None,
    site_folder: str = "",
) -> None:
    db_file.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(db_file, site_code)
    try:
        with transaction(conn):
            for stmt in _statements(SCHEMA):
                conn.execute(stmt)
            conn.execute(
                "INSERT OR REPLACE INTO SchemaInfo (Name, Value) VALUES ('version', ?)",
                (str(SCHEMA_VERSION),),
            )
            conn.execute(
                "INSERT OR IGNORE INTO ServerData (ID, SiteCode, ParentSiteCode, SiteServerName, "
                "SiteType, IsLocal, SiteFolder) VALUES (1, ?, ?, ?, ?, 1, ?)",
                (site_code, parent_code, server, SITE_TYPES[role], site_folder),
            )
            conn.execute(
                "INSERT OR IGNORE INTO Sites (SiteCode, SiteName, Version, FullVersion, "
                "BuildNumber, ReportingSiteCode, ServerName, Type) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    site_code,
                    f"{site_code} lab site",
                    f"5.00.{build}.1000",
                    f"5.00.{build}.10{minor_build:02d}",
                    build,
                    parent_code,
                    server,
                    SITE_TYPES[role],
                ),
            )
            triggers.install_triggers(conn, site_code)
    finally:
        conn.close()


def _statements(script: str) -> list[str]:
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out


def split_statements(script: str) -> list[str]:
    return _statements(script)


class SiteDB:
    """The process's connection, used from one dedicated thread so that database work never
    blocks the event loop and never interleaves two transactions on one connection."""

    def __init__(
        self,
        db_file: Path,
        site_code: str,
        *,
        durability: str = "process",
    ) -> None:
        self.db_file = db_file
        self.site_code = site_code
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sitedb")
        self._conn: sqlite3.Connection | None = None
        self._durability = durability

    def _get(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect(self.db_file, self.site_code, durability=self._durability)
        return self._conn

    def _run_tx(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = self._get()
        with transaction(conn):
            return fn(conn, *args)

    def _run_read(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        return fn(self._get(), *args)

    async def tx(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` in one committed transaction; returns when it is durable."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run_tx, fn, args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run_read, fn, args)

    def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """For code already on a worker thread: run on the DB thread and wait."""
        return self._executor.submit(self._run_tx, fn, args).result()

    def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._executor.submit(_close).result()
        self._executor.shutdown(wait=True)
