"""Bad input during synchronization: each gets a clear log line, goes to BAD with its reason,
sets the state the guide gives, and the daemon keeps serving (a good sync follows each)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cmlab.core.fs import write_atomic
from cmlab.site.cab import create_cab, extract_cab
from cmlab.site.state_codes import PackageState
from cmlab.site.trust import create_lab_ca, load_lab_ca, sign_cab
from tests.helpers.sites import GUID_2509, Daemon, cmlab, log, states
from tests.helpers.waiting import wait_until
from tests.unit.test_cabfiles import raw_cab

MCM = "___CABConfigMgr.Update.Manifest.mcm"
BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<ConfigMgrUpdates>&lol3;</ConfigMgrUpdates>"""


def good_files(site: Path, tmp: Path) -> dict[str, Path]:
    out = tmp / "good"
    extract_cab(site / "cloud" / "ConfigMgr.Update.Manifest.cab", out)
    return {str(p.relative_to(out)): p for p in sorted(out.rglob("*")) if p.is_file()}


def signed(site: Path, tmp: Path, unsigned: Path, ca_dir: Path | None = None) -> bytes:
    signer = load_lab_ca(ca_dir or site / "trust").signer()
    out = tmp / "signed.cab"
    sign_cab(unsigned, out, signer)
    return out.read_bytes()


def unsigned_cab(site: Path, tmp: Path) -> bytes:
    cab = tmp / "unsigned.cab"
    create_cab(good_files(site, tmp), cab)
    return cab.read_bytes()


def case_unsigned(site: Path, tmp: Path) -> bytes:
    return unsigned_cab(site, tmp)


def case_tampered(site: Path, tmp: Path) -> bytes:
    data = bytearray((site / "cloud" / "ConfigMgr.Update.Manifest.cab").read_bytes())
    data[200] ^= 0x01  # inside the CAB's folder/file data, well before the signature
    return bytes(data)


def case_untrusted_root(site: Path, tmp: Path) -> bytes:
    other = create_lab_ca(tmp / "rogue-ca", common_name="Rogue Root")
    unsigned = tmp / "u.cab"
    unsigned.write_bytes(unsigned_cab(site, tmp))
    return signed(site, tmp, unsigned, other.root_cert.parent)


def case_corrupt(site: Path, tmp: Path) -> bytes:
    return b"MSCF\0\0\0\0" + os.urandom(300)


def _signed_raw(site: Path, tmp: Path, raw: bytes) -> bytes:
    unsigned = tmp / "raw.cab"
    unsigned.write_bytes(raw)
    return signed(site, tmp, unsigned)


def case_corrupt_data_but_signed(site: Path, tmp: Path) -> bytes:
    raw = bytearray(raw_cab([(b"Manifest.xml", b"<ConfigMgrUpdates/>" * 200)], comp=1))
    raw[-20] ^= 0xFF  # inside the MSZIP stream: the signature is over the broken bytes
    return _signed_raw(site, tmp, bytes(raw))


def case_dotdot_name(site: Path, tmp: Path) -> bytes:
    return _signed_raw(
        site, tmp, raw_cab([(b"..\\..\\evil.txt", b"owned"), (b"Manifest.xml", b"x")])
    )


def case_absolute_name(site: Path, tmp: Path) -> bytes:
    return _signed_raw(site, tmp, raw_cab([(b"/tmp/cmlab-evil.txt", b"owned")]))


def _manifest_cab(site: Path, tmp: Path, manifest: bytes) -> bytes:
    files = good_files(site, tmp)
    files["Manifest.xml"].write_bytes(manifest)
    unsigned = tmp / "m.cab"
    create_cab(files, unsigned)
    return signed(site, tmp, unsigned)


def case_malformed_xml(site: Path, tmp: Path) -> bytes:
    return _manifest_cab(site, tmp, b"<ConfigMgrUpdates><Manifest PackageGuid=")


def case_entity_bomb(site: Path, tmp: Path) -> bytes:
    return _manifest_cab(site, tmp, BOMB)


def case_sql_hash_mismatch(site: Path, tmp: Path) -> bytes:
    files = good_files(site, tmp)
    sql = files["ApplicabilityChecks/CM2509-KB35360093_AppCheck_420E3E18.sql"]
    sql.write_text("SELECT 1; -- changed after the manifest was hashed\n")
    unsigned = tmp / "m.cab"
    create_cab(files, unsigned)
    return signed(site, tmp, unsigned)


CASES: dict[str, tuple[Callable[[Path, Path], bytes], str, str]] = {
    # name: (builder, text expected in the .reason file, text expected in an hman.log ERROR line)
    "unsigned": (case_unsigned, "NOT_SIGNED", "Failed to verify the trust of file"),
    "tampered": (case_tampered, "DIGEST_MISMATCH", "Failed to verify the trust of file"),
    "untrusted_root": (case_untrusted_root, "UNTRUSTED_ROOT", "Failed to verify the trust of file"),
    "corrupt": (case_corrupt, "NOT_A_CAB", "Failed to verify the trust of file"),
    "corrupt_data": (case_corrupt_data_but_signed, "extraction failed", "Failed to extract"),
    "dotdot_name": (case_dotdot_name, "extraction failed", "Failed to extract"),
    "absolute_name": (case_absolute_name, "extraction failed", "Failed to extract"),
    "malformed_xml": (case_malformed_xml, "not well-formed", "Failed to process the manifest"),
    "entity_bomb": (case_entity_bomb, "refused", "Failed to process the manifest"),
    "sql_hash_mismatch": (
        case_sql_hash_mismatch,
        "hash does not match",
        "does not match the manifest",
    ),
}


def sync_and_settle(site: Path) -> None:
    cmlab("sync", str(site))
    wait_until(
        lambda: (
            states(site).get(GUID_2509) == PackageState.APPLICABILITY_SUCCESS
            and not (site / "inboxes" / "hman.box" / "CAS.SCU").exists()
        ),
        timeout=60,
        what="a good sync after the bad input",
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_manifest_is_quarantined_and_the_daemon_keeps_serving(
    site: Path, tmp_path: Path, case: str
) -> None:
    build, reason_text, log_text = CASES[case]
    data = build(site, tmp_path)
    with Daemon(site) as daemon:
        daemon.start()
        write_atomic(site / "inboxes" / "hman.box" / "ForwardingMsg" / MCM, data)
        write_atomic(site / "inboxes" / "hman.box" / "CAS.SCU", b"")
        reason = (
            site / "inboxes" / "hman.box" / "CFD" / "BAD" / "ConfigMgr.Update.Manifest.CAB.reason"
        )
        wait_until(reason.exists, timeout=60, what=f"{case} quarantined")
        assert reason_text in reason.read_text()
        assert any(line.startswith("ERROR:") and log_text in line for line in log(site, "hman.log"))
        assert (
            site / "inboxes" / "hman.box" / "CFD" / "BAD" / "ConfigMgr.Update.Manifest.CAB"
        ).read_bytes() == data
        if case == "sql_hash_mismatch":
            # The guide's state for a failed applicability check; the other packages go on.
            assert states(site)[GUID_2509] == PackageState.APPLICABILITY_FAILED
            assert (
                states(site)["345A6BE1-3D07-43ED-B6E5-FAC0889DA04C"]
                == PackageState.APPLICABILITY_NA
            )
        assert not Path("/tmp/cmlab-evil.txt").exists()
        assert not (site / "evil.txt").exists() and not (site.parent / "evil.txt").exists()
        sync_and_settle(site)
        assert daemon.stop() == 0


def test_empty_mcm_is_quarantined(site: Path) -> None:
    with Daemon(site) as daemon:
        daemon.start()
        write_atomic(site / "inboxes" / "hman.box" / "ForwardingMsg" / MCM, b"")
        reason = site / "inboxes" / "hman.box" / "ForwardingMsg" / "BAD" / f"{MCM}.reason"
        wait_until(reason.exists, timeout=60)
        assert "is empty" in reason.read_text()
        sync_and_settle(site)
        assert daemon.stop() == 0


def test_symlink_in_an_inbox_is_never_followed(site: Path, tmp_path: Path) -> None:
    target = tmp_path / "outside.txt"
    target.write_text("secret")
    with Daemon(site) as daemon:
        daemon.start()
        os.symlink(target, site / "inboxes" / "hman.box" / "CAS.SCU")
        reason = site / "inboxes" / "hman.box" / "BAD" / "CAS.SCU.reason"
        wait_until(reason.exists, timeout=60)
        assert "symbolic link" in reason.read_text()
        assert target.read_text() == "secret"
        # The reason file is written before the log line: wait for the line, do not race it.
        wait_until(
            lambda: any("symbolic link" in line for line in log(site, "hman.log")), timeout=30
        )
        sync_and_settle(site)
        assert daemon.stop() == 0


def test_bad_manifest_in_the_content_source_stops_the_sync_before_state_3(site: Path) -> None:
    cloud = site / "cloud" / "ConfigMgr.Update.Manifest.cab"
    good = cloud.read_bytes()
    tampered = bytearray(good)
    tampered[200] ^= 0x01
    cloud.write_bytes(bytes(tampered))
    with Daemon(site) as daemon:
        daemon.start()
        cmlab("sync", str(site))
        bad = site / "EasySetupPayload" / "BAD" / "ConfigMgr.Update.Manifest.cab.reason"
        wait_until(bad.exists, timeout=60)
        assert "DIGEST_MISMATCH" in bad.read_text()
        lines = log(site, "dmpdownloader.log")
        assert any(
            line.startswith("ERROR: File '") and "failed the trust check" in line for line in lines
        )
        assert (
            "Generating state message: 3 for package 00000000-0000-0000-0000-000000000000~~"
            not in lines
        )
        cloud.write_bytes(good)
        sync_and_settle(site)
        assert daemon.stop() == 0
