"""The stored procedures of the Replication and Prerequisite check stages, with the guide's
names: InitiateUpgrade, sp_UpdateEasySetupSettings, spCMUGetPendingUpdatePackage,
spCMUAddPrereqMessage, spProcessCMUPackages / spProcessCMU, RetryContentReplication.

Beside them, the rows these stages share with the components that do the work: the Easy
Setup Package's distribution (SMSPackages, EasySetupSettings, ObjectDistributionState, at the
top-level site and at a child site's despooler) and the update being installed.

Like `procs`, each runs inside the caller's transaction and is safe to replay."""

from __future__ import annotations

import enum
import sqlite3
from dataclasses import dataclass
from typing import Any

from cmlab.site.sitedb import hierarchy
from cmlab.site.sitedb.procs import UnknownPackage, local_site_number
from cmlab.site.state_codes import PackageFlag, PackageState

EASY_SETUP_PACKAGE_NAME = "Configuration Manager Easy Setup Package"
EASY_SETUP_FLAG = 2  # StorePkgFlag: "set to replicate to site servers only"


class DistributionState(enum.IntEnum):
    """ObjectDistributionState.State, as ConfigMgr numbers them."""

    INSTALLED = 0
    INSTALL_PENDING = 1
    INSTALL_RETRYING = 2
    INSTALL_FAILED = 3


# InitiateUpgrade (Install, Run prerequisite check) is offered for a package that is ready to
# install, or whose last replication, check or installation ended, so it can be run again.
INITIATE_STATES = (
    PackageState.DOWNLOAD_SUCCESS,
    PackageState.ENABLED,
    PackageState.CONTENT_REPLICATION_FAILED,
    PackageState.PREREQ_SUCCESS,
    PackageState.PREREQ_WARNING,
    PackageState.PREREQ_ERROR,
    PackageState.INSTALL_FAILED,
    PackageState.INSTALL_CMU_FAILED,
)

# An update in one of these states is "in progress": ConfigMgr runs one at a time.
IN_PROGRESS_STATES = (
    PackageState.ENABLED,
    PackageState.CONTENT_REPLICATING,
    PackageState.CONTENT_REPLICATION_SUCCESS,
    PackageState.PREREQ_IN_PROGRESS,
    PackageState.INSTALL_IN_PROGRESS,
    PackageState.INSTALL_WAITING_SERVICE_WINDOW,
    PackageState.INSTALL_WAITING_PARENT,
    PackageState.INSTALL_CMU_VALIDATING,
    PackageState.INSTALL_CMU_STOPPED,
    PackageState.INSTALL_CMU_INSTALLFILES,
    PackageState.INSTALL_CMU_STARTED,
    PackageState.INSTALL_CMU_SUCCESS,
    PackageState.INSTALL_WAITING_CMU,
    PackageState.INSTALL_INSTALLFILES,
    PackageState.INSTALL_UPGRADESITECTRLIMAGE,
    PackageState.INSTALL_CONFIGURESERVICEBROKER,
    PackageState.INSTALL_INSTALLSYSTEM,
    PackageState.INSTALL_CONSOLE,
    PackageState.INSTALL_INSTALLBASESERVICES,
    PackageState.INSTALL_UPDATE_SITES,
    PackageState.INSTALL_SSB_ACTIVATION_ON,
    PackageState.INSTALL_UPGRADEDATABASE,
    PackageState.INSTALL_UPDATEADMINCONSOLE,
)

FAILED_STATES = (
    PackageState.CONTENT_REPLICATION_FAILED,
    PackageState.PREREQ_ERROR,
    PackageState.INSTALL_FAILED,
    PackageState.INSTALL_CMU_FAILED,
)
PREREQ_RESULTS = (
    PackageState.PREREQ_SUCCESS,
    PackageState.PREREQ_WARNING,
    PackageState.PREREQ_ERROR,
)


def _in(states: tuple[PackageState, ...]) -> str:
    return "(" + ", ".join(str(int(s)) for s in states) + ")"


# An update whose run is not over, as a condition on `CM_UpdatePackages p`: in progress, or at
# a prerequisite result the run goes on from (Flag 0 or 2; a warning only with Flag 2), where
# the installation is starting or the roll-up has not caught up with the sites yet.
def _goes_on_to_install(state: str, flag: str) -> str:
    return (
        f"(({state} = {int(PackageState.PREREQ_SUCCESS)} AND {flag} IN (0, 2)) "
        f"OR ({state} = {int(PackageState.PREREQ_WARNING)} AND {flag} = 2))"
    )


def _run_goes_on(state: str, flag: str) -> str:
    return f"({state} IN {_in(IN_PROGRESS_STATES)} OR {_goes_on_to_install(state, flag)})"


GOES_ON_TO_INSTALL = _goes_on_to_install("p.State", "p.Flag")
RUN_GOES_ON = _run_goes_on("p.State", "p.Flag")


class NotInitiable(LookupError):
    """InitiateUpgrade refused: no such package, a state it cannot start from, or another
    update already in progress."""


class NoPackageToInitiate(UnknownPackage, NotInitiable):
    """InitiateUpgrade or RetryContentReplication refused: no such package."""


def InitiateUpgrade(conn: sqlite3.Connection, guid: str, flag: PackageFlag) -> int:
    """What the console's Install / Run prerequisite check does through the SMS Provider: the
    package goes to ENABLED (2) with its flag, and `CM_UpdatePackages_UPD_HMAN` makes SMSDBMon
    drop `2.ESC`. Returns the state it was in."""
    row = conn.execute(
        "SELECT State, Name FROM CM_UpdatePackages WHERE PackageGuid = ?", (guid,)
    ).fetchone()
    if row is None:
        raise NoPackageToInitiate(f"no update package {guid} in CM_UpdatePackages")
    _refuse_below_top_level(conn)
    state, name = int(row[0]), str(row[1])
    if state not in INITIATE_STATES:
        allowed = ", ".join(s.name for s in INITIATE_STATES)
        raise NotInitiable(
            f"{name} ({guid}) is {PackageState.name_of(state)} ({state}); an update can be "
            f"installed or checked only from {allowed}"
        )
    going_on = conn.execute(
        f"SELECT 1 FROM CM_UpdatePackages p WHERE p.PackageGuid = ? AND {GOES_ON_TO_INSTALL}",
        (guid,),
    ).fetchone()
    if going_on is not None:
        # A prerequisite result its run goes on from: CMUpdate is installing it (or will at its
        # next pass); starting it over would pull the content from under the installation.
        raise NotInitiable(
            f"{name} ({guid}) is being installed: its prerequisite result "
            f"{PackageState.name_of(state)} ({state}) goes on to the installation; wait for it "
            "to finish"
        )
    _refuse_if_another_in_progress(conn, guid)
    conn.execute("UPDATE CM_UpdatePackages SET Flag = ? WHERE PackageGuid = ?", (int(flag), guid))
    _start_run(conn, guid)
    return state


def _refuse_below_top_level(conn: sqlite3.Connection) -> None:
    local = hierarchy.local_site(conn)
    if local.parent is not None:
        raise NotInitiable(
            f"{local.code} is a child site of {local.parent}: updates are installed from the "
            "top-level site of the hierarchy, and child primary sites follow it"
        )


def _refuse_if_another_in_progress(conn: sqlite3.Connection, guid: str) -> None:
    busy = conn.execute(
        "SELECT p.PackageGuid, p.Name, p.State FROM CM_UpdatePackages p "
        f"WHERE {RUN_GOES_ON} AND p.PackageGuid <> ? LIMIT 1",
        (guid,),
    ).fetchone()
    if busy is not None:
        raise NotInitiable(
            f"another update is in progress: {busy[1]} ({busy[0]}) is "
            f"{PackageState.name_of(int(busy[2]))} ({busy[2]}); wait for it to finish"
        )


def _start_run(conn: sqlite3.Connection, guid: str) -> None:
    """A new run of the update (InitiateUpgrade, RetryContentReplication): ENABLED (SMSDBMon
    drops 2.ESC), the next run number, and every site restarted."""
    conn.execute(
        "UPDATE CM_UpdatePackages SET State = ?, RunNumber = RunNumber + 1, "
        "LastUpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE PackageGuid = ?",
        (int(PackageState.ENABLED), guid),
    )
    _restart_sites(conn, guid)


def _restart_sites(conn: sqlite3.Connection, guid: str) -> None:
    """A new run starts every site from ENABLED, so the last run's results (a failure, say)
    are not rolled up into this one; a site that has installed the update stays installed.
    Every primary site of the hierarchy gets a row, so the roll-up waits for the sites that
    have not reported yet."""
    conn.execute(
        "UPDATE CM_UpdatePackageSiteStatus SET State = ?, Flag = p.Flag, "
        "RunNumber = p.RunNumber, UpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') "
        "FROM (SELECT Flag, RunNumber FROM CM_UpdatePackages WHERE PackageGuid = ?) AS p "
        "WHERE PackageGuid = ? AND State <> ?",
        (int(PackageState.ENABLED), guid, guid, int(PackageState.INSTALL_SUCCESS)),
    )
    conn.execute(
        "UPDATE CM_UpdatePackageSiteStatus SET RunNumber = "
        "(SELECT RunNumber FROM CM_UpdatePackages WHERE PackageGuid = ?) "
        "WHERE PackageGuid = ? AND State = ?",
        (guid, guid, int(PackageState.INSTALL_SUCCESS)),
    )
    conn.execute(
        "INSERT INTO CM_UpdatePackageSiteStatus (PackageGuid, SiteNumber, State, Flag, RunNumber) "
        "SELECT p.PackageGuid, sd.ID, ?, p.Flag, p.RunNumber FROM CM_UpdatePackages p, "
        "ServerData sd WHERE p.PackageGuid = ? AND sd.SiteType IN (?, ?) "
        "AND sd.ID <> (SELECT ID FROM ServerData WHERE IsLocal = 1) "
        "ON CONFLICT (PackageGuid, SiteNumber) DO NOTHING",
        (int(PackageState.ENABLED), guid, hierarchy.CAS, hierarchy.PRIMARY),
    )


def enabled_package(conn: sqlite3.Connection) -> str | None:
    """HMAN's `SELECT TOP 1 convert(NVARCHAR(40), PackageGuid) FROM CM_UpdatePackages WHERE
    State=2`, run as written through the T-SQL shim."""
    from cmlab.site.sitedb.functions import tsql_to_sqlite

    row = conn.execute(
        tsql_to_sqlite(
            "SELECT TOP 1 convert(NVARCHAR(40), PackageGuid) FROM CM_UpdatePackages WHERE State=2"
        )
    ).fetchone()
    return None if row is None else str(row[0])


@dataclass(frozen=True)
class EasySetupPackage:
    """A row of vEasySetupPackage."""

    package_id: str
    package_version: int
    package_hash: str
    package_guid: str
    stored_pkg_hash: str
    source: str
    source_site: str
    stored_pkg_version: int
    source_version: int


def easy_setup_package(conn: sqlite3.Connection, guid: str) -> EasySetupPackage | None:
    row = conn.execute(
        "SELECT PackageID, PackageVersion, PackageHash, PackageGUID, StoredPkgHash, Source, "
        "SourceSite, StoredPkgVersion, SourceVersion FROM vEasySetupPackage "
        "WHERE PackageGUID = ?",
        (guid,),
    ).fetchone()
    return None if row is None else _esp(row)


def easy_setup_package_by_id(conn: sqlite3.Connection, package_id: str) -> EasySetupPackage | None:
    row = conn.execute(
        "SELECT PackageID, PackageVersion, PackageHash, PackageGUID, StoredPkgHash, Source, "
        "SourceSite, StoredPkgVersion, SourceVersion FROM vEasySetupPackage WHERE PackageID = ?",
        (package_id,),
    ).fetchone()
    return None if row is None else _esp(row)


def _esp(row: tuple[Any, ...]) -> EasySetupPackage:
    # A SQLite row's values are typed by what the table holds, not statically: Any.
    return EasySetupPackage(
        package_id=str(row[0]),
        package_version=int(row[1] or 0),
        package_hash=str(row[2] or ""),
        package_guid=str(row[3] or ""),
        stored_pkg_hash=str(row[4] or ""),
        source=str(row[5] or ""),
        source_site=str(row[6] or ""),
        stored_pkg_version=int(row[7] or 0),
        source_version=int(row[8] or 0),
    )


def easy_setup_package_id(conn: sqlite3.Connection, guid: str, site_code: str) -> str:
    """The Easy Setup Package of an update: its existing PackageID, or the site's next one
    (`<SiteCode>10001`, `<SiteCode>10002`, ... as in the guide's `CAS10001`)."""
    row = conn.execute(
        "SELECT PackageID FROM EasySetupSettings WHERE PackageGuid = ?", (guid,)
    ).fetchone()
    if row is not None:
        return str(row[0])
    code = site_code.upper()
    used = {
        str(r[0]).upper()
        for r in conn.execute(
            "SELECT PackageID FROM EasySetupSettings UNION SELECT PkgID FROM SMSPackages"
        )
    }
    number = 0x10001
    while f"{code}{number:05X}" in used:
        number += 1
    return f"{code}{number:05X}"


def sp_UpdateEasySetupSettings(
    conn: sqlite3.Connection,
    package_id: str,
    flag: int,
    package_hash: str,
    *,
    guid: str,
    source: str,
    source_site: str,
    source_size: int,
) -> int:
    """Record the update's Easy Setup Package with its source folder hash and ask DistMgr to
    refresh it from its source (a new SourceVersion; SMSDBMon drops `<PkgID>.PKN`). The
    EasySetupSettings write makes SMSDBMon drop `<GUID>.CME`. Returns the new source version."""
    conn.execute(
        "INSERT INTO EasySetupSettings (PackageID, PackageGuid, PackageVersion, PackageHash) "
        "VALUES (?, ?, 1, ?) ON CONFLICT (PackageID) DO UPDATE SET "
        "PackageGuid = excluded.PackageGuid, PackageHash = excluded.PackageHash, "
        "PackageVersion = PackageVersion + 1, "
        "LastUpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now')",
        (package_id, guid, package_hash),
    )
    conn.execute(
        "INSERT INTO SMSPackages (PkgID, Name, Source, SourceSite, SourceVersion, SourceDate, "
        "SourceSize, StorePkgFlag, Hash) VALUES (?, ?, ?, ?, 1, "
        "strftime('%Y-%m-%d %H:%M:%f', 'now'), ?, ?, ?) ON CONFLICT (PkgID) DO UPDATE SET "
        "Source = excluded.Source, SourceSite = excluded.SourceSite, "
        "SourceVersion = SourceVersion + 1, SourceDate = excluded.SourceDate, "
        "SourceSize = excluded.SourceSize, StorePkgFlag = excluded.StorePkgFlag, "
        "Hash = excluded.Hash",
        (package_id, EASY_SETUP_PACKAGE_NAME, source, source_site, source_size, flag, package_hash),
    )
    row = conn.execute("SELECT SourceVersion FROM SMSPackages WHERE PkgID = ?", (package_id,))
    return int(row.fetchone()[0])


def spCMUSetSiteState(
    conn: sqlite3.Connection,
    guid: str,
    state: PackageState,
    *,
    only_from: tuple[PackageState, ...] = (),
    site_code: str | None = None,
) -> bool:
    """A site's status for an update (`CM_UpdatePackageSiteStatus`), as DistMgr and CMUpdate
    report it: this site's, or with `site_code` another's (the Sender's verdict on a child's
    content replication). HMAN rolls it up into CM_UpdatePackages (spProcessCMU). With
    `only_from`, only a site in one of those states moves (a replayed drop file cannot undo
    later progress). A site that installed the update stays installed. False when nothing
    changed."""
    if site_code is None:
        site = local_site_number(conn)
    else:
        found = hierarchy.site_by_code(conn, site_code)
        if found is None:
            raise LookupError(f"ServerData has no site {site_code}")
        site = found.number
    row = conn.execute(
        "SELECT State FROM CM_UpdatePackageSiteStatus WHERE PackageGuid = ? AND SiteNumber = ?",
        (guid, site),
    ).fetchone()
    if row is not None and int(row[0]) in (int(state), int(PackageState.INSTALL_SUCCESS)):
        return False
    if only_from and (row is None or int(row[0]) not in only_from):
        return False
    cur = conn.execute(
        "INSERT INTO CM_UpdatePackageSiteStatus (PackageGuid, SiteNumber, State, Flag, RunNumber) "
        "SELECT ?, ?, ?, Flag, RunNumber FROM CM_UpdatePackages WHERE PackageGuid = ? "
        "ON CONFLICT (PackageGuid, SiteNumber) DO UPDATE SET State = excluded.State, "
        "Flag = excluded.Flag, RunNumber = excluded.RunNumber, "
        "UpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now')",
        (guid, site, int(state), guid),
    )
    return cur.rowcount > 0


def set_package_state(conn: sqlite3.Connection, guid: str, state: PackageState) -> None:
    """CM_UpdatePackages.State alone, as CMUpdate "silently" sets PREREQ_IN_PROGRESS."""
    conn.execute(
        "UPDATE CM_UpdatePackages SET State = ?, "
        "LastUpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') "
        "WHERE PackageGuid = ? AND State <> ?",
        (int(state), guid, int(state)),
    )


def package_state_and_flag(conn: sqlite3.Connection, guid: str) -> tuple[int, int] | None:
    """CM_UpdatePackages' State and Flag of an update; None when it has no row."""
    row = conn.execute(
        "SELECT State, Flag FROM CM_UpdatePackages WHERE PackageGuid = ?", (guid,)
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def set_distribution_state(
    conn: sqlite3.Connection,
    package_id: str,
    site_code: str,
    state: int,
    source_version: int,
    description: str = "",
) -> None:
    """ObjectDistributionState for the Easy Setup Package at a site (its trigger feeds
    CM_UpdatePackage_MonitoringStatus)."""
    conn.execute(
        "INSERT INTO ObjectDistributionState (ObjectID, SiteCode, State, SourceVersion, "
        "Description) VALUES (?, ?, ?, ?, ?) ON CONFLICT (ObjectID, SiteCode) DO UPDATE SET "
        "State = excluded.State, SourceVersion = excluded.SourceVersion, "
        "Description = excluded.Description, "
        "LastUpdateDate = strftime('%Y-%m-%d %H:%M:%f', 'now')",
        (package_id, site_code, state, source_version, description),
    )


def record_stored_package(
    conn: sqlite3.Connection, package_id: str, version: int, stored_hash: str
) -> None:
    conn.execute(
        "UPDATE SMSPackages SET StoredPkgVersion = ?, StoredPkgHash = ?, "
        "LastRefresh = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE PkgID = ?",
        (version, stored_hash, package_id),
    )


@dataclass(frozen=True)
class StoredPackage:
    version: int
    hash: str


def stored_package(conn: sqlite3.Connection, pkg_id: str) -> StoredPackage:
    """The version and hash SMSPackages records as stored here (0 and "" for none)."""
    row = conn.execute(
        "SELECT StoredPkgVersion, StoredPkgHash FROM SMSPackages WHERE PkgID = ?", (pkg_id,)
    ).fetchone()
    if row is None:
        return StoredPackage(0, "")
    return StoredPackage(int(row[0] or 0), str(row[1] or "").upper())


def record_despooled_package(
    conn: sqlite3.Connection,
    *,
    pkg_id: str,
    guid: str,
    source: str,
    source_site: str,
    version: int,
    digest: str,
    site_code: str,
) -> int:
    """A child site's despooler stored version `version` of the Easy Setup Package `pkg_id`
    (of update `guid`) with content hash `digest`: its SMSPackages, EasySetupSettings and
    ObjectDistributionState rows, and the run's progress here (child_run_progress). Returns
    the version stored before (0 for none), for the guide's "(version <old>) exists" line."""
    old = stored_package(conn, pkg_id).version
    conn.execute(
        "INSERT INTO SMSPackages (PkgID, Name, Source, SourceSite, SourceVersion, "
        "StoredPkgVersion, StoredPkgHash, StorePkgFlag, LastRefresh) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, strftime('%Y-%m-%d %H:%M:%f', 'now')) "
        "ON CONFLICT (PkgID) DO UPDATE SET Name = excluded.Name, Source = excluded.Source, "
        "SourceSite = excluded.SourceSite, SourceVersion = excluded.SourceVersion, "
        "StoredPkgVersion = excluded.StoredPkgVersion, StoredPkgHash = excluded.StoredPkgHash, "
        "StorePkgFlag = excluded.StorePkgFlag, LastRefresh = excluded.LastRefresh",
        (
            pkg_id,
            EASY_SETUP_PACKAGE_NAME,
            source,
            source_site,
            version,
            version,
            digest,
            EASY_SETUP_FLAG,
        ),
    )
    # PackageHash is the top-level site's (CMUpdates replication): never written here, so a
    # replicated one stays, and a new row has none until replication brings it. An unchanged
    # row is not touched (its update trigger would wake HMAN for nothing).
    conn.execute(
        "INSERT INTO EasySetupSettings (PackageID, PackageGuid, PackageHash) VALUES (?, ?, NULL) "
        "ON CONFLICT (PackageID) DO UPDATE SET PackageGuid = excluded.PackageGuid, "
        "LastUpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') "
        "WHERE PackageGuid IS NOT excluded.PackageGuid",
        (pkg_id, guid),
    )
    set_distribution_state(
        conn, pkg_id, site_code, DistributionState.INSTALLED, version, "Package stored"
    )
    child_run_progress(conn)
    return old


@dataclass(frozen=True)
class PendingPackage:
    """A row of spCMUGetPendingUpdatePackage: an update this site's CMUpdate has work for."""

    guid: str
    name: str
    state: int  # this site's state (CM_UpdatePackageSiteStatus), else the package's
    flag: int
    package_type: int
    update_number: str
    full_version: str
    min_cm_version: str
    max_cm_version: str
    package_id: str  # its Easy Setup Package
    stored_version: int  # the content version in this site's content library
    stored_hash: str


def spCMUGetPendingUpdatePackage(conn: sqlite3.Connection) -> list[PendingPackage]:
    """The updates in replication, prerequisite check or installation at this site, with this
    site's state for each (the guide: it "collects the information from the CM_UpdatePackages
    and CM_UpdatePackageSiteStatus tables for the site that's running the check")."""
    local = hierarchy.local_site(conn)
    # A site's own run decides, not the roll-up: at the top-level site a child's failure must
    # not stop its own installation. A child site's run starts when its own row does (the
    # package row there is the top-level site's, replicated).
    state = "COALESCE(ss.State, p.State)" if local.parent is None else "ss.State"
    rows = conn.execute(
        f"SELECT p.PackageGuid, p.Name, {state}, p.Flag, p.PackageType, "
        "p.UpdateNumber, p.FullVersion, p.MinCMVersion, p.MaxCMVersion, e.PackageID, "
        "COALESCE(sp.StoredPkgVersion, 0), COALESCE(sp.StoredPkgHash, '') "
        "FROM CM_UpdatePackages p "
        "JOIN EasySetupSettings e ON e.PackageGuid = p.PackageGuid "
        "LEFT JOIN SMSPackages sp ON sp.PkgID = e.PackageID "
        "LEFT JOIN CM_UpdatePackageSiteStatus ss "
        "ON ss.PackageGuid = p.PackageGuid AND ss.SiteNumber = ? "
        f"WHERE {_run_goes_on(state, 'p.Flag')} ORDER BY p.LastUpdateTime",
        (local.number,),
    ).fetchall()
    return [
        PendingPackage(
            guid=str(r[0]),
            name=str(r[1]),
            state=int(r[2]),
            flag=int(r[3]),
            package_type=int(r[4]),
            update_number=str(r[5] or ""),
            full_version=str(r[6] or ""),
            min_cm_version=str(r[7] or ""),
            max_cm_version=str(r[8] or ""),
            package_id=str(r[9]),
            stored_version=int(r[10]),
            stored_hash=str(r[11]).upper(),
        )
        for r in rows
    ]


def clear_prereq_messages(conn: sqlite3.Connection, guid: str) -> None:
    """A new prerequisite run replaces this site's results of the previous one."""
    site = local_site_number(conn)
    conn.execute(
        "DELETE FROM CM_UpdatePackagePrereqStatus WHERE PackageGuid = ? AND SiteNumber = ?",
        (guid, site),
    )


def spCMUAddPrereqMessage(
    conn: sqlite3.Connection, guid: str, server: str, rule: str, status: int, message: str
) -> None:
    """One rule's result (0 Passed, 1 Warning, 2 Failed) in CM_UpdatePackagePrereqStatus."""
    site = local_site_number(conn)
    conn.execute(
        "INSERT INTO CM_UpdatePackagePrereqStatus (PackageGuid, SiteNumber, ServerName, "
        "RuleName, Status, Message) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (PackageGuid, SiteNumber, ServerName, RuleName) DO UPDATE SET "
        "Status = excluded.Status, Message = excluded.Message, "
        "MessageTime = strftime('%Y-%m-%d %H:%M:%f', 'now')",
        (guid, site, server, rule, int(status), message),
    )


def _overall(states: list[int]) -> int:
    """The update's state over all its sites: a failure anywhere wins; when every site has its
    prerequisite result, the worst of them (the guide: "the worst for all the sites that were
    checked"); otherwise the least advanced site, which is still working."""
    failures = [s for s in states if s in FAILED_STATES]
    if failures:
        return min(failures)
    if all(s in PREREQ_RESULTS for s in states):
        return max(states)  # 131074 SUCCESS < 131075 WARNING
    return min(states, key=_progress)


# How far a site has got, in the order a run goes through the states (the INSTALL_* codes are
# not numbered in that order: the steps follow install.map).
PROGRESS_ORDER = (
    PackageState.ENABLED,
    PackageState.CONTENT_REPLICATING,
    PackageState.CONTENT_REPLICATION_SUCCESS,
    PackageState.PREREQ_IN_PROGRESS,
    PackageState.PREREQ_SUCCESS,
    PackageState.PREREQ_WARNING,
    PackageState.INSTALL_WAITING_PARENT,
    PackageState.INSTALL_WAITING_SERVICE_WINDOW,
    PackageState.INSTALL_IN_PROGRESS,
    PackageState.INSTALL_WAITING_CMU,
    PackageState.INSTALL_CMU_VALIDATING,
    PackageState.INSTALL_CMU_STOPPED,
    PackageState.INSTALL_CMU_INSTALLFILES,
    PackageState.INSTALL_CMU_STARTED,
    PackageState.INSTALL_CMU_SUCCESS,
    PackageState.INSTALL_UPGRADEDATABASE,
    PackageState.INSTALL_INSTALLSYSTEM,
    PackageState.INSTALL_INSTALLFILES,
    PackageState.INSTALL_UPGRADESITECTRLIMAGE,
    PackageState.INSTALL_CONFIGURESERVICEBROKER,
    PackageState.INSTALL_INSTALLBASESERVICES,
    PackageState.INSTALL_UPDATE_SITES,
    PackageState.INSTALL_UPDATEADMINCONSOLE,
    PackageState.INSTALL_CONSOLE,
    PackageState.INSTALL_SSB_ACTIVATION_ON,
    PackageState.INSTALL_PENDING_REBOOT,
    PackageState.INSTALL_SUCCESS,
)
_PROGRESS = {int(state): i for i, state in enumerate(PROGRESS_ORDER)}


def _progress(state: int) -> int:
    return _PROGRESS.get(state, -1)


def spProcessCMU(conn: sqlite3.Connection, guid: str) -> int | None:
    """Roll the sites' states of one update up into CM_UpdatePackages.State: the worst of all
    sites (the guide: "final result of the prerequisite checks is the worst for all the sites
    that were checked"). Returns the package's state afterwards."""
    # A child site still at ENABLED has not received the run's content yet: to the roll-up
    # it is CONTENT_REPLICATING, so the update is not shown finished before every primary
    # site is. Not ENABLED itself: that would make SMSDBMon drop 2.ESC again. This site's own
    # ENABLED row is left out, as before HMAN has taken its 2.ESC.
    states = [
        int(r[0])
        for r in conn.execute(
            "SELECT CASE WHEN ss.State = ? THEN ? ELSE ss.State END "
            "FROM CM_UpdatePackageSiteStatus ss "
            "JOIN ServerData sd ON sd.ID = ss.SiteNumber "
            "WHERE ss.PackageGuid = ? AND sd.SiteType IN (2, 4) "
            "AND (ss.State BETWEEN 65537 AND 262143 OR (ss.State = ? AND sd.IsLocal = 0))",
            (
                int(PackageState.ENABLED),
                int(PackageState.CONTENT_REPLICATING),
                guid,
                int(PackageState.ENABLED),
            ),
        )
    ]
    row = conn.execute(
        "SELECT State FROM CM_UpdatePackages WHERE PackageGuid = ?", (guid,)
    ).fetchone()
    if row is None:
        return None
    current = int(row[0])
    if not states or current not in IN_PROGRESS_STATES + PREREQ_RESULTS + FAILED_STATES:
        return current
    if current == PackageState.ENABLED:
        # The run waits for HMAN to take its 2.ESC (HMAN moves it on): rolling it up now
        # would take it off ENABLED before HMAN finds it there.
        return current
    worst = _overall(states)
    if worst != current:
        conn.execute(
            "UPDATE CM_UpdatePackages SET State = ?, "
            "LastUpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE PackageGuid = ?",
            (worst, guid),
        )
    return worst


def spProcessCMUPackages(conn: sqlite3.Connection) -> dict[str, int]:
    """`exec spProcessCMUPackages`: spProcessCMU for every update with an Easy Setup Package
    whose run is not over (RUN_GOES_ON). Returns each one's state afterwards. Only the
    top-level site rolls up: below it, CM_UpdatePackages is the top-level site's, replicated."""
    if not hierarchy.is_top_level(conn):
        return {}
    guids = [
        str(r[0])
        for r in conn.execute(
            "SELECT p.PackageGuid FROM CM_UpdatePackages p "
            "JOIN EasySetupSettings e ON e.PackageGuid = p.PackageGuid "
            f"WHERE {RUN_GOES_ON}"
        )
    ]
    out: dict[str, int] = {}
    for guid in guids:
        state = spProcessCMU(conn, guid)
        if state is not None:
            out[guid] = state
    return out


def RetryContentReplication(conn: sqlite3.Connection, guid: str) -> str:
    """SMS_CM_UpdatePackages.RetryContentReplication: forget the Easy Setup Package's recorded
    source hash so the next 2.ESC updates it from its source again, and put the update back to
    ENABLED (its flag kept) so SMSDBMon drops 2.ESC now. Returns the package's PackageID."""
    row = conn.execute(
        "SELECT p.State, p.Name, e.PackageID FROM CM_UpdatePackages p "
        "LEFT JOIN EasySetupSettings e ON e.PackageGuid = p.PackageGuid WHERE p.PackageGuid = ?",
        (guid,),
    ).fetchone()
    if row is None:
        raise NoPackageToInitiate(f"no update package {guid} in CM_UpdatePackages")
    state, name, package_id = int(row[0]), str(row[1]), row[2]
    _refuse_below_top_level(conn)
    if package_id is None:
        raise NotInitiable(
            f"{name} ({guid}) has no Easy Setup Package yet: install it or run the "
            "prerequisite check first"
        )
    # Any state where the Easy Setup Package is not in use by a check or an installation: the
    # guide retries after a failed replication, and after a bad package was found (Issue 1).
    allowed = (
        *INITIATE_STATES,
        PackageState.CONTENT_REPLICATING,
        PackageState.CONTENT_REPLICATION_SUCCESS,
    )
    if state not in allowed:
        raise NotInitiable(
            f"{name} ({guid}) is {PackageState.name_of(state)} ({state}); content replication "
            "cannot be retried while the update is being checked or installed"
        )
    _refuse_if_another_in_progress(conn, guid)
    conn.execute(
        "UPDATE EasySetupSettings SET PackageHash = NULL, "
        "LastUpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE PackageID = ?",
        (package_id,),
    )
    _start_run(conn, guid)
    return str(package_id)


# -- a child primary site's run (docs/hierarchy.md) ---------------------------------------------


def start_replicated_runs(conn: sqlite3.Connection) -> list[str]:
    """At a child site: a run the top-level site started (a RunNumber newer than this site's
    row, replicated in CM_UpdatePackages) reaches this site: its row goes to ENABLED with the
    run's flag. A site that installed the update stays installed. Returns the updates
    started. Secondary sites take no part: Recover Secondary Site updates them."""
    local = hierarchy.local_site(conn)
    if local.parent is None or local.site_type != hierarchy.PRIMARY:
        return []
    rows = conn.execute(
        "SELECT p.PackageGuid, p.RunNumber, ss.State FROM CM_UpdatePackages p "
        "LEFT JOIN CM_UpdatePackageSiteStatus ss "
        "ON ss.PackageGuid = p.PackageGuid AND ss.SiteNumber = ? "
        "WHERE p.RunNumber > 0 AND p.RunNumber > COALESCE(ss.RunNumber, 0)",
        (local.number,),
    ).fetchall()
    started = []
    for guid, run, state in rows:
        if state is not None and int(state) == PackageState.INSTALL_SUCCESS:
            conn.execute(
                "UPDATE CM_UpdatePackageSiteStatus SET RunNumber = ? "
                "WHERE PackageGuid = ? AND SiteNumber = ?",
                (run, guid, local.number),
            )
            continue
        conn.execute(
            "INSERT INTO CM_UpdatePackageSiteStatus (PackageGuid, SiteNumber, State, Flag, "
            "RunNumber) SELECT PackageGuid, ?, ?, Flag, RunNumber FROM CM_UpdatePackages "
            "WHERE PackageGuid = ? ON CONFLICT (PackageGuid, SiteNumber) DO UPDATE SET "
            "State = excluded.State, Flag = excluded.Flag, RunNumber = excluded.RunNumber, "
            "UpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now')",
            (local.number, int(PackageState.ENABLED), guid),
        )
        started.append(str(guid))
    return started


def mark_replicated_content(conn: sqlite3.Connection) -> list[tuple[str, int]]:
    """At a child site: an update whose run has reached this site is CONTENT_REPLICATING until
    this site's content library holds the Easy Setup Package the top-level site recorded
    (the despooler stored a version whose hash is EasySetupSettings.PackageHash, replicated),
    then CONTENT_REPLICATION_SUCCESS. Returns the (update, state) changes made."""
    local = hierarchy.local_site(conn)
    if local.parent is None or local.site_type != hierarchy.PRIMARY:
        return []
    rows = conn.execute(
        "SELECT ss.PackageGuid, ss.State, e.PackageHash, sp.StoredPkgHash "
        "FROM CM_UpdatePackageSiteStatus ss "
        "LEFT JOIN EasySetupSettings e ON e.PackageGuid = ss.PackageGuid "
        "LEFT JOIN SMSPackages sp ON sp.PkgID = e.PackageID "
        "WHERE ss.SiteNumber = ? AND ss.State IN (?, ?)",
        (local.number, int(PackageState.ENABLED), int(PackageState.CONTENT_REPLICATING)),
    ).fetchall()
    changes = []
    for guid, state, wanted, stored in rows:
        ready = bool(wanted) and bool(stored) and str(wanted).upper() == str(stored).upper()
        new = (
            PackageState.CONTENT_REPLICATION_SUCCESS if ready else PackageState.CONTENT_REPLICATING
        )
        if int(state) != new and spCMUSetSiteState(conn, str(guid), new):
            changes.append((str(guid), int(new)))
    return changes


def child_run_progress(conn: sqlite3.Connection) -> list[tuple[str, int]]:
    """What a child site does after replicated rows or a despooled package arrive:
    start_replicated_runs, then mark_replicated_content."""
    start_replicated_runs(conn)
    return mark_replicated_content(conn)


def site_state(conn: sqlite3.Connection, guid: str, site_code: str) -> int | None:
    """One site's state for an update, as this database knows it."""
    row = conn.execute(
        "SELECT ss.State FROM CM_UpdatePackageSiteStatus ss "
        "JOIN ServerData sd ON sd.ID = ss.SiteNumber "
        "WHERE ss.PackageGuid = ? AND sd.SiteCode = ?",
        (guid, site_code),
    ).fetchone()
    return None if row is None else int(row[0])


# The installation stage's states (0x3xxxx) but its failures: an update in one of these is
# being installed (so a 196612.ESC that reaches HMAN now is early).
INSTALLING_STATES = tuple(
    s
    for s in PackageState
    if s >> 16 == 3 and s != PackageState.INSTALL_SUCCESS and s not in FAILED_STATES
)


def current_install(conn: sqlite3.Connection) -> tuple[str, int] | None:
    """The update being installed or last installed at this site: the newest state change
    among the installation states and INSTALL_SUCCESS (failed installations are left out).
    This site's own status row counts first: the package's state is a roll-up that lags
    behind it (and stands still while install steps 5-13 have SMSDBMon's triggers removed)."""
    states = ", ".join(str(int(s)) for s in (*INSTALLING_STATES, PackageState.INSTALL_SUCCESS))
    row = conn.execute(
        "SELECT p.PackageGuid, COALESCE(ss.State, p.State) AS SiteState "
        "FROM CM_UpdatePackages p LEFT JOIN CM_UpdatePackageSiteStatus ss "
        "ON ss.PackageGuid = p.PackageGuid AND ss.SiteNumber = ? "
        f"WHERE SiteState IN ({states}) "
        "ORDER BY COALESCE(ss.UpdateTime, p.LastUpdateTime) DESC, p.FullVersion DESC LIMIT 1",
        (local_site_number(conn),),
    ).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


@dataclass(frozen=True)
class PackageProgress:
    """Where a package stands, for a command or a test that waits on it."""

    state: int
    flag: int
    # The run goes on by itself from this state (RUN_GOES_ON), or a failed download is queued
    # again (DMPDownloader retries it; the row leaves the queue with the next result): a waiter
    # keeps waiting.
    goes_on: bool


def package_progress(conn: sqlite3.Connection, guid: str) -> PackageProgress | None:
    row = conn.execute(
        f"SELECT p.State, p.Flag, {RUN_GOES_ON} OR (p.State = ? AND EXISTS (SELECT 1 FROM "
        "CM_UpdatePackagesToDownload d WHERE d.PackageGuid = p.PackageGuid)) "
        "FROM CM_UpdatePackages p WHERE p.PackageGuid = ?",
        (int(PackageState.DOWNLOAD_FAILED), guid),
    ).fetchone()
    if row is None:
        return None
    return PackageProgress(state=int(row[0]), flag=int(row[1]), goes_on=bool(row[2]))
