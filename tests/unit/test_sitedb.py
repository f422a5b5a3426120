"""The site database: the guide's names, site functions, triggers, procedures, group commit."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from cmlab.site.sitedb import (
    SiteDB,
    SiteDBClosed,
    connect,
    create_site_db,
    migrate,
    procs,
    servicing,
    transaction,
)
from cmlab.site.sitedb.functions import tsql_to_sqlite, version_to_int
from cmlab.site.sitedb.schema import SCHEMA_VERSION
from cmlab.site.state_codes import IsComplete, PackageState, SubStage

GUID = "420E3E18-73C5-4BE9-88B0-6F1E30A012CA"


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    path = tmp_path / "site.db"
    create_site_db(path, site_code="CAS", role="cas", server="cas.lab", build=9135, minor_build=6)
    conn = connect(path, "CAS")
    with transaction(conn):
        conn.execute(
            "INSERT INTO CM_UpdatePackages (PackageGuid, Name, State) VALUES (?, 'CM 2509', ?)",
            (GUID, int(PackageState.APPLICABILITY_SUCCESS)),
        )
    conn.close()
    return path


def test_site_functions_have_the_guides_forms(db_file: Path) -> None:
    conn = connect(db_file, "CAS")
    row = conn.execute(
        tsql_to_sqlite(
            "SELECT dbo.fnCurrentSiteVersion(), dbo.fnSetupFullVersion(), "
            "dbo.fnCurrentSiteVersion_INT()"
        )
    ).fetchone()
    assert row == ("5.00.9135.1000", "5.00.9135.1006", 5009135)
    assert version_to_int("5.00.9141.1000") == 5009141


def test_guide_queries_run_as_written(db_file: Path) -> None:
    conn = connect(db_file, "CAS")
    with transaction(conn):
        conn.execute("UPDATE CM_UpdatePackages SET State = 2")
    q = "SELECT TOP 1 convert(NVARCHAR(40), PackageGuid) FROM CM_UpdatePackages WHERE State=2"
    assert conn.execute(tsql_to_sqlite(q)).fetchall() == [(GUID,)]
    q = f"SELECT PackageGuid,State FROM CM_UpdatePackages where PackageGUID = '{GUID.lower()}'"
    assert conn.execute(q).fetchall() == [(GUID, 2)]
    assert conn.execute(
        "SELECT Name, PackageGuid FROM v_LocalizedUpdatePackageMetaData_SiteLoc"
    ).fetchall()
    assert conn.execute("Select * from vEasySetupPackage").fetchall() == []


def test_enabling_a_package_queues_2_esc_for_smsdbmon_in_the_same_transaction(
    db_file: Path,
) -> None:
    conn = connect(db_file, "CAS")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE CM_UpdatePackages SET State = 2 WHERE PackageGuid = ?", (GUID,))
    conn.execute("ROLLBACK")
    assert conn.execute("SELECT COUNT(*) FROM TableChangeNotifications").fetchone()[0] == 0
    with transaction(conn):
        conn.execute("UPDATE CM_UpdatePackages SET State = 2 WHERE PackageGuid = ?", (GUID,))
    rows = conn.execute(
        "SELECT TriggerName, TableName, Action, KeyValue, FileName, Directory "
        "FROM TableChangeNotifications"
    ).fetchall()
    assert rows == [
        ("CM_UpdatePackages_UPD_HMAN", "CM_UpdatePackages", "UPDATE", "2", "2.ESC", "hman.box/CFD")
    ]


def test_download_success_or_failure_leaves_the_download_queue(db_file: Path) -> None:
    conn = connect(db_file, "CAS")
    for final in (PackageState.DOWNLOAD_SUCCESS, PackageState.DOWNLOAD_FAILED):
        with transaction(conn):
            procs.spCMUSetUpdatePackageState(conn, GUID, PackageState.APPLICABILITY_SUCCESS)
            assert procs.spAddPackageToDownload(conn, GUID)
            assert not procs.spAddPackageToDownload(conn, GUID)  # already queued
        assert procs.spCMUCheckAvailableUpdates(conn) == [GUID]
        with transaction(conn):
            procs.spCMUSetUpdatePackageState(conn, GUID, PackageState.DOWNLOAD_IN_PROGRESS)
        assert procs.spCMUCheckAvailableUpdates(conn) == [GUID]
        with transaction(conn):
            procs.spCMUSetUpdatePackageState(conn, GUID, final)
        assert procs.spCMUCheckAvailableUpdates(conn) == []
        site_state = conn.execute("SELECT State FROM CM_UpdatePackageSiteStatus").fetchone()[0]
        assert site_state == final
    with pytest.raises(LookupError):
        procs.spAddPackageToDownload(conn, "00000000-0000-0000-0000-000000000001")
    with transaction(conn):  # a failed download can be retried
        assert procs.spAddPackageToDownload(conn, GUID)
        procs.spCMUSetUpdatePackageState(conn, GUID, PackageState.DOWNLOAD_SUCCESS)
    with pytest.raises(procs.NotDownloadable, match=r"DOWNLOAD_SUCCESS \(262146\)"):
        procs.spAddPackageToDownload(conn, GUID)


def test_a_failed_download_queued_again_goes_on_for_a_waiter(db_file: Path) -> None:
    """DOWNLOAD_FAILED ends a wait for the download, unless the package is queued again:
    DMPDownloader retries it, and the row leaves the queue with the next result."""
    conn = connect(db_file, "CAS")
    with transaction(conn):
        procs.spCMUSetUpdatePackageState(conn, GUID, PackageState.DOWNLOAD_FAILED)
    assert servicing.package_progress(conn, GUID) == servicing.PackageProgress(
        state=PackageState.DOWNLOAD_FAILED, flag=0, goes_on=False
    )
    with transaction(conn):
        procs.spAddPackageToDownload(conn, GUID)
    progress = servicing.package_progress(conn, GUID)
    assert progress is not None and progress.goes_on
    with transaction(conn):
        procs.spCMUSetUpdatePackageState(conn, GUID, PackageState.DOWNLOAD_FAILED)
    progress = servicing.package_progress(conn, GUID)
    assert progress is not None and not progress.goes_on
    assert servicing.package_progress(conn, "00000000-0000-0000-0000-000000000001") is None
    conn.close()


def test_a_site_database_of_schema_1_is_migrated(db_file: Path) -> None:
    conn = connect(db_file, "CAS")
    with transaction(conn):
        conn.execute("ALTER TABLE CM_UpdatePackages DROP COLUMN PayloadHash")
        conn.execute("UPDATE SchemaInfo SET Value = '1' WHERE Name = 'version'")
    assert migrate(conn) == 1
    assert migrate(conn) == SCHEMA_VERSION
    cols = [r[1] for r in conn.execute("PRAGMA table_info(CM_UpdatePackages)")]
    assert "PayloadHash" in cols


def test_applicability_does_not_rewind_a_package_that_went_further(db_file: Path) -> None:
    conn = connect(db_file, "CAS")
    with transaction(conn):
        procs.spCMUSetUpdatePackageState(conn, GUID, PackageState.DOWNLOAD_SUCCESS)
        assert not procs.spCMUSetApplicability(conn, GUID, PackageState.APPLICABILITY_NA)
    assert procs.package_state(conn, GUID) == PackageState.DOWNLOAD_SUCCESS


async def test_group_commit_isolates_a_failing_job(db_file: Path) -> None:
    db = SiteDB(db_file, "CAS")

    def insert(conn: sqlite3.Connection, i: int) -> int:
        conn.execute("INSERT INTO CM_UpdatePackagesToDownload (PackageGuid) VALUES (?)", (f"g{i}",))
        if i == 7:
            raise ValueError("job 7 fails")
        return i

    try:
        results = await asyncio.gather(
            *(db.tx(insert, i) for i in range(40)), return_exceptions=True
        )
    finally:
        db.close()
    assert isinstance(results[7], ValueError)
    assert [r for i, r in enumerate(results) if i != 7] == [i for i in range(40) if i != 7]
    conn = connect(db_file, "CAS")
    stored = {r[0] for r in conn.execute("SELECT PackageGuid FROM CM_UpdatePackagesToDownload")}
    assert stored == {f"g{i}" for i in range(40) if i != 7}


def test_substage_reports_update_one_monitoring_row_per_stage(db_file: Path) -> None:
    conn = connect(db_file, "CAS")
    for progress, done in ((1, IsComplete.IN_PROGRESS), (100, IsComplete.SUCCESS)):
        with transaction(conn):
            procs.spCMUReportUpdateStatus(
                conn, GUID, SubStage.EASY_SETUP_PACKAGE_UPDATED, done, progress
            )
    rows = conn.execute(
        "select ServerData.SiteCode, cmums.SubStageID, cmums.IsComplete, cmums.Progress "
        "from CM_UpdatePackage_MonitoringStatus cmums "
        "Left join serverdata on cmums.SiteNumber=ServerData.ID where PackageGUID=?",
        (GUID.lower(),),
    ).fetchall()
    assert rows == [("CAS", 0xB0001, 2, 100)]


def test_a_job_after_close_fails_instead_of_waiting_forever(db_file: Path) -> None:
    db = SiteDB(db_file, "CAS")
    assert db.call_sync(procs.package_state, GUID) == PackageState.APPLICABILITY_SUCCESS
    db.close()
    with pytest.raises(SiteDBClosed):
        db.call_sync(procs.package_state, GUID)
