"""HMAN's post-installation on the real daemon: `196612.ESC` dropped by hand in its CFD box
(as CMUpdate will drop it at the end of an installation) updates the client packages from
`SITE/CMUClient` (docs/installation.md, "Post-installation: HMAN on 196612.ESC")."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest

from cmlab.core.fs import write_atomic
from cmlab.site.state_codes import PackageState
from tests.helpers.sites import (
    GUID_2509,
    Daemon,
    assert_in_order,
    copy_site,
    log,
    query,
    set_toml,
    temporaries,
)
from tests.helpers.waiting import wait_until

GUID = GUID_2509
ROOT = r"E:\ConfigMgr"
CFD = Path("inboxes") / "hman.box" / "CFD"
ESC = "196612.ESC"
FOUND = "INFO: 196612.ESC file was found. Updating client packages. InteropMode = 0"
WARN = (
    "WARN: The current update package's state (196611) is not set to installed yet. "
    "Will retry in next cycle."
)
SETTINGS = (
    "Loaded client upgrade settings from DB successfully. FullClientPackageID=CAS00004, "
    "StagingClientPackageID=CAS00008, ClientUpgradePackageID=CAS00005, "
    "PilotingUpgradePackageID=CAS00009, ClientUpgradeAdvertisementID=CAS20000, "
    "ClientPilotingAdvertisementID={piloting}"
)


def status(substage: int, is_complete: int, progress: int) -> str:
    return (
        "Successfully reported ConfigMgr update status (SiteCode=CAS, "
        f"SubStageID=0x{substage:x}, IsComplete={is_complete}, Progress={progress}, Applicable=1)"
    )


CLIENT_BINARIES = rf"Copying client binaries from '{ROOT}\CMUClient' to '{ROOT}\Client'..."
UPGRADE_COPY = (
    rf"Copying ccmsetup from '{ROOT}\CMUClient\ccmsetup.exe' to "
    rf"'{ROOT}\ClientUpgrade\ccmsetup.exe'..."
)
PILOTING_COPY = (
    rf"Copying ccmsetup from '{ROOT}\CMUClient\ccmsetup.exe' to "
    rf"'{ROOT}\PilotingUpgrade\ccmsetup.exe'..."
)


def expected_lines(piloting: bool) -> list[str]:
    return [
        FOUND,
        SETTINGS.format(piloting="CAS20001" if piloting else "(null)"),
        "Client piloting is enabled." if piloting else "Client piloting is not enabled.",
        status(0xE0007, 1, 1),
        *([PILOTING_COPY] if piloting else []),
        status(0xE0007, 2, 100),
        status(0xE0009, 1, 1),
        status(0xE0008, 1, 1),
        CLIENT_BINARIES,
        UPGRADE_COPY,
        status(0xE0009, 2, 100),
        status(0xE0008, 2, 100),
        rf"deleted notification file {ROOT}\inboxes\hman.box\CFD\196612.ESC",
    ]


@pytest.fixture
def site(downloaded_template: Path, tmp_path: Path) -> Path:
    """A downloaded site with the new client files in CMUClient (those of the sample update's
    payload, as the installation will leave them) and an old client in Client/."""
    s = copy_site(downloaded_template, tmp_path / "CAS")
    set_toml(s, "site", "display_root", "'E:\\ConfigMgr'")
    payload_client = s / "EasySetupPayload" / GUID.lower() / "CMUClient"
    cmu_client = s / "CMUClient"
    cmu_client.mkdir(exist_ok=True)
    for f in payload_client.iterdir():
        (cmu_client / f.name).write_bytes(f.read_bytes())
    (cmu_client / "i386").mkdir()
    (cmu_client / "i386" / "client.msi").write_bytes(b"x86 client " * 100)
    (s / "Client").mkdir(exist_ok=True)
    (s / "Client" / "old-client.msi").write_bytes(b"the previous build's client")
    return s


def tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def set_state(site: Path, state: int) -> None:
    """What CMUpdate leaves: the package's state and this site's status row."""
    conn = sqlite3.connect(site / "db" / "site.db", timeout=30)
    try:
        with conn:
            conn.execute(
                "UPDATE CM_UpdatePackages SET State = ? WHERE PackageGuid = ?", (state, GUID)
            )
            site_number = conn.execute("SELECT ID FROM ServerData WHERE IsLocal = 1").fetchone()[0]
            conn.execute(
                "INSERT OR REPLACE INTO CM_UpdatePackageSiteStatus (PackageGuid, SiteNumber, "
                "State) VALUES (?, ?, ?)",
                (GUID, site_number, state),
            )
    finally:
        conn.close()


def drop_esc(site: Path) -> None:
    write_atomic(site / CFD / ESC, b"")


def handled(site: Path) -> bool:
    return not (site / CFD / ESC).exists() and UPGRADE_COPY in log(site, "hman.log")


def monitoring(site: Path) -> dict[int, tuple[int, int]]:
    return {
        int(r[0]): (int(r[1]), int(r[2]))
        for r in query(
            site,
            "SELECT SubStageID, IsComplete, Progress FROM CM_UpdatePackage_MonitoringStatus "
            "WHERE PackageGuid = ? AND SubStageID IN (917511, 917512, 917513)",
            [GUID],
        )
    }


def assert_client_packages(site: Path, *, piloting: bool) -> None:
    new = tree(site / "CMUClient")
    assert tree(site / "Client") == new  # the old client is gone: the folder was replaced
    ccmsetup = new["ccmsetup.exe"]
    assert tree(site / "ClientUpgrade") == {"ccmsetup.exe": ccmsetup}
    if piloting:
        assert tree(site / "PilotingUpgrade") == {"ccmsetup.exe": ccmsetup}
    else:
        assert tree(site / "PilotingUpgrade") == {}
    assert monitoring(site) == {0xE0007: (2, 100), 0xE0008: (2, 100), 0xE0009: (2, 100)}
    assert temporaries(site) == []


def test_early_notification_waits_then_updates_the_client_packages(site: Path) -> None:
    set_state(site, PackageState.INSTALL_WAITING_PARENT)
    with Daemon(site) as daemon:
        daemon.start()
        drop_esc(site)
        wait_until(lambda: WARN in log(site, "hman.log"), timeout=30, what="the WARN line")
        # Not installed yet: the notification stays for the next cycle, nothing is copied.
        assert (site / CFD / ESC).exists()
        assert not (site / CFD / "BAD").exists()
        assert tree(site / "Client") == {"old-client.msi": b"the previous build's client"}
        assert monitoring(site) == {}
        assert_in_order(log(site, "hman.log"), [FOUND, WARN])

        set_state(site, PackageState.INSTALL_SUCCESS)
        wait_until(lambda: handled(site), timeout=30, what="196612.ESC handled")
        messages = log(site, "hman.log")
        assert messages.count(WARN) == 1  # retries while the state stays are not logged again
        assert_in_order(messages, [FOUND, WARN, *expected_lines(piloting=False)])
        assert_client_packages(site, piloting=False)
        assert query(
            site,
            "SELECT SiteCode, FullClientPackageID, ClientPilotingAdvertisementID "
            "FROM ClientUpgradeSettings",
        ) == [("CAS", "CAS00004", None)]

        # Handled again (a crash before the delete, or a trainee's re-drop): the same end.
        drop_esc(site)
        wait_until(
            lambda: (
                not (site / CFD / ESC).exists()
                and log(site, "hman.log").count(UPGRADE_COPY) == 2
                and "deleted notification file" in log(site, "hman.log")[-1]
            ),
            timeout=30,
            what="the second 196612.ESC handled",
        )
        assert_client_packages(site, piloting=False)
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.stderr(), daemon.stderr()
    assert not [line for line in log(site, "hman.log") if line.startswith("ERROR")]


def test_piloting_also_updates_the_piloting_package(site: Path) -> None:
    with (site / "site.toml").open("a") as f:
        f.write("\n[client]\npiloting = true\n")
    set_state(site, PackageState.INSTALL_SUCCESS)
    with Daemon(site) as daemon:
        daemon.start()
        drop_esc(site)
        wait_until(lambda: handled(site), timeout=30, what="196612.ESC handled")
        assert_in_order(log(site, "hman.log"), expected_lines(piloting=True))
        assert_client_packages(site, piloting=True)
        assert query(site, "SELECT ClientPilotingAdvertisementID FROM ClientUpgradeSettings") == [
            ("CAS20001",)
        ]
        assert daemon.stop() == 0


def test_stray_notification_is_deleted(site: Path) -> None:
    """No update is being installed or installed (the site is at DOWNLOAD_SUCCESS)."""
    with Daemon(site) as daemon:
        daemon.start()
        drop_esc(site)
        wait_until(lambda: not (site / CFD / ESC).exists(), timeout=30, what="196612.ESC gone")
        assert_in_order(
            log(site, "hman.log"),
            [
                FOUND,
                "INFO: No update package is being installed or installed. Nothing to update; "
                "the notification is removed.",
            ],
        )
        assert not (site / CFD / "BAD").exists()
        assert tree(site / "Client") == {"old-client.msi": b"the previous build's client"}
        assert daemon.stop() == 0


def moved_bad_file_errors(site: Path) -> list[str]:
    """hman.log's ERROR lines once the engine has logged a quarantine; [] until then."""
    errors = [line for line in log(site, "hman.log") if line.startswith("ERROR")]
    return errors if any(e.startswith("ERROR: Moved bad file") for e in errors) else []


@pytest.mark.parametrize("broken", ["no CMUClient", "no ccmsetup"])
def test_missing_client_files_go_to_bad(site: Path, broken: str) -> None:
    if broken == "no CMUClient":
        for f in (site / "CMUClient").rglob("*"):
            if f.is_file():
                f.unlink()
        (site / "CMUClient" / "i386").rmdir()
        (site / "CMUClient").rmdir()
        what = "CMUClient does not exist"
    else:
        (site / "CMUClient" / "ccmsetup.exe").unlink()
        what = "CMUClient has no ccmsetup.exe"
    set_state(site, PackageState.INSTALL_SUCCESS)
    with Daemon(site) as daemon:
        daemon.start()
        drop_esc(site)
        bad = site / CFD / "BAD" / ESC
        wait_until(lambda: (bad.parent / f"{ESC}.reason").exists(), timeout=30, what="BAD")
        reason = (bad.parent / f"{ESC}.reason").read_text()
        assert "the client files to update the client packages from are missing" in reason
        assert what in reason
        # Quarantine writes the .reason file before it logs the move: wait for the line.
        errors = wait_until(
            lambda: moved_bad_file_errors(site), timeout=30, what="ERROR: Moved bad file"
        )
        assert any("Failed to update client packages" in e and what in e for e in errors)
        # Nothing half-copied.
        assert tree(site / "Client") == {"old-client.msi": b"the previous build's client"}
        assert tree(site / "ClientUpgrade") == {}
        assert monitoring(site) == {0xE0007: (4, 0)}
        assert CLIENT_BINARIES not in log(site, "hman.log")
        assert daemon.stop() == 0


def test_sigkill_after_client_copy_then_restart_converges(site: Path) -> None:
    set_state(site, PackageState.INSTALL_SUCCESS)
    with Daemon(site) as daemon:
        daemon.start(CMLAB_CRASHPOINTS="hman.postinstall.after_client_copy")
        drop_esc(site)
        rc = daemon.wait_exit(timeout=60)
        assert rc == -signal.SIGKILL, daemon.stderr()
        # Killed between the two copies: Client is the new one, ClientUpgrade not yet.
        assert (site / CFD / ESC).exists()
        assert tree(site / "Client") == tree(site / "CMUClient")
        assert tree(site / "ClientUpgrade") == {}
        assert UPGRADE_COPY not in log(site, "hman.log")

        daemon.start()
        wait_until(lambda: handled(site), timeout=30, what="196612.ESC handled after restart")
        assert_client_packages(site, piloting=False)
        assert log(site, "hman.log").count(CLIENT_BINARIES) == 2
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.stderr(), daemon.stderr()
