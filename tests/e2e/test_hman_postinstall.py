"""HMAN's post-installation on the real daemon: `196612.ESC` dropped by hand in its CFD box
(as CMUpdate will drop it at the end of an installation) updates the client packages from
`SITE/CMUClient` (docs/installation.md, "Post-installation: HMAN on 196612.ESC")."""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from cmlab.testing import SAMPLE_UPDATE, LabSite, Mode, State, assert_in_order
from tests.helpers.site_files import temporaries

GUID = SAMPLE_UPDATE
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


def client_site(make: Callable[..., LabSite], mode: Mode = "inprocess") -> LabSite:
    """A downloaded site, not started, with the new client files in CMUClient (those of the
    sample update's payload, as the installation will leave them) and an old client in
    Client/."""
    site = make(stage="downloaded", mode=mode, start=False, settings={"site.display_root": ROOT})
    s = site.path
    payload_client = s / "EasySetupPayload" / GUID.lower() / "CMUClient"
    cmu_client = s / "CMUClient"
    cmu_client.mkdir(exist_ok=True)
    for f in payload_client.iterdir():
        (cmu_client / f.name).write_bytes(f.read_bytes())
    (cmu_client / "i386").mkdir()
    (cmu_client / "i386" / "client.msi").write_bytes(b"x86 client " * 100)
    (s / "Client").mkdir(exist_ok=True)
    (s / "Client" / "old-client.msi").write_bytes(b"the previous build's client")
    return site


@pytest.fixture
def site(cmlab_site_factory: Callable[..., LabSite]) -> LabSite:
    return client_site(cmlab_site_factory)


def tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def set_state(site: LabSite, state: int) -> None:
    """What CMUpdate leaves: the package's state and this site's status row."""
    conn = sqlite3.connect(site.path / "db" / "site.db", timeout=30)
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


def drop_esc(site: LabSite) -> None:
    site.drop("hman.box/CFD", ESC)


def handled(site: LabSite) -> bool:
    return not (site.path / CFD / ESC).exists() and UPGRADE_COPY in site.log("hman.log")


def monitoring(site: LabSite) -> dict[int, tuple[int, int]]:
    return {
        int(r[0]): (int(r[1]), int(r[2]))
        for r in site.query(
            "SELECT SubStageID, IsComplete, Progress FROM CM_UpdatePackage_MonitoringStatus "
            "WHERE PackageGuid = ? AND SubStageID IN (917511, 917512, 917513)",
            [GUID],
        )
    }


def assert_client_packages(site: LabSite, *, piloting: bool) -> None:
    folder = site.path
    new = tree(folder / "CMUClient")
    assert tree(folder / "Client") == new  # the old client is gone: the folder was replaced
    ccmsetup = new["ccmsetup.exe"]
    assert tree(folder / "ClientUpgrade") == {"ccmsetup.exe": ccmsetup}
    if piloting:
        assert tree(folder / "PilotingUpgrade") == {"ccmsetup.exe": ccmsetup}
    else:
        assert tree(folder / "PilotingUpgrade") == {}
    assert monitoring(site) == {0xE0007: (2, 100), 0xE0008: (2, 100), 0xE0009: (2, 100)}
    assert temporaries(folder) == []


def test_early_notification_waits_then_updates_the_client_packages(
    site: LabSite, capfd: pytest.CaptureFixture[str]
) -> None:
    set_state(site, State.INSTALL_WAITING_PARENT)
    site.start()
    drop_esc(site)
    site.wait_for(lambda: WARN in site.log("hman.log"), timeout=30, what="the WARN line")
    # Not installed yet: the notification stays for the next cycle, nothing is copied.
    assert (site.path / CFD / ESC).exists()
    assert not (site.path / CFD / "BAD").exists()
    assert tree(site.path / "Client") == {"old-client.msi": b"the previous build's client"}
    assert monitoring(site) == {}
    assert_in_order(site.log("hman.log"), [FOUND, WARN])

    set_state(site, State.INSTALL_SUCCESS)
    site.wait_for(lambda: handled(site), timeout=30, what="196612.ESC handled")
    messages = site.log("hman.log")
    assert messages.count(WARN) == 1  # retries while the state stays are not logged again
    assert_in_order(messages, [FOUND, WARN, *expected_lines(piloting=False)])
    assert_client_packages(site, piloting=False)
    assert site.query(
        "SELECT SiteCode, FullClientPackageID, ClientPilotingAdvertisementID "
        "FROM ClientUpgradeSettings",
    ) == [("CAS", "CAS00004", None)]

    # Handled again (a crash before the delete, or a trainee's re-drop): the same end.
    drop_esc(site)
    site.wait_for(
        lambda: (
            not (site.path / CFD / ESC).exists()
            and site.log("hman.log").count(UPGRADE_COPY) == 2
            and "deleted notification file" in site.log("hman.log")[-1]
        ),
        timeout=30,
        what="the second 196612.ESC handled",
    )
    assert_client_packages(site, piloting=False)
    assert site.stop() == 0
    # In this process, a component's traceback would be on this test's stderr.
    stderr = capfd.readouterr().err
    assert "Traceback" not in stderr, stderr
    assert not [line for line in site.log("hman.log") if line.startswith("ERROR")]


def test_piloting_also_updates_the_piloting_package(site: LabSite) -> None:
    with (site.path / "site.toml").open("a") as f:
        f.write("\n[client]\npiloting = true\n")
    set_state(site, State.INSTALL_SUCCESS)
    site.start()
    drop_esc(site)
    site.wait_for(lambda: handled(site), timeout=30, what="196612.ESC handled")
    assert_in_order(site.log("hman.log"), expected_lines(piloting=True))
    assert_client_packages(site, piloting=True)
    assert site.query("SELECT ClientPilotingAdvertisementID FROM ClientUpgradeSettings") == [
        ("CAS20001",)
    ]
    assert site.stop() == 0


def test_stray_notification_is_deleted(site: LabSite) -> None:
    """No update is being installed or installed (the site is at DOWNLOAD_SUCCESS)."""
    site.start()
    drop_esc(site)
    site.wait_for(lambda: not (site.path / CFD / ESC).exists(), timeout=30, what="196612.ESC gone")
    assert_in_order(
        site.log("hman.log"),
        [
            FOUND,
            "INFO: No update package is being installed or installed. Nothing to update; "
            "the notification is removed.",
        ],
    )
    assert not (site.path / CFD / "BAD").exists()
    assert tree(site.path / "Client") == {"old-client.msi": b"the previous build's client"}
    assert site.stop() == 0


def moved_bad_file_errors(site: LabSite) -> list[str]:
    """hman.log's ERROR lines once the engine has logged a quarantine; [] until then."""
    errors = [line for line in site.log("hman.log") if line.startswith("ERROR")]
    return errors if any(e.startswith("ERROR: Moved bad file") for e in errors) else []


@pytest.mark.parametrize("broken", ["no CMUClient", "no ccmsetup"])
def test_missing_client_files_go_to_bad(site: LabSite, broken: str) -> None:
    if broken == "no CMUClient":
        for f in (site.path / "CMUClient").rglob("*"):
            if f.is_file():
                f.unlink()
        (site.path / "CMUClient" / "i386").rmdir()
        (site.path / "CMUClient").rmdir()
        what = "CMUClient does not exist"
    else:
        (site.path / "CMUClient" / "ccmsetup.exe").unlink()
        what = "CMUClient has no ccmsetup.exe"
    set_state(site, State.INSTALL_SUCCESS)
    site.start()
    drop_esc(site)
    bad = site.path / CFD / "BAD" / ESC
    site.wait_for(lambda: (bad.parent / f"{ESC}.reason").exists(), timeout=30, what="BAD")
    reason = (bad.parent / f"{ESC}.reason").read_text()
    assert "the client files to update the client packages from are missing" in reason
    assert what in reason
    # Quarantine writes the .reason file before it logs the move: wait for the line.
    errors = site.wait_for(
        lambda: moved_bad_file_errors(site), timeout=30, what="ERROR: Moved bad file"
    )
    assert any("Failed to update client packages" in e and what in e for e in errors)
    # Nothing half-copied.
    assert tree(site.path / "Client") == {"old-client.msi": b"the previous build's client"}
    assert tree(site.path / "ClientUpgrade") == {}
    assert monitoring(site) == {0xE0007: (4, 0)}
    assert CLIENT_BINARIES not in site.log("hman.log")
    assert site.stop() == 0


def test_sigkill_after_client_copy_then_restart_converges(
    cmlab_site_factory: Callable[..., LabSite],
) -> None:
    # A crash point SIGKILLs the daemon's process: it runs as `cmlab run` in a child process.
    site = client_site(cmlab_site_factory, mode="subprocess")
    set_state(site, State.INSTALL_SUCCESS)
    site.start(CMLAB_CRASHPOINTS="hman.postinstall.after_client_copy")
    drop_esc(site)
    rc = site.wait_exit(timeout=60)
    assert rc == -signal.SIGKILL, site.daemon_stderr()
    # Killed between the two copies: Client is the new one, ClientUpgrade not yet.
    assert (site.path / CFD / ESC).exists()
    assert tree(site.path / "Client") == tree(site.path / "CMUClient")
    assert tree(site.path / "ClientUpgrade") == {}
    assert UPGRADE_COPY not in site.log("hman.log")

    site.start()
    site.wait_for(lambda: handled(site), timeout=30, what="196612.ESC handled after restart")
    assert_client_packages(site, piloting=False)
    assert site.log("hman.log").count(CLIENT_BINARIES) == 2
    assert site.stop() == 0
    assert "Traceback" not in site.daemon_stderr(), site.daemon_stderr()
