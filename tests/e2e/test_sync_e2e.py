"""Synchronization and Applicability, end to end on the real daemon, with the guide's lines."""

from __future__ import annotations

import json
import re

import pytest

from cmlab.core.hashing import sha256_file
from cmlab.testing import (
    SAMPLE_HIDDEN,
    SAMPLE_NOT_APPLICABLE,
    SAMPLE_UPDATE,
    SYNCED_STATES,
    LabSite,
    assert_in_order,
)
from tests.helpers.cli import cmlab

NULL = "00000000-0000-0000-0000-000000000000"
HIGH = r"E:\\ConfigMgr\\inboxes\\auth\\statesys\.box\\incoming\\high\\___CMU[a-z0-9]{8}\.SMX~~"

# Every test here synchronizes a new site itself, paths shown as on a site server's E: drive.
pytestmark = pytest.mark.cmlab(stage="new", settings={"site.display_root": r"E:\ConfigMgr"})


def sync(site: LabSite) -> None:
    """Synchronize and wait until every package's applicability is decided and the site idle
    (no drop file, no change SMSDBMon has still to turn into one)."""
    site.sync(wait=True)
    assert site.states() == SYNCED_STATES


def state_message_lines(n: int, guid: str = NULL) -> list[str | re.Pattern[str]]:
    return [
        f"Generating state message: {n} for package {guid}~~",
        re.compile(r"Write the state message in " + HIGH),
        f"Successfully Dropped the state message {n}~~",
    ]


def test_sync_end_to_end(cmlab_site: LabSite) -> None:
    site = cmlab_site.path
    sync(cmlab_site)
    assert cmlab_site.stop() == 0

    # Five state messages, 0 to 4, written as .SMX files and consumed by statesys.
    rows = cmlab_site.query("SELECT StateID, StateName, FileName FROM StateMessages ORDER BY ID")
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4]
    assert [r[1] for r in rows] == [
        "START_PROCESS",
        "START_VERIFY_MANIFEST",
        "START_VERIFY_MANIFESTFILE_TRUSTED",
        "VERIFIED_MANIFEST",
        "MANIFEST_DOWNLOADED",
    ]
    assert all(re.fullmatch(r"___CMU[a-z0-9]{8}\.SMX", r[2]) for r in rows)

    cab = r"E:\ConfigMgr\EasySetupPayload\ConfigMgr.Update.Manifest.cab"
    assert_in_order(
        cmlab_site.log("dmpdownloader.log"),
        [
            *state_message_lines(0),
            "Checking for preview version~~",
            "Site is preview? no~~",
            "Is it a fast channel? :False~~",
            "Download Easy setup payloads~~",
            "Get manifest.cab url~~",
            "Get manifest.cab from download center.~~",
            "GetSABranchInfo: Site is at 1 branch.~~",
            "Flighting is not configured, fallback to default setting.~~",
            *state_message_lines(1),
            "Download manifest.cab~~",
            re.compile(r"manifest\.cab \(http response\) size is \d+~~"),
            *state_message_lines(2),
            f"File '{cab}' is signed and trusted.",
            f"File '{cab}' is signed with MS root cert.",
            "Finished calling verify manifest~~",
            *state_message_lines(3),
            "Manifest.cab was successfully moved to the connector outbox~~",
            *state_message_lines(4),
        ],
    )

    cfd_cab = r"E:\ConfigMgr\inboxes\hman.box\CFD\ConfigMgr.Update.Manifest.CAB"
    staging = r"E:\ConfigMgr\CMUStaging"
    checks = site / "CMUStaging" / "ApplicabilityChecks"

    def hash_line(sql: str) -> str:
        return (
            f"{staging}\\ApplicabilityChecks\\{sql} has hash value SHA256:"
            f"{sha256_file(checks / sql)}"
        )

    assert_in_order(
        cmlab_site.log("hman.log"),
        [
            re.compile(
                r'STATMSG: ID=3306 SEV=I LEV=M SOURCE="SMS Server" COMP="SMS_HIERARCHY_MANAGER" '
                r"SYS=cas\.cmlab\.local SITE=CAS PID=\d+ TID=\d+ "
                r"GMTDATE=\w{3} \w{3} \d\d \d\d:\d\d:\d\d\.\d{3} \d{4} "
                r'ISTR0="E:\\ConfigMgr\\inboxes\\hman\.box\\CAS\.SCU"'
            ),
            f"File '{cfd_cab}' is signed and trusted.",
            f"File '{cfd_cab}' is signed with MS root cert.",
            f"Extracting file {cfd_cab} to {staging}\\~",
            f"Extracted {staging}\\Manifest.xml",
            f"Processing Configuration Manager Update manifest file {staging}\\manifest.xml",
            hash_line("CM2509-KB35360093_AppCheck_420E3E18.sql"),
            f"Configuration Manager Update (PackageGuid={SAMPLE_UPDATE}) is applicable",
            hash_line("CM2503-KB33177653_AppCheck_6B0783D9.sql"),
            "SQL MESSAGE:  - Superseded by Configuration Manager 2509, hide this hotfix",
            f"Configuration Manager Update (PackageGuid={SAMPLE_HIDDEN}) is not applicable "
            "and should be filtered.",
            hash_line("CM2409-KB32290337_AppCheck_345A6BE1.sql"),
            "SQL MESSAGE:  - Not a 2409 build, skip this hotfix",
            f"Configuration Manager Update (PackageGuid={SAMPLE_NOT_APPLICABLE}) is not applicable "
            "and should be filtered.",
        ],
    )
    smsdbmon = cmlab_site.log("SMSDBMon.log")
    assert (
        "Modified trigger definition for Hierarchy Manager[CM_UpdatePackages_UPD_HMAN]: table "
        r"CM_UpdatePackages(State) on update, file ESC in dir E:\ConfigMgr\inboxes\hman.box\CFD"
        + "\\"
    ) in smsdbmon
    assert_in_order(
        smsdbmon,
        [
            "RCV: INSERT on StateMessages for StateMessages_INS_HMAN [4  ]",
            r"SND: Dropped E:\ConfigMgr\inboxes\hman.box\CAS.SCU",
        ],
    )
    # The manifest was renamed, forwarded, extracted to CMUStaging; nothing is left behind.
    assert (site / "CMUStaging" / "Manifest.xml").is_file()
    assert sorted(p.name for p in checks.iterdir()) == [
        "CM2409-KB32290337_AppCheck_345A6BE1.sql",
        "CM2503-KB33177653_AppCheck_6B0783D9.sql",
        "CM2509-KB35360093_AppCheck_420E3E18.sql",
    ]
    assert not (site / "inboxes" / "hman.box" / "CFD" / "ConfigMgr.Update.Manifest.CAB").exists()
    assert not (site / "EasySetupPayload" / "ConfigMgr.Update.Manifest.cab").exists()
    assert cmlab_site.waiting_files() == []

    # The guide's queries run as written.
    assert cmlab_site.query("SELECT dbo.fnCurrentSiteVersion()") == [("5.00.9135.1000",)]
    rows = cmlab_site.query(
        "SELECT PackageGuid,State FROM CM_UpdatePackages "
        f"where PackageGUID = '{SAMPLE_UPDATE.lower()}'"
    )
    assert [state for _, state in rows] == [327682]


def test_status_reports_states_by_name(cmlab_site: LabSite) -> None:
    # `cmlab status` is the command under test: it runs as an administrator runs it.
    site = cmlab_site.path
    sync(cmlab_site)
    out = cmlab("status", str(site)).stdout
    assert "APPLICABILITY_SUCCESS (327682)" in out
    assert "daemon running" in out
    assert cmlab_site.stop() == 0

    doc = json.loads(cmlab("status", str(site), "--json").stdout)
    assert {p["PackageGuid"]: p["StateName"] for p in doc["packages"]} == {
        g: s.name for g, s in SYNCED_STATES.items()
    }
    assert doc["daemon_running"] is False


@pytest.mark.cmlab(stage="new", settings={"site.display_root": r"E:\ConfigMgr", "scp.remote": True})
def test_remote_scp_goes_through_the_mp_outbox(cmlab_site: LabSite) -> None:
    sync(cmlab_site)
    assert cmlab_site.stop() == 0
    assert any(
        line.startswith(
            r"Moved file E:\ConfigMgr\MP\OUTBOXES\MCM.box\___CABConfigMgr.Update.Manifest.mcm"
        )
        for line in cmlab_site.log("mpfdm.log")
    )


@pytest.mark.cmlab(stage="new", start=False, settings={"site.display_root": r"E:\ConfigMgr"})
def test_backlog_at_restart_is_processed(cmlab_site: LabSite) -> None:
    """Drop files already waiting in every inbox when the daemon starts are all handled."""
    from cmlab.core.fs import write_atomic
    from cmlab.site.formats.state_message import StateMessage, render_state_message

    site = cmlab_site.path
    inboxes = site / "inboxes"
    high = inboxes / "auth" / "statesys.box" / "incoming" / "high"
    for i in range(200):
        msg = StateMessage("SMS_DMP_DOWNLOADER", "cas", NULL, i % 4, "", "2026-11-21T00:00:00")
        write_atomic(high / f"___CMU{i:08d}.SMX", render_state_message(msg))
    manifest = (site / "cloud" / "ConfigMgr.Update.Manifest.cab").read_bytes()
    write_atomic(
        inboxes / "hman.box" / "ForwardingMsg" / "___CABConfigMgr.Update.Manifest.mcm", manifest
    )
    write_atomic(inboxes / "hman.box" / "CAS.SCU", b"")
    # And a sync requested while the daemon was down: SMSDBMon finds the row at start.
    cmlab_site.sync()
    with cmlab_site:
        cmlab_site.wait_for(
            lambda: cmlab_site.states() == SYNCED_STATES,
            what="sync and applicability",
            seen=lambda: str(cmlab_site.states()),
        )
        cmlab_site.wait_idle()
        assert cmlab_site.states() == SYNCED_STATES
        assert cmlab_site.stop() == 0
    assert len(cmlab_site.query("SELECT * FROM StateMessages")) == 200 + 5
    assert cmlab_site.waiting_files() == []
