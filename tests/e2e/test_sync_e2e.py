"""Synchronization and Applicability, end to end on the real daemon, with the guide's lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cmlab.core.hashing import sha256_file
from tests.helpers.sites import (
    GUID_2409_HFRU,
    GUID_2503_HFRU,
    GUID_2509,
    SYNCED,
    Daemon,
    assert_in_order,
    cmlab,
    copy_site,
    inbox_files,
    log,
    query,
    set_toml,
    synced,
)
from tests.helpers.waiting import wait_until

EXPECTED = SYNCED
NULL = "00000000-0000-0000-0000-000000000000"
HIGH = r"E:\\ConfigMgr\\inboxes\\auth\\statesys\.box\\incoming\\high\\___CMU[a-z0-9]{8}\.SMX~~"


@pytest.fixture
def site(template: Path, tmp_path: Path) -> Path:
    s = copy_site(template, tmp_path / "CAS")
    set_toml(s, "site", "display_root", "'E:\\ConfigMgr'")
    return s


def state_message_lines(n: int, guid: str = NULL) -> list[str | re.Pattern[str]]:
    return [
        f"Generating state message: {n} for package {guid}~~",
        re.compile(r"Write the state message in " + HIGH),
        f"Successfully Dropped the state message {n}~~",
    ]


def test_sync_end_to_end(site: Path) -> None:
    with Daemon(site) as daemon:
        daemon.start()
        cmlab("sync", str(site))
        wait_until(lambda: synced(site), timeout=60, what="sync and applicability")
        assert daemon.stop() == 0

    # Five state messages, 0 to 4, written as .SMX files and consumed by statesys.
    rows = query(site, "SELECT StateID, StateName, FileName FROM StateMessages ORDER BY ID")
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
        log(site, "dmpdownloader.log"),
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
        log(site, "hman.log"),
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
            f"Configuration Manager Update (PackageGuid={GUID_2509}) is applicable",
            hash_line("CM2503-KB33177653_AppCheck_6B0783D9.sql"),
            "SQL MESSAGE:  - Superseded by Configuration Manager 2509, hide this hotfix",
            f"Configuration Manager Update (PackageGuid={GUID_2503_HFRU}) is not applicable "
            "and should be filtered.",
            hash_line("CM2409-KB32290337_AppCheck_345A6BE1.sql"),
            "SQL MESSAGE:  - Not a 2409 build, skip this hotfix",
            f"Configuration Manager Update (PackageGuid={GUID_2409_HFRU}) is not applicable "
            "and should be filtered.",
        ],
    )
    smsdbmon = log(site, "SMSDBMon.log")
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
    assert inbox_files(site) == []

    # The guide's queries run as written.
    out = cmlab("sql", str(site), "SELECT dbo.fnCurrentSiteVersion()").stdout
    assert "5.00.9135.1000" in out
    out = cmlab(
        "sql",
        str(site),
        "SELECT PackageGuid,State FROM CM_UpdatePackages "
        f"where PackageGUID = '{GUID_2509.lower()}'",
    ).stdout
    assert "327682" in out


def test_status_reports_states_by_name(site: Path) -> None:
    with Daemon(site) as daemon:
        daemon.start()
        cmlab("sync", str(site))
        wait_until(lambda: synced(site), timeout=60)
        out = cmlab("status", str(site)).stdout
        assert "APPLICABILITY_SUCCESS (327682)" in out
        assert "daemon running" in out
        assert daemon.stop() == 0
    import json

    doc = json.loads(cmlab("status", str(site), "--json").stdout)
    assert {p["PackageGuid"]: p["StateName"] for p in doc["packages"]} == {
        g: s.name for g, s in EXPECTED.items()
    }
    assert doc["daemon_running"] is False


def test_remote_scp_goes_through_the_mp_outbox(site: Path) -> None:
    set_toml(site, "scp", "remote", "true")
    with Daemon(site) as daemon:
        daemon.start()
        cmlab("sync", str(site))
        wait_until(lambda: synced(site), timeout=60)
        assert daemon.stop() == 0
    assert any(
        line.startswith(
            r"Moved file E:\ConfigMgr\MP\OUTBOXES\MCM.box\___CABConfigMgr.Update.Manifest.mcm"
        )
        for line in log(site, "mpfdm.log")
    )


def test_backlog_at_restart_is_processed(site: Path) -> None:
    """Drop files already waiting in every inbox when the daemon starts are all handled."""
    from cmlab.core.fs import write_atomic
    from cmlab.site.formats.state_message import StateMessage, render_state_message

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
    cmlab("sync", str(site))
    with Daemon(site) as daemon:
        daemon.start()
        wait_until(lambda: synced(site), timeout=60)
        assert daemon.stop() == 0
    assert len(query(site, "SELECT * FROM StateMessages")) == 200 + 5
    assert inbox_files(site) == []
