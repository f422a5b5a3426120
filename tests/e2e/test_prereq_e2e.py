"""The Replication and Prerequisite check stages end to end on the real daemon: `cmlab prereq`
(InitiateUpgrade, Flag=1) from "Ready to install" to PREREQ_SUCCESS / WARNING / ERROR, with the
guide's lines in SMSDBMon.log, hman.log, distmgr.log, CMUpdate.log and ConfigMgrPrereq.log."""

from __future__ import annotations

import re
import shutil

import pytest

from cmlab.core.hashing import folder_hash, staging_hash
from cmlab.testing import SAMPLE_UPDATE, LabSite, State, assert_in_order
from tests.helpers.cli import cmlab

GUID = SAMPLE_UPDATE
ROOT = r"E:\ConfigMgr"
CFD = rf"{ROOT}\inboxes\hman.box\CFD"
STAGING = rf"\\?\{ROOT}\CMUStaging\{GUID}"
SHARE = rf"\\cas.cmlab.local\EasySetupPayLoad\{GUID}"
HEX64 = r"[0-9A-F]{64}"


# Every test starts "Ready to install" (the plugin's downloaded template), paths shown as on a
# site server's E: drive.
pytestmark = pytest.mark.cmlab(stage="downloaded", settings={"site.display_root": ROOT})


def prereq_rows(site: LabSite) -> list[tuple[str, int, str]]:
    return [
        (str(r[0]), int(r[1]), str(r[2] or ""))
        for r in site.query(
            "SELECT RuleName, Status, Message FROM CM_UpdatePackagePrereqStatus "
            "WHERE PackageGuid = ? ORDER BY RuleName",
            [GUID],
        )
    ]


def test_prereq_only_reaches_prereq_success_with_the_guides_lines(cmlab_site: LabSite) -> None:
    site = cmlab_site.path
    assert cmlab_site.prereq(GUID, wait=True, timeout=90) == State.DOWNLOAD_SUCCESS
    cmlab_site.wait_settled(GUID, State.PREREQ_SUCCESS)
    assert cmlab_site.stop() == 0

    assert_in_order(
        cmlab_site.log("SMSDBMon.log"),
        [
            "RCV: UPDATE on CM_UpdatePackages for CM_UpdatePackages_UPD_HMAN [2  ]",
            rf"SND: Dropped {CFD}\2.ESC",
            rf"SND: Dropped {CFD}\{GUID}.CME",
        ],
    )
    assert (
        "Modified trigger definition for Hierarchy Manager[CM_UpdatePackages_UPD_HMAN]: table "
        rf"CM_UpdatePackages(State) on update, file ESC in dir {CFD}"
        + "\\"
        in cmlab_site.log("SMSDBMon.log")
    )
    hman = cmlab_site.log("hman.log")
    package_id = "CAS10001"
    assert_in_order(
        hman,
        [
            "INFO: 2.ESC file was found. Easy setup package needs to be updated.",
            f"Get  Update Pack {GUID}, {SHARE}",
            f"INFO: Successfully requested package {package_id} to be updated from its source.",
            f"Info: Updated package {package_id} and SMS_DISTRIBUTION_MANAGER will replicate the "
            "content to all the site servers except the secondary sites. The content will be "
            "stored in the content library on the site servers. Check distmgr.log for "
            "replication status.",
            "Successfully reported ConfigMgr update status (SiteCode=CAS, SubStageID=0xb0001, "
            "IsComplete=2, Progress=100, Applicable=1)",
            re.compile(
                rf"Updating easy setup settings with EXEC sp_UpdateEasySetupSettings "
                rf"N'{package_id}','2',N'{HEX64}'"
            ),
            "Check CMU status...",
            "INFO: Starting service CONFIGURATION_MANAGER_UPDATE",
            "CONFIGURATION_MANAGER_UPDATE is already running.",
            "Successfully checking Site server readiness for update.",
            f"Created notification file ({GUID}.CMI) for CONFIGURATION_MANAGER_UPDATE",
            "There are update package in progress. Cleanup will skip this time.",
            "Check CMU status...",
            rf"deleted notification file {CFD}\{GUID}.CME",
        ],
    )
    assert_in_order(
        cmlab_site.log("distmgr.log"),
        [
            f"Found package properties updated notification for package '{package_id}'",
            f"Info: package '{package_id}' is set to replicate to site servers only.",
            f"Taking package snapshot for package {package_id} from source {SHARE}",
            f"Adding package '{package_id}' to package processing queue.",
            f"Started package processing thread for package '{package_id}',",
            f"Start updating the package {package_id}...",
            f"Successfully created/updated the package {package_id}",
        ],
    )

    def d0005(complete: int, progress: int) -> str:
        return (
            "Successfully reported ConfigMgr update status (SiteCode=CAS, SubStageID=0xd0005, "
            f"IsComplete={complete}, Progress={progress}, Applicable=1)"
        )

    setup = rf"{STAGING}\SMSSetup"
    assert_in_order(
        cmlab_site.log("CMUpdate.log"),
        [
            rf'Detected a change to the "{ROOT}\inboxes\cmupdate.box" directory.',
            "INFO: setup type: 8, top level: 1.",
            "Content replication succeeded. Start extracting the package to run prereq check...",
            d0005(1, 1),
            d0005(1, 25),
            "Checking if the CMU Staging folder already has the content extracted.",
            "Extractring the content from content library...",
            rf"update package content {GUID} has been expanded to foler {STAGING}" + "\\",
            d0005(1, 50),
            rf"File '{setup}\update.map.cab' is signed and trusted.",
            rf"File '{setup}\update.map.cab' is signed with MS root cert.",
            rf"Extracting file {setup}\update.map.cab to {setup}\~",
            rf"Extracted {setup}\update.map~",
            d0005(1, 75),
            rf"Successfully read file {setup}\update.map",
            d0005(2, 100),
            "~FQDN for server CAS is cas.cmlab.local",
            "INFO: Setup detected an existing Configuration Manager installation. Currently "
            "installed version is 9135~",
            rf"Set working directory to the staging folder {ROOT}\CMUStaging\{GUID}\SMSSetup",
            "INFO: Configuration Manager Build Number = 9141",
            "Preparing prereq check for site server [cas.cmlab.local]...~",
            re.compile(rf"prereqcore has hash value SHA256:{HEX64}"),
            "Running prereq checking against Server [cas.cmlab.local] ...~",
            "INFO: SQL Connection succeeded. Connection: SMS ACCESS, Type: Secure",
        ],
    )
    assert_in_order(
        cmlab_site.log("ConfigMgrPrereq.log"),
        [
            "******* Start Prerequisite checking. *******",
            "===== INFO: Prerequisite Type & Server: SITE_PRI:cas.cmlab.local =====",
            "===== INFO: Prerequisite Type & Server: SQL:cas.cmlab.local =====",
            "===== INFO: Prerequisite Type & Server: SDK:cas.cmlab.local =====",
            "******* Prerequisite checking is completed. *******",
        ],
    )
    # Every rule passed, and says so in the table.
    rows = prereq_rows(cmlab_site)
    assert rows and all(status == 0 for _, status, _ in rows), rows
    # vEasySetupPackage: the guide's columns, and one hash everywhere.
    cols = (
        "PackageID, PackageVersion, PackageHash, PackageGUID, StoredPkgHash, Source, SourceSite, "
        "LastRefresh, StoredPkgVersion, StorePkgFlag, SourceDate, SourceVersion, SourceSize"
    )
    (row,) = cmlab_site.query(f"SELECT {cols} FROM vEasySetupPackage")
    v = dict(zip([c.strip() for c in cols.split(",")], row, strict=True))
    source_hash = folder_hash(site / "EasySetupPayload" / GUID.lower())
    assert v["PackageID"] == package_id and v["PackageGUID"] == GUID
    assert v["PackageHash"] == v["StoredPkgHash"] == source_hash
    assert v["Source"] == SHARE and v["SourceSite"] == "CAS"
    assert v["StoredPkgVersion"] == v["SourceVersion"] == 1 and v["StorePkgFlag"] == 2
    assert v["SourceSize"] > 0 and v["LastRefresh"] and v["SourceDate"]
    assert staging_hash(site / "CMUStaging" / GUID) == source_hash
    # The monitoring rows of each stage, complete.
    mon = dict(
        cmlab_site.query(
            "SELECT SubStageID, IsComplete FROM CM_UpdatePackage_MonitoringStatus "
            "WHERE PackageGuid = ?",
            [GUID],
        )
    )
    assert mon[0xB0001] == 2 and mon[0xB0002] == 2 and mon[0xD0005] == 2
    assert cmlab_site.query(
        "SELECT State FROM CM_UpdatePackageSiteStatus WHERE PackageGuid = ?", [GUID]
    )
    assert cmlab_site.query("SELECT Flag FROM CM_UpdatePackages WHERE PackageGuid = ?", [GUID]) == [
        (1,)
    ]


@pytest.mark.cmlab(
    stage="downloaded",
    settings={"site.display_root": ROOT, "facts.maintenance_tasks_during_update": True},
)
def test_prereq_warning_then_install_ignoring_warnings(cmlab_site: LabSite) -> None:
    cmlab_site.prereq(GUID, wait=True, timeout=90)
    cmlab_site.wait_settled(GUID, State.PREREQ_WARNING)
    warned = [r for r in prereq_rows(cmlab_site) if r[1] == 1]
    assert warned and all(message for _, _, message in warned), warned
    prereq_log = cmlab_site.log("ConfigMgrPrereq.log")
    assert any(warned[0][2] in line for line in prereq_log), warned[0][2]
    # Install with Flag=2: the content is replicated already, the check passes the warning.
    cmlab_site.install(GUID, ignore_warnings=True)
    cmlab_site.wait_log(
        "CMUpdate.log",
        "Continue configuration manager update as it is configured to ignore prereq warnings.",
        timeout=90,
    )
    # Flag 2 goes on to the installation despite the warning.
    cmlab_site.wait_state(GUID, State.INSTALL_SUCCESS, timeout=120)
    cmlab_site.wait_settled(GUID, State.INSTALL_SUCCESS)
    assert cmlab_site.stop() == 0
    assert "Easy setup source folder hash is not changed. Skip updating." in cmlab_site.log(
        "hman.log"
    )
    assert "Content is already found at the staging folder" in cmlab_site.log("CMUpdate.log")
    assert cmlab_site.query("SELECT Flag FROM CM_UpdatePackages WHERE PackageGuid = ?", [GUID]) == [
        (2,)
    ]
    assert (
        "INFO: Running install step 1 (RUN_PREUPGRADE_SCRIPTS): Unpack and run the pre-upgrade "
        "SQL scripts" in cmlab_site.log("CMUpdate.log")
    )


@pytest.mark.cmlab(
    stage="downloaded", settings={"site.display_root": ROOT, "facts.client_comm": "http"}
)
def test_prereq_error_names_the_rule_and_its_fix(cmlab_site: LabSite) -> None:
    cmlab_site.prereq(GUID)
    cmlab_site.wait_settled(GUID, State.PREREQ_ERROR, timeout=90)
    assert cmlab_site.stop() == 0
    failed = [r for r in prereq_rows(cmlab_site) if r[1] == 2]
    assert len(failed) >= 1
    assert any("HTTPS" in message and "Enhanced HTTP" in message for _, _, message in failed)
    prereq_log = cmlab_site.log("ConfigMgrPrereq.log")
    assert any(failed[0][0] in line and "Error" in line for line in prereq_log)


@pytest.mark.cmlab(stage="downloaded", start=False, settings={"site.display_root": ROOT})
def test_unreadable_source_keeps_enabled_until_2esc_is_dropped_again(cmlab_site: LabSite) -> None:
    site = cmlab_site.path
    source = site / "EasySetupPayload" / GUID.lower()
    aside = site / "payload-aside"
    shutil.move(source, aside)
    cmlab_site.start()
    cmlab_site.prereq(GUID)
    cmlab_site.wait_log("hman.log", "Failed to calculate hash")
    cmlab_site.wait_idle()
    assert cmlab_site.state(GUID) == State.ENABLED
    assert (
        "Successfully reported ConfigMgr update status (SiteCode=CAS, SubStageID=0xb0001, "
        "IsComplete=4, Progress=0, Applicable=1)" in cmlab_site.log("hman.log")
    )
    # The guide's fix: make the share readable, then re-create 2.esc in CFD by hand.
    shutil.move(aside, source)
    cmlab_site.drop("hman.box/CFD", "2.esc")
    cmlab_site.wait_settled(GUID, State.PREREQ_SUCCESS, timeout=90)
    assert cmlab_site.stop() == 0
    assert_in_order(
        cmlab_site.log("hman.log"),
        [
            f"Get  Update Pack {GUID}, {SHARE}",
            "Failed to calculate hash",
            "INFO: 2.ESC file was found. Easy setup package needs to be updated.",
            f"Get  Update Pack {GUID}, {SHARE}",
            "INFO: Successfully requested package CAS10001 to be updated from its source.",
        ],
    )


@pytest.mark.cmlab(stage="downloaded", start=False, settings={"site.display_root": ROOT})
def test_tampered_update_map_cab_gives_the_guides_error_and_retry_recovers(
    cmlab_site: LabSite,
) -> None:
    site = cmlab_site.path
    cab = site / "EasySetupPayload" / GUID.lower() / "SMSSetup" / "update.map.cab"
    good = cab.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    cab.write_bytes(bytes(bad))
    cmlab_site.start()
    cmlab_site.prereq(GUID)
    cmlab_site.wait_settled(GUID, State.PREREQ_ERROR, timeout=90)
    assert_in_order(
        cmlab_site.log("CMUpdate.log"),
        [
            rf"update package content {GUID} has been expanded to foler {STAGING}" + "\\",
            rf"Error in verifying the trust of file {STAGING}\SMSSetup\update.map.cab.",
        ],
    )
    assert [r[0] for r in prereq_rows(cmlab_site) if r[1] == 2] == ["update.map.cab signature"]
    # The guide's fix: good payload files, RetryContentReplication, then try again.
    cab.write_bytes(good)
    assert cmlab_site.retry_replication(GUID, wait=True, timeout=90) == "CAS10001"
    cmlab_site.wait_settled(GUID, State.PREREQ_SUCCESS)
    assert cmlab_site.stop() == 0
    assert_in_order(
        cmlab_site.log("distmgr.log"),
        [
            "Taking package snapshot for package CAS10001 from source " + SHARE,
            "Successfully created/updated the package CAS10001",
            "Taking package snapshot for package CAS10001 from source " + SHARE,
            "Successfully created/updated the package CAS10001",
        ],
    )
    assert re.search(
        r"Staging folder \(.*\) has hash [0-9A-F]{64} which does not match hash from content "
        r"library [0-9A-F]{64}",
        "\n".join(cmlab_site.log("CMUpdate.log")),
    )
    (stored,) = cmlab_site.query("SELECT StoredPkgHash FROM vEasySetupPackage")
    assert stored[0] == folder_hash(site / "EasySetupPayload" / GUID.lower())
    assert staging_hash(site / "CMUStaging" / GUID) == stored[0]


# `cmlab prereq`'s refusal is what is tested: the command line, no daemon needed.
@pytest.mark.cmlab(stage="downloaded", start=False, settings={"site.display_root": ROOT})
def test_initiate_upgrade_refuses_a_package_that_is_not_ready(cmlab_site: LabSite) -> None:
    site = cmlab_site.path
    proc = cmlab("prereq", str(site), "6B0783D9-B8A2-4848-82F6-8EFE956F4988", check=False)
    assert proc.returncode == 4  # refused
    assert "APPLICABILITY_HIDE" in proc.stderr
