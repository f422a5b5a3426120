"""The emulated site server's state in the site database: what a working site's rows are,
the snapshot an installation saves before its first change, and the restore a rollback makes
from it.

A real site server keeps this state in SQL Server Service Broker and WMI, the Service Control
Manager and the registry; cmlab keeps it in `SiteServerSettings`, `SiteServices` and
`SiteRegistry` (docs/installation.md, "Tables"), whose SQL is cmlab.site.sitedb.site_server.
Here is what the rows mean: the registry keys, the services, Service Broker's port.

Every function runs inside the caller's transaction and commits nothing.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from cmlab.site.installation.context import InstallStepError
from cmlab.site.sitedb import site_server, triggers

__all__ = [
    "DEFAULT_SERVICES",
    "RCM_KEY",
    "REGISTRY_KEYS",
    "RUNNING",
    "SERVICE_BROKER_PORT",
    "SETUP_KEY",
    "SQL_KEY",
    "STOPPED",
    "is_snapshot",
    "local_site",
    "restore_site_state",
    "seed_site_state",
    "snapshot",
]

SETUP_KEY = r"HKLM\SOFTWARE\Microsoft\SMS\Setup"
SQL_KEY = r"HKLM\SOFTWARE\Microsoft\SMS\SQL Server"
RCM_KEY = r"HKLM\SOFTWARE\Microsoft\SMS\Components\SMS_REPLICATION_CONFIGURATION_MONITOR"
REGISTRY_KEYS = (SETUP_KEY, SQL_KEY, RCM_KEY)

RUNNING = "Running"
STOPPED = "Stopped"
SERVICE_BROKER_PORT = "4022"
# CONFIGURATION_MANAGER_UPDATE is seeded too but not in install.map's list: CMUpdate runs the
# installation, so it keeps running while the site's services are stopped.
DEFAULT_SERVICES = ("SMS_EXECUTIVE", "SMS_SITE_COMPONENT_MANAGER", "CONFIGURATION_MANAGER_UPDATE")


def local_site(conn: sqlite3.Connection, site_code: str) -> site_server.InstalledVersion:
    """The site's Sites row; InstallStepError when it has none."""
    site = site_server.local_site(conn, site_code)
    if site is None:
        raise InstallStepError(
            f"the site database has no Sites row for site {site_code}; is this the right site?"
        )
    return site


def seed_site_state(conn: sqlite3.Connection, site_code: str) -> None:
    """The rows of a working site (Service Broker ON, WMI loaded, services running, registry
    from the Sites row), where missing: INSERT OR IGNORE, inside the caller's transaction.
    So a site database made before these tables existed works the same."""
    version, full_version, build = local_site(conn, site_code)
    server, folder = site_server.server_and_folder(conn, site_code)
    db_name = site_server.database_name(conn)
    settings = {
        "ServiceBroker": "ON",
        "ServiceBrokerPort": SERVICE_BROKER_PORT,
        "ServiceBrokerConfiguredBuild": str(build),
        "WMIProviders": "Loaded",
        "DatabaseVersion": version,
    }
    registry = [
        (SETUP_KEY, "Full Version", full_version),
        (SETUP_KEY, "Build Number", str(build)),
        (SETUP_KEY, "Installation Directory", folder),
        (SQL_KEY, "Database Name", db_name),
        (SQL_KEY, "Server", server),
        (SQL_KEY, "Service Broker Port", SERVICE_BROKER_PORT),
        (SQL_KEY, "Database Version", version),
        (RCM_KEY, "Full Version", full_version),
        (RCM_KEY, "Build Number", str(build)),
    ]
    site_server.seed_site_server(
        conn,
        settings=settings,
        services=[(name, RUNNING, build) for name in DEFAULT_SERVICES],
        registry=registry,
    )


def snapshot(conn: sqlite3.Connection, site_code: str) -> dict[str, Any]:
    """What rollback() restores in the database, as JSON-able data (the backup's
    state.json)."""
    version, full_version, build = local_site(conn, site_code)
    return {
        "site_code": site_code,
        "sites": {"Version": version, "FullVersion": full_version, "BuildNumber": build},
        "registry": site_server.registry_rows(conn),
        "settings": site_server.settings(conn),
        "services": site_server.service_builds(conn),
    }


def is_snapshot(data: Any) -> bool:
    """Whether `data` (a parsed state.json) has the shape `snapshot` writes."""
    try:
        sites = data["sites"]
        return bool(
            isinstance(sites["Version"], str)
            and isinstance(sites["FullVersion"], str)
            and isinstance(sites["BuildNumber"], int)
            and all(isinstance(r, list) and len(r) == 3 for r in data["registry"])
            and isinstance(data["settings"], dict)
            and isinstance(data["services"], dict)
        )
    except (KeyError, TypeError):
        return False


def restore_site_state(
    conn: sqlite3.Connection, site_code: str, guid: str, state: dict[str, Any] | None
) -> tuple[int, str]:
    """The database part of a rollback: the Sites row, registry keys, settings and service
    builds of `state` (the snapshot, None when there is none), then a working site whatever
    the failed step had turned off, SMSDBMon's triggers in place, and the update's
    installation records removed. Returns (triggers in place, the site's version)."""
    seed_site_state(conn, site_code)
    if state is not None:
        sites = state["sites"]
        site_server.set_site_version(
            conn,
            site_code,
            site_server.InstalledVersion(
                sites["Version"], sites["FullVersion"], sites["BuildNumber"]
            ),
        )
        site_server.replace_registry(conn, REGISTRY_KEYS, state["registry"])
        for name, value in state["settings"].items():
            site_server.set_setting(conn, name, value)
        for name, build in state["services"].items():
            site_server.set_service(conn, name, RUNNING, build)
    # A working site, whatever the failed step had turned off.
    site_server.set_setting(conn, "ServiceBroker", "ON")
    site_server.set_setting(conn, "WMIProviders", "Loaded")
    for name in site_server.service_names(conn):
        site_server.set_service(conn, name, RUNNING)
    defs = triggers.install_triggers(conn, site_code)
    # Only with a backup: after finish() the upgrade happened and stays recorded.
    if state is not None:
        site_server.forget_upgrade(conn, guid)
    site_server.forget_steps(conn, guid)
    return len(defs), local_site(conn, site_code).version
