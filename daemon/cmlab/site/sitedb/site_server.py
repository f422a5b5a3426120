"""The emulated site server's tables, as the install steps read and change them: the local
`Sites` row, `SiteServerSettings` (Service Broker, WMI), `SiteServices`, `SiteRegistry`,
`SiteInstallScripts`, `SiteInstallSteps`, `CM_UpgradeHistory`, and the SMSDBMon triggers
the install drops (docs/installation.md, "Tables"); and what HMAN's post-installation step
and a secondary site's reinstallation read and write: the services' builds, registry values
and the client upgrade settings (`ClientUpgradeSettings`). The registry key paths are the
installation's (`cmlab.site.installation`), passed in.

Why it exists: the SQL lives in sitedb, so cmlab.site.installation says what a step means
and this module how the rows say it. Every function runs inside the caller's transaction
(`sitedb.transaction`) and commits nothing, so a step's changes still commit together; the
one exception is `scripts_transaction`, the pre-upgrade scripts' own transaction.

What it promises: a `set_*` function returns the old value and leaves a row that already
holds the value untouched (its LastUpdateTime too), so a step run twice leaves exactly what
one run leaves.
"""

from __future__ import annotations

import contextlib
import enum
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, TypedDict

__all__ = [
    "SETTINGS_COLUMNS",
    "InstalledVersion",
    "PostInstallFacts",
    "ServiceBrokerState",
    "ServiceState",
    "WmiProvidersState",
    "applied_scripts",
    "client_upgrade_ids",
    "completed_steps",
    "database_name",
    "drop_trigger",
    "forget_steps",
    "forget_upgrade",
    "load_client_upgrade_settings",
    "local_site",
    "piloting_advertisement_id",
    "post_install_facts",
    "record_scripts",
    "record_step",
    "record_upgrade",
    "registry_rows",
    "replace_registry",
    "run_script_statement",
    "scripts_transaction",
    "seed_site_server",
    "server_and_folder",
    "service_build",
    "service_builds",
    "service_names",
    "set_installed_version",
    "set_registry",
    "set_registry_value",
    "set_service",
    "set_service_build",
    "set_setting",
    "set_site_version",
    "setting",
    "settings",
    "table_exists",
    "trigger_exists",
]


class ServiceState(enum.StrEnum):
    """SiteServices.State: a Windows service of the site server."""

    RUNNING = "Running"
    STOPPED = "Stopped"


class ServiceBrokerState(enum.StrEnum):
    """SiteServerSettings' ServiceBroker value: SQL Server Service Broker on the site
    database, turned off and on again by the install steps SSB_OFF and SSB_ON."""

    ON = "ON"
    OFF = "OFF"


class WmiProvidersState(enum.StrEnum):
    """SiteServerSettings' WMIProviders value: the SMS Provider's WMI providers, unloaded while
    the installation replaces the site server's files."""

    LOADED = "Loaded"
    UNLOADED = "Unloaded"


class InstalledVersion(NamedTuple):
    """A `Sites` row's version columns."""

    version: str  # Version, e.g. 5.00.9135.1000
    full_version: str  # FullVersion, e.g. 5.00.9135.1006
    build: int  # BuildNumber


# -- Sites and ServerData -------------------------------------------------------------------


def local_site(conn: sqlite3.Connection, site_code: str) -> InstalledVersion | None:
    """The site's `Sites` row; None when it has none."""
    row = conn.execute(
        "SELECT Version, FullVersion, BuildNumber FROM Sites WHERE SiteCode = ?", (site_code,)
    ).fetchone()
    return None if row is None else InstalledVersion(str(row[0]), str(row[1]), int(row[2]))


def set_site_version(conn: sqlite3.Connection, site_code: str, site: InstalledVersion) -> None:
    conn.execute(
        "UPDATE Sites SET Version = ?, FullVersion = ?, BuildNumber = ? WHERE SiteCode = ?",
        (site.version, site.full_version, site.build, site_code),
    )


def server_and_folder(conn: sqlite3.Connection, site_code: str) -> tuple[str, str]:
    """The site's server name and folder from ServerData; ("", "") when it has no row."""
    row = conn.execute(
        "SELECT SiteServerName, SiteFolder FROM ServerData WHERE SiteCode = ?", (site_code,)
    ).fetchone()
    return (str(row[0]), str(row[1] or "")) if row else ("", "")


def database_name(conn: sqlite3.Connection) -> str:
    """The file name of the connection's main database ("site.db" for one in memory)."""
    row = conn.execute("PRAGMA database_list").fetchone()
    return Path(str(row[2])).name if row and row[2] else "site.db"


# -- SiteServerSettings, SiteServices, SiteRegistry -------------------------------------------


def seed_site_server(
    conn: sqlite3.Connection,
    *,
    settings: Mapping[str, str],
    services: Iterable[tuple[str, str, int]],
    registry: Iterable[tuple[str, str, str]],
) -> None:
    """Add the rows given where missing (INSERT OR IGNORE): a row already there, changed by
    a step or by hand, is kept. `services` are (name, state, build), `registry` are
    (key, name, value)."""
    conn.executemany(
        "INSERT OR IGNORE INTO SiteServerSettings (Name, Value) VALUES (?, ?)", settings.items()
    )
    conn.executemany(
        "INSERT OR IGNORE INTO SiteServices (ServiceName, State, Build) VALUES (?, ?, ?)",
        services,
    )
    conn.executemany(
        "INSERT OR IGNORE INTO SiteRegistry (KeyPath, Name, Value) VALUES (?, ?, ?)", registry
    )


def setting(conn: sqlite3.Connection, name: str) -> str | None:
    row = conn.execute("SELECT Value FROM SiteServerSettings WHERE Name = ?", (name,)).fetchone()
    return None if row is None else str(row[0])


def set_setting(conn: sqlite3.Connection, name: str, value: str) -> str | None:
    """Set a setting; returns its old value. An unchanged row keeps its LastUpdateTime, so a
    step run twice leaves exactly what one run leaves."""
    old = setting(conn, name)
    conn.execute(
        "INSERT INTO SiteServerSettings (Name, Value) VALUES (?, ?) ON CONFLICT (Name) DO UPDATE "
        "SET Value = excluded.Value, LastUpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') "
        "WHERE Value IS NOT excluded.Value",
        (name, value),
    )
    return old


def set_registry(conn: sqlite3.Connection, key: str, name: str, value: str) -> str | None:
    """Set a registry value; returns its old value."""
    row = conn.execute(
        "SELECT Value FROM SiteRegistry WHERE KeyPath = ? AND Name = ?", (key, name)
    ).fetchone()
    conn.execute(
        "INSERT INTO SiteRegistry (KeyPath, Name, Value) VALUES (?, ?, ?) "
        "ON CONFLICT (KeyPath, Name) DO UPDATE SET Value = excluded.Value",
        (key, name, value),
    )
    return None if row is None else str(row[0])


def set_service(
    conn: sqlite3.Connection, name: str, state: str, build: int | None = None
) -> str | None:
    """Set a service's state (and the build it was installed from, unless None); returns its
    old state."""
    row = conn.execute("SELECT State FROM SiteServices WHERE ServiceName = ?", (name,)).fetchone()
    conn.execute(
        "INSERT INTO SiteServices (ServiceName, State, Build) VALUES (?, ?, ?) "
        "ON CONFLICT (ServiceName) DO UPDATE SET State = excluded.State, "
        "Build = coalesce(excluded.Build, Build), "
        "LastUpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') "
        "WHERE State IS NOT excluded.State OR Build IS NOT coalesce(excluded.Build, Build)",
        (name, state, build),
    )
    return None if row is None else str(row[0])


def service_names(conn: sqlite3.Connection) -> list[str]:
    return [str(name) for (name,) in conn.execute("SELECT ServiceName FROM SiteServices")]


def registry_rows(conn: sqlite3.Connection) -> list[list[str]]:
    """Every SiteRegistry row as [key, name, value], in key and name order."""
    return [
        [str(k), str(n), str(v)]
        for k, n, v in conn.execute(
            "SELECT KeyPath, Name, Value FROM SiteRegistry ORDER BY KeyPath, Name"
        )
    ]


def settings(conn: sqlite3.Connection) -> dict[str, str]:
    """Every SiteServerSettings row, name -> value, in name order."""
    return {
        str(n): str(v)
        for n, v in conn.execute("SELECT Name, Value FROM SiteServerSettings ORDER BY Name")
    }


def service_builds(conn: sqlite3.Connection) -> dict[str, int | None]:
    """Every SiteServices row, name -> build, in name order."""
    return {
        str(n): b for n, b in conn.execute("SELECT ServiceName, Build FROM SiteServices ORDER BY 1")
    }


def replace_registry(
    conn: sqlite3.Connection, keys: Iterable[str], rows: Iterable[Sequence[str]]
) -> None:
    """The registry keys `keys` hold exactly `rows` ([key, name, value]) afterwards; a row of
    another key is ignored."""
    wanted = tuple(keys)
    for key in wanted:
        conn.execute("DELETE FROM SiteRegistry WHERE KeyPath = ?", (key,))
    conn.executemany(
        "INSERT OR REPLACE INTO SiteRegistry (KeyPath, Name, Value) VALUES (?, ?, ?)",
        [tuple(r) for r in rows if r[0] in wanted],
    )


# -- the schema: tables and SMSDBMon's triggers --------------------------------------------


def table_exists(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ? COLLATE NOCASE", (name,)
    ).fetchone()
    return row is not None


def trigger_exists(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?", (name,)
    ).fetchone()
    return row is not None


def drop_trigger(conn: sqlite3.Connection, name: str) -> bool:
    """Drop the trigger `name` if it exists; returns whether it did."""
    if not trigger_exists(conn, name):
        return False
    conn.execute(f'DROP TRIGGER "{name}"')
    return True


# -- an update's installation: steps, scripts, upgrade history -------------------------------


def record_step(conn: sqlite3.Connection, guid: str, step_id: int, action: str) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO SiteInstallSteps (PackageGuid, StepID, Action) VALUES (?, ?, ?)",
        (guid, step_id, action),
    )


def completed_steps(conn: sqlite3.Connection, guid: str) -> frozenset[int]:
    rows = conn.execute(
        "SELECT StepID FROM SiteInstallSteps WHERE PackageGuid = ?", (guid,)
    ).fetchall()
    return frozenset(int(r[0]) for r in rows)


def forget_steps(conn: sqlite3.Connection, guid: str) -> None:
    conn.execute("DELETE FROM SiteInstallSteps WHERE PackageGuid = ?", (guid,))


def applied_scripts(conn: sqlite3.Connection, guid: str) -> dict[str, str]:
    """The pre-upgrade scripts applied for the update: name -> SHA-256."""
    return {
        str(n): str(h)
        for n, h in conn.execute(
            "SELECT ScriptName, ScriptHash FROM SiteInstallScripts WHERE PackageGuid = ?",
            (guid,),
        )
    }


@contextlib.contextmanager
def scripts_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT around the pre-upgrade scripts, ROLLBACK on any error.
    Unlike `transaction`, the ROLLBACK is skipped when SQLite has already ended the
    transaction itself (some errors of a foreign script do), so the script's error is the one
    raised."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def run_script_statement(conn: sqlite3.Connection, statement: str) -> None:
    """One statement of a pre-upgrade script, inside `scripts_transaction`."""
    conn.execute(statement)


def record_scripts(conn: sqlite3.Connection, guid: str, scripts: Mapping[str, str]) -> None:
    """The update's applied scripts are exactly `scripts` (name -> SHA-256)."""
    conn.execute("DELETE FROM SiteInstallScripts WHERE PackageGuid = ?", (guid,))
    conn.executemany(
        "INSERT INTO SiteInstallScripts (PackageGuid, ScriptName, ScriptHash) VALUES (?, ?, ?)",
        [(guid, name, digest) for name, digest in scripts.items()],
    )


def record_upgrade(conn: sqlite3.Connection, guid: str, from_build: int, to_build: int) -> None:
    """A CM_UpgradeHistory row for the update, once per target build. The sample's
    pre-upgrade script creates the table; a payload without one still gets its upgrade
    recorded."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS CM_UpgradeHistory (PackageGUID TEXT NOT NULL, "
        "FromBuild INTEGER, ToBuild INTEGER NOT NULL, StartedAt TEXT NOT NULL DEFAULT "
        "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"
    )
    seen = conn.execute(
        "SELECT 1 FROM CM_UpgradeHistory WHERE upper(PackageGUID) = upper(?) AND ToBuild = ?",
        (guid, to_build),
    ).fetchone()
    if seen is None:
        conn.execute(
            "INSERT INTO CM_UpgradeHistory (PackageGUID, FromBuild, ToBuild) VALUES (?, ?, ?)",
            (guid, from_build, to_build),
        )


def forget_upgrade(conn: sqlite3.Connection, guid: str) -> None:
    """Remove the update's CM_UpgradeHistory rows, if the table exists."""
    if table_exists(conn, "CM_UpgradeHistory"):
        conn.execute("DELETE FROM CM_UpgradeHistory WHERE upper(PackageGUID) = upper(?)", (guid,))


# -- services, registry and client upgrade settings (post-installation, secondary sites) ---


def service_build(conn: sqlite3.Connection, name: str) -> int | None:
    """The build the service `name` runs; None when it has no row or no build."""
    row = conn.execute("SELECT Build FROM SiteServices WHERE ServiceName = ?", (name,)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def set_service_build(conn: sqlite3.Connection, name: str, build: int) -> None:
    """The service `name` is Running at `build` (a row unchanged is not written)."""
    conn.execute(
        "INSERT INTO SiteServices (ServiceName, State, Build) VALUES (?, ?, ?) "
        "ON CONFLICT (ServiceName) DO UPDATE SET State = excluded.State, Build = excluded.Build, "
        "LastUpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') "
        "WHERE SiteServices.State <> excluded.State OR SiteServices.Build IS NOT excluded.Build",
        (name, ServiceState.RUNNING, build),
    )


def set_registry_value(conn: sqlite3.Connection, key: str, name: str, value: str) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO SiteRegistry (KeyPath, Name, Value) VALUES (?, ?, ?)",
        (key, name, value),
    )


def set_installed_version(
    conn: sqlite3.Connection,
    site_code: str,
    *,
    build: int,
    version: str,
    full_version: str,
    registry_keys: tuple[str, ...],
) -> None:
    """This site now runs `build`: its Sites row, every service's build, and the `Full
    Version` and `Build Number` values under each of `registry_keys`, where they exist."""
    conn.execute(
        "UPDATE Sites SET Version = ?, FullVersion = ?, BuildNumber = ? WHERE SiteCode = ?",
        (version, full_version, build, site_code),
    )
    conn.execute("UPDATE SiteServices SET Build = ? WHERE Build IS NOT ?", (build, build))
    for key in registry_keys:
        conn.execute(
            "UPDATE SiteRegistry SET Value = ? WHERE KeyPath = ? AND Name = 'Full Version'",
            (full_version, key),
        )
        conn.execute(
            "UPDATE SiteRegistry SET Value = ? WHERE KeyPath = ? AND Name = 'Build Number'",
            (str(build), key),
        )


class PostInstallFacts(TypedDict):
    services: dict[str, str]  # ServiceName -> "State:Build"
    rcm_build: str | None
    hman_triggers: int
    children: list[str]


def post_install_facts(conn: sqlite3.Connection, site_code: str, rcm_key: str) -> PostInstallFacts:
    """What CMUpdate's post-installation check reads: each service's `State:Build`, the
    replication monitor's `Build Number` (under `rcm_key`), how many of SMSDBMon's HMAN
    triggers exist, and this site's child sites."""
    services: dict[str, str] = dict(
        conn.execute("SELECT ServiceName, State || ':' || Build FROM SiteServices")
    )
    rcm = conn.execute(
        "SELECT Value FROM SiteRegistry WHERE KeyPath = ? AND Name = 'Build Number'", (rcm_key,)
    ).fetchone()
    triggers = conn.execute(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger' AND name LIKE '%\\_HMAN' "
        "ESCAPE '\\'"
    ).fetchone()[0]
    children = [
        str(r[0])
        for r in conn.execute(
            "SELECT SiteCode FROM ServerData WHERE ParentSiteCode = ? ORDER BY SiteCode",
            (site_code,),
        )
    ]
    return {
        "services": services,
        "rcm_build": None if rcm is None else str(rcm[0]),
        "hman_triggers": int(triggers),
        "children": children,
    }


# -- ClientUpgradeSettings ------------------------------------------------------------------------


def client_upgrade_ids(site_code: str) -> dict[str, str]:
    """The IDs of the client packages and deployments a site creates at its installation."""
    return {
        "FullClientPackageID": f"{site_code}00004",
        "StagingClientPackageID": f"{site_code}00008",
        "ClientUpgradePackageID": f"{site_code}00005",
        "PilotingUpgradePackageID": f"{site_code}00009",
        "ClientUpgradeAdvertisementID": f"{site_code}20000",
    }


def piloting_advertisement_id(site_code: str) -> str:
    return f"{site_code}20001"


SETTINGS_COLUMNS = (
    "FullClientPackageID",
    "StagingClientPackageID",
    "ClientUpgradePackageID",
    "PilotingUpgradePackageID",
    "ClientUpgradeAdvertisementID",
    "ClientPilotingAdvertisementID",
)


def load_client_upgrade_settings(
    conn: sqlite3.Connection, site_code: str, piloting: bool
) -> dict[str, str | None]:
    """The site's ClientUpgradeSettings row, seeded on first use; the piloting deployment
    exists only while piloting is on."""
    ids = client_upgrade_ids(site_code)
    conn.execute(
        "INSERT OR IGNORE INTO ClientUpgradeSettings (SiteCode, "
        + ", ".join(ids)
        + ") VALUES (?, "
        + ", ".join("?" for _ in ids)
        + ")",
        (site_code, *ids.values()),
    )
    wanted = piloting_advertisement_id(site_code) if piloting else None
    conn.execute(
        "UPDATE ClientUpgradeSettings SET ClientPilotingAdvertisementID = ?, "
        "LastUpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') "
        "WHERE SiteCode = ? AND ClientPilotingAdvertisementID IS NOT ?",
        (wanted, site_code, wanted),
    )
    row = conn.execute(
        f"SELECT {', '.join(SETTINGS_COLUMNS)} FROM ClientUpgradeSettings WHERE SiteCode = ?",
        (site_code,),
    ).fetchone()
    return {k: (None if v is None else str(v)) for k, v in zip(SETTINGS_COLUMNS, row, strict=True)}
