"""SQL that cmlab did not write: an update's applicability script (HMAN runs it during
synchronization) and the administrator's query (`cmlab sql`). Both come in the guide's T-SQL
spelling (`dbo.`, `TOP n`, `convert(NVARCHAR(n), x)`), which `tsql_to_sqlite` turns into
SQLite's."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cmlab.site.sitedb import connect, split_statements
from cmlab.site.sitedb.functions import tsql_to_sqlite

__all__ = ["connect_for_script", "run_query", "run_script"]


def connect_for_script(
    db_file: Path, site_code: str, *, timeout: float, print_sink: Callable[[str], None]
) -> sqlite3.Connection:
    """A connection of its own for one script: what the script PRINTs goes to `print_sink`,
    and a statement still running `timeout` seconds from now is interrupted (sqlite3's
    OperationalError "interrupted"). The caller closes it."""
    conn = connect(db_file, site_code, print_sink=print_sink)
    deadline = time.monotonic() + timeout
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    return conn


def run_script(conn: sqlite3.Connection, script: str) -> tuple[int, object]:
    """Run `script` read-only (PRAGMA query_only), statement by statement. Returns how many
    statements it has (0: nothing was run) and the last one's first column (None when it
    returned no row). Raises sqlite3.Error for a statement that fails or is interrupted."""
    conn.execute("PRAGMA query_only = 1")
    value: object = None
    statements = split_statements(script)
    for stmt in statements:
        row = conn.execute(tsql_to_sqlite(stmt)).fetchone()
        value = None if row is None or len(row) == 0 else row[0]
    return len(statements), value


def run_query(
    conn: sqlite3.Connection, query: str, params: Sequence[Any] = ()
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """One query of the administrator's: (column names, rows)."""
    cur = conn.execute(tsql_to_sqlite(query), tuple(params))
    rows = cur.fetchall()
    cols = [d[0] for d in cur.description or []]
    return cols, rows
