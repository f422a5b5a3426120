"""The stored procedures of the Replication and Prerequisite check stages
(`cmlab.site.sitedb.servicing`)
on a real SQLite site database made by `cmlab init`, with its SMSDBMon and monitoring triggers;
no daemon. Rows are inserted by hand, as a trainee with `sqlite3` would; the guide's queries run
as written. Last, the CLI that calls them (`cmlab prereq | install | retry-replication`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmlab.site.sitedb import connect, migrate, transaction
from cmlab.site.sitedb.functions import tsql_to_sqlite
from cmlab.site.sitedb.schema import SCHEMA_VERSION
from cmlab.site.sitedb.servicing import (
    InitiateUpgrade,
    NotInitiable,
    PendingPackage,
    RetryContentReplication,
    clear_prereq_messages,
    easy_setup_package,
    easy_setup_package_id,
    enabled_package,
    record_stored_package,
    set_distribution_state,
    sp_UpdateEasySetupSettings,
    spCMUAddPrereqMessage,
    spCMUGetPendingUpdatePackage,
    spCMUSetSiteState,
    spProcessCMU,
    spProcessCMUPackages,
)
from cmlab.site.state_codes import PackageFlag, PackageState
from tests.helpers.cli import cmlab

GUID = "420E3E18-73C5-4BE9-88B0-6F1E30A012CA"  # 2509
OTHER = "6B0783D9-B8A2-4848-82F6-8EFE956F4988"  # 2503 hotfix rollup
THIRD = "345A6BE1-3D07-43ED-B6E5-FAC0889DA04C"
HASH = "A" * 64
SHARE = rf"\\cas.cmlab.local\EasySetupPayLoad\{GUID}"
CFD = "hman.box/CFD"
GUIDE_COLUMNS = [
    "PackageID",
    "PackageVersion",
    "PackageHash",
    "PackageGUID",
    "StoredPkgHash",
    "Source",
    "SourceSite",
    "LastRefresh",
    "StoredPkgVersion",
    "StorePkgFlag",
    "SourceDate",
    "SourceVersion",
    "SourceSize",
]
DOWNLOAD_STATES = (
    PackageState.DOWNLOAD_IN_PROGRESS,
    PackageState.DOWNLOAD_SUCCESS,
    PackageState.DOWNLOAD_FAILED,
)
APPLICABILITY_STATES = (
    PackageState.APPLICABILITY_CHECKING,
    PackageState.APPLICABILITY_SUCCESS,
    PackageState.APPLICABILITY_HIDE,
    PackageState.APPLICABILITY_NA,
    PackageState.APPLICABILITY_FAILED,
)
# Replication, prerequisite check and installation states: 65537..262143.
SERVICING_STATES = tuple(s for s in PackageState if 65537 <= s <= 262143)


# -- fixtures and helpers ---------------------------------------------------------------------


# `site` (tests/conftest.py): a copy of the session's new site, as `cmlab init` made it (a
# signed lab cloud, a database at the current schema); no daemon runs.


@pytest.fixture
def conn(site: Path) -> Iterator[sqlite3.Connection]:
    c = connect(site / "db" / "site.db", "CAS")
    yield c
    c.close()


def add_package(
    conn: sqlite3.Connection, guid: str, state: int, *, flag: int = 0, name: str = ""
) -> None:
    with transaction(conn):
        conn.execute(
            "INSERT INTO CM_UpdatePackages (PackageGuid, Name, UpdateNumber, FullVersion, "
            "MinCMVersion, MaxCMVersion, State, Flag) "
            "VALUES (?, ?, '2509', '5.00.9141.1000', '5.00.8790.1000', '5.00.9135.1000', ?, ?)",
            (guid, name or f"Configuration Manager {guid[:4]}", int(state), flag),
        )


def add_site(conn: sqlite3.Connection, number: int, code: str, site_type: int = 2) -> None:
    with transaction(conn):
        conn.execute(
            "INSERT INTO ServerData (ID, SiteCode, ParentSiteCode, SiteServerName, SiteType) "
            "VALUES (?, ?, 'CAS', ?, ?)",
            (number, code, f"{code.lower()}.cmlab.local", site_type),
        )


def set_site_row(conn: sqlite3.Connection, guid: str, number: int, state: int) -> None:
    with transaction(conn):
        conn.execute(
            "INSERT INTO CM_UpdatePackageSiteStatus (PackageGuid, SiteNumber, State) "
            "VALUES (?, ?, ?) ON CONFLICT (PackageGuid, SiteNumber) DO UPDATE SET "
            "State = excluded.State",
            (guid, number, int(state)),
        )


def record_esp(
    conn: sqlite3.Connection, guid: str = GUID, digest: str = HASH, size: int = 4096
) -> str:
    """What HMAN does on 2.ESC: the update's Easy Setup Package, recorded."""
    with transaction(conn):
        package_id = easy_setup_package_id(conn, guid, "CAS")
        sp_UpdateEasySetupSettings(
            conn,
            package_id,
            2,
            digest,
            guid=guid,
            source=rf"\\cas.cmlab.local\EasySetupPayLoad\{guid}",
            source_site="CAS",
            source_size=size,
        )
    return package_id


def notifications(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """SMSDBMon's queue: (trigger, file, folder), in order."""
    return [
        (str(r[0]), str(r[1]), str(r[2]))
        for r in conn.execute(
            "SELECT TriggerName, FileName, Directory FROM TableChangeNotifications ORDER BY ID"
        )
    ]


def drain(conn: sqlite3.Connection) -> None:
    """As SMSDBMon does once it dropped the files."""
    with transaction(conn):
        conn.execute("DELETE FROM TableChangeNotifications")


def package(conn: sqlite3.Connection, guid: str = GUID) -> tuple[int, int]:
    row = conn.execute(
        "SELECT State, Flag FROM CM_UpdatePackages WHERE PackageGuid = ?", (guid,)
    ).fetchone()
    return int(row[0]), int(row[1])


def site_rows(conn: sqlite3.Connection, guid: str = GUID) -> dict[int, tuple[int, int]]:
    return {
        int(r[0]): (int(r[1]), int(r[2]))
        for r in conn.execute(
            "SELECT SiteNumber, State, Flag FROM CM_UpdatePackageSiteStatus WHERE PackageGuid = ?",
            (guid,),
        )
    }


def monitoring(conn: sqlite3.Connection, guid: str = GUID) -> dict[int, tuple[int, int]]:
    return {
        int(r[0]): (int(r[1]), int(r[2]))
        for r in conn.execute(
            "SELECT SubStageID, IsComplete, Progress FROM CM_UpdatePackage_MonitoringStatus "
            "WHERE PackageGuid = ?",
            (guid,),
        )
    }


# -- InitiateUpgrade ----------------------------------------------------------------------------


def test_initiate_upgrade_enables_the_package_and_queues_2_esc(conn: sqlite3.Connection) -> None:
    add_package(conn, GUID, PackageState.DOWNLOAD_SUCCESS)
    assert notifications(conn) == []
    with transaction(conn):
        was = InitiateUpgrade(conn, GUID.lower(), PackageFlag.PREREQ_ONLY)
    assert was == PackageState.DOWNLOAD_SUCCESS
    assert package(conn) == (PackageState.ENABLED, PackageFlag.PREREQ_ONLY)
    assert notifications(conn) == [("CM_UpdatePackages_UPD_HMAN", "2.ESC", CFD)]
    (key,) = conn.execute("SELECT KeyValue FROM TableChangeNotifications").fetchone()
    assert str(key) == "2"


@pytest.mark.parametrize(
    "state",
    [*APPLICABILITY_STATES, PackageState.DOWNLOAD_IN_PROGRESS, PackageState.DOWNLOAD_FAILED],
    ids=lambda s: s.name,
)
def test_initiate_upgrade_refuses_a_package_that_is_not_downloaded(
    conn: sqlite3.Connection, state: PackageState
) -> None:
    add_package(conn, GUID, state)
    with pytest.raises(NotInitiable, match=rf"is {state.name} \({int(state)}\); an update can be"):
        InitiateUpgrade(conn, GUID, PackageFlag.NORMAL)
    assert package(conn) == (state, 0)
    assert notifications(conn) == []


def test_initiate_upgrade_refuses_an_unknown_package(conn: sqlite3.Connection) -> None:
    unknown = "00000000-0000-0000-0000-0000000000AB"
    with pytest.raises(NotInitiable, match=f"no update package {unknown} in CM_UpdatePackages"):
        InitiateUpgrade(conn, unknown, PackageFlag.NORMAL)


@pytest.mark.parametrize(
    "busy",
    [
        PackageState.ENABLED,
        PackageState.CONTENT_REPLICATING,
        PackageState.CONTENT_REPLICATION_SUCCESS,
        PackageState.PREREQ_IN_PROGRESS,
        PackageState.INSTALL_IN_PROGRESS,
    ],
    ids=lambda s: s.name,
)
def test_initiate_upgrade_refuses_a_second_update_while_one_is_in_progress(
    conn: sqlite3.Connection, busy: PackageState
) -> None:
    add_package(conn, OTHER, busy, flag=1, name="Hotfix rollup 2503")
    add_package(conn, GUID, PackageState.DOWNLOAD_SUCCESS)
    with pytest.raises(
        NotInitiable,
        match=rf"another update is in progress: Hotfix rollup 2503 \({OTHER}\) is "
        rf"{busy.name} \({int(busy)}\)",
    ):
        InitiateUpgrade(conn, GUID, PackageFlag.NORMAL)
    assert package(conn) == (PackageState.DOWNLOAD_SUCCESS, 0)
    assert package(conn, OTHER) == (busy, 1)


@pytest.mark.parametrize(
    ("state", "flag"),
    [
        (PackageState.PREREQ_SUCCESS, 0),
        (PackageState.PREREQ_SUCCESS, 2),
        (PackageState.PREREQ_WARNING, 2),
    ],
    ids=["success-install", "success-ignore-warnings", "warning-ignore-warnings"],
)
def test_initiate_upgrade_refuses_while_a_prerequisite_result_goes_on_to_install(
    conn: sqlite3.Connection, state: PackageState, flag: int
) -> None:
    """At a result its run goes on from, CMUpdate is installing the update: neither it nor
    another update can be started meanwhile. The same result of a check only (Flag 1), or a
    warning with Flag 0, ends the run: both can be started."""
    add_package(conn, GUID, state, flag=flag, name="Configuration Manager 2509")
    add_package(conn, OTHER, PackageState.DOWNLOAD_SUCCESS, name="Hotfix rollup 2503")
    with pytest.raises(NotInitiable, match=r"is being installed: its prerequisite result"):
        InitiateUpgrade(conn, GUID, PackageFlag.NORMAL)
    with pytest.raises(NotInitiable, match=r"another update is in progress: Configuration"):
        InitiateUpgrade(conn, OTHER, PackageFlag.NORMAL)
    assert package(conn) == (state, flag)
    with transaction(conn):
        conn.execute("UPDATE CM_UpdatePackages SET Flag = 1 WHERE PackageGuid = ?", (GUID,))
    with transaction(conn):
        assert InitiateUpgrade(conn, GUID, PackageFlag.NORMAL) == state
    assert package(conn) == (PackageState.ENABLED, PackageFlag.NORMAL)


def test_initiate_upgrade_again_on_the_update_in_progress_is_allowed(
    conn: sqlite3.Connection,
) -> None:
    """The console's button on the same update: ENABLED again (HMAN re-hashes its source)."""
    add_package(conn, GUID, PackageState.ENABLED, flag=1)
    with transaction(conn):
        assert InitiateUpgrade(conn, GUID, PackageFlag.NORMAL) == PackageState.ENABLED
    assert package(conn) == (PackageState.ENABLED, PackageFlag.NORMAL)
    assert notifications(conn) == [("CM_UpdatePackages_UPD_HMAN", "2.ESC", CFD)]


def test_initiate_upgrade_restarts_every_site_of_that_update(conn: sqlite3.Connection) -> None:
    """The last run's failure at a site is not rolled up into the new run."""
    add_site(conn, 2, "PR1")
    add_package(conn, GUID, PackageState.PREREQ_ERROR, flag=1)
    add_package(conn, OTHER, PackageState.DOWNLOAD_SUCCESS)
    record_esp(conn)
    set_site_row(conn, GUID, 1, PackageState.PREREQ_SUCCESS)
    set_site_row(conn, GUID, 2, PackageState.PREREQ_ERROR)
    set_site_row(conn, OTHER, 1, PackageState.DOWNLOAD_SUCCESS)
    with transaction(conn):
        assert InitiateUpgrade(conn, GUID, PackageFlag.IGNORE_WARNINGS) == PackageState.PREREQ_ERROR
    assert site_rows(conn) == {1: (PackageState.ENABLED, 2), 2: (PackageState.ENABLED, 2)}
    assert site_rows(conn, OTHER) == {1: (PackageState.DOWNLOAD_SUCCESS, 0)}
    with transaction(conn):
        assert spProcessCMU(conn, GUID) == PackageState.ENABLED
    assert package(conn) == (PackageState.ENABLED, 2)


# -- HMAN's queries -----------------------------------------------------------------------------


def test_enabled_package_runs_the_guides_query(conn: sqlite3.Connection) -> None:
    query = "SELECT TOP 1 convert(NVARCHAR(40), PackageGuid) FROM CM_UpdatePackages WHERE State=2"
    add_package(conn, OTHER, PackageState.DOWNLOAD_SUCCESS)
    assert enabled_package(conn) is None
    assert conn.execute(tsql_to_sqlite(query)).fetchall() == []
    add_package(conn, GUID, PackageState.ENABLED)
    assert enabled_package(conn) == GUID
    assert conn.execute(tsql_to_sqlite(query)).fetchall() == [(GUID,)]


def test_easy_setup_package_ids_are_the_sites_next_and_stable(conn: sqlite3.Connection) -> None:
    add_package(conn, GUID, PackageState.ENABLED)
    add_package(conn, OTHER, PackageState.DOWNLOAD_SUCCESS)
    assert easy_setup_package_id(conn, GUID, "CAS") == "CAS10001"
    assert record_esp(conn, GUID) == "CAS10001"
    # The same update keeps its package, whatever the GUID's case.
    assert easy_setup_package_id(conn, GUID, "CAS") == "CAS10001"
    assert easy_setup_package_id(conn, GUID.lower(), "cas") == "CAS10001"
    assert record_esp(conn, GUID) == "CAS10001"
    assert easy_setup_package_id(conn, OTHER, "cas") == "CAS10002"
    assert record_esp(conn, OTHER) == "CAS10002"
    assert [r[0] for r in conn.execute("SELECT PackageID FROM vEasySetupPackage ORDER BY 1")] == [
        "CAS10001",
        "CAS10002",
    ]


def test_sp_update_easy_setup_settings_fills_the_guides_view_and_wakes_distmgr(
    conn: sqlite3.Connection,
) -> None:
    add_package(conn, GUID, PackageState.ENABLED)
    drain(conn)
    with transaction(conn):
        version = sp_UpdateEasySetupSettings(
            conn,
            "CAS10001",
            2,
            HASH,
            guid=GUID.lower(),
            source=SHARE,
            source_site="CAS",
            source_size=123456,
        )
    assert version == 1
    cur = conn.execute(f"Select * from vEasySetupPackage where PackageGUID = '{GUID}'")
    assert [d[0] for d in cur.description] == GUIDE_COLUMNS
    (row,) = cur.fetchall()
    v = dict(zip(GUIDE_COLUMNS, row, strict=True))
    assert v["PackageID"] == "CAS10001" and v["PackageGUID"].upper() == GUID
    assert v["PackageVersion"] == 1 and v["PackageHash"] == HASH
    assert v["Source"] == SHARE and v["SourceSite"] == "CAS" and v["SourceSize"] == 123456
    assert v["SourceVersion"] == 1 and v["StorePkgFlag"] == 2 and v["SourceDate"]
    # Not stored by DistMgr yet.
    assert v["StoredPkgHash"] is None and v["StoredPkgVersion"] == 0 and v["LastRefresh"] is None
    assert notifications(conn) == [
        ("EasySetupSettings_INS_HMAN", f"{GUID}.CME", CFD),
        ("SMSPackages_INS_DISTMGR", "CAS10001.PKN", "distmgr.box"),
    ]
    drain(conn)

    new_hash = "B" * 64
    with transaction(conn):
        version = sp_UpdateEasySetupSettings(
            conn,
            "CAS10001",
            2,
            new_hash,
            guid=GUID,
            source=SHARE,
            source_site="CAS",
            source_size=999,
        )
    assert version == 2
    esp = easy_setup_package(conn, GUID)
    assert esp is not None
    assert (esp.package_version, esp.source_version, esp.package_hash) == (2, 2, new_hash)
    (size,) = conn.execute("SELECT SourceSize FROM vEasySetupPackage").fetchone()
    assert size == 999
    assert notifications(conn) == [
        ("EasySetupSettings_UPD_HMAN", f"{GUID}.CME", CFD),
        ("SMSPackages_UPD_DISTMGR", "CAS10001.PKN", "distmgr.box"),
    ]


def test_a_stored_version_does_not_wake_distmgr_again(conn: sqlite3.Connection) -> None:
    """DistMgr recording what it stored changes no SourceVersion: no PKN loop."""
    add_package(conn, GUID, PackageState.CONTENT_REPLICATING)
    record_esp(conn)
    drain(conn)
    with transaction(conn):
        record_stored_package(conn, "CAS10001", 1, HASH)
    assert notifications(conn) == []
    esp = easy_setup_package(conn, GUID)
    assert esp is not None and (esp.stored_pkg_version, esp.stored_pkg_hash) == (1, HASH)


# -- this site's state, and the CME it causes ---------------------------------------------------


def test_spcmusetsitestate_with_and_without_only_from(conn: sqlite3.Connection) -> None:
    add_package(conn, GUID, PackageState.CONTENT_REPLICATING, flag=2)
    # only_from and no row yet: nothing to move from.
    with transaction(conn):
        assert not spCMUSetSiteState(
            conn,
            GUID,
            PackageState.CONTENT_REPLICATION_SUCCESS,
            only_from=(PackageState.CONTENT_REPLICATING,),
        )
    assert site_rows(conn) == {}
    with transaction(conn):
        assert spCMUSetSiteState(conn, GUID, PackageState.CONTENT_REPLICATING)
        assert not spCMUSetSiteState(conn, GUID, PackageState.CONTENT_REPLICATING)  # unchanged
    assert site_rows(conn) == {1: (PackageState.CONTENT_REPLICATING, 2)}
    with transaction(conn):
        assert spCMUSetSiteState(
            conn,
            GUID,
            PackageState.CONTENT_REPLICATION_SUCCESS,
            only_from=(PackageState.CONTENT_REPLICATING,),
        )
        # A replayed DistMgr failure cannot undo the later success.
        assert not spCMUSetSiteState(
            conn,
            GUID,
            PackageState.CONTENT_REPLICATION_FAILED,
            only_from=(PackageState.CONTENT_REPLICATING,),
        )
    assert site_rows(conn) == {1: (PackageState.CONTENT_REPLICATION_SUCCESS, 2)}
    with transaction(conn):
        assert spCMUSetSiteState(conn, GUID, PackageState.PREREQ_IN_PROGRESS)
    assert site_rows(conn) == {1: (PackageState.PREREQ_IN_PROGRESS, 2)}
    # The package's own state is HMAN's roll-up, not this procedure's.
    assert package(conn) == (PackageState.CONTENT_REPLICATING, 2)


def test_site_status_queues_no_cme_for_an_update_without_easy_setup_package(
    conn: sqlite3.Connection,
) -> None:
    add_package(conn, GUID, PackageState.CONTENT_REPLICATING)
    for state in (PackageState.CONTENT_REPLICATING, PackageState.PREREQ_SUCCESS):
        with transaction(conn):
            spCMUSetSiteState(conn, GUID, state)
    assert notifications(conn) == []


@pytest.mark.parametrize("state", SERVICING_STATES, ids=lambda s: s.name)
def test_site_status_queues_cme_for_replication_prereq_and_install_states(
    conn: sqlite3.Connection, state: PackageState
) -> None:
    add_package(conn, GUID.lower(), PackageState.ENABLED)
    record_esp(conn, GUID.lower())
    drain(conn)
    other = (
        PackageState.CONTENT_REPLICATING
        if state != PackageState.CONTENT_REPLICATING
        else PackageState.PREREQ_IN_PROGRESS
    )
    # INSTALL_SUCCESS is a site's last state (nothing moves it on): report it second.
    first, then = (other, state) if state == PackageState.INSTALL_SUCCESS else (state, other)
    with transaction(conn):
        assert spCMUSetSiteState(conn, GUID, first)  # first report: the INSERT trigger
    assert notifications(conn) == [("CM_UpdatePackageSiteStatus_INS_HMAN", f"{GUID}.CME", CFD)]
    drain(conn)
    with transaction(conn):
        assert spCMUSetSiteState(conn, GUID, then)  # a later one: the UPDATE trigger
    assert notifications(conn) == [("CM_UpdatePackageSiteStatus_UPD_HMAN", f"{GUID}.CME", CFD)]


@pytest.mark.parametrize(
    "state", [*DOWNLOAD_STATES, *APPLICABILITY_STATES, PackageState.ENABLED], ids=lambda s: s.name
)
def test_site_status_never_queues_cme_for_download_applicability_or_enabled(
    conn: sqlite3.Connection, state: PackageState
) -> None:
    add_package(conn, GUID, PackageState.ENABLED)
    record_esp(conn)
    set_site_row(conn, GUID, 1, PackageState.PREREQ_SUCCESS)  # a previous run
    drain(conn)
    with transaction(conn):
        assert spCMUSetSiteState(conn, GUID, state)
    assert notifications(conn) == []
    with transaction(conn):
        conn.execute("DELETE FROM CM_UpdatePackageSiteStatus")
        assert spCMUSetSiteState(conn, GUID, state)
    assert notifications(conn) == []


# -- ObjectDistributionState and the monitoring table --------------------------------------------


def guide_monitoring_query(conn: sqlite3.Connection, guid: str) -> list[dict[str, object]]:
    query = (
        "select ServerData.SiteCode, cmums.* from CM_UpdatePackage_MonitoringStatus cmums "
        "Left join serverdata on cmums.SiteNumber=ServerData.ID where "
        f"PackageGUID='{guid}'"
    )
    cur = conn.execute(tsql_to_sqlite(query))
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def test_distribution_state_feeds_monitoring_substage_b0002(conn: sqlite3.Connection) -> None:
    add_package(conn, GUID, PackageState.CONTENT_REPLICATING)
    record_esp(conn)
    seen = []
    # (ObjectDistributionState.State, IsComplete, Progress): INSTALL_PENDING (the INSERT
    # trigger), INSTALLED, INSTALL_FAILED, INSTALL_RETRYING (the UPDATE trigger).
    for ods_state, complete, progress in ((1, 1, 0), (0, 2, 100), (3, 4, 0), (2, 1, 0)):
        with transaction(conn):
            set_distribution_state(conn, "CAS10001", "CAS", ods_state, 1, "lab")
        assert monitoring(conn)[0xB0002] == (complete, progress)
        seen.append(complete)
    assert seen == [1, 2, 4, 1]
    with transaction(conn):
        set_distribution_state(conn, "cas10001", "cas", 0, 2, "Package stored")
    (row,) = guide_monitoring_query(conn, GUID.lower())
    assert row["SiteCode"] == "CAS"
    assert row["PackageGuid"].upper() == GUID
    assert (row["SubStageID"], row["IsComplete"], row["Progress"]) == (0xB0002, 2, 100)
    assert (row["SiteNumber"], row["Applicable"]) == (1, 1) and row["MessageTime"]
    # The table: one row per package and site.
    assert conn.execute("SELECT COUNT(*) FROM ObjectDistributionState").fetchone() == (1,)


def test_distribution_state_insert_trigger_records_a_failure_at_once(
    conn: sqlite3.Connection,
) -> None:
    add_package(conn, GUID, PackageState.CONTENT_REPLICATING)
    record_esp(conn)
    with transaction(conn):
        set_distribution_state(conn, "CAS10001", "CAS", 3, 1, "Failed to take snapshot")
    assert monitoring(conn) == {0xB0002: (4, 0)}


def test_distribution_state_of_other_packages_is_not_monitored(conn: sqlite3.Connection) -> None:
    add_package(conn, GUID, PackageState.CONTENT_REPLICATING)
    record_esp(conn)
    with transaction(conn):
        set_distribution_state(conn, "CAS00042", "CAS", 0, 1)  # not an Easy Setup Package
        set_distribution_state(conn, "CAS10001", "XYZ", 0, 1)  # no such site
    assert monitoring(conn) == {}
    assert conn.execute("SELECT COUNT(*) FROM CM_UpdatePackage_MonitoringStatus").fetchone() == (0,)


# -- CMUpdate's procedures ---------------------------------------------------------------------


def test_prereq_messages_are_upserted_and_cleared_for_this_site_only(
    conn: sqlite3.Connection,
) -> None:
    add_site(conn, 2, "PR1")
    add_package(conn, GUID, PackageState.PREREQ_IN_PROGRESS)
    add_package(conn, OTHER, PackageState.PREREQ_ERROR)
    with transaction(conn):
        spCMUAddPrereqMessage(conn, GUID, "cas.cmlab.local", "Pending system restart", 1, "w")
        spCMUAddPrereqMessage(conn, GUID, "cas.cmlab.local", "Pending system restart", 2, "again")
        spCMUAddPrereqMessage(conn, GUID, "cas.cmlab.local", "SQL Server version", 0, "")
        spCMUAddPrereqMessage(conn, OTHER, "cas.cmlab.local", "SQL Server version", 2, "old")
        conn.execute(
            "INSERT INTO CM_UpdatePackagePrereqStatus (PackageGuid, SiteNumber, ServerName, "
            "RuleName, Status, Message) VALUES (?, 2, 'pr1.cmlab.local', 'Pending system "
            "restart', 1, 'primary')",
            (GUID,),
        )
    rows = conn.execute(
        "SELECT SiteNumber, RuleName, Status, Message FROM CM_UpdatePackagePrereqStatus "
        "WHERE PackageGuid = ? ORDER BY SiteNumber, RuleName",
        (GUID,),
    ).fetchall()
    assert rows == [
        (1, "Pending system restart", 2, "again"),
        (1, "SQL Server version", 0, ""),
        (2, "Pending system restart", 1, "primary"),
    ]
    with transaction(conn):
        clear_prereq_messages(conn, GUID.lower())
    left = conn.execute(
        "SELECT PackageGuid, SiteNumber FROM CM_UpdatePackagePrereqStatus ORDER BY 1"
    ).fetchall()
    assert sorted((g.upper(), n) for g, n in left) == [(GUID, 2), (OTHER, 1)]


def test_pending_update_package_has_this_sites_state_flag_and_stored_content(
    conn: sqlite3.Connection,
) -> None:
    add_site(conn, 2, "PR1")
    add_package(
        conn, GUID, PackageState.CONTENT_REPLICATING, flag=2, name="Configuration Manager 2509"
    )
    add_package(
        conn, OTHER, PackageState.PREREQ_SUCCESS, flag=1
    )  # a check only, finished: not pending
    add_package(conn, THIRD, PackageState.ENABLED)  # in progress, but no Easy Setup Package yet
    record_esp(conn, GUID)
    record_esp(conn, OTHER)
    assert [p.state for p in spCMUGetPendingUpdatePackage(conn)] == [
        PackageState.CONTENT_REPLICATING
    ]
    # The same result with Flag 0 (install) or a warning with Flag 2 is where the installation
    # goes on from; a warning with Flag 0 ends the run.
    for flag, state, pending in (
        (0, PackageState.PREREQ_SUCCESS, True),
        (2, PackageState.PREREQ_SUCCESS, True),
        (2, PackageState.PREREQ_WARNING, True),
        (0, PackageState.PREREQ_WARNING, False),
        (1, PackageState.PREREQ_WARNING, False),
    ):
        with transaction(conn):
            conn.execute(
                "UPDATE CM_UpdatePackages SET State = ?, Flag = ? WHERE PackageGuid = ?",
                (int(state), flag, OTHER),
            )
        found = {p.guid for p in spCMUGetPendingUpdatePackage(conn)}
        assert (OTHER in found) is pending, (flag, state)
    with transaction(conn):
        conn.execute("UPDATE CM_UpdatePackages SET Flag = 1 WHERE PackageGuid = ?", (OTHER,))
    with transaction(conn):
        record_stored_package(conn, "CAS10001", 1, "ab" * 32)
        spCMUSetSiteState(conn, GUID, PackageState.CONTENT_REPLICATION_SUCCESS)
    set_site_row(conn, GUID, 2, PackageState.CONTENT_REPLICATION_FAILED)  # another site's: not ours
    assert spCMUGetPendingUpdatePackage(conn) == [
        PendingPackage(
            guid=GUID,
            name="Configuration Manager 2509",
            state=PackageState.CONTENT_REPLICATION_SUCCESS,
            flag=2,
            package_type=0,
            update_number="2509",
            full_version="5.00.9141.1000",
            min_cm_version="5.00.8790.1000",
            max_cm_version="5.00.9135.1000",
            package_id="CAS10001",
            stored_version=1,
            stored_hash="AB" * 32,
        )
    ]


# -- HMAN's roll-up -----------------------------------------------------------------------------

PS, PW, PE, PIP = (
    PackageState.PREREQ_SUCCESS,
    PackageState.PREREQ_WARNING,
    PackageState.PREREQ_ERROR,
    PackageState.PREREQ_IN_PROGRESS,
)
CRS, CRF, CRI = (
    PackageState.CONTENT_REPLICATION_SUCCESS,
    PackageState.CONTENT_REPLICATION_FAILED,
    PackageState.CONTENT_REPLICATING,
)


@pytest.mark.parametrize(
    ("cas", "pr1", "pr2", "expected"),
    [
        # The guide's example: the CAS passed, a primary warned.
        (PS, PW, None, PW),
        (PS, PS, PS, PS),
        (PW, PS, PW, PW),
        # Any failure wins, even over a site still working.
        (PS, PE, PW, PE),
        (PW, CRF, PS, CRF),
        (PE, PIP, None, PE),
        (PS, PS, PackageState.INSTALL_FAILED, PackageState.INSTALL_FAILED),
        # A site still working keeps the update in progress.
        (PS, PIP, None, PIP),
        (PW, PIP, PS, PIP),
        (PS, CRI, PW, CRI),
        (CRS, CRS, CRS, CRS),
    ],
)
def test_roll_up_is_the_worst_of_all_sites(
    conn: sqlite3.Connection,
    cas: PackageState,
    pr1: PackageState,
    pr2: PackageState | None,
    expected: PackageState,
) -> None:
    add_site(conn, 2, "PR1")
    add_site(conn, 3, "PR2")
    add_site(conn, 4, "SE1", site_type=1)  # a secondary site is not checked
    add_package(conn, GUID, PackageState.PREREQ_IN_PROGRESS, flag=1)
    record_esp(conn)
    for number, state in ((1, cas), (2, pr1), (3, pr2), (4, PackageState.PREREQ_ERROR)):
        if state is not None:
            set_site_row(conn, GUID, number, state)
    with transaction(conn):
        assert spProcessCMUPackages(conn) == {GUID: expected}
    assert package(conn) == (expected, 1)


def test_a_site_not_yet_checked_keeps_the_update_in_progress(conn: sqlite3.Connection) -> None:
    add_site(conn, 2, "PR1")
    add_package(conn, GUID, PackageState.PREREQ_IN_PROGRESS, flag=1)
    record_esp(conn)
    set_site_row(conn, GUID, 1, PW)
    set_site_row(conn, GUID, 2, CRS)  # replicated; its CMUpdate has not checked yet
    with transaction(conn):
        spProcessCMUPackages(conn)
    # Not PREREQ_WARNING: HMAN would end the run (Flag 1) and never roll up PR1's result.
    assert package(conn) == (CRS, 1)
    set_site_row(conn, GUID, 2, PE)  # then its check fails
    with transaction(conn):
        spProcessCMUPackages(conn)
    assert package(conn) == (PE, 1)


def test_roll_up_leaves_packages_that_are_not_in_progress_alone(conn: sqlite3.Connection) -> None:
    add_site(conn, 2, "PR1")
    add_package(conn, GUID, PackageState.PREREQ_IN_PROGRESS, flag=1)
    add_package(conn, OTHER, PackageState.PREREQ_SUCCESS, flag=1)  # an ended run
    add_package(conn, THIRD, PackageState.DOWNLOAD_SUCCESS)
    for guid in (GUID, OTHER, THIRD):
        record_esp(conn, guid)
    set_site_row(conn, GUID, 1, PS)
    for guid in (OTHER, THIRD):
        set_site_row(conn, guid, 1, PE)
        set_site_row(conn, guid, 2, PE)
    with transaction(conn):
        assert spProcessCMUPackages(conn) == {GUID: PS}
    assert package(conn, OTHER) == (PS, 1)
    assert package(conn, THIRD) == (PackageState.DOWNLOAD_SUCCESS, 0)
    with transaction(conn):  # spProcessCMU itself leaves a package that was never started
        assert spProcessCMU(conn, THIRD) == PackageState.DOWNLOAD_SUCCESS
        assert spProcessCMU(conn, "00000000-0000-0000-0000-0000000000AB") is None
    assert package(conn, THIRD) == (PackageState.DOWNLOAD_SUCCESS, 0)


def test_roll_up_ignores_download_states_and_sites_not_started(conn: sqlite3.Connection) -> None:
    add_site(conn, 2, "PR1")
    add_package(conn, GUID, PackageState.CONTENT_REPLICATING, flag=1)
    record_esp(conn)
    set_site_row(conn, GUID, 1, PackageState.CONTENT_REPLICATING)
    set_site_row(conn, GUID, 2, PackageState.DOWNLOAD_FAILED)
    with transaction(conn):
        assert spProcessCMU(conn, GUID) == PackageState.CONTENT_REPLICATING
    assert package(conn) == (PackageState.CONTENT_REPLICATING, 1)


# -- RetryContentReplication --------------------------------------------------------------------


def test_retry_content_replication_forgets_the_hash_and_enables(conn: sqlite3.Connection) -> None:
    add_package(conn, GUID, PackageState.CONTENT_REPLICATION_FAILED, flag=2)
    record_esp(conn)
    set_site_row(conn, GUID, 1, CRF)
    drain(conn)
    with transaction(conn):
        assert RetryContentReplication(conn, GUID.lower()) == "CAS10001"
    assert package(conn) == (PackageState.ENABLED, 2)  # the flag is kept
    esp = easy_setup_package(conn, GUID)
    assert esp is not None and esp.package_hash == "" and esp.source_version == 1
    (stored,) = conn.execute("SELECT PackageHash FROM EasySetupSettings").fetchone()
    assert stored is None
    assert ("CM_UpdatePackages_UPD_HMAN", "2.ESC", CFD) in notifications(conn)
    assert site_rows(conn) == {1: (PackageState.ENABLED, 2)}


@pytest.mark.parametrize(
    "state", [CRI, CRS, PS, PW, PE, PackageState.ENABLED], ids=lambda s: s.name
)
def test_retry_content_replication_is_offered_outside_a_check_or_installation(
    conn: sqlite3.Connection, state: PackageState
) -> None:
    add_package(conn, GUID, state, flag=1)
    record_esp(conn)
    with transaction(conn):
        RetryContentReplication(conn, GUID)
    assert package(conn) == (PackageState.ENABLED, 1)


def test_retry_content_replication_refuses_an_update_without_easy_setup_package(
    conn: sqlite3.Connection,
) -> None:
    add_package(conn, GUID, PackageState.DOWNLOAD_SUCCESS)
    with pytest.raises(NotInitiable, match="has no Easy Setup Package yet"):
        RetryContentReplication(conn, GUID)
    with pytest.raises(NotInitiable, match=f"no update package {OTHER}"):
        RetryContentReplication(conn, OTHER)
    assert package(conn) == (PackageState.DOWNLOAD_SUCCESS, 0)
    assert notifications(conn) == []


@pytest.mark.parametrize("state", [PIP, PackageState.INSTALL_IN_PROGRESS], ids=lambda s: s.name)
def test_retry_content_replication_refuses_while_checking_or_installing(
    conn: sqlite3.Connection, state: PackageState
) -> None:
    add_package(conn, GUID, state, flag=0)
    record_esp(conn)
    drain(conn)
    with pytest.raises(NotInitiable, match=rf"is {state.name} \({int(state)}\); content"):
        RetryContentReplication(conn, GUID)
    assert package(conn) == (state, 0)
    esp = easy_setup_package(conn, GUID)
    assert esp is not None and esp.package_hash == HASH
    assert notifications(conn) == []


def test_retry_content_replication_refuses_while_another_update_is_in_progress(
    conn: sqlite3.Connection,
) -> None:
    add_package(conn, OTHER, PackageState.PREREQ_IN_PROGRESS, flag=1)
    add_package(conn, GUID, PackageState.CONTENT_REPLICATION_FAILED, flag=1)
    record_esp(conn, GUID)
    drain(conn)
    with pytest.raises(
        NotInitiable, match=rf"another update is in progress: .* \({OTHER}\) is PREREQ_IN_PROGRESS"
    ):
        RetryContentReplication(conn, GUID)
    assert package(conn) == (CRF, 1)
    esp = easy_setup_package(conn, GUID)
    assert esp is not None and esp.package_hash == HASH
    assert notifications(conn) == []


# -- migration from schema 2 --------------------------------------------------------------------

NEW_IN_3 = (
    "CM_UpdatePackageSiteStatus_INS_HMAN",
    "CM_UpdatePackageSiteStatus_UPD_HMAN",
    "SMSPackages_INS_DISTMGR",
    "SMSPackages_UPD_DISTMGR",
)


def test_a_site_database_of_schema_2_is_migrated_with_working_triggers(
    conn: sqlite3.Connection,
) -> None:
    with transaction(conn):
        conn.execute("DROP TRIGGER ObjectDistributionState_ins_updMon")
        conn.execute("DROP TRIGGER ObjectDistributionState_upd_updMon")
        conn.execute("DROP TABLE ObjectDistributionState")
        for name in NEW_IN_3:
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("UPDATE SchemaInfo SET Value = '2' WHERE Name = 'version'")
    add_package(conn, GUID, PackageState.DOWNLOAD_SUCCESS)

    assert migrate(conn) == 2
    assert conn.execute("SELECT Value FROM SchemaInfo WHERE Name = 'version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    assert SCHEMA_VERSION >= 3
    names = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master")}
    for name in (
        "ObjectDistributionState",
        "ObjectDistributionState_ins_updMon",
        "ObjectDistributionState_upd_updMon",
        *NEW_IN_3,
    ):
        assert name in names, name
    assert migrate(conn) == SCHEMA_VERSION  # nothing left to do
    assert package(conn) == (PackageState.DOWNLOAD_SUCCESS, 0)  # data kept

    # And they work: the whole replication path, by hand.
    with transaction(conn):
        InitiateUpgrade(conn, GUID, PackageFlag.PREREQ_ONLY)
    drain(conn)
    record_esp(conn)
    assert ("SMSPackages_INS_DISTMGR", "CAS10001.PKN", "distmgr.box") in notifications(conn)
    drain(conn)
    with transaction(conn):
        spCMUSetSiteState(conn, GUID, CRI)
        set_distribution_state(conn, "CAS10001", "CAS", 1, 1)
        set_distribution_state(conn, "CAS10001", "CAS", 0, 1)
    assert notifications(conn) == [("CM_UpdatePackageSiteStatus_INS_HMAN", f"{GUID}.CME", CFD)]
    assert monitoring(conn) == {0xB0002: (2, 100)}
    drain(conn)
    with transaction(conn):
        spCMUSetSiteState(conn, GUID, CRS)
        sp_UpdateEasySetupSettings(
            conn, "CAS10001", 2, HASH, guid=GUID, source=SHARE, source_site="CAS", source_size=1
        )
    assert notifications(conn) == [
        ("CM_UpdatePackageSiteStatus_UPD_HMAN", f"{GUID}.CME", CFD),
        ("EasySetupSettings_UPD_HMAN", f"{GUID}.CME", CFD),
        ("SMSPackages_UPD_DISTMGR", "CAS10001.PKN", "distmgr.box"),
    ]


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_prereq_install_and_ignore_warnings_set_the_flag(
    site: Path, conn: sqlite3.Connection
) -> None:
    add_package(conn, GUID, PackageState.DOWNLOAD_SUCCESS)
    out = cmlab("prereq", str(site), GUID).stdout
    assert "Flag=1 PREREQ_ONLY" in out and "DOWNLOAD_SUCCESS (262146) -> ENABLED (2)" in out
    assert package(conn) == (PackageState.ENABLED, 1)
    out = cmlab("install", str(site), GUID).stdout
    assert "Flag=0 NORMAL" in out and "ENABLED (2) -> ENABLED (2)" in out
    assert package(conn) == (PackageState.ENABLED, 0)
    out = cmlab("install", str(site), GUID, "--ignore-warnings").stdout
    assert "Flag=2 IGNORE_WARNINGS" in out
    assert package(conn) == (PackageState.ENABLED, 2)
    assert [n[1] for n in notifications(conn)] == ["2.ESC"] * 3


def test_cli_retry_replication_keeps_the_flag(site: Path, conn: sqlite3.Connection) -> None:
    add_package(conn, GUID, PackageState.CONTENT_REPLICATION_FAILED, flag=2)
    record_esp(conn)
    out = cmlab("retry-replication", str(site), GUID).stdout
    assert "ReturnValue 0" in out and "CAS10001" in out
    assert package(conn) == (PackageState.ENABLED, 2)
    (stored,) = conn.execute("SELECT PackageHash FROM EasySetupSettings").fetchone()
    assert stored is None


def test_cli_refusals_exit_4_or_5_with_the_reason(site: Path, conn: sqlite3.Connection) -> None:
    """A state the action cannot start from is "refused" (exit code 4); an unknown package is
    "not found" (5)."""
    add_package(conn, GUID, PackageState.APPLICABILITY_SUCCESS)
    add_package(conn, OTHER, PackageState.PREREQ_IN_PROGRESS, flag=1, name="Hotfix rollup 2503")
    add_package(conn, THIRD, PackageState.DOWNLOAD_SUCCESS)
    record_esp(conn, OTHER)
    unknown = "00000000-0000-0000-0000-0000000000AB"
    cases = [
        (("prereq", GUID), 4, "APPLICABILITY_SUCCESS (327682)"),
        (("install", unknown), 5, f"no update package {unknown}"),
        (("retry-replication", unknown), 5, f"no update package {unknown}"),
        (("install", THIRD, "--ignore-warnings"), 4, "another update is in progress: Hotfix"),
        (("retry-replication", THIRD), 4, "has no Easy Setup Package yet"),
        (("retry-replication", OTHER), 4, "PREREQ_IN_PROGRESS (131073); content replication"),
    ]
    for (command, guid, *rest), code, reason in cases:
        proc = cmlab(command, str(site), guid, *rest, check=False)
        assert proc.returncode == code, (command, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("cmlab: ") and reason in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert package(conn) == (PackageState.APPLICABILITY_SUCCESS, 0)
    assert package(conn, OTHER) == (PackageState.PREREQ_IN_PROGRESS, 1)
    assert package(conn, THIRD) == (PackageState.DOWNLOAD_SUCCESS, 0)
    assert notifications(conn) == [
        ("EasySetupSettings_INS_HMAN", f"{OTHER}.CME", CFD),
        ("SMSPackages_INS_DISTMGR", "CAS10001.PKN", "distmgr.box"),
    ]


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        (
            (PackageState.INSTALL_SUCCESS, PackageState.INSTALL_UPGRADEDATABASE),
            PackageState.INSTALL_UPGRADEDATABASE,
        ),
        (
            (PackageState.INSTALL_SUCCESS, PackageState.INSTALL_CMU_VALIDATING),
            PackageState.INSTALL_CMU_VALIDATING,
        ),
        (
            (PackageState.INSTALL_INSTALLFILES, PackageState.INSTALL_UPGRADEDATABASE),
            PackageState.INSTALL_UPGRADEDATABASE,
        ),
        (
            (PackageState.INSTALL_SUCCESS, PackageState.INSTALL_SUCCESS),
            PackageState.INSTALL_SUCCESS,
        ),
    ],
)
def test_installing_sites_roll_up_to_the_least_advanced_not_the_lowest_code(
    conn: sqlite3.Connection, states: tuple[PackageState, PackageState], expected: PackageState
) -> None:
    """The INSTALL_* codes are not numbered in install.map's order: an update is installed
    only when every site is."""
    add_site(conn, 2, "PR1")
    add_package(conn, GUID, PackageState.INSTALL_IN_PROGRESS)
    record_esp(conn)
    for number, state in enumerate(states, 1):
        set_site_row(conn, GUID, number, state)
    with transaction(conn):
        assert spProcessCMUPackages(conn) == {GUID: expected}


def test_set_site_state_of_an_unknown_update_changes_nothing(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        assert not spCMUSetSiteState(
            conn, "11111111-2222-3333-4444-555555555555", PackageState.PREREQ_SUCCESS
        )
