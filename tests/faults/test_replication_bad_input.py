"""Bad drop files in the Replication and Prerequisite check inboxes, on the real daemon: each
goes to `BAD/` beside its inbox with a `.reason` file and an `ERROR:` line in the component's
log, the daemon keeps serving, and a prerequisite check afterwards still reaches PREREQ_SUCCESS.
Last, DistMgr's CONTENT_REPLICATION_FAILED: the source changed after HMAN hashed it."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from cmlab.core.hashing import folder_hash
from cmlab.testing import SAMPLE_UPDATE, LabSite, State, assert_in_order

# Each test's site has 2509 downloaded; its daemon runs in this process, but for the one test
# that kills it at a crash point.
pytestmark = pytest.mark.cmlab(stage="downloaded")

GUID = SAMPLE_UPDATE
CFD = "hman.box/CFD"
DISTMGR = "distmgr.box"
CMUPDATE = "cmupdate.box"
NO_ENABLED = "INFO: No update package is in state 2 (ENABLED). Nothing to update."


def settled_at(site: LabSite, state: int) -> bool:
    return site.state(GUID) == state and not site.waiting_files()


def errors(site: LabSite, log_name: str) -> list[str]:
    return [line for line in site.log(log_name) if line.startswith("ERROR:")]


def expect_bad(site: LabSite, box: str, name: str, reason: str, log_name: str) -> None:
    """`name` was moved to `box/BAD` with its reason, and the component's log says so."""

    def moved() -> list[str]:
        return [
            line
            for line in errors(site, log_name)
            if line.startswith("ERROR: Moved bad file") and name in line and reason in line
        ]

    site.wait_for(moved, timeout=30, what=f"the ERROR line for {name} in {log_name}")
    inbox = site.inbox(box)
    assert not os.path.lexists(inbox / name)
    assert os.path.lexists(inbox / "BAD" / name)
    text = (inbox / "BAD" / f"{name}.reason").read_text()
    assert reason in text, text


def prereq_still_succeeds(site: LabSite, capfd: pytest.CaptureFixture[str]) -> None:
    """The good flow after the bad input: the daemon is alive and serves a prerequisite check.
    In this process a component's traceback goes to the test's stderr, which capfd (set
    up before the site starts) holds."""
    assert site.running
    assert site.states()[GUID] == State.DOWNLOAD_SUCCESS
    site.prereq(GUID)
    site.wait_for(lambda: settled_at(site, State.PREREQ_SUCCESS), timeout=60, what="PREREQ_SUCCESS")
    assert site.stop() == 0
    stderr = capfd.readouterr().err
    assert "Traceback" not in stderr, stderr


# -- hman.box/CFD --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("NOTAGUID.CME", "NOTAGUID.CME: the file name is not <PackageGuid>.CME"),
        ("5.ESC", "5.ESC is not a notification HMAN handles here (2.ESC, <PackageGuid>.CME)"),
    ],
)
def test_bad_cfd_notification_goes_to_bad(
    capfd: pytest.CaptureFixture[str], cmlab_site: LabSite, name: str, reason: str
) -> None:
    site = cmlab_site
    site.drop(CFD, name, b"")
    expect_bad(site, CFD, name, reason, "hman.log")
    prereq_still_succeeds(site, capfd)


def test_symlink_named_2_esc_is_never_followed(
    capfd: pytest.CaptureFixture[str], cmlab_site: LabSite, tmp_path: Path
) -> None:
    site = cmlab_site
    outside = tmp_path / "outside.txt"
    outside.write_text("not HMAN's\n")
    os.symlink(outside, site.inbox(CFD) / "2.ESC")
    expect_bad(site, CFD, "2.ESC", "it is a symbolic link", "hman.log")
    assert (site.inbox(CFD) / "BAD" / "2.ESC").is_symlink()
    assert outside.read_text() == "not HMAN's\n"
    assert "INFO: 2.ESC file was found. Easy setup package needs to be updated." not in site.log(
        "hman.log"
    )
    prereq_still_succeeds(site, capfd)


def test_2_esc_with_no_enabled_update_is_deleted_and_changes_nothing(
    capfd: pytest.CaptureFixture[str], cmlab_site_factory: Callable[..., LabSite]
) -> None:
    site = cmlab_site_factory(stage="downloaded", start=False)
    before = errors(site, "hman.log")
    site.start()
    esc = site.drop(CFD, "2.ESC", b"")
    site.wait_for(
        lambda: NO_ENABLED in site.log("hman.log") and not esc.exists(),
        timeout=30,
        what="2.ESC handled",
    )
    assert_in_order(
        site.log("hman.log"),
        ["INFO: 2.ESC file was found. Easy setup package needs to be updated.", NO_ENABLED],
    )
    assert not (site.inbox(CFD) / "BAD").exists()
    assert errors(site, "hman.log") == before
    assert site.query("SELECT COUNT(*) FROM EasySetupSettings") == [(0,)]
    prereq_still_succeeds(site, capfd)


# -- distmgr.box ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size", "reason"),
    [
        ("BADNAME.PKN", 0, "BADNAME.PKN: the file name is not <PackageID>.PKN"),
        ("CAS9ZZZZ.PKN", 0, "CAS9ZZZZ.PKN: the file name is not <PackageID>.PKN"),
        ("CAS10009.PKN", 0, "CAS10009.PKN: package CAS10009 is not an Easy Setup Package here"),
        # Junk, named as the package the next check will create, before it exists.
        (
            "CAS10001.PKN",
            10 * 1024 * 1024,
            "CAS10001.PKN: package CAS10001 is not an Easy Setup Package here",
        ),
    ],
)
def test_bad_pkn_goes_to_bad(
    capfd: pytest.CaptureFixture[str], cmlab_site: LabSite, name: str, size: int, reason: str
) -> None:
    site = cmlab_site
    # Written in place, as a careless trainee would: taken once closed.
    (site.inbox(DISTMGR) / name).write_bytes(os.urandom(size))
    expect_bad(site, DISTMGR, name, reason, "distmgr.log")
    assert (site.inbox(DISTMGR) / "BAD" / name).stat().st_size == size
    assert site.query("SELECT COUNT(*) FROM ObjectDistributionState") == [(0,)]
    assert not any((site.path / "SCCMContentLib").rglob("*.INI"))
    prereq_still_succeeds(site, capfd)
    # The real CAS10001.PKN came afterwards and was served.
    assert "Successfully created/updated the package CAS10001" in site.log("distmgr.log")


# -- cmupdate.box --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data"),
    [
        (f"{GUID}.CMI", os.urandom(64 * 1024)),
        ("00000000-0000-0000-0000-0000000000AB.CMI", b""),
        ("NOTAGUID.CMI", b"\x00junk\xff" * 100),
    ],
    ids=["junk-content", "unknown-guid", "not-a-guid"],
)
def test_cmi_is_only_a_wake_up_and_is_deleted_harmlessly(
    capfd: pytest.CaptureFixture[str], cmlab_site: LabSite, name: str, data: bytes
) -> None:
    """CMUpdate reads neither the CMI's name nor its content: it runs
    spCMUGetPendingUpdatePackage, which has nothing for an update that is only downloaded."""
    site = cmlab_site
    cmi = site.drop(CMUPDATE, name, data)
    site.wait_for(
        lambda: (
            not cmi.exists()
            and any(line.startswith("Detected a change to") for line in site.log("CMUpdate.log"))
        ),
        timeout=30,
        what=f"{name} handled",
    )
    assert not (site.inbox(CMUPDATE) / "BAD").exists()
    assert errors(site, "CMUpdate.log") == []
    assert not (site.path / "CMUStaging" / GUID).exists()  # nothing extracted
    assert site.query("SELECT COUNT(*) FROM CM_UpdatePackagePrereqStatus") == [(0,)]
    prereq_still_succeeds(site, capfd)


# -- DistMgr's CONTENT_REPLICATION_FAILED --------------------------------------------------------


def test_source_changed_after_hman_hashed_it_fails_replication_and_retry_recovers(
    cmlab_site_factory: Callable[..., LabSite],
) -> None:
    # A crash point: the daemon is a child process, killed there.
    site = cmlab_site_factory(stage="downloaded", mode="subprocess", start=False)
    source = site.path / "EasySetupPayload" / GUID.lower()
    cfd = site.inbox(CFD)
    recorded = folder_hash(source)
    # HMAN records the Easy Setup Package with the source's hash, then the daemon dies
    # before 2.ESC is deleted (the PKN is queued in the database, perhaps not dropped).
    site.start(CMLAB_CRASHPOINTS="hman.before_esc_delete")
    site.prereq(GUID)
    assert site.wait_exit(60) == -signal.SIGKILL
    assert site.query("SELECT PackageID, PackageHash FROM vEasySetupPackage") == [
        ("CAS10001", recorded)
    ]
    assert site.states()[GUID] == State.CONTENT_REPLICATING
    assert (cfd / "2.ESC").exists()

    # The source changes before DistMgr takes its snapshot.
    with open(source / "splash.hta", "ab") as f:
        f.write(b"<!-- edited on the share -->\n")
    changed = folder_hash(source)
    assert changed != recorded

    site.start()
    site.wait_for(
        lambda: settled_at(site, State.CONTENT_REPLICATION_FAILED),
        timeout=60,
        what="CONTENT_REPLICATION_FAILED",
    )
    assert site.states()[GUID] == 131071
    assert (
        f"ERROR: The snapshot of package CAS10001 has hash {changed}, not the source hash "
        f"{recorded} HMAN recorded: the source changed while it was replicated. Retry the "
        "content replication." in errors(site, "distmgr.log")
    )
    assert site.query(
        "SELECT IsComplete FROM CM_UpdatePackage_MonitoringStatus "
        "WHERE PackageGuid = ? AND SubStageID = ?",
        [GUID, 0xB0002],
    ) == [(4,)]
    assert site.query("SELECT State FROM ObjectDistributionState") == [(3,)]
    assert site.query(
        "SELECT State FROM CM_UpdatePackageSiteStatus WHERE PackageGuid = ?", [GUID]
    ) == [(State.CONTENT_REPLICATION_FAILED,)]
    # The CME was deleted (the run ended), the replayed 2.ESC found nothing ENABLED, and
    # CMUpdate was never asked to check.
    assert not (cfd / f"{GUID}.CME").exists()
    hman = site.log("hman.log")
    assert NO_ENABLED in hman
    assert any(line.startswith("deleted notification file") for line in hman)
    assert f"Created notification file ({GUID}.CMI) for CONFIGURATION_MANAGER_UPDATE" not in hman

    # RetryContentReplication returns 0 with the package it updates again.
    assert site.retry_replication(GUID) == "CAS10001"
    site.wait_for(lambda: settled_at(site, State.PREREQ_SUCCESS), timeout=60, what="PREREQ_SUCCESS")
    assert site.stop() == 0
    assert "Traceback" not in site.daemon_stderr(), site.daemon_stderr()

    (row,) = site.query(
        "SELECT PackageHash, StoredPkgHash, SourceVersion, StoredPkgVersion FROM vEasySetupPackage",
    )
    assert row == (changed, changed, 2, 2)
    assert site.query(
        "SELECT IsComplete, Progress FROM CM_UpdatePackage_MonitoringStatus "
        "WHERE PackageGuid = ? AND SubStageID = ?",
        [GUID, 0xB0002],
    ) == [(2, 100)]
    assert site.query("SELECT Flag FROM CM_UpdatePackages WHERE PackageGuid = ?", [GUID]) == [(1,)]
