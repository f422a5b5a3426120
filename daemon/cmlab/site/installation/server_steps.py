"""The install steps that change the emulated site server's state in the site database: SQL
Server Service Broker (2 SSB_OFF, 12 CONFIGURE_SSB, 16 SSB_ON), WMI (4 UNLOAD_WMI), the
services (3 STOP_SERVICES, 13 INSTALL_SERVICES), SMSDBMon's triggers (5
DELETE_DBMON_TRIGGERS), the database version (7 UPGRADE_DATABASE), the registry (8
UPDATE_SQL_REGISTRY, 9 UPDATE_RCM_REGISTRY) and the Sites row (14 UPDATE_SITE_TABLE).

Each step is one transaction: it commits whole or not at all, and run again it changes
nothing more (the site_server setters leave a row that already holds the value alone). The
log lines are the lab's (docs/installation.md, "The steps").
"""

from __future__ import annotations

import re
from pathlib import Path

from cmlab.core.errors import CmlabError
from cmlab.site.formats.install_map import InstallStep
from cmlab.site.installation import server_state
from cmlab.site.installation.context import InstallStepError
from cmlab.site.installation.layout import installed_build
from cmlab.site.installation.server_state import (
    RCM_KEY,
    RUNNING,
    SERVICE_BROKER_PORT,
    SETUP_KEY,
    SQL_KEY,
    STOPPED,
)
from cmlab.site.installation.session import InstallSession
from cmlab.site.sitedb import site_server, transaction, triggers

__all__ = [
    "configure_ssb",
    "delete_dbmon_triggers",
    "install_services",
    "ssb_off",
    "ssb_on",
    "stop_services",
    "unload_wmi",
    "update_rcm_registry",
    "update_site_table",
    "update_sql_registry",
    "upgrade_database",
]

_SERVICE_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_VERSION_RE = re.compile(r"^\d+\.\d+\.(\d+)\.\d+$")


def _was(old: str | None, new: str) -> str:
    return "unchanged" if old == new else f"was {old}"


def _check_params(install: InstallSession, step: InstallStep) -> None:
    build, version = step.param("build"), step.param("version")
    if build and build != str(install.ctx.target_build):
        raise InstallStepError(
            f"install.map says build={build}, but the update installs build "
            f"{install.ctx.target_build}; the package is inconsistent (download it again)"
        )
    if version and version != install.ctx.target_version:
        raise InstallStepError(
            f"install.map says version={version}, but the update installs "
            f"{install.ctx.target_version}; the package is inconsistent (download it again)"
        )


def _services(step: InstallStep) -> list[str]:
    names = [s.strip() for s in step.param("services").split(",") if s.strip()]
    for name in names:
        if not _SERVICE_RE.match(name):
            raise InstallStepError(f"install.map names a bad service {name!r}")
    return names


def _ssb(install: InstallSession, value: str, verb: str) -> None:
    install.say(f"INFO: Turning {verb} SQL Server Service Broker...")
    with install.db() as conn, transaction(conn):
        old = site_server.set_setting(conn, "ServiceBroker", value)
    if old == value:
        install.say(f"INFO: SQL Server Service Broker is already {value}.")
    else:
        install.say(f"INFO: SQL Server Service Broker is {value} (was {old}).")


def ssb_off(install: InstallSession, step: InstallStep) -> None:
    _ssb(install, "OFF", "off")


def ssb_on(install: InstallSession, step: InstallStep) -> None:
    _ssb(install, "ON", "on")


def configure_ssb(install: InstallSession, step: InstallStep) -> None:
    build = str(install.ctx.target_build)
    install.say(
        f"INFO: Configuring SQL Server Service Broker for build {build} "
        f"(port {SERVICE_BROKER_PORT})..."
    )
    with install.db() as conn, transaction(conn):
        site_server.set_setting(conn, "ServiceBrokerPort", SERVICE_BROKER_PORT)
        old = site_server.set_setting(conn, "ServiceBrokerConfiguredBuild", build)
    install.say(f"INFO: SQL Server Service Broker configured (build {old} -> {build}).")


def unload_wmi(install: InstallSession, step: InstallStep) -> None:
    install.say("INFO: Unloading the WMI providers...")
    with install.db() as conn, transaction(conn):
        old = site_server.set_setting(conn, "WMIProviders", "Unloaded")
    install.say(
        "INFO: The WMI providers are already unloaded."
        if old == "Unloaded"
        else "INFO: The WMI providers are unloaded."
    )


def stop_services(install: InstallSession, step: InstallStep) -> None:
    names = _services(step)
    with install.db() as conn, transaction(conn):
        for name in names:
            install.say(f"INFO: Stopping service {name}")
            old = site_server.set_service(conn, name, STOPPED)
            install.say(
                f"INFO: Service {name} is already stopped."
                if old == STOPPED
                else f"INFO: Service {name} is stopped."
            )


def install_services(install: InstallSession, step: InstallStep) -> None:
    names = _services(step)
    try:
        build = installed_build(install.root)
    except CmlabError as exc:
        raise InstallStepError(
            f"cannot install the services: {exc}. Run INSTALL_FILES again first."
        ) from exc
    install.say("INFO: Starting WMI: loading the WMI providers...")
    with install.db() as conn, transaction(conn):
        site_server.set_setting(conn, "WMIProviders", "Loaded")
        install.say("INFO: Creating SMSDBMON triggers...")
        for t in triggers.trigger_defs(install.code):
            if not site_server.trigger_exists(conn, t.name):
                install.say(f"INFO: Created SMSDBMON trigger {t.name} on {t.table}")
        defs = triggers.install_triggers(conn, install.code)
        install.say(f"INFO: {len(defs)} SMSDBMON triggers are in place.")
        for name in names:
            install.say(f"INFO: Installing service {name} from build {build} binaries")
            install.say(f"INFO: Starting service {name}")
            site_server.set_service(conn, name, RUNNING, build)
            install.say(f"INFO: Service {name} is running.")


def delete_dbmon_triggers(install: InstallSession, step: InstallStep) -> None:
    install.say("INFO: Deleting SMSDBMON triggers...")
    dropped = 0
    with install.db() as conn, transaction(conn):
        for t in triggers.trigger_defs(install.code):
            if site_server.drop_trigger(conn, t.name):
                dropped += 1
                install.say(f"INFO: Dropped SMSDBMON trigger {t.name} on {t.table}")
    install.say(f"INFO: Deleted {dropped} SMSDBMON trigger(s).")


def _from_build(install: InstallSession) -> int:
    state = install.saved_state()
    if state is not None:
        return int(state["sites"]["BuildNumber"])
    with install.db() as conn:
        return server_state.local_site(conn, install.code).build


def upgrade_database(install: InstallSession, step: InstallStep) -> None:
    _check_params(install, step)
    target, build = install.ctx.target_version, install.ctx.target_build
    from_build = _from_build(install)
    with install.db() as conn, transaction(conn):
        old = site_server.setting(conn, "DatabaseVersion")
        install.say(f"INFO: Updating the Configuration Manager database from {old} to {target}...")
        site_server.record_upgrade(conn, install.ctx.guid, from_build, build)
        site_server.set_setting(conn, "DatabaseVersion", target)
    install.say(
        f"INFO: Recorded the upgrade in CM_UpgradeHistory (PackageGUID={install.ctx.guid}, "
        f"FromBuild={from_build}, ToBuild={build})."
    )
    install.say(f"INFO: The site database is at version {target}.")


def _registry(install: InstallSession, what: str, key: str, values: dict[str, str]) -> None:
    install.say(f"INFO: Updating the {what} registry entries...")
    with install.db() as conn, transaction(conn):
        for name, value in values.items():
            old = site_server.set_registry(conn, key, name, value)
            install.say(f"INFO: {key}\\{name} = {value} ({_was(old, value)})")


def update_sql_registry(install: InstallSession, step: InstallStep) -> None:
    with install.db() as conn:
        server, _ = site_server.server_and_folder(conn, install.code)
    values = {
        "Database Name": Path(install.ctx.db_file).name,
        "Server": server,
        "Service Broker Port": SERVICE_BROKER_PORT,
        "Database Version": install.ctx.target_version,
    }
    _registry(install, "SQL", SQL_KEY, values)


def update_rcm_registry(install: InstallSession, step: InstallStep) -> None:
    values = {
        "Full Version": install.ctx.target_version,
        "Build Number": str(install.ctx.target_build),
    }
    _registry(install, "RCM", RCM_KEY, values)


def update_site_table(install: InstallSession, step: InstallStep) -> None:
    _check_params(install, step)
    full_version = install.ctx.target_version
    found = _VERSION_RE.match(full_version)
    if found is None or found.group(1) != str(install.ctx.target_build):
        raise InstallStepError(
            f"the target version {full_version!r} does not carry build {install.ctx.target_build}"
        )
    version = ".".join(full_version.split(".")[:3]) + ".1000"
    build = install.ctx.target_build
    with install.db() as conn, transaction(conn):
        old_version, _, old_build = server_state.local_site(conn, install.code)
        install.say(
            f"INFO: Updating the site table: site {install.code} version {old_version} -> "
            f"{version} (build {old_build} -> {build})"
        )
        site_server.set_site_version(
            conn, install.code, site_server.InstalledVersion(version, full_version, build)
        )
        for name, value in (("Full Version", full_version), ("Build Number", str(build))):
            old = site_server.set_registry(conn, SETUP_KEY, name, value)
            install.say(f"INFO: {SETUP_KEY}\\{name} = {value} ({_was(old, value)})")
    install.say(f"INFO: Site {install.code} is at version {version}.")
