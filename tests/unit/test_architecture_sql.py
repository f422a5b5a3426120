"""All SQL lives in `cmlab.site.sitedb`: components and commands call its named functions
(the guide's stored procedures under their own names), so only sitedb knows the schema.

The check walks daemon/cmlab with `ast` and counts, per module outside site/sitedb/, every way
the code runs SQL or reaches around sitedb to the database:

- a call of `.execute(`, `.executemany(` or `.executescript(` on anything;
- a call of the other sqlite3 connection methods that run SQL or change how it runs
  (`commit`, `rollback`, `backup`, `iterdump`, `create_function`, `set_progress_handler`...);
- `sqlite3.connect(...)`: a connection opened behind sitedb's back (`sitedb.connect` is the
  one that registers the site functions);
- a string literal that is a SQL statement (it starts `SELECT ... FROM`, `INSERT INTO`,
  `UPDATE t SET`, `DELETE FROM`, `CREATE TABLE`, `PRAGMA`, `BEGIN`...; upper case, as cmlab
  writes SQL) outside such a call: SQL built in one place and handed to a helper to run.
  Docstrings are not code and are left out.

Every module must count 0, except the allow-list below."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path

import cmlab

PACKAGE = Path(cmlab.__file__).resolve().parent
SITEDB = "site/sitedb/"

# Modules allowed to run SQL of their own outside site/sitedb/, with their count: the check
# fails if one grows. Empty since issue 13 moved the last ones (site/installation.py, 39
# calls) into sitedb; keep it empty.
ALLOWED: dict[str, int] = {}

SQL_CALLS = frozenset({"execute", "executemany", "executescript"})
# sqlite3.Connection methods that run SQL (commit, rollback), copy or dump the database, or
# change how SQL runs on the connection.
CONNECTION_CALLS = frozenset(
    {
        "commit",
        "rollback",
        "backup",
        "iterdump",
        "blobopen",
        "create_function",
        "create_aggregate",
        "create_window_function",
        "create_collation",
        "set_authorizer",
        "set_progress_handler",
        "set_trace_callback",
        "enable_load_extension",
        "load_extension",
    }
)
SQL_TEXT = re.compile(
    r"\s*(?:SELECT\b.*\bFROM\b|SELECT\s+\w+\s*\(|INSERT\s+(?:OR\s+[A-Z]+\s+)?INTO\b"
    r"|REPLACE\s+INTO\b|UPDATE\s+\w+\s+SET\b|DELETE\s+FROM\b"
    r"|(?:CREATE|DROP)\s+(?:TEMP\s+|UNIQUE\s+)?(?:TABLE|VIEW|TRIGGER|INDEX)\b"
    r"|ALTER\s+TABLE\b|PRAGMA\s+\w|BEGIN(?:\s+(?:IMMEDIATE|EXCLUSIVE|DEFERRED))?\s*$"
    r"|COMMIT\s*$|ROLLBACK\b|SAVEPOINT\s+\w|RELEASE\s+\w+\s*$|WITH\s+\w+\s+AS\s*\()",
    re.DOTALL,
)


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _text(node: ast.AST) -> str | None:
    """The literal text of a string or f-string (its placeholders left out)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
        )
    return None


def sql_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for every way `source` runs SQL; see the module's docstring."""
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    inside_call: set[int] = set()  # the nodes under a counted call: its SQL is not counted again
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        what = None
        if isinstance(func, ast.Attribute) and func.attr in SQL_CALLS | CONNECTION_CALLS:
            what = f".{func.attr}()"
        elif (
            isinstance(func, ast.Attribute)
            and func.attr == "connect"
            and isinstance(func.value, ast.Name)
            and func.value.id == "sqlite3"
        ):
            what = "sqlite3.connect()"
        if what is not None:
            found.append((node.lineno, what))
            inside_call.update(id(n) for n in ast.walk(node))
    skip = inside_call | _docstrings(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)  # the f-string is one string, not several
        text = _text(node)
        if text is not None and SQL_TEXT.match(text):
            found.append((getattr(node, "lineno", 0), f"SQL text {text.strip()[:50]!r}"))
    return sorted(found)


def count_sql(source: str) -> int:
    return len(sql_uses(source))


def sql_by_module(package: Path) -> dict[str, int]:
    """Module (path under the package, with `/`) -> its count, for every module outside
    site/sitedb/ that runs SQL."""
    counts = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel.startswith(SITEDB):
            continue
        n = count_sql(path.read_text(encoding="utf-8"))
        if n:
            counts[rel] = n
    return counts


def violations(counts: Mapping[str, int], allowed: Mapping[str, int]) -> list[str]:
    return [
        f"{module}: {n} (allowed {allowed.get(module, 0)})"
        for module, n in sorted(counts.items())
        if n > allowed.get(module, 0)
    ]


def _table(counts: Mapping[str, int]) -> str:
    rows = [f"  {n:4}  {module}" for module, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return "\n".join(rows) or "  (none)"


def test_sql_runs_only_in_sitedb() -> None:
    counts = sql_by_module(PACKAGE)
    bad = violations(counts, ALLOWED)
    where = [
        f"  {module}:{line}: {what}"
        for module in sorted(counts)
        if module not in ALLOWED
        for line, what in sql_uses((PACKAGE / module).read_text(encoding="utf-8"))
    ]
    assert not bad, (
        "SQL outside site/sitedb/ (move it into a named function there):\n"
        + "\n".join(f"  {b}" for b in bad)
        + "\n"
        + "\n".join(where)
        + "\nSQL calls per module outside site/sitedb/:\n"
        + _table(counts)
    )


def test_the_allow_list_names_modules_that_exist() -> None:
    missing = [m for m in ALLOWED if not (PACKAGE / m).is_file()]
    assert not missing, f"allow-list entries for modules that are gone: {missing}"


# -- the check bites ------------------------------------------------------------------------------


def test_the_counter_sees_an_execute_call() -> None:
    source = (
        "def state(conn, guid):\n"
        '    return conn.execute("SELECT State FROM CM_UpdatePackages WHERE PackageGuid = ?",'
        " (guid,)).fetchone()\n"
    )
    assert count_sql(source) == 1  # the call, not its SQL text a second time


def test_the_counter_sees_every_way_of_running_sql() -> None:
    source = '''
import sqlite3

QUERY = "SELECT ID FROM SyncHistory"
UPSERT = f"INSERT OR REPLACE INTO {TABLE} (Name) VALUES (?)"

def run(conn, helper, ids):
    """Docstrings may say SELECT State FROM CM_UpdatePackages: not counted."""
    conn.executemany("DELETE FROM TableChangeNotifications WHERE ID = ?", ids)
    conn.executescript("BEGIN; COMMIT;")
    cur = conn.cursor()
    cur.execute(QUERY)
    helper(conn, "UPDATE SchedulerJobs SET State = 'Failed'")
    conn.commit()
    conn.create_function("fnX", 0, lambda: 1)
    return sqlite3.connect("site.db")
'''
    uses = sql_uses(source)
    assert [what for _, what in uses] == [
        "SQL text 'SELECT ID FROM SyncHistory'",
        "SQL text 'INSERT OR REPLACE INTO  (Name) VALUES (?)'",
        ".executemany()",
        ".executescript()",
        ".execute()",
        "SQL text \"UPDATE SchedulerJobs SET State = 'Failed'\"",
        ".commit()",
        ".create_function()",
        "sqlite3.connect()",
    ]


def test_the_counter_leaves_prose_and_other_calls_alone() -> None:
    source = '''
"""Selecting the update from the list. SELECT Name FROM v_X shows it."""
log("Update package is not in CM_UpdatePackages: removing its leftover rows")
say("Select the update and click Install")
print(f"Check the Package Guid (SELECT Name, PackageGuid FROM v_Localized) of {guid}")
text = "BEGIN_COMPONENT_FILELIST"
parser.add_argument("query", help="run a query against the site database")
conn = connect(db_file, site_code)
'''
    assert sql_uses(source) == []


def test_an_execute_in_a_component_fails_the_check(tmp_path: Path) -> None:
    (tmp_path / "components").mkdir()
    (tmp_path / "site" / "sitedb").mkdir(parents=True)
    (tmp_path / "components" / "newcomp.py").write_text(
        "def poke(conn):\n    conn.execute('UPDATE SyncHistory SET Result = NULL')\n"
    )
    (tmp_path / "site" / "sitedb" / "procs.py").write_text(
        "def poke(conn):\n    conn.execute('UPDATE SyncHistory SET Result = NULL')\n"
    )
    (tmp_path / "site" / "installation.py").write_text("x = conn.execute('SELECT 1')\n" * 3)
    counts = sql_by_module(tmp_path)
    assert counts == {"components/newcomp.py": 1, "site/installation.py": 3}
    assert violations(counts, {"site/installation.py": 3}) == [
        "components/newcomp.py: 1 (allowed 0)"
    ]
    # The allowed module may not grow either.
    assert violations(counts, {"site/installation.py": 2}) == [
        "components/newcomp.py: 1 (allowed 0)",
        "site/installation.py: 3 (allowed 2)",
    ]
