"""Recover Secondary Site (docs/hierarchy.md, "Secondary sites"): the request at the primary
(`request_secondary_recovery`), HMAN packing the primary's files on `<SiteCode>.RSS`, and the
secondary's despooler reinstalling the site from them. Real sites (CAS -> PR1 -> SEC made by
`cmlab init`), real CABs, the real inbox engine; the Scheduler and Sender between PR1 and SEC
are played by the test (their own tests cover them)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmlab.admin.installation_layout import create_installation
from cmlab.components.hman.hman import HierarchyManager
from cmlab.core.fs import write_atomic
from cmlab.core.hashing import folder_hash, sha256_file
from cmlab.site.cab import list_cab
from cmlab.site.formats.replication import (
    Instruction,
    Recovery,
    build_instruction,
    job_name,
    read_recovery_sidecar,
)
from cmlab.site.installation import installed_build
from cmlab.site.sitedb import connect, hierarchy, transaction
from cmlab.site.sitedb.recovery import request_secondary_recovery
from cmlab.site.state_codes import PackageState
from cmlab.testing import SAMPLE_UPDATE, LabHierarchy, LabSite
from tests.e2e.test_despooler import ROOT, bad, make_hierarchy, receive, running
from tests.helpers.waiting import await_until

NEW_BUILD = 9200
NEW_VERSION = f"5.00.{NEW_BUILD}.1000"
HOTFIX = "11111111-2222-3333-4444-555555555555"
NOT_INSTALLED = "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE"


def db(site: LabSite, code: str) -> sqlite3.Connection:
    return connect(site.path / "db" / "site.db", code)


@pytest.fixture
def hier(template: Path, tmp_path: Path) -> Iterator[LabHierarchy]:
    """CAS -> PR1 -> SEC, with PR1 updated to build 9200 (two updates installed, a third not)
    and SEC still at the build `cmlab init` gave it."""
    sites = make_hierarchy(tmp_path / "sites", template, secondary=True)
    pr1 = sites["PR1"]
    create_installation(pr1.path, NEW_BUILD, NEW_VERSION, site_code="PR1", server="pr1.cmlab.local")
    conn = db(pr1, "PR1")
    try:
        with transaction(conn):
            conn.execute(
                "UPDATE Sites SET Version = ?, FullVersion = ?, BuildNumber = ? "
                "WHERE SiteCode = 'PR1'",
                (NEW_VERSION, NEW_VERSION, NEW_BUILD),
            )
            for guid, state in (
                (SAMPLE_UPDATE, PackageState.INSTALL_SUCCESS),
                (HOTFIX, PackageState.INSTALL_SUCCESS),
                (NOT_INSTALLED, PackageState.PREREQ_SUCCESS),
            ):
                conn.execute(
                    "INSERT INTO CM_UpdatePackages (PackageGuid, Name, State, RunNumber) "
                    "VALUES (?, ?, ?, 1)",
                    (guid, f"update {guid[:8]}", int(state)),
                )
                conn.execute(
                    "INSERT INTO CM_UpdatePackageSiteStatus (PackageGuid, SiteNumber, State, "
                    "RunNumber) VALUES (?, 1, ?, 1)",
                    (guid, int(state)),
                )
    finally:
        conn.close()
    yield sites
    sites.stop()


def bin_files(site: LabSite) -> dict[str, bytes]:
    folder = site.path / "bin" / "x64"
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")}


def request(site: LabSite, code: str, site_code: str) -> int:
    conn = db(site, code)
    try:
        with transaction(conn):
            return request_secondary_recovery(conn, site_code)
    finally:
        conn.close()


def drop_rss(pr1: LabSite, code: str = "SEC") -> Path:
    """What SMSDBMon drops for the new request number (its trigger's notification)."""
    return pr1.drop("hman.box", f"{code}.RSS")


async def recover_at_primary(pr1: LabSite, code: str = "SEC", times: int = 1) -> None:
    async with running(pr1, HierarchyManager, ("on_recover_secondary",)):
        for _ in range(times):
            rss = drop_rss(pr1, code)
            await await_until(lambda rss=rss: not rss.exists(), what=f"{rss.name} handled")


# -- the request --------------------------------------------------------------------------------


def test_request_numbers_rise_and_notify_hman(hier: LabHierarchy) -> None:
    pr1 = hier["PR1"]
    assert request(pr1, "PR1", "sec") == 1
    assert request(pr1, "PR1", "SEC") == 2
    assert pr1.query("SELECT SiteCode, RequestNumber, State FROM SecondarySiteRecovery") == [
        ("SEC", 2, "Requested")
    ]
    assert (
        pr1.query(
            "SELECT FileName, Directory FROM TableChangeNotifications WHERE FileName = 'SEC.RSS'",
        )
        == [("SEC.RSS", "hman.box")] * 2
    )


@pytest.mark.parametrize(
    ("where", "code", "message"),
    [
        (
            "PR1",
            "CAS",
            "Cannot recover secondary site CAS: site CAS is a cas site, not a secondary site",
        ),
        (
            "PR1",
            "XYZ",
            "Cannot recover secondary site XYZ: site XYZ is not known at PR1 (no ServerData row)",
        ),
        (
            "PR1",
            "SE2",
            "Cannot recover secondary site SE2: secondary site SE2 is a child of PR2, not of PR1",
        ),
        (
            "CAS",
            "SEC",
            "Cannot recover secondary site SEC: CAS is a cas site; Recover Secondary "
            "Site runs at the secondary site's parent primary site",
        ),
        (
            "SEC",
            "SEC",
            "Cannot recover secondary site SEC: SEC is a secondary site; Recover "
            "Secondary Site runs at the secondary site's parent primary site",
        ),
    ],
)
def test_request_is_refused_for_anything_but_a_secondary_child(
    hier: LabHierarchy, where: str, code: str, message: str
) -> None:
    conn = db(hier[where], where)
    try:
        with transaction(conn):
            # Another primary's secondary that PR1 knows of (replicated site rows).
            hierarchy.ensure_site(
                conn, "SE2", parent="PR2", site_type=hierarchy.SECONDARY, server="se2"
            )
        with pytest.raises(LookupError) as err, transaction(conn):
            request_secondary_recovery(conn, code)
        assert str(err.value) == message
        assert conn.execute("SELECT COUNT(*) FROM SecondarySiteRecovery").fetchone() == (0,)
    finally:
        conn.close()


# -- HMAN at the primary ------------------------------------------------------------------------


async def test_hman_packs_the_primary_files_once_per_request(hier: LabHierarchy) -> None:
    pr1 = hier["PR1"]
    assert request(pr1, "PR1", "SEC") == 1
    await recover_at_primary(pr1, times=2)  # the second RSS is a replay

    rcv = pr1.path / "SMSPKG" / "SEC.RCV.1"
    files = bin_files(pr1)
    assert sorted(e.path for e in list_cab(rcv)) == sorted(files)
    content_hash = folder_hash(pr1.path / "bin" / "x64")
    assert json.loads((pr1.path / "SMSPKG" / "SEC.RCV.1.json").read_text()) == {
        "Build": NEW_BUILD,
        "Version": NEW_VERSION,
        "FullVersion": NEW_VERSION,
        "InstalledUpdates": sorted([SAMPLE_UPDATE, HOTFIX]),
    }
    assert pr1.query(
        "SELECT JobID, JobType, PkgID, Version, DestSite, PackageFile, FileSize, FileHash, "
        "ContentHash, State FROM SchedulerJobs",
    ) == [
        (
            1,
            "SiteRecovery",
            "SEC",
            1,
            "SEC",
            "SMSPKG/SEC.RCV.1",
            rcv.stat().st_size,
            sha256_file(rcv),
            content_hash,
            "Pending",
        )
    ]
    assert pr1.query("SELECT RequestNumber, State, Detail FROM SecondarySiteRecovery") == [
        (1, "Sent", "job 00000001")
    ]
    # The job row makes SMSDBMon wake the Scheduler.
    assert pr1.query(
        "SELECT FileName FROM TableChangeNotifications WHERE Directory = 'schedule.box'"
    ) == [("00000001.JOB",)]
    assert pr1.log("hman.log") == [
        f"Recover secondary site SEC: reinstalling it with this site's files (Configuration "
        f"Manager {NEW_VERSION}, build {NEW_BUILD}).",
        f"Created package {ROOT}\\SMSPKG\\SEC.RCV.1 ({rcv.stat().st_size} bytes) of the files "
        f"in {ROOT}\\bin\\x64; content hash {content_hash}.",
        f"Created site recovery job 00000001 to send {ROOT}\\SMSPKG\\SEC.RCV.1 to site SEC "
        "(request 1, 2 installed updates).",
        "Recover secondary site SEC: request 1 is already queued as job 00000001.",
    ]


async def test_hman_refuses_a_site_that_is_not_its_secondary(hier: LabHierarchy) -> None:
    pr1 = hier["PR1"]
    conn = db(pr1, "PR1")
    with transaction(conn):  # as if requested by hand, past request_secondary_recovery
        conn.execute("INSERT INTO SecondarySiteRecovery (SiteCode) VALUES ('CAS')")
    conn.close()
    await recover_at_primary(pr1, "CAS")
    assert pr1.log("hman.log") == [
        "ERROR: Recover secondary site CAS: site CAS is a cas site, not a secondary site."
    ]
    assert pr1.query("SELECT State, Detail FROM SecondarySiteRecovery") == [
        ("Failed", "site CAS is a cas site, not a secondary site")
    ]
    assert pr1.query("SELECT COUNT(*) FROM SchedulerJobs") == [(0,)]
    assert not list((pr1.path / "SMSPKG").glob("CAS.RCV*"))


# -- the secondary's despooler ------------------------------------------------------------------


def recovery_instruction(pr1: LabSite, **override: object) -> tuple[bytes, bytes, str]:
    """What the Scheduler and Sender deliver for PR1's job: the package, the instruction (from
    the job row and the sidecar) and the job ID."""
    (job_id, pkg_file, size, file_hash, content_hash) = pr1.query(
        "SELECT JobID, PackageFile, FileSize, FileHash, ContentHash FROM SchedulerJobs"
    )[0]
    # Read as the Scheduler reads it: HMAN's sidecar is the instruction's Recovery.
    rec = read_recovery_sidecar(pr1.path / pkg_file)
    fields: dict[str, object] = {
        "job": job_name(job_id),
        "job_type": "SiteRecovery",
        "source_site": "PR1",
        "dest_site": "SEC",
        "package_id": "SEC",
        "version": 1,
        "package_guid": "",
        "package_name": "Site recovery of SEC",
        "source": "",
        "package_file": r"E:\ConfigMgr\SMSPKG\SEC.RCV.1",
        "file_size": size,
        "file_hash": file_hash,
        "content_hash": content_hash,
        "recovery": rec,
    }
    fields.update(override)
    ins = build_instruction(Instruction(**fields))  # type: ignore[arg-type]
    return (pr1.path / pkg_file).read_bytes(), ins, job_name(job_id)


async def despool_at(sec: LabSite, pkg: bytes | None, ins: bytes, job: str) -> None:
    async with running(sec):
        if pkg is not None:
            write_atomic(receive(sec) / f"ds_{job.lower()}.pkg", pkg)
        write_atomic(receive(sec) / f"{job}.INS", ins)
        target = receive(sec) / f"{job}.INS"
        await await_until(lambda: not target.exists(), what=f"{job}.INS handled")


async def test_secondary_is_reinstalled_with_its_parent_files(hier: LabHierarchy) -> None:
    pr1, sec = hier["PR1"], hier["SEC"]
    old_build = installed_build(sec.path)
    assert old_build != NEW_BUILD
    request(pr1, "PR1", "SEC")
    await recover_at_primary(pr1)
    pkg, ins, job = recovery_instruction(pr1)
    await despool_at(sec, pkg, ins, job)

    assert bin_files(sec) == bin_files(pr1)
    assert installed_build(sec.path) == NEW_BUILD
    assert sec.query(
        "SELECT Version, FullVersion, BuildNumber FROM Sites WHERE SiteCode = 'SEC'"
    ) == [(NEW_VERSION, NEW_VERSION, NEW_BUILD)]
    assert {b for (b,) in sec.query("SELECT Build FROM SiteServices")} == {NEW_BUILD}
    assert sec.query(
        "SELECT ss.PackageGuid, ss.State, p.Name FROM CM_UpdatePackageSiteStatus ss "
        "JOIN CM_UpdatePackages p ON p.PackageGuid = ss.PackageGuid "
        "JOIN ServerData sd ON sd.ID = ss.SiteNumber AND sd.SiteCode = 'SEC' "
        "ORDER BY ss.PackageGuid",
    ) == [
        (HOTFIX, PackageState.INSTALL_SUCCESS, HOTFIX),
        (SAMPLE_UPDATE, PackageState.INSTALL_SUCCESS, SAMPLE_UPDATE),
    ]
    ctrl = (sec.path / "inboxes" / "sitectrl.box" / "sitectrl.ct0").read_text()
    assert f"PROPERTY <Build Number><><{NEW_BUILD}><0>" in ctrl
    assert f"PROPERTY <Full Version><><{NEW_VERSION}><0>" in ctrl
    n = len(bin_files(pr1))
    lines = [
        f"Received site recovery package from site PR1 for site SEC (build {NEW_BUILD}). "
        rf"Compressed file -  E:\ConfigMgr\SMSPKG\SEC.RCV.1 as {ROOT}\inboxes\despoolr.box"
        rf"\receive\ds_{job.lower()}.pkg",
        rf"Extracting from {ROOT}\SMSPKG\SEC.RCV.temp",
        f"Reinstalling site SEC with the files of its parent site PR1 (Configuration Manager "
        f"{NEW_VERSION}).",
        rf"Installed {n} files in {ROOT}\bin\x64",
        rf"Updated the site control file {ROOT}\inboxes\sitectrl.box\sitectrl.ct0: "
        f"Build Number {NEW_BUILD}, Full Version {NEW_VERSION}.",
        f"Update {HOTFIX} is installed at site SEC (INSTALL_SUCCESS).",
        f"Update {SAMPLE_UPDATE} is installed at site SEC (INSTALL_SUCCESS).",
        f"Site SEC has been reinstalled at build {NEW_BUILD}.",
    ]
    assert sec.log("despool.log") == lines
    assert os.listdir(receive(sec)) == []
    assert not list((sec.path / "SMSPKG").iterdir())

    # Replayed (the INS again, its package consumed): nothing to do.
    await despool_at(sec, None, ins, job)
    assert sec.log("despool.log") == [
        *lines,
        lines[0],
        f"Site SEC is already reinstalled at build {NEW_BUILD}.",
    ]
    assert not bad(sec).exists()


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        (
            {"content_hash": "0" * 64},
            r".*: its content has hash [0-9A-F]{64}, the instruction "
            r"says 0{64}",
        ),
        (
            {"recovery": Recovery(9999, "5.00.9999.1000", "5.00.9999.1000", ())},
            rf"its smsexec\.exe is build {NEW_BUILD}, the instruction says 9999",
        ),
    ],
    ids=["content-hash", "build"],
)
async def test_damaged_recovery_package_changes_nothing(
    hier: LabHierarchy, override: dict[str, object], reason: str
) -> None:
    pr1, sec = hier["PR1"], hier["SEC"]
    before = bin_files(sec)
    sites = sec.query("SELECT * FROM Sites ORDER BY SiteCode")
    request(pr1, "PR1", "SEC")
    await recover_at_primary(pr1)
    pkg, ins, job = recovery_instruction(pr1, **override)
    await despool_at(sec, pkg, ins, job)

    errors = [line for line in sec.log("despool.log") if line.startswith("ERROR: The site")]
    assert len(errors) == 1
    m = re.fullmatch(
        r"ERROR: The site recovery package from site PR1 is damaged: (.*)\. Site SEC is not "
        r"reinstalled; run Recover Secondary Site at site PR1 again\.",
        errors[0],
    )
    assert m is not None and re.fullmatch(reason, m[1]), errors[0]
    assert bin_files(sec) == before
    assert sec.query("SELECT * FROM Sites ORDER BY SiteCode") == sites
    assert sec.query("SELECT COUNT(*) FROM CM_UpdatePackageSiteStatus") == [(0,)]
    assert sorted(os.listdir(bad(sec))) == [
        f"{job}.INS",
        f"{job}.INS.reason",
        f"ds_{job.lower()}.pkg",
        f"ds_{job.lower()}.pkg.reason",
    ]
    # A recovery is not re-requested through DistMgr: the administrator runs it again.
    assert not list((pr1.path / "inboxes" / "distmgr.box").glob("*.RSQ"))


def test_a_request_whose_notification_was_lost_is_found_by_hman(hier: LabHierarchy) -> None:
    """A request made while the primary's installation had SMSDBMon's triggers removed
    (install steps 5 to 13) gets no `.RSS`: HMAN's sweep of the requests finds it."""
    pr1 = hier["PR1"]
    conn = db(pr1, "PR1")
    try:
        with transaction(conn):
            for trigger in ("SecondarySiteRecovery_INS_HMAN", "SecondarySiteRecovery_UPD_HMAN"):
                conn.execute(f"DROP TRIGGER {trigger}")
            request_secondary_recovery(conn, "SEC")
        assert not conn.execute("SELECT 1 FROM TableChangeNotifications").fetchall()
    finally:
        conn.close()
    pr1.start()
    pr1.wait_for(
        lambda: pr1.query("SELECT State FROM SecondarySiteRecovery") == [("Sent",)],
        timeout=60,
        what="HMAN to take the request",
    )
    assert "Recover secondary site SEC: request found without a notification." in pr1.log(
        "hman.log"
    )
    assert pr1.query("SELECT JobType, DestSite FROM SchedulerJobs") == [("SiteRecovery", "SEC")]
    assert pr1.stop() == 0
