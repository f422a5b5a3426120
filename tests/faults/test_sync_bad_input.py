"""Bad input during synchronization: each gets a clear log line, goes to BAD with its reason,
sets the state the guide gives, and the daemon keeps serving (a good sync follows each)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from cmlab.site.cab import create_cab, extract_cab
from cmlab.site.trust import create_lab_ca, load_lab_ca, sign_cab
from cmlab.testing import SAMPLE_NOT_APPLICABLE, SAMPLE_UPDATE, LabSite, State
from tests.unit.test_cabfiles import raw_cab

# Each test's site is new (`cmlab init`, not synchronized), its daemon running in this process.
pytestmark = pytest.mark.cmlab(stage="new")

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


def sync_and_settle(site: LabSite) -> None:
    site.sync()
    site.wait_for(
        lambda: (
            site.state(SAMPLE_UPDATE) == State.APPLICABILITY_SUCCESS
            and not (site.inbox("hman.box") / "CAS.SCU").exists()
        ),
        timeout=60,
        what="a good sync after the bad input",
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_manifest_is_quarantined_and_the_daemon_keeps_serving(
    cmlab_site: LabSite, tmp_path: Path, case: str
) -> None:
    site = cmlab_site
    build, reason_text, log_text = CASES[case]
    data = build(site.path, tmp_path)
    site.drop("hman.box/ForwardingMsg", MCM, data)
    site.drop("hman.box", "CAS.SCU")
    bad = site.inbox("hman.box/CFD") / "BAD"
    reason = bad / "ConfigMgr.Update.Manifest.CAB.reason"
    site.wait_for(reason.exists, timeout=60, what=f"{case} quarantined")
    assert reason_text in reason.read_text()
    assert any(line.startswith("ERROR:") and log_text in line for line in site.log("hman.log"))
    assert (bad / "ConfigMgr.Update.Manifest.CAB").read_bytes() == data
    if case == "sql_hash_mismatch":
        # The guide's state for a failed applicability check; the other packages go on.
        assert site.states()[SAMPLE_UPDATE] == State.APPLICABILITY_FAILED
        assert site.states()[SAMPLE_NOT_APPLICABLE] == State.APPLICABILITY_NA
    assert not Path("/tmp/cmlab-evil.txt").exists()
    assert not (site.path / "evil.txt").exists() and not (site.path.parent / "evil.txt").exists()
    sync_and_settle(site)
    assert site.stop() == 0


def test_empty_mcm_is_quarantined(cmlab_site: LabSite) -> None:
    site = cmlab_site
    site.drop("hman.box/ForwardingMsg", MCM, b"")
    reason = site.inbox("hman.box/ForwardingMsg") / "BAD" / f"{MCM}.reason"
    site.wait_for(reason.exists, timeout=60, what="the empty MCM quarantined")
    assert "is empty" in reason.read_text()
    sync_and_settle(site)
    assert site.stop() == 0


def test_symlink_in_an_inbox_is_never_followed(cmlab_site: LabSite, tmp_path: Path) -> None:
    site = cmlab_site
    target = tmp_path / "outside.txt"
    target.write_text("secret")
    os.symlink(target, site.inbox("hman.box") / "CAS.SCU")
    reason = site.inbox("hman.box") / "BAD" / "CAS.SCU.reason"
    site.wait_for(reason.exists, timeout=60, what="the link quarantined")
    assert "symbolic link" in reason.read_text()
    assert target.read_text() == "secret"
    # The reason file is written before the log line: wait for the line, do not race it.
    site.wait_log("hman.log", re.compile("symbolic link"), timeout=30)
    sync_and_settle(site)
    assert site.stop() == 0


def test_bad_manifest_in_the_content_source_stops_the_sync_before_state_3(
    cmlab_site: LabSite,
) -> None:
    site = cmlab_site
    cloud = site.path / "cloud" / "ConfigMgr.Update.Manifest.cab"
    good = cloud.read_bytes()
    tampered = bytearray(good)
    tampered[200] ^= 0x01
    cloud.write_bytes(bytes(tampered))
    site.sync()
    bad = site.path / "EasySetupPayload" / "BAD" / "ConfigMgr.Update.Manifest.cab.reason"
    site.wait_for(bad.exists, timeout=60, what="the tampered manifest quarantined")
    assert "DIGEST_MISMATCH" in bad.read_text()
    lines = site.log("dmpdownloader.log")
    assert any(
        line.startswith("ERROR: File '") and "failed the trust check" in line for line in lines
    )
    assert (
        "Generating state message: 3 for package 00000000-0000-0000-0000-000000000000~~"
        not in lines
    )
    cloud.write_bytes(good)
    sync_and_settle(site)
    assert site.stop() == 0
