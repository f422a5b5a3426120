"""The site database: SQLite in WAL mode, one file per site, the guide's names."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from cmlab.site.sitedb import functions, triggers
from cmlab.site.sitedb.schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION

T = TypeVar("T")
P = ParamSpec("P")

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


def migrate(conn: sqlite3.Connection) -> int:
    """Bring a site database made by an older cmlab up to SCHEMA_VERSION; returns the version
    it was at. Each step commits with its new version number, so an interrupted upgrade
    resumes where it stopped."""
    row = conn.execute("SELECT Value FROM SchemaInfo WHERE Name = 'version'").fetchone()
    found = int(row[0]) if row else SCHEMA_VERSION
    for version in range(found + 1, SCHEMA_VERSION + 1):
        with transaction(conn):
            for stmt in MIGRATIONS.get(version, ()):
                if not _adds_existing_column(conn, stmt):
                    conn.execute(stmt)
            conn.execute("UPDATE SchemaInfo SET Value = ? WHERE Name = 'version'", (str(version),))
    if found < SCHEMA_VERSION:
        # New tables, views and triggers are all CREATE ... IF NOT EXISTS: add what is missing.
        local = conn.execute("SELECT SiteCode FROM ServerData WHERE IsLocal = 1").fetchone()
        with transaction(conn):
            for stmt in split_statements(SCHEMA):
                conn.execute(stmt)
            if local is not None:
                triggers.install_triggers(conn, str(local[0]))
    return found


def _adds_existing_column(conn: sqlite3.Connection, stmt: str) -> bool:
    """An `ALTER TABLE t ADD COLUMN c` whose column is there already (a database whose
    version was set back by hand, or tables made from a newer SCHEMA): nothing to do."""
    words = stmt.split()
    if [w.upper() for w in words[:2]] != ["ALTER", "TABLE"] or len(words) < 6:
        return False
    if [w.upper() for w in words[3:5]] != ["ADD", "COLUMN"]:
        return False
    cols = {str(r[1]).lower() for r in conn.execute(f"PRAGMA table_info({words[2]})")}
    return words[5].lower() in cols


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


@contextlib.contextmanager
def connected(
    db_file: Path, site_code: str, *, durability: str = "process"
) -> Iterator[sqlite3.Connection]:
    """A connection for one command (`connect`), closed on every path."""
    conn = connect(db_file, site_code, durability=durability)
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def one_transaction(
    db_file: Path, site_code: str, *, durability: str = "process"
) -> Iterator[sqlite3.Connection]:
    """connect, BEGIN IMMEDIATE ... COMMIT (ROLLBACK when the block raises), close: an
    administrator's action as one transaction, as the commands run them."""
    with connected(db_file, site_code, durability=durability) as conn, transaction(conn):
        yield conn


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
            for stmt in split_statements(SCHEMA):
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


def split_statements(script: str) -> list[str]:
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


@dataclass
class _Job:
    fn: Callable[..., Any]  # checked against args and kwargs where the job is made (tx, read)
    args: tuple[object, ...]
    kwargs: dict[str, object]
    write: bool
    future: Future[Any]


class SiteDBClosed(RuntimeError):
    """A job reached the site database after the daemon closed it (a handler abandoned at
    shutdown); the drop file stays and is handled at the next start."""


class SiteDB:
    """The process's connection, owned by one thread, so database work never blocks the event
    loop and never interleaves two transactions on one connection.

    Group commit: write jobs that queue up while a transaction runs are committed together,
    each inside its own SAVEPOINT, so one failing job rolls back alone and the others share one
    COMMIT. A caller's `tx()` returns only after the COMMIT that contains its job succeeded."""

    BATCH = 128

    def __init__(self, db_file: Path, site_code: str, *, durability: str = "process") -> None:
        self.db_file = db_file
        self.site_code = site_code
        self._durability = durability
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="sitedb", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn: sqlite3.Connection | None = None
        while True:
            job = self._queue.get()
            if job is None:
                break
            batch = [job]
            while len(batch) < self.BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            try:
                if conn is None:
                    conn = connect(self.db_file, self.site_code, durability=self._durability)
                self._run_batch(conn, batch)
            except BaseException as exc:  # delivered to every caller of the batch
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)
        if conn is not None:
            conn.close()
        # Jobs that raced close(): fail them, or their callers would wait forever (and a worker
        # thread waiting forever keeps the process from exiting).
        while True:
            try:
                late = self._queue.get_nowait()
            except queue.Empty:
                break
            if late is not None and not late.future.done():
                late.future.set_exception(SiteDBClosed("the site database is closed"))

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        results: list[tuple[_Job, bool, Any]] = []
        writes = any(j.write for j in batch)
        if writes:
            conn.execute("BEGIN IMMEDIATE")
        try:
            for j in batch:
                if writes:
                    conn.execute("SAVEPOINT job")
                try:
                    value = j.fn(conn, *j.args, **j.kwargs)
                except Exception as exc:
                    if writes:
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                    results.append((j, False, exc))
                else:
                    if writes:
                        conn.execute("RELEASE job")
                    results.append((j, True, value))
            if writes:
                conn.execute("COMMIT")
        except BaseException:
            if writes and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        for j, ok, value in results:
            if ok:
                j.future.set_result(value)
            else:
                j.future.set_exception(value)

    def _submit(
        self,
        fn: Callable[..., T],
        args: tuple[object, ...],
        kwargs: dict[str, object],
        write: bool,
    ) -> Future[T]:
        future: Future[T] = Future()
        if self._closed:
            future.set_exception(SiteDBClosed("the site database is closed"))
            return future
        self._queue.put(_Job(fn, args, kwargs, write, future))
        return future

    # The three entry points take `fn`'s own parameters after the connection (ParamSpec), so
    # mypy checks every `db.tx(query, a, b)` against `query(conn, a, b)` and types its result.

    async def tx(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run `fn(conn, *args, **kwargs)` in a committed transaction; returns when it is
        durable."""
        return await asyncio.wrap_future(self._submit(fn, args, kwargs, True))

    async def read(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run the query `fn(conn, *args, **kwargs)`: no transaction of its own (in a batch
        with writes it runs inside theirs)."""
        return await asyncio.wrap_future(self._submit(fn, args, kwargs, False))

    def call_sync(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """For code already on a worker thread: run a transaction on the DB thread and wait."""
        return self._submit(fn, args, kwargs, True).result()

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join()
