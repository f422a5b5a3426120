"""`cmlab reset`: the Update Reset Tool (CMUpdateReset.exe) on a real synced site."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmlab.admin.reset import ResetResult, reset_package
from cmlab.site.sitedb import connect, procs, transaction
from cmlab.site.sms_log import read_messages
from cmlab.site.state_codes import IsComplete, PackageState, SubStage
from cmlab.testing import SAMPLE_HIDDEN, SAMPLE_NOT_APPLICABLE, SAMPLE_UPDATE, LabSite
from tests.helpers.cli import cmlab

GUID = SAMPLE_UPDATE  # the package reset in these tests
OTHER = SAMPLE_HIDDEN  # a package that must be left alone
GUID_TABLES = (
    "CM_UpdatePackages",
    "CM_UpdatePackagesToDownload",
    "CM_UpdatePackageSiteStatus",
    "CM_UpdatePackage_MonitoringStatus",
    "CM_UpdatePackagePrereqStatus",
    "EasySetupSettings",
)
INSTALLING = "After an update package starts installing, don't use CMUpdateReset.exe."


# A synchronized site (the plugin's synced template: auto-download off, so it stays there),
# its daemon not running: the reset is run on the site's folder, as CMUpdateReset.exe is.
pytestmark = pytest.mark.cmlab(stage="synced", start=False)


@pytest.fixture
def site(cmlab_site: LabSite) -> Path:
    return cmlab_site.path


@pytest.fixture
def db(site: Path) -> Iterator[sqlite3.Connection]:
    conn = connect(site / "db" / "site.db", "CAS")
    yield conn
    conn.close()


def seed(conn: sqlite3.Connection, guid: str, state: int, package_id: str) -> None:
    """The rows the later stages leave for a package, as their procedures write them."""
    with transaction(conn):
        procs.spCMUSetUpdatePackageState(conn, guid, PackageState.DOWNLOAD_IN_PROGRESS)
        conn.execute("INSERT INTO CM_UpdatePackagesToDownload (PackageGuid) VALUES (?)", (guid,))
        procs.spCMUSetUpdatePackageState(conn, guid, state)
        procs.spCMUReportUpdateStatus(
            conn, guid, SubStage.EASY_SETUP_PACKAGE_UPDATED, IsComplete.SUCCESS, 100
        )
        conn.execute(
            "INSERT INTO CM_UpdatePackagePrereqStatus (PackageGuid, SiteNumber, ServerName, "
            "RuleName, Status) VALUES (?, 1, 'cas.cmlab.local', 'Pending system restart', 0)",
            (guid.lower(),),
        )
        # GUID columns are COLLATE NOCASE: HMAN's rows may spell the GUID in lower case.
        conn.execute(
            "INSERT INTO EasySetupSettings (PackageID, PackageGuid, PackageVersion, PackageHash) "
            "VALUES (?, ?, 1, 'AB12')",
            (package_id, guid.lower()),
        )
        conn.execute(
            "INSERT INTO SMSPackages (PkgID, Name, Source) VALUES (?, 'Configuration Manager "
            "Updates', ?)",
            (package_id.lower(), f"\\\\cas.cmlab.local\\EasySetupPayload\\{guid}"),
        )


def make_content(site: Path, guid: str) -> list[Path]:
    """Downloaded content (GUID in lower case, as DMPDownloader writes it), the staging folder
    (upper case) and pending drop files, in every place the reset cleans."""
    low, up = guid.lower(), guid.upper()
    files = [
        site / "EasySetupPayload" / f"{low}.cab",
        site / "EasySetupPayload" / f"{low}.cab.partial",
        site / "EasySetupPayload" / low / "SMSSETUP" / "BIN" / "X64" / "setup.exe",
        site / "EasySetupPayload" / low / "redist" / "ConfigMgr.Manifest.cab",
        site / "CMUStaging" / up / "SMSSETUP" / "update.map",
        site / "inboxes" / "dmpdownloader.box" / f"{up}.DMP",
        site / "inboxes" / "hman.box" / "ForwardingMsg" / f"___CMU{low}.MCM",
        site / "inboxes" / "hman.box" / "CFD" / f"{low}.CMU",
        site / "inboxes" / "hman.box" / "CFD" / f"{up}.CME",
    ]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x" * 10)
    return files


def count(site: LabSite, sql: str, *params: object) -> int:
    return int(site.query(sql, params)[0][0])


def rows_of(site: LabSite, guid: str) -> dict[str, int]:
    counts = {
        t: count(site, f"SELECT COUNT(*) FROM {t} WHERE PackageGuid = ? COLLATE NOCASE", guid)
        for t in GUID_TABLES
    }
    counts["SMSPackages"] = count(
        site,
        "SELECT COUNT(*) FROM SMSPackages WHERE PkgID IN (SELECT PackageID FROM "
        "EasySetupSettings WHERE PackageGuid = ? COLLATE NOCASE)",
        guid,
    )
    counts["TableChangeNotifications"] = count(
        site,
        "SELECT COUNT(*) FROM TableChangeNotifications WHERE upper(FileName) LIKE ?",
        guid.upper() + ".%",
    )
    return counts


def snapshot(site: LabSite) -> tuple[dict[str, list[tuple[object, ...]]], set[str]]:
    """Every row of the package tables and every path of the site tree except Logs and db."""
    tables = {
        t: sorted(map(tuple, site.query(f"SELECT * FROM {t}")), key=repr)
        for t in (*GUID_TABLES, "SMSPackages", "TableChangeNotifications", "StateMessages")
    }
    paths = set()
    for root, dirs, files in os.walk(site.path):
        rel = Path(root).relative_to(site.path)
        if rel.parts[:1] in (("Logs",), ("db",)):
            continue
        paths.update(str(rel / n) for n in dirs + files)
    return tables, paths


def prepared(site: Path, db: sqlite3.Connection, state: int) -> tuple[list[Path], list[Path]]:
    seed(db, GUID, state, "CAS10001")
    seed(db, OTHER, PackageState.DOWNLOAD_IN_PROGRESS, "CAS10002")
    return make_content(site, GUID), make_content(site, OTHER)


@pytest.mark.parametrize(
    "state", [PackageState.APPLICABILITY_SUCCESS, PackageState.DOWNLOAD_IN_PROGRESS]
)
def test_reset_removes_a_package_that_has_not_started_installing(
    cmlab_site: LabSite, site: Path, db: sqlite3.Connection, state: PackageState
) -> None:
    mine, others = prepared(site, db, state)
    assert all(rows_of(cmlab_site, GUID).values())
    history = count(cmlab_site, "SELECT COUNT(*) FROM StateMessages")
    staging_before = sorted(p.name for p in (site / "CMUStaging").iterdir())

    proc = cmlab("reset", str(site), GUID.lower())  # the GUID matches in either case

    assert f"Update package {GUID} (Configuration Manager 2509), was {state.name}" in proc.stdout
    for table in (*GUID_TABLES, "SMSPackages", "TableChangeNotifications"):
        assert table in proc.stdout
    for path in (f"{GUID.lower()}.cab", f"___CMU{GUID.lower()}.MCM", f"{GUID}.DMP"):
        assert path in proc.stdout
    assert f"cmlab sync {site}" in proc.stdout
    assert rows_of(cmlab_site, GUID) == dict.fromkeys(rows_of(cmlab_site, GUID), 0)
    assert not [p for p in mine if os.path.lexists(p)]
    assert not (site / "EasySetupPayload" / GUID.lower()).exists()
    assert not (site / "CMUStaging" / GUID).exists()

    # History stays; the other package, its rows and its content are untouched.
    assert count(cmlab_site, "SELECT COUNT(*) FROM StateMessages") == history
    assert all(rows_of(cmlab_site, OTHER).values())
    assert all(p.is_file() for p in others)
    assert cmlab_site.states() == {
        SAMPLE_HIDDEN: PackageState.DOWNLOAD_IN_PROGRESS,
        SAMPLE_NOT_APPLICABLE: PackageState.APPLICABILITY_NA,
    }
    # Only the package's own staging folder went: the manifest and applicability checks stay.
    assert sorted(p.name for p in (site / "CMUStaging").iterdir()) == [
        n for n in staging_before if n != GUID
    ]
    log = read_messages(site / "Logs" / "CMUpdateReset.log")
    assert f"CMUpdateReset started on site CAS for update package {GUID}" in log
    assert "Deleted 1 row(s) from CM_UpdatePackages" in log
    assert f"Deleted folder {site / 'CMUStaging' / GUID}" in log
    assert log[-1] == (
        f"Successfully reset update package {GUID} (Configuration Manager 2509). Check for "
        "updates to synchronize and download it again."
    )

    # Run again: the package is gone, so the GUID is now unknown.
    again = cmlab("reset", str(site), GUID, check=False)
    assert again.returncode == 5  # not found
    assert f"There is no update package {GUID} in CM_UpdatePackages" in again.stderr


@pytest.mark.parametrize(
    ("state", "force"),
    [
        (PackageState.INSTALL_IN_PROGRESS, False),
        (PackageState.INSTALL_WAITING_SERVICE_WINDOW, True),
        (PackageState.INSTALL_CMU_STARTED, True),
        (PackageState.INSTALL_UPGRADEDATABASE, False),
        (PackageState.INSTALL_PENDING_REBOOT, True),
        (PackageState.INSTALL_CMU_FAILED, True),
        (PackageState.INSTALL_FAILED, True),
        (PackageState.INSTALL_SUCCESS, True),
    ],
)
def test_reset_refuses_a_package_that_started_installing(
    cmlab_site: LabSite, site: Path, db: sqlite3.Connection, state: PackageState, force: bool
) -> None:
    prepared(site, db, state)
    before = snapshot(cmlab_site)
    report = reset_package(site, GUID, force=force)
    assert report.outcome is ResetResult.INSTALLING and not report.ok
    assert f"is {state.name} ({int(state)})" in report.message
    assert INSTALLING in report.message
    assert snapshot(cmlab_site) == before
    assert f"ERROR: {report.message}" in read_messages(site / "Logs" / "CMUpdateReset.log")


def test_cli_refusal_names_the_state_and_exits_4(
    cmlab_site: LabSite, site: Path, db: sqlite3.Connection
) -> None:
    prepared(site, db, PackageState.INSTALL_IN_PROGRESS)
    before = snapshot(cmlab_site)
    proc = cmlab("reset", str(site), GUID, "--force", check=False)
    assert proc.returncode == 4  # refused
    assert (
        f"update package {GUID} (Configuration Manager 2509) is INSTALL_IN_PROGRESS (196609): "
        "it has started installing." in proc.stderr
    )
    assert INSTALLING in proc.stderr and "Nothing was removed." in proc.stderr
    assert snapshot(cmlab_site) == before


def test_a_child_site_that_is_installing_blocks_the_reset(
    cmlab_site: LabSite, site: Path, db: sqlite3.Connection
) -> None:
    """The top-level site has the package downloaded; a child primary already installs it."""
    prepared(site, db, PackageState.DOWNLOAD_SUCCESS)
    with transaction(db):
        db.execute(
            "INSERT INTO ServerData (ID, SiteCode, ParentSiteCode, SiteServerName, SiteType) "
            "VALUES (2, 'PR1', 'CAS', 'pr1.cmlab.local', 2)"
        )
        db.execute(
            "INSERT INTO CM_UpdatePackageSiteStatus (PackageGuid, SiteNumber, State) "
            "VALUES (?, 2, ?)",
            (GUID, int(PackageState.INSTALL_IN_PROGRESS)),
        )
    before = snapshot(cmlab_site)
    report = reset_package(site, GUID, force=True)
    assert report.outcome is ResetResult.INSTALLING
    assert "is INSTALL_IN_PROGRESS (196609) at site PR1" in report.message
    assert snapshot(cmlab_site) == before


@pytest.mark.parametrize(
    "state", [PackageState.DOWNLOAD_SUCCESS, PackageState.CONTENT_REPLICATION_FAILED]
)
def test_a_downloaded_package_is_deleted_only_with_force(
    cmlab_site: LabSite, site: Path, db: sqlite3.Connection, state: PackageState
) -> None:
    mine, _ = prepared(site, db, state)
    before = snapshot(cmlab_site)
    proc = cmlab("reset", str(site), GUID, check=False)
    assert proc.returncode == 4  # refused
    assert f"is {state.name} ({int(state)}), a post-download state" in proc.stderr
    assert "--force" in proc.stderr
    assert snapshot(cmlab_site) == before

    proc = cmlab("reset", str(site), GUID, "--force")
    assert rows_of(cmlab_site, GUID) == dict.fromkeys(rows_of(cmlab_site, GUID), 0)
    assert not [p for p in mine if os.path.lexists(p)]
    log = read_messages(site / "Logs" / "CMUpdateReset.log")
    assert (
        f"CMUpdateReset started on site CAS for update package {GUID} with force delete "
        "(-FDELETE)" in log
    )


def test_unknown_and_malformed_guids(cmlab_site: LabSite, site: Path) -> None:
    before = snapshot(cmlab_site)
    unknown = "61F16B3C-F1F6-4F9F-8647-2A524B0C802C"
    proc = cmlab("reset", str(site), unknown, check=False)
    assert proc.returncode == 5  # not found
    assert f"There is no update package {unknown} in CM_UpdatePackages" in proc.stderr
    doc = json.loads(cmlab("reset", str(site), unknown, "--json", check=False).stdout)
    assert doc["outcome"] == "unknown-package" and doc["ok"] is False and doc["removed"] == []
    for bad in ("../../etc", f"{GUID}/..", "not-a-guid"):
        proc = cmlab("reset", str(site), bad, check=False)
        assert proc.returncode == 2 and "is not an update package GUID" in proc.stderr
    assert snapshot(cmlab_site) == before


def test_json_output(site: Path, db: sqlite3.Connection) -> None:
    prepared(site, db, PackageState.DOWNLOAD_FAILED)
    doc = json.loads(cmlab("reset", str(site), f"{{{GUID.lower()}}}", "--json").stdout)
    assert doc["outcome"] == "reset" and doc["ok"] is True
    assert doc["guid"] == GUID and doc["name"] == "Configuration Manager 2509"
    assert doc["state"] == PackageState.DOWNLOAD_FAILED and doc["state_name"] == "DOWNLOAD_FAILED"
    assert doc["rows"] == {
        "SMSPackages": 1,
        "EasySetupSettings": 1,
        "TableChangeNotifications": 2,  # the pending <GUID>.DMP and <GUID>.CME
        "CM_UpdatePackagesToDownload": 0,  # a failed download has left the queue
        "CM_UpdatePackageSiteStatus": 1,
        "CM_UpdatePackage_MonitoringStatus": 1,
        "CM_UpdatePackagePrereqStatus": 1,
        "CM_UpdatePackages": 1,
    }
    removed = {Path(r["path"]).relative_to(site).as_posix(): r["kind"] for r in doc["removed"]}
    low = GUID.lower()
    assert removed == {
        f"EasySetupPayload/{low}": "folder",
        f"EasySetupPayload/{low}.cab": "file",
        f"EasySetupPayload/{low}.cab.partial": "file",
        f"CMUStaging/{GUID}": "folder",
        f"inboxes/dmpdownloader.box/{GUID}.DMP": "file",
        f"inboxes/hman.box/ForwardingMsg/___CMU{low}.MCM": "file",
        f"inboxes/hman.box/CFD/{low}.CMU": "file",
        f"inboxes/hman.box/CFD/{GUID}.CME": "file",
    }
    assert doc["log"] == str(site / "Logs" / "CMUpdateReset.log")


def test_links_are_removed_never_followed(
    site: Path, db: sqlite3.Connection, tmp_path: Path
) -> None:
    seed(db, GUID, PackageState.DOWNLOAD_FAILED, "CAS10001")
    outside = tmp_path / "outside"
    (outside / "payload" / "redist").mkdir(parents=True)
    (outside / "payload" / "redist" / "keep.cab").write_text("keep")
    (outside / "keep.cab").write_text("keep")
    (outside / "staging").mkdir()
    (outside / "staging" / "keep.txt").write_text("keep")
    low = GUID.lower()
    # The package's content folder and CAB are links; its staging folder holds one.
    (site / "EasySetupPayload" / low).symlink_to(outside / "payload", target_is_directory=True)
    (site / "EasySetupPayload" / f"{low}.cab").symlink_to(outside / "keep.cab")
    (site / "CMUStaging" / GUID).mkdir()
    (site / "CMUStaging" / GUID / "SMSSETUP").symlink_to(outside / "staging")

    report = reset_package(site, GUID)

    assert report.ok
    kinds = {r.path.name: r.kind for r in report.removed}
    assert kinds == {low: "link", f"{low}.cab": "link", GUID: "folder"}
    assert not os.path.lexists(site / "EasySetupPayload" / low)
    assert not os.path.lexists(site / "EasySetupPayload" / f"{low}.cab")
    assert not os.path.lexists(site / "CMUStaging" / GUID)
    assert (outside / "payload" / "redist" / "keep.cab").read_text() == "keep"
    assert (outside / "keep.cab").read_text() == "keep"
    assert (outside / "staging" / "keep.txt").read_text() == "keep"
    log = read_messages(site / "Logs" / "CMUpdateReset.log")
    assert (
        f"Deleted link {site / 'EasySetupPayload' / low} (the link only: its target is left "
        "alone)" in log
    )


def test_leftovers_of_an_interrupted_reset_are_cleaned(
    cmlab_site: LabSite, site: Path, db: sqlite3.Connection
) -> None:
    """The package's row is gone (a crash, or a hand-made DELETE) but other rows and its files
    are left: running the reset again removes them."""
    seed(db, GUID, PackageState.DOWNLOAD_FAILED, "CAS10001")
    with transaction(db):
        db.execute("DELETE FROM CM_UpdatePackages WHERE PackageGuid = ?", (GUID,))
    files = make_content(site, GUID)
    report = reset_package(site, GUID)
    assert report.ok and report.state is None
    assert not [p for p in files if os.path.lexists(p)]
    assert rows_of(cmlab_site, GUID) == dict.fromkeys(rows_of(cmlab_site, GUID), 0)
    assert report.rows["EasySetupSettings"] == 1
    # Only files left (the database part had committed): cleaned too.
    files = make_content(site, GUID)
    report = reset_package(site, GUID)
    assert report.ok and not any(report.rows.values())
    assert not [p for p in files if os.path.lexists(p)]


def test_only_the_top_level_site_runs_the_reset(
    cmlab_site: LabSite, site: Path, db: sqlite3.Connection
) -> None:
    prepared(site, db, PackageState.DOWNLOAD_FAILED)
    cmlab_site.set("site", "role", "primary")
    cmlab_site.set("site", "parent", str(site.parent / "CAS-parent"))
    before = snapshot(cmlab_site)
    proc = cmlab("reset", str(site), GUID, check=False)
    assert proc.returncode == 4 and "not the top-level site" in proc.stderr
    assert snapshot(cmlab_site) == before


def test_reset_while_the_daemon_runs_then_sync_brings_the_package_back(
    cmlab_site: LabSite, site: Path
) -> None:
    """The guide's case: the download finished but the content is suspect. Reset it (forced,
    as it is downloaded) with the daemon running; the next sync starts it over."""
    payload = site / "EasySetupPayload"
    low = GUID.lower()
    downloaded = (PackageState.DOWNLOAD_SUCCESS, PackageState.DOWNLOAD_FAILED)
    cmlab_site.start()
    cmlab_site.download(GUID)
    cmlab_site.wait_for(lambda: cmlab_site.states()[GUID] in downloaded, what="download")
    assert cmlab_site.states()[GUID] == PackageState.DOWNLOAD_SUCCESS
    cmlab_site.wait_for(lambda: not cmlab_site.waiting_files(), what="drop files consumed")
    assert (payload / low).is_dir() and (payload / f"{low}.cab").is_file()
    (payload / low / "tampered.txt").write_text("not from Microsoft")

    # `cmlab reset`'s refusal is tested as the command line gives it.
    refused = cmlab("reset", str(site), GUID, check=False)
    assert refused.returncode == 4 and "DOWNLOAD_SUCCESS (262146)" in refused.stderr
    assert cmlab_site.states()[GUID] == PackageState.DOWNLOAD_SUCCESS

    assert cmlab_site.reset(GUID, force=True).ok
    assert GUID not in cmlab_site.states()
    assert not [n for n in os.listdir(payload) if n.lower().startswith(low)]
    assert rows_of(cmlab_site, GUID) == dict.fromkeys(rows_of(cmlab_site, GUID), 0)
    assert cmlab_site.running

    cmlab_site.sync()
    # Back at the start: applicable again (or further on, if the site downloads by itself).
    # HMAN rechecks every package of the manifest: wait for all of them.
    back = (
        PackageState.APPLICABILITY_SUCCESS,
        PackageState.DOWNLOAD_IN_PROGRESS,
        PackageState.DOWNLOAD_SUCCESS,
    )
    others = {
        SAMPLE_HIDDEN: PackageState.APPLICABILITY_HIDE,
        SAMPLE_NOT_APPLICABLE: PackageState.APPLICABILITY_NA,
    }

    def resynced() -> bool:
        now = cmlab_site.states()
        return now.get(GUID) in back and all(now.get(g) == s for g, s in others.items())

    cmlab_site.wait_for(resynced, what="the package back, the others rechecked")

    # And it downloads again, cleanly.
    if cmlab_site.states()[GUID] == PackageState.APPLICABILITY_SUCCESS:
        cmlab_site.download(GUID)
    cmlab_site.wait_for(lambda: cmlab_site.states()[GUID] in downloaded, what="download again")
    assert cmlab_site.states()[GUID] == PackageState.DOWNLOAD_SUCCESS
    assert not (payload / low / "tampered.txt").exists()
    assert cmlab_site.stop() == 0
