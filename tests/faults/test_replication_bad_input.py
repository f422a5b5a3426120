"""Bad drop files in the Replication and Prerequisite check inboxes, on the real daemon: each
goes to `BAD/` beside its inbox with a `.reason` file and an `ERROR:` line in the component's
log, the daemon keeps serving, and a prerequisite check afterwards still reaches PREREQ_SUCCESS.
Last, DistMgr's CONTENT_REPLICATION_FAILED: the source changed after HMAN hashed it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from cmlab.core.fs import write_atomic
from cmlab.core.hashing import folder_hash
from cmlab.site.state_codes import PackageState
from tests.helpers.sites import (
    GUID_2509,
    Daemon,
    assert_in_order,
    cmlab,
    copy_site,
    inbox_files,
    log,
    query,
    states,
)
from tests.helpers.waiting import wait_until

GUID = GUID_2509
CFD = Path("inboxes/hman.box/CFD")
DISTMGR = Path("inboxes/distmgr.box")
CMUPDATE = Path("inboxes/cmupdate.box")
NO_ENABLED = "INFO: No update package is in state 2 (ENABLED). Nothing to update."


@pytest.fixture
def site(downloaded_template: Path, tmp_path: Path) -> Path:
    return copy_site(downloaded_template, tmp_path / "CAS")


def settled_at(site: Path, state: int) -> bool:
    return states(site).get(GUID) == state and not inbox_files(site)


def errors(site: Path, log_name: str) -> list[str]:
    return [line for line in log(site, log_name) if line.startswith("ERROR:")]


def expect_bad(site: Path, box: Path, name: str, reason: str, log_name: str) -> None:
    """`name` was moved to `box/BAD` with its reason, and the component's log says so."""

    def moved() -> list[str]:
        return [
            line
            for line in errors(site, log_name)
            if line.startswith("ERROR: Moved bad file") and name in line and reason in line
        ]

    wait_until(moved, timeout=30, what=f"the ERROR line for {name} in {log_name}")
    assert not os.path.lexists(site / box / name)
    assert os.path.lexists(site / box / "BAD" / name)
    text = (site / box / "BAD" / f"{name}.reason").read_text()
    assert reason in text, text


def prereq_still_succeeds(site: Path, daemon: Daemon) -> None:
    """The good flow after the bad input: the daemon is alive and serves a prerequisite check."""
    assert daemon.alive()
    assert states(site)[GUID] == PackageState.DOWNLOAD_SUCCESS
    cmlab("prereq", str(site), GUID)
    wait_until(
        lambda: settled_at(site, PackageState.PREREQ_SUCCESS), timeout=60, what="PREREQ_SUCCESS"
    )
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.stderr(), daemon.stderr()


# -- hman.box/CFD --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("NOTAGUID.CME", "NOTAGUID.CME: the file name is not <PackageGuid>.CME"),
        ("5.ESC", "5.ESC is not a notification HMAN handles here (2.ESC, <PackageGuid>.CME)"),
    ],
)
def test_bad_cfd_notification_goes_to_bad(site: Path, name: str, reason: str) -> None:
    with Daemon(site) as daemon:
        daemon.start()
        write_atomic(site / CFD / name, b"")
        expect_bad(site, CFD, name, reason, "hman.log")
        prereq_still_succeeds(site, daemon)


def test_symlink_named_2_esc_is_never_followed(site: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not HMAN's\n")
    with Daemon(site) as daemon:
        daemon.start()
        os.symlink(outside, site / CFD / "2.ESC")
        expect_bad(site, CFD, "2.ESC", "it is a symbolic link", "hman.log")
        assert (site / CFD / "BAD" / "2.ESC").is_symlink()
        assert outside.read_text() == "not HMAN's\n"
        assert "INFO: 2.ESC file was found. Easy setup package needs to be updated." not in log(
            site, "hman.log"
        )
        prereq_still_succeeds(site, daemon)


def test_2_esc_with_no_enabled_update_is_deleted_and_changes_nothing(site: Path) -> None:
    before = errors(site, "hman.log")
    with Daemon(site) as daemon:
        daemon.start()
        write_atomic(site / CFD / "2.ESC", b"")
        wait_until(
            lambda: NO_ENABLED in log(site, "hman.log") and not (site / CFD / "2.ESC").exists(),
            timeout=30,
            what="2.ESC handled",
        )
        assert_in_order(
            log(site, "hman.log"),
            ["INFO: 2.ESC file was found. Easy setup package needs to be updated.", NO_ENABLED],
        )
        assert not (site / CFD / "BAD").exists()
        assert errors(site, "hman.log") == before
        assert query(site, "SELECT COUNT(*) FROM EasySetupSettings") == [(0,)]
        prereq_still_succeeds(site, daemon)


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
def test_bad_pkn_goes_to_bad(site: Path, name: str, size: int, reason: str) -> None:
    with Daemon(site) as daemon:
        daemon.start()
        # Written in place, as a careless trainee would: taken once closed.
        (site / DISTMGR / name).write_bytes(os.urandom(size))
        expect_bad(site, DISTMGR, name, reason, "distmgr.log")
        assert (site / DISTMGR / "BAD" / name).stat().st_size == size
        assert query(site, "SELECT COUNT(*) FROM ObjectDistributionState") == [(0,)]
        assert not any((site / "SCCMContentLib").rglob("*.INI"))
        prereq_still_succeeds(site, daemon)
    # The real CAS10001.PKN came afterwards and was served.
    assert "Successfully created/updated the package CAS10001" in log(site, "distmgr.log")


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
    site: Path, name: str, data: bytes
) -> None:
    """CMUpdate reads neither the CMI's name nor its content: it runs
    spCMUGetPendingUpdatePackage, which has nothing for an update that is only downloaded."""
    with Daemon(site) as daemon:
        daemon.start()
        write_atomic(site / CMUPDATE / name, data)
        wait_until(
            lambda: (
                not (site / CMUPDATE / name).exists()
                and any(
                    line.startswith("Detected a change to") for line in log(site, "CMUpdate.log")
                )
            ),
            timeout=30,
            what=f"{name} handled",
        )
        assert not (site / CMUPDATE / "BAD").exists()
        assert errors(site, "CMUpdate.log") == []
        assert not (site / "CMUStaging" / GUID).exists()  # nothing extracted
        assert query(site, "SELECT COUNT(*) FROM CM_UpdatePackagePrereqStatus") == [(0,)]
        prereq_still_succeeds(site, daemon)


# -- DistMgr's CONTENT_REPLICATION_FAILED --------------------------------------------------------


def test_source_changed_after_hman_hashed_it_fails_replication_and_retry_recovers(
    site: Path,
) -> None:
    source = site / "EasySetupPayload" / GUID.lower()
    recorded = folder_hash(source)
    with Daemon(site) as daemon:
        # HMAN records the Easy Setup Package with the source's hash, then the daemon dies
        # before 2.ESC is deleted (the PKN is queued in the database, perhaps not dropped).
        daemon.start(CMLAB_CRASHPOINTS="hman.before_esc_delete")
        cmlab("prereq", str(site), GUID)
        assert daemon.wait_exit(60) == -signal.SIGKILL
        assert query(site, "SELECT PackageID, PackageHash FROM vEasySetupPackage") == [
            ("CAS10001", recorded)
        ]
        assert states(site)[GUID] == PackageState.CONTENT_REPLICATING
        assert (site / CFD / "2.ESC").exists()

        # The source changes before DistMgr takes its snapshot.
        with open(source / "splash.hta", "ab") as f:
            f.write(b"<!-- edited on the share -->\n")
        changed = folder_hash(source)
        assert changed != recorded

        daemon.start()
        wait_until(
            lambda: settled_at(site, PackageState.CONTENT_REPLICATION_FAILED),
            timeout=60,
            what="CONTENT_REPLICATION_FAILED",
        )
        assert states(site)[GUID] == 131071
        assert (
            f"ERROR: The snapshot of package CAS10001 has hash {changed}, not the source hash "
            f"{recorded} HMAN recorded: the source changed while it was replicated. Retry the "
            "content replication." in errors(site, "distmgr.log")
        )
        assert query(
            site,
            "SELECT IsComplete FROM CM_UpdatePackage_MonitoringStatus "
            "WHERE PackageGuid = ? AND SubStageID = ?",
            [GUID, 0xB0002],
        ) == [(4,)]
        assert query(site, "SELECT State FROM ObjectDistributionState") == [(3,)]
        assert query(
            site, "SELECT State FROM CM_UpdatePackageSiteStatus WHERE PackageGuid = ?", [GUID]
        ) == [(PackageState.CONTENT_REPLICATION_FAILED,)]
        # The CME was deleted (the run ended), the replayed 2.ESC found nothing ENABLED, and
        # CMUpdate was never asked to check.
        assert not (site / CFD / f"{GUID}.CME").exists()
        hman = log(site, "hman.log")
        assert NO_ENABLED in hman
        assert any(line.startswith("deleted notification file") for line in hman)
        assert (
            f"Created notification file ({GUID}.CMI) for CONFIGURATION_MANAGER_UPDATE" not in hman
        )

        out = cmlab("retry-replication", str(site), GUID).stdout
        assert "ReturnValue 0" in out
        wait_until(
            lambda: settled_at(site, PackageState.PREREQ_SUCCESS), timeout=60, what="PREREQ_SUCCESS"
        )
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.stderr(), daemon.stderr()

    (row,) = query(
        site,
        "SELECT PackageHash, StoredPkgHash, SourceVersion, StoredPkgVersion FROM vEasySetupPackage",
    )
    assert row == (changed, changed, 2, 2)
    assert query(
        site,
        "SELECT IsComplete, Progress FROM CM_UpdatePackage_MonitoringStatus "
        "WHERE PackageGuid = ? AND SubStageID = ?",
        [GUID, 0xB0002],
    ) == [(2, 100)]
    assert query(site, "SELECT Flag FROM CM_UpdatePackages WHERE PackageGuid = ?", [GUID]) == [(1,)]
