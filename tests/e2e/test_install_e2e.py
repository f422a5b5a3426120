"""The Installation stage end to end on the real daemon: `cmlab install` (InitiateUpgrade,
Flag=0) from "Ready to install" to INSTALL_SUCCESS (196612), with every state recorded in
order, the site really updated (installation folder, database version, cd.latest, client
folders) and the guide's lines in CMUpdate.log and hman.log; the failures the guide
troubleshoots, each ending in INSTALL_FAILED (or INSTALL_CMU_FAILED) with the site at its old
version and working, then fixed and installed."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from cmlab.admin.payload import build_cab_from_dir
from cmlab.core.hashing import sha256_file
from cmlab.site.formats.sample_binary import sample_build_number
from cmlab.site.resources import data_dir
from cmlab.site.trust import load_lab_ca
from cmlab.testing import SAMPLE_UPDATE, LabSite, State, assert_in_order
from tests.helpers.site_files import temporaries

GUID = SAMPLE_UPDATE
ROOT = r"E:\ConfigMgr"
STAGING = rf"{ROOT}\CMUStaging\{GUID}"
NDP = "NDP462-KB3151800-X86-X64-ALLOS-ENU.EXE"
OLD_VERSION, NEW_VERSION = "5.00.9135.1000", "5.00.9141.1000"
OLD_BUILD, NEW_BUILD = 9135, 9141
CFD_ESC = rf"{ROOT}\inboxes\hman.box\CFD\196612.ESC"

# This site's states, in order, for an installation that succeeds (CM_UpdatePackageSiteStatus
# as the _HIST table records it): the run from InitiateUpgrade, the prerequisite rerun, the
# self-upgrade, then one state per group of install.map steps.
INSTALL_STATES = [
    State.INSTALL_IN_PROGRESS,
    State.INSTALL_CMU_VALIDATING,
    State.INSTALL_CMU_STOPPED,
    State.INSTALL_CMU_INSTALLFILES,
    State.INSTALL_CMU_STARTED,
    State.INSTALL_CMU_SUCCESS,
    State.INSTALL_IN_PROGRESS,
    State.INSTALL_UPGRADEDATABASE,
    State.INSTALL_INSTALLSYSTEM,
    State.INSTALL_INSTALLFILES,
    State.INSTALL_UPGRADESITECTRLIMAGE,
    State.INSTALL_CONFIGURESERVICEBROKER,
    State.INSTALL_INSTALLBASESERVICES,
    State.INSTALL_UPDATE_SITES,
    State.INSTALL_UPDATEADMINCONSOLE,
    State.INSTALL_SSB_ACTIVATION_ON,
    State.INSTALL_SUCCESS,
]
RUN_STATES = [
    State.ENABLED,
    State.CONTENT_REPLICATING,
    State.CONTENT_REPLICATION_SUCCESS,
    State.PREREQ_IN_PROGRESS,
    State.PREREQ_SUCCESS,
    *INSTALL_STATES,
]


# Every test starts "Ready to install" (the plugin's downloaded template), paths shown as on a
# site server's E: drive; a test that breaks the site first starts it itself.
pytestmark = pytest.mark.cmlab(stage="downloaded", settings={"site.display_root": ROOT})
BROKEN_FIRST = pytest.mark.cmlab(
    stage="downloaded", start=False, settings={"site.display_root": ROOT}
)


SITE_SERVER_BINARIES = (
    "cmupdate.exe",
    "prereqcore.dll",
    "setupcore.dll",
    "smsexec.exe",
    "hman.dll",
    "smsdbmon.dll",
    "distmgr.dll",
    "dmpdownloader.dll",
    "baseutil.dll",
)


def binary_builds(site: Path) -> set[int]:
    """The builds of the site server's binaries (the redists beside them have none)."""
    return {sample_build_number(site / "bin" / "x64" / name) for name in SITE_SERVER_BINARIES}


def site_version(site: LabSite) -> str:
    """What fnCurrentSiteVersion() returns."""
    ((version,),) = site.query("SELECT dbo.fnCurrentSiteVersion()")
    return str(version)


def wait_settled(site: LabSite, state: int, timeout: float = 120) -> None:
    """`state` (failing at once at any other failure state), with the site idle."""
    site.wait_state(GUID, state, timeout)
    site.wait_settled(GUID, state, timeout)


def assert_old_site_working(site: LabSite) -> None:
    assert site_version(site) == OLD_VERSION
    assert sample_build_number(site.path / "bin" / "x64" / "smsexec.exe") == OLD_BUILD
    services = dict(site.query("SELECT ServiceName, State FROM SiteServices"))
    assert set(services.values()) == {"Running"}
    settings = dict(site.query("SELECT Name, Value FROM SiteServerSettings"))
    assert settings["ServiceBroker"] == "ON"
    assert settings["WMIProviders"] == "Loaded"
    assert site.query("SELECT 1 FROM sqlite_master WHERE name = 'CM_UpdatePackages_UPD_HMAN'"), (
        "SMSDBMon's triggers are back"
    )
    assert not (site.path / "CMUStaging" / f"{GUID}.backup").exists()
    assert not (site.path / "CMUStaging" / f"{GUID}.failed").exists()


# ---------------------------------------------------------------------------------------
# The whole stage


def test_install_takes_the_update_to_install_success_and_updates_the_site(
    cmlab_site: LabSite,
) -> None:
    site = cmlab_site.path
    assert cmlab_site.install(GUID) == State.DOWNLOAD_SUCCESS
    wait_settled(cmlab_site, State.INSTALL_SUCCESS)
    assert cmlab_site.stop() == 0

    assert cmlab_site.history(GUID) == [
        State.DOWNLOAD_IN_PROGRESS,
        State.DOWNLOAD_SUCCESS,
        *RUN_STATES,
    ]
    assert cmlab_site.states()[GUID] == State.INSTALL_SUCCESS

    # The site really changed.
    assert site_version(cmlab_site) == NEW_VERSION
    assert binary_builds(site) == {NEW_BUILD}
    assert (
        sample_build_number(site / "AdminConsole" / "bin" / "Microsoft.ConfigurationManagement.exe")
        == NEW_BUILD
    )
    assert dict(cmlab_site.query("SELECT ServiceName, Build FROM SiteServices")) == {
        "SMS_EXECUTIVE": NEW_BUILD,
        "SMS_SITE_COMPONENT_MANAGER": NEW_BUILD,
        "CONFIGURATION_MANAGER_UPDATE": NEW_BUILD,
    }
    assert (
        "<Build Number><><9141><0>"
        in (site / "inboxes" / "sitectrl.box" / "sitectrl.ct0").read_text()
    )
    staging = site / "CMUStaging" / GUID
    cd_latest = site / "cd.latest"
    for rel in ("SMSSetup/update.map", "SMSSetup/install.map", "redist/ConfigMgr.Manifest.cab"):
        assert sha256_file(cd_latest / rel) == sha256_file(staging / rel)
    staging_client = staging / "CMUClient"
    for name in ("ccmsetup.exe", "client.msi"):
        for folder in ("CMUClient", "Client"):
            assert sha256_file(site / folder / name) == sha256_file(staging_client / name)
    assert sha256_file(site / "ClientUpgrade" / "ccmsetup.exe") == sha256_file(
        staging_client / "ccmsetup.exe"
    )
    assert not (site / "PilotingUpgrade" / "ccmsetup.exe").exists()
    assert not (site / "CMUStaging" / f"{GUID}.backup").exists()
    assert not temporaries(site)
    monitoring = {
        (int(r[0]), int(r[1]))
        for r in cmlab_site.query(
            "SELECT SubStageID, IsComplete FROM CM_UpdatePackage_MonitoringStatus "
            "WHERE PackageGuid = ?",
            [GUID],
        )
    }
    for substage, complete in (
        (0xD0007, 2),
        (0xD0005, 2),
        (0xD0006, 2),
        (0xD001A, 3),
        (0xE0007, 2),
        (0xE0008, 2),
        (0xE0009, 2),
    ):
        assert (substage, complete) in monitoring

    status = r"Successfully reported ConfigMgr update status \(SiteCode=CAS, SubStageID=0x{}, IsComplete={}, Progress={}, Applicable=1\)"  # noqa: E501
    assert_in_order(
        cmlab_site.log("CMUpdate.log"),
        [
            re.compile(r"Prerequisite check of .* completed: PREREQ_SUCCESS \(131074\)\."),
            re.compile(status.format("d0007", 1, 1)),
            f"INFO: Waiting for CONFIGURATION_MANAGER_SERVICE to be ready to apply update: {GUID}",
            "CONFIGURATION_MANAGER_UPDATE service is stopping...",
            "CONFIGURATION_MANAGER_UPDATE service is starting...",
            f"Microsoft Microsoft Configuration Manager v5.00 (Build {NEW_BUILD})",
            f"INFO: Waiting for CONFIGURATION_MANAGER_SERVICE to be ready to apply update: {GUID}",
            f"CONFIGURATION_MANAGER_UPDATE is already running build {NEW_BUILD}.",
            "There is no service window defined for the site server to apply the CM server "
            "updates.",
            "Checking if the CMU Staging folder already has the content extracted.",
            "Creating hash for algorithm 32780",
            re.compile(r"Staging folder has hash = [0-9A-F]{64}"),
            "Content is already found at the staging folder",
            rf"Successfully read file \\?\{STAGING}\SMSSetup\update.map",
            re.compile(status.format("d0005", 2, 100)),
            re.compile(status.format("d0006", 1, 1)),
            rf"Found redist manifest {STAGING}\redist\ConfigMgr.Manifest.cab and set redist "
            rf"folder to {STAGING}\redist.",
            'INFO: Processing file group "Dot_Net_Framework"',
            re.compile(status.format("d0006", 2, 100)),
            rf"INFO: Checking media: {STAGING}\SMSSetup\bin\x64\{NDP}",
            re.compile(
                r"Expected hash:[0-9A-F]{64}, Actual hash:"
                r"E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"
            ),
            rf"WARNING: File hash mismatch for {STAGING}\SMSSetup\bin\x64\{NDP}",
            rf"INFO: Checking alternate path: {STAGING}\redist\{NDP}",
            rf"INFO: Found valid source in folder: '{STAGING}\redist\'",
            rf"This file {STAGING}\redist\{NDP} will be copied "
            "from redist.",
            "INFO: Running install step 1 (RUN_PREUPGRADE_SCRIPTS): Unpack and run the "
            "pre-upgrade SQL scripts",
            "INFO: Running install step 2 (SSB_OFF): Turn off SQL Server Service Broker",
            "INFO: Running install step 5 (DELETE_DBMON_TRIGGERS): Delete the SMSDBMON triggers",
            "INFO: Running install step 10 (INSTALL_FILES): Install files, language packs, "
            "components, and controls",
            "INFO: Running install step 16 (SSB_ON): Turn on SQL Server Service Broker",
            "INFO: Install step 16 (SSB_ON) completed.",
            "INFO: Adding default USMT package ...",
            "INFO: Adding Boot Image Packages, this may take some time...",
            "INFO: Attempting to export x86 boot image from ADK installation source",
            "INFO: Attempting to export x64 boot image from ADK installation source",
            "INFO: Attempting to export arm64 boot image from ADK installation source",
            re.compile(status.format("d001a", 3, 100)),
            "~   Starting ConfigMgr Update post installation monitor thread...",
            rf"Creating cd backup location at {ROOT}\cd.latest",
            rf"Copying contents of update package from {STAGING} to {ROOT}\cd.latest",
            "successfully updated setup registry to have new external files stored at "
            rf"{ROOT}\cd.latest\redist",
            "INFO: Successfully dropped update pack installed notification to HMAN CFD box.",
            f"INFO: Verified that the SMS_Executive service is installed (build {NEW_BUILD}).",
            f"INFO: Verified that the RCM component is installed (build {NEW_BUILD}).",
        ],
    )
    hman = cmlab_site.log("hman.log")
    assert_in_order(
        hman,
        [
            "INFO: 196612.ESC file was found. Updating client packages. InteropMode = 0",
            re.compile(r"Loaded client upgrade settings from DB successfully\. .*"),
            "Client piloting is not enabled.",
            re.compile(status.format("e0007", 1, 1)),
            re.compile(status.format("e0007", 2, 100)),
            re.compile(status.format("e0009", 1, 1)),
            re.compile(status.format("e0008", 1, 1)),
            rf"Copying client binaries from '{ROOT}\CMUClient' to '{ROOT}\Client'...",
            rf"Copying ccmsetup from '{ROOT}\CMUClient\ccmsetup.exe' to "
            rf"'{ROOT}\ClientUpgrade\ccmsetup.exe'...",
            re.compile(status.format("e0009", 2, 100)),
            re.compile(status.format("e0008", 2, 100)),
            f"deleted notification file {CFD_ESC}",
        ],
    )
    # The notification comes before INSTALL_SUCCESS, as in the guide: when HMAN takes it that
    # early it says so and waits (how early depends on the machine's load, so not required).
    warns = [i for i, line in enumerate(hman) if line.startswith("WARN: The current update")]
    loaded = next(i for i, line in enumerate(hman) if line.startswith("Loaded client upgrade"))
    for i in warns:
        assert re.fullmatch(
            r"WARN: The current update package's state \(1966\d\d\) is not set to installed "
            r"yet\. Will retry in next cycle\.",
            hman[i],
        )
        assert i < loaded
    assert f"deleted notification file {ROOT}\\inboxes\\hman.box\\CFD\\{GUID}.CME" in hman
    assert "Check CMU status..." in hman


# ---------------------------------------------------------------------------------------
# Failures: INSTALL_FAILED / INSTALL_CMU_FAILED, the site at its old version and working,
# then the cause fixed and the update installed


def payload(site: Path) -> Path:
    return site / "EasySetupPayload" / GUID.lower()


def flip_byte(path: Path) -> bytes:
    original = path.read_bytes()
    data = bytearray(original)
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    return original


def fail_then_fix(
    lab: LabSite, failed: int, error: str | re.Pattern[str], fix: Callable[[], None]
) -> list[str]:
    """Start the broken site, install, expect `failed` with `error` in CMUpdate.log and the old
    site working; fix the cause, install again, expect INSTALL_SUCCESS. Returns CMUpdate.log of
    the failed run."""
    site = lab.path
    lab.start()
    assert lab.install(GUID) == State.DOWNLOAD_SUCCESS
    wait_settled(lab, failed)
    failed_log = lab.log("CMUpdate.log")
    assert_in_order(
        failed_log,
        [
            error,
            re.compile(
                rf"ERROR: Failed to install update package {GUID}: "
                rf"{State.name_of(failed)} \({failed}\)\. "
                r"Fix the cause above, then install the "
                r"update again\."
            ),
        ],
    )
    assert lab.query(
        "SELECT State FROM CM_UpdatePackageSiteStatus WHERE PackageGuid = ?",
        [GUID],
    ) == [(failed,)]
    assert_old_site_working(lab)
    assert not any((site / "cd.latest").iterdir())
    assert not (site / "inboxes" / "hman.box" / "CFD" / "196612.ESC").exists()
    assert f"deleted notification file {ROOT}\\inboxes\\hman.box\\CFD\\{GUID}.CME" in (
        lab.log("hman.log")
    )

    fix()
    assert lab.install(GUID) == failed
    wait_settled(lab, State.INSTALL_SUCCESS)
    assert lab.stop() == 0
    assert site_version(lab) == NEW_VERSION
    assert binary_builds(site) == {NEW_BUILD}
    assert not temporaries(site)
    return failed_log


@BROKEN_FIRST
def test_a_file_whose_hash_does_not_match_update_map_fails_before_any_change(
    cmlab_site: LabSite,
) -> None:
    site = cmlab_site.path
    dll = payload(site) / "SMSSetup" / "bin" / "x64" / "hman.dll"
    original = flip_byte(dll)
    failed_log = fail_then_fix(
        cmlab_site,
        State.INSTALL_FAILED,
        re.compile(
            r"ERROR: .*\\SMSSetup\\bin\\x64\\hman\.dll has hash [0-9A-F]{64}, update\.map "
            r"expects [0-9A-F]{64}, and no redist .* provides hman\.dll"
        ),
        lambda: dll.write_bytes(original),
    )
    # The media check comes before the first install step: nothing to roll back.
    assert not any("Running install step" in line for line in failed_log)


@BROKEN_FIRST
def test_a_step_that_fails_midway_is_rolled_back(cmlab_site: LabSite) -> None:
    """Step 15 meets a link where the console binary should be (links are never followed):
    steps 1-14 had changed the site, the rollback puts it back."""
    site = cmlab_site.path
    console = site / "AdminConsole" / "bin" / "Microsoft.ConfigurationManagement.exe"
    original = console.read_bytes()
    console.unlink()
    console.symlink_to(site / "site.toml")

    def fix() -> None:
        console.unlink()
        console.write_bytes(original)

    failed_log = fail_then_fix(
        cmlab_site,
        State.INSTALL_FAILED,
        re.compile(r"ERROR: install step 15 \(UPDATE_ADMIN_CONSOLE\) failed: .*"),
        fix,
    )
    assert_in_order(
        failed_log,
        [
            "INFO: Install step 14 (UPDATE_SITE_TABLE) completed.",
            re.compile(r"WARNING: Rolling back the installation of update .*"),
            re.compile(
                r"INFO: Rollback of update .* completed; site at version 5\.00\.9135\.1000\."
            ),
        ],
    )


@BROKEN_FIRST
def test_a_redist_missing_from_both_paths_fails_before_any_change(cmlab_site: LabSite) -> None:
    site = cmlab_site.path
    redist = payload(site) / "redist" / "sqlncli.msi"
    original = redist.read_bytes()
    redist.unlink()
    failed_log = fail_then_fix(
        cmlab_site,
        State.INSTALL_FAILED,
        re.compile(r"ERROR: .*sqlncli.*", re.IGNORECASE),
        lambda: redist.write_bytes(original),
    )
    assert not any("Running install step" in line for line in failed_log)


@BROKEN_FIRST
def test_a_failing_pre_upgrade_script_fails_and_applies_nothing(
    cmlab_site: LabSite, tmp_path: Path
) -> None:
    site = cmlab_site.path
    cab = payload(site) / "redist" / "ConfigMgr.AutoUpgradeScripts.cab"
    original = cab.read_bytes()
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    sample = data_dir("payloads") / "updates" / "cm2509" / "AutoUpgradeScripts"
    shutil.copy2(sample / "001_CM_UpgradeHistory.sql", scripts)
    (scripts / "002_broken.sql").write_text(
        "CREATE TABLE CM_Broken (x INTEGER);\nINSERT INTO NoSuchTable VALUES (1);\n"
    )
    build_cab_from_dir(scripts, cab, load_lab_ca(site / "trust").signer())
    fail_then_fix(
        cmlab_site,
        State.INSTALL_FAILED,
        "ERROR: Pre-upgrade script 002_broken.sql failed: no such table: NoSuchTable",
        lambda: cab.write_bytes(original),
    )
    assert cmlab_site.query("SELECT name FROM sqlite_master WHERE name = 'CM_Broken'") == []


@BROKEN_FIRST
def test_a_damaged_cmupdate_exe_fails_the_self_upgrade(cmlab_site: LabSite) -> None:
    site = cmlab_site.path
    exe = payload(site) / "SMSSetup" / "bin" / "x64" / "cmupdate.exe"
    original = flip_byte(exe)
    failed_log = fail_then_fix(
        cmlab_site,
        State.INSTALL_CMU_FAILED,
        re.compile(r"ERROR: The new cmupdate\.exe .* does not match update\.map: .*"),
        lambda: exe.write_bytes(original),
    )
    assert "CONFIGURATION_MANAGER_UPDATE service is stopping..." not in failed_log


# ---------------------------------------------------------------------------------------
# Service windows


def set_service_window(site: Path, start: datetime, minutes: int) -> None:
    text = (site / "site.toml").read_text()
    text = text.split("\n[[service_window]]")[0].rstrip("\n")
    text += (
        f'\n\n[[service_window]]\ndays = "*"\nstart = "{start:%H:%M:%S}"\nduration = {minutes}\n'
    )
    (site / "site.toml").write_text(text)


def site_state(site: LabSite) -> int | None:
    return site.site_states(GUID).get(site.site_code)


@BROKEN_FIRST
def test_outside_its_service_window_the_site_waits_across_a_restart(cmlab_site: LabSite) -> None:
    site = cmlab_site.path
    set_service_window(site, datetime.now() + timedelta(hours=2), 60)
    cmlab_site.start()
    assert cmlab_site.install(GUID) == State.DOWNLOAD_SUCCESS
    cmlab_site.wait_for(
        lambda: site_state(cmlab_site) == State.INSTALL_WAITING_SERVICE_WINDOW,
        timeout=120,
        what="INSTALL_WAITING_SERVICE_WINDOW",
    )
    assert cmlab_site.stop() == 0
    waiting = [
        line for line in cmlab_site.log("CMUpdate.log") if "outside its service window" in line
    ]
    assert waiting  # once per pass: a second CMI can make it twice
    assert re.fullmatch(
        r"The site server is outside its service window \(Every day \d\d:\d\d:\d\d for 1h00m\)\. "
        rf"Waiting for the service window to apply update {GUID}; it opens at "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.",
        waiting[0],
    )
    assert site_version(cmlab_site) == OLD_VERSION
    assert not any("Running install step" in line for line in cmlab_site.log("CMUpdate.log"))

    # Restarted, still outside: it keeps waiting (the state is in the database, not memory).
    cmlab_site.start()
    cmlab_site.wait_for(
        lambda: (
            len([x for x in cmlab_site.log("CMUpdate.log") if "outside its service window" in x])
            > len(waiting)
        ),
        timeout=60,
        what="the wait taken up again after the restart",
    )
    assert site_state(cmlab_site) == State.INSTALL_WAITING_SERVICE_WINDOW
    assert cmlab_site.stop() == 0

    # The window now opens a few seconds after the start: CMUpdate wakes for it on its own.
    set_service_window(site, datetime.now() + timedelta(seconds=4), 60)
    cmlab_site.start()
    wait_settled(cmlab_site, State.INSTALL_SUCCESS)
    assert cmlab_site.stop() == 0
    lines = cmlab_site.log("CMUpdate.log")
    assert_in_order(
        lines,
        [
            re.compile(r"The site server is outside its service window .*"),
            re.compile(
                r"The site server is in its service window \(.*\): the CM server updates can be "
                r"applied now\."
            ),
            "INFO: Running install step 1 (RUN_PREUPGRADE_SCRIPTS): Unpack and run the "
            "pre-upgrade SQL scripts",
        ],
    )
    assert site_version(cmlab_site) == NEW_VERSION
    hist = cmlab_site.history(GUID)
    assert hist.count(State.INSTALL_WAITING_SERVICE_WINDOW) == 1
    assert hist[-1] == State.INSTALL_SUCCESS
