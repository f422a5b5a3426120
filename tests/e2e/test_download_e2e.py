"""The Download stage end to end on the real daemon: `cmlab download` (or auto-download) to
DOWNLOAD_SUCCESS, with the guide's lines, state messages, .MCM bodies and CMU handling."""

from __future__ import annotations

import os
import re
import sqlite3

import pytest

from cmlab.core.hashing import folder_hash
from cmlab.testing import SAMPLE_UPDATE, SYNCED_STATES, LabSite, State, assert_in_order
from tests.helpers.cli import cmlab
from tests.helpers.site_files import temporaries

GUID = SAMPLE_UPDATE.lower()
ROOT = r"E:\ConfigMgr"
HIGH = r"E:\\ConfigMgr\\inboxes\\auth\\statesys\.box\\incoming\\high\\___CMU[a-z0-9]{8}\.SMX~~"
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"
MCM = rf"{ROOT}\inboxes\hman.box\ForwardingMsg\___CMU{GUID}.MCM"
CMU = rf"{ROOT}\inboxes\hman.box\CFD\{GUID}.CMU"
PAYLOAD = rf"{ROOT}\EasySetupPayload\{GUID}.cab"

# Every test here synchronizes a new site itself, paths shown as on a site server's E: drive.
pytestmark = pytest.mark.cmlab(stage="new", settings={"site.display_root": ROOT})


def sync(site: LabSite) -> None:
    site.sync(wait=True)
    assert site.states() == SYNCED_STATES


def download(site: LabSite) -> None:
    """Download 2509 and wait until it is DOWNLOAD_SUCCESS with every drop file consumed."""
    assert site.download(SAMPLE_UPDATE, wait=True)
    site.wait_settled(SAMPLE_UPDATE, State.DOWNLOAD_SUCCESS)


def payload_hash(site: LabSite) -> str:
    """The manifest's PayloadHash, as HMAN stored it in CM_UpdatePackages."""
    ((value,),) = site.query(
        "SELECT PayloadHash FROM CM_UpdatePackages WHERE PackageGuid = ?", [SAMPLE_UPDATE]
    )
    return str(value)


def smx(n: int) -> list[str | re.Pattern[str]]:
    return [
        f"Generating state message: {n} for package {GUID}~~",
        re.compile(r"Write the state message in " + HIGH),
        f"Successfully Dropped the state message {n}~~",
    ]


def cmu_block(state: int) -> list[str | re.Pattern[str]]:
    return [
        "Write the package meta data to connector's outbox~~",
        f"The CMU file name is {MCM}~~",
        re.compile(
            re.escape(f'outerxml is <ConfigurationManagerUpdateContent Guid="{GUID}" ')
            + re.escape(f'State="{state}" ReportTime="')
            + STAMP
            + re.escape('" />~~')
        ),
        f"Successfully write the update meta into outbox for package {GUID}~~",
    ]


def test_download_end_to_end(cmlab_site: LabSite) -> None:
    site = cmlab_site.path
    sync(cmlab_site)
    assert cmlab_site.state(SAMPLE_UPDATE) == State.APPLICABILITY_SUCCESS  # auto-download is off
    # The console's Download as `cmlab download` does it: its output is tested here too.
    out = cmlab("download", str(site), SAMPLE_UPDATE)
    assert "added to CM_UpdatePackagesToDownload" in out.stdout
    cmlab_site.wait_state(SAMPLE_UPDATE, State.DOWNLOAD_SUCCESS)
    cmlab_site.wait_settled(SAMPLE_UPDATE, State.DOWNLOAD_SUCCESS)
    assert cmlab_site.stop() == 0

    # State messages: the sync's 0-4 (no package), then the download's, in the guide's order.
    rows = cmlab_site.query("SELECT TopicID, StateID FROM StateMessages ORDER BY ID")
    assert [s for t, s in rows if t.lower() == GUID] == [6, 8, 9, 10, 25, 11, 12, 13]
    assert cmlab_site.query("SELECT COUNT(*) FROM CM_UpdatePackagesToDownload") == [(0,)]

    assert_in_order(
        cmlab_site.log("SMSDBMon.log"),
        [
            "RCV: INSERT on CM_UpdatePackagesToDownload for "
            f"CM_UpdatePackagesToDownload_INS_DMP [{SAMPLE_UPDATE}  ]",
            rf"SND: Dropped {ROOT}\inboxes\dmpdownloader.box\{SAMPLE_UPDATE}.DMP",
        ],
    )
    dmp = cmlab_site.log("dmpdownloader.log")
    assert_in_order(
        dmp,
        [
            "Get new Easy Setup Package IDs~~",
            "Found a new available update~~",
            *smx(6),
            "EasySetupMaintenance - Redownload packages if needed~~",
            f"EasySetupMaintenance - Redownload package: {GUID}~~",
            f"EasySetupDownloadSinglePackage downloading {GUID}. ~~",
            *smx(8),
            "Checking IsPayloadLocal with HashAlgorithm = SHA256 ...~~",
            f"expected hash = {payload_hash(cmlab_site)}~~",
            "actual hash = ~~",
            "PayloadExist = -1~~",
            f"Content for {GUID} does not exist locally. Download it from internet~~",
            *cmu_block(262145),
            f"The payload to be processed is at {PAYLOAD}~~",
            *smx(9),
            f"Download content for payload {GUID}~~",
            "Download large file with BITs~~",
            rf"Redirected to URL {ROOT}\cloud\{SAMPLE_UPDATE}.cab~~",
            *smx(10),
            *cmu_block(262145),
            "Verify the payload signature, hash value and extract the payload~~",
            f"File '{PAYLOAD}' is signed and trusted.",
            f"File '{PAYLOAD}' is signed with MS root cert.",
            re.compile(r"File \S+ is being extracted~~"),
            f"File {PAYLOAD} has been extracted with 0~~",
            *smx(25),
            f"Check if there is redist to download for update, {GUID}~~",
            f"Download redist for update {GUID}~~",
            f"Successfully download redist for {GUID}.~~",
            *smx(11),
            *cmu_block(262146),
            *smx(12),
            *smx(13),
            f"EasySetupDownloadSinglePackage finishes downloading {GUID}. ~~",
        ],
    )
    assert not [line for line in dmp if line.startswith("ERROR")]
    for name in ("splash.hta", r"SMSSetup\bin\x64\cmupdate.exe", r"CMUClient\client.msi"):
        assert f"File {name} is being extracted~~" in dmp

    redist = rf"{ROOT}\EasySetupPayload\{GUID}\redist"
    cloud = rf"{ROOT}\cloud\{SAMPLE_UPDATE}\redist"
    assert_in_order(
        cmlab_site.log("ConfigMgrSetup.log"),
        [
            "INFO: Attempting to load resource DLL...",
            "INFO: Setup downloader setupdl.exe: STARTED",
            f"INFO: Downloading files to {redist}",
            "INFO: Downloading component manifest...",
            rf"INFO: Downloading {cloud}\ConfigMgr.LN.Manifest.cab as ConfigMgr.LN.Manifest.cab",
            rf"INFO: Downloading {cloud}\ConfigMgr.Manifest.cab as ConfigMgr.Manifest.cab",
            re.compile(r"INFO: Extracted file .*ConfigMgr\.LN\.Manifest\.xml"),
            "INFO: Downloading https://go.microsoft.com/fwlink/?LinkID=2171070 as "
            "NDP462-KB3151800-x86-x64-AllOS-ENU.exe",
            rf"INFO: Verify directory {redist}\LanguagePack\MobileDevice\SMSSETUP\BIN\X64" + "\\",
            "INFO: Setup downloader setupdl.exe: FINISHED",
        ],
    )

    # HMAN's CMUHandler, verbose: the guide's lines for each notification, 262146 last.
    hman = cmlab_site.log("hman.log")
    for state in (262145, 262146):
        assert_in_order(
            hman,
            [
                f"Validate CMU file {CMU} with no intune subscription.",
                f"INFO: File without BOM : ({CMU})",
                f"There is no additional error details {CMU} from file",
                f"Updated CMUpdatePackage state to {state} (PackageGuid={GUID})",
                f"deleted file {CMU}",
            ],
        )
    updates = [line for line in hman if line.startswith("Updated CMUpdatePackage state")]
    assert updates[-1].startswith("Updated CMUpdatePackage state to 262146")

    # The content: payload extracted, redists beside it, all as the manifest says.
    folder = site / "EasySetupPayload" / GUID
    assert folder_hash(folder) == payload_hash(cmlab_site)
    assert folder_hash(folder / "redist") == folder_hash(site / "cloud" / SAMPLE_UPDATE / "redist")
    assert (folder / "SMSSetup" / "bin" / "x64" / "cmupdate.exe").is_file()
    assert (site / "EasySetupPayload" / f"{GUID}.cab").is_file()
    assert not (site / "EasySetupPayload" / f"{GUID}.cab.partial").exists()
    assert not temporaries(site)
    assert not list(site.rglob("BAD"))
    site_status = cmlab_site.query("SELECT State FROM CM_UpdatePackageSiteStatus")
    assert site_status == [(State.DOWNLOAD_SUCCESS,)]

    status = cmlab("status", str(site)).stdout
    assert re.search(rf"{SAMPLE_UPDATE}\s+DOWNLOAD_SUCCESS \(262146\)", status)


@pytest.mark.cmlab(stage="new", settings={"site.display_root": ROOT, "scp.auto_download": True})
def test_auto_download_takes_the_newest_applicable_update_after_sync(cmlab_site: LabSite) -> None:
    cmlab_site.sync()
    cmlab_site.wait_state(SAMPLE_UPDATE, State.DOWNLOAD_SUCCESS)
    cmlab_site.wait_settled(SAMPLE_UPDATE, State.DOWNLOAD_SUCCESS)
    assert cmlab_site.stop() == 0
    assert (
        f"Automatic download is enabled. Added package {SAMPLE_UPDATE} to download queue."
        in cmlab_site.log("hman.log")
    )
    # The filtered hotfixes were not downloaded.
    assert sorted(p.name for p in (cmlab_site.path / "EasySetupPayload").iterdir()) == [
        GUID,
        f"{GUID}.cab",
    ]


def set_state(site: LabSite, state: int) -> None:
    conn = sqlite3.connect(site.path / "db" / "site.db")
    try:
        with conn:
            conn.execute(
                "UPDATE CM_UpdatePackages SET State = ? WHERE PackageGuid = ?", (state, GUID)
            )
    finally:
        conn.close()


def test_a_payload_already_local_is_not_downloaded_again_and_a_damaged_one_is(
    cmlab_site: LabSite,
) -> None:
    site = cmlab_site.path
    folder = site / "EasySetupPayload" / GUID
    sync(cmlab_site)
    download(cmlab_site)
    expected = payload_hash(cmlab_site)
    cab_stat = os.stat(site / "EasySetupPayload" / f"{GUID}.cab")
    before = len(cmlab_site.log("dmpdownloader.log"))

    # Asked again (a failed later stage, an administrator): the content is local.
    set_state(cmlab_site, State.APPLICABILITY_SUCCESS)
    download(cmlab_site)
    second = cmlab_site.log("dmpdownloader.log")[before:]
    assert_in_order(
        second,
        [
            "Checking IsPayloadLocal with HashAlgorithm = SHA256 ...~~",
            f"expected hash = {expected}~~",
            f"actual hash = {expected}~~",
            "PayloadExist = 1~~",
            f"Content for {GUID} exists locally. Skip downloading~~",
            *cmu_block(262146),
            f"EasySetupDownloadSinglePackage finishes downloading {GUID}. ~~",
        ],
    )
    assert "Download large file with BITs~~" not in second
    assert os.stat(site / "EasySetupPayload" / f"{GUID}.cab").st_ino == cab_stat.st_ino

    # A file damaged after download: the hash differs, so the folder is rebuilt from the
    # CAB already on disk (its hash is right, so it is not fetched again).
    damaged = folder / "SMSSetup" / "bin" / "x64" / "cmupdate.exe"
    damaged.write_bytes(b"tampered")
    before = len(cmlab_site.log("dmpdownloader.log"))
    set_state(cmlab_site, State.APPLICABILITY_SUCCESS)
    download(cmlab_site)
    third = cmlab_site.log("dmpdownloader.log")[before:]
    assert "PayloadExist = 0~~" in third
    assert f"Payload {PAYLOAD} is already downloaded with the expected hash~~" in third
    assert "Download large file with BITs~~" not in third
    assert cmlab_site.stop() == 0
    assert folder_hash(folder) == expected


@pytest.mark.cmlab(stage="new", settings={"site.display_root": ROOT, "scp.remote": True})
def test_download_through_a_remote_scp_goes_via_the_mp_outbox(cmlab_site: LabSite) -> None:
    sync(cmlab_site)
    download(cmlab_site)
    assert cmlab_site.stop() == 0
    assert rf"The CMU file name is {ROOT}\MP\OUTBOXES\MCM.box\___CMU{GUID}.MCM~~" in (
        cmlab_site.log("dmpdownloader.log")
    )


# `cmlab download`'s refusals are what is tested: a synced site (the plugin's template), the
# command line run as an administrator runs it, no daemon needed.
@pytest.mark.cmlab(stage="synced", start=False, settings={"site.display_root": ROOT})
def test_download_refuses_what_cannot_be_downloaded(cmlab_site: LabSite) -> None:
    site = cmlab_site.path
    unknown = cmlab("download", str(site), "00000000-0000-0000-0000-000000000001", check=False)
    assert unknown.returncode == 5  # not found
    assert "no update package" in unknown.stderr
    hidden = cmlab("download", str(site), "6B0783D9-B8A2-4848-82F6-8EFE956F4988", check=False)
    assert hidden.returncode == 4  # refused
    assert "APPLICABILITY_HIDE (393213)" in hidden.stderr
    assert cmlab_site.query("SELECT COUNT(*) FROM CM_UpdatePackagesToDownload") == [(0,)]
