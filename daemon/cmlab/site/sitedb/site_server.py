"""The site server as the site database emulates it (docs/installation.md): its Windows
services (SiteServices, each with the build it runs), its registry values (SiteRegistry), and
its client upgrade settings (ClientUpgradeSettings). CMUpdate's installation, HMAN's
post-installation step and a secondary site's reinstallation read and write them here.

The registry key paths are the installation's (`cmlab.site.installation`), passed in.
Each function runs inside the caller's transaction and is safe to replay."""

from __future__ import annotations

import enum
import sqlite3

__all__ = [
    "SETTINGS_COLUMNS",
    "ServiceBrokerState",
    "ServiceState",
    "WmiProvidersState",
    "client_upgrade_ids",
    "load_client_upgrade_settings",
    "piloting_advertisement_id",
    "post_install_facts",
    "service_build",
    "set_installed_version",
    "set_registry_value",
    "set_service_build",
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


def post_install_facts(conn: sqlite3.Connection, site_code: str, rcm_key: str) -> dict[str, object]:
    """What CMUpdate's post-installation check reads: each service's `State:Build`, the
    replication monitor's `Build Number` (under `rcm_key`), how many of SMSDBMon's HMAN
    triggers exist, and this site's child sites."""
    services = dict(conn.execute("SELECT ServiceName, State || ':' || Build FROM SiteServices"))
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
