"""Download-stage failures on the real daemon. Each broken download (a bad payload, a bad redist
manifest, a missing or wrong redist) ends DOWNLOAD_FAILED (327679) with the exact ERROR lines,
the offending file in EasySetupPayload\\BAD with its reason and nothing half-made, and the
daemon keeps serving: once the content source is repaired, the same Download succeeds cleanly.
Malformed CMU notifications go to CFD\\BAD and change nothing; `cmlab download` refuses a
package it cannot download."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cmlab.core.hashing import folder_hash
from cmlab.site.cab import create_cab, extract_cab
from cmlab.site.formats.manifest import parse_manifest
from cmlab.site.trust import (
    TrustStore,
    VerdictStatus,
    create_lab_ca,
    load_lab_ca,
    sign_cab,
    verify_cab,
)
from cmlab.testing import SAMPLE_HIDDEN, SAMPLE_NOT_APPLICABLE, SAMPLE_UPDATE, LabSite, State
from tests.faults.test_sync_bad_input import BOMB
from tests.helpers.cli import cmlab
from tests.helpers.site_files import temporaries

G = SAMPLE_UPDATE
g = G.lower()
SETUP_FAILED = "ERROR: Setup downloader setupdl.exe: FAILED"


# -- sites -------------------------------------------------------------------------------------


@pytest.fixture
def site(cmlab_site_factory: Callable[..., LabSite]) -> LabSite:
    """A site that went through sync and applicability (2509 is APPLICABILITY_SUCCESS), its
    daemon not started yet (it runs in this process): each test breaks its content source
    first."""
    return cmlab_site_factory(start=False)


def queued(site: LabSite) -> set[str]:
    return {r[0].upper() for r in site.query("SELECT PackageGuid FROM CM_UpdatePackagesToDownload")}


def settled(site: LabSite, state: State) -> bool:
    """HMAN recorded `state`, the queue entry is gone and every drop file was consumed."""
    return site.state(G) == state and G not in queued(site) and not site.waiting_files()


def error_lines(site: LabSite, name: str) -> list[str]:
    return [line for line in site.log(name) if line.startswith("ERROR:")]


def payload_hash(site: LabSite) -> str:
    """The manifest's PayloadHash, as HMAN stored it in CM_UpdatePackages."""
    rows = site.query("SELECT PayloadHash FROM CM_UpdatePackages WHERE PackageGuid = ?", [G])
    return str(rows[0][0])


def assert_downloaded(site: LabSite) -> None:
    """DOWNLOAD_SUCCESS with the whole package in place: the folder hash is the manifest's."""
    stored = payload_hash(site)
    manifest = parse_manifest((site.path / "CMUStaging" / "Manifest.xml").read_bytes())
    (package,) = [p for p in manifest.packages if p.guid == G]
    assert stored and stored == package.payload_hash
    folder = site.path / "EasySetupPayload" / g
    assert folder_hash(folder) == stored
    assert (folder / "redist" / "ConfigMgr.Manifest.cab").is_file()
    assert site.states()[G] == State.DOWNLOAD_SUCCESS
    assert G not in queued(site)
    assert site.waiting_files() == []
    assert temporaries(site.path) == []
    assert not list((site.path / "EasySetupPayload").glob("*.partial"))


# -- the ways a download breaks ----------------------------------------------------------------


@dataclass
class Breakage:
    target: Path  # the content-source file that is broken
    data: bytes | None  # its broken content; None: the file is missing
    reason: str  # DMPDownloader's reason: `ERROR: <reason>~~`, and the .reason file's text
    setup_errors: list[str] = field(default_factory=list)  # ConfigMgrSetup.log ERROR lines
    bad: str | None = None  # the file quarantined in EasySetupPayload\BAD
    kept: bytes | None = None  # what BAD holds, when it is not `data` whole


def trust_store(site: LabSite) -> TrustStore:
    config = site.config
    return TrustStore.from_pem_files(config.trust_roots, config.microsoft_roots)


def verdict_of(site: LabSite, tmp: Path, data: bytes, status: VerdictStatus) -> str:
    """The reason the daemon's verifier will give for `data` (reasons never name the path)."""
    probe = tmp / "probe.cab"
    probe.write_bytes(data)
    verdict = verify_cab(probe, trust_store(site))
    assert verdict.status is status, verdict
    return verdict.reason


def flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def unsigned_copy(cab: Path, tmp: Path, change: dict[str, bytes] | None = None) -> Path:
    """The CAB's files (optionally changed) in a new, unsigned CAB."""
    out = tmp / f"x-{cab.name}"
    extract_cab(cab, out)
    files: dict[str, Path | bytes] = {
        str(p.relative_to(out)): p for p in sorted(out.rglob("*")) if p.is_file()
    }
    files.update(change or {})
    unsigned = tmp / f"unsigned-{cab.name}"
    create_cab(files, unsigned)
    return unsigned


def signed_by(unsigned: Path, ca_dir: Path, tmp: Path) -> bytes:
    out = tmp / f"signed-{unsigned.name}"
    sign_cab(unsigned, out, load_lab_ca(ca_dir).signer())
    return out.read_bytes()


def rogue_ca(tmp: Path) -> Path:
    return create_lab_ca(tmp / "rogue-ca", common_name="Rogue Root").root_cert.parent


def content_hash(site: LabSite) -> str:
    return str(
        site.query("SELECT ContentHash FROM CM_UpdatePackages WHERE PackageGuid=?", [G])[0][0]
    )


def payload(site: LabSite) -> Path:
    return site.path / "cloud" / f"{G}.cab"


def redist(site: LabSite, name: str) -> Path:
    return site.path / "cloud" / G / "redist" / name


def downloaded_as(site: LabSite, source: Path) -> Path:
    """Where DMPDownloader puts a content-source file (and how its logs name it)."""
    redists = site.path / "cloud" / G / "redist"
    if source.is_relative_to(redists):
        return site.path / "EasySetupPayload" / g / "redist" / source.relative_to(redists)
    return site.path / "EasySetupPayload" / f"{g}.cab"


def local_cab(site: LabSite) -> str:
    return str(site.path / "EasySetupPayload" / f"{g}.cab")


def payload_untrusted(site: LabSite, data: bytes, status: VerdictStatus, tmp: Path) -> Breakage:
    reason = verdict_of(site, tmp, data, status)
    return Breakage(
        payload(site),
        data,
        f"File '{local_cab(site)}' failed the trust check ({status.name}): {reason}",
        bad=f"{g}.cab",
    )


def case_payload_tampered(site: LabSite, tmp: Path) -> Breakage:
    # A byte of the CAB's file table: the signature no longer covers the file.
    data = flip(payload(site).read_bytes(), 200)
    return payload_untrusted(site, data, VerdictStatus.DIGEST_MISMATCH, tmp)


def case_payload_unsigned(site: LabSite, tmp: Path) -> Breakage:
    data = unsigned_copy(payload(site), tmp).read_bytes()
    return payload_untrusted(site, data, VerdictStatus.NOT_SIGNED, tmp)


def case_payload_other_ca(site: LabSite, tmp: Path) -> Breakage:
    data = signed_by(unsigned_copy(payload(site), tmp), rogue_ca(tmp), tmp)
    return payload_untrusted(site, data, VerdictStatus.UNTRUSTED_ROOT, tmp)


def case_payload_resigned(site: LabSite, tmp: Path) -> Breakage:
    # Changed content, validly signed by the site's own lab CA: only the manifest hash catches it.
    unsigned = unsigned_copy(payload(site), tmp, {"splash.hta": b"<html>not 2509</html>"})
    data = signed_by(unsigned, site.path / "trust", tmp)
    verdict_of(site, tmp, data, VerdictStatus.TRUSTED)
    actual = hashlib.sha256(data).hexdigest().upper()
    return Breakage(
        payload(site),
        data,
        f"Payload {local_cab(site)} has hash value SHA256:{actual}, the manifest expects "
        f"SHA256:{content_hash(site)}",
        bad=f"{g}.cab",
    )


def case_payload_missing(site: LabSite, tmp: Path) -> Breakage:
    src = payload(site)
    return Breakage(
        src,
        None,
        f"Failed to download the payload from {src}: [Errno 2] No such file or directory: '{src}'",
    )


def manifest_untrusted(site: LabSite, data: bytes, status: VerdictStatus, tmp: Path) -> Breakage:
    why = f"ConfigMgr.Manifest.cab failed the trust check ({status.name}): "
    why += verdict_of(site, tmp, data, status)
    return Breakage(
        redist(site, "ConfigMgr.Manifest.cab"),
        data,
        f"Failed to download redist for {g}: {why}",
        setup_errors=[f"ERROR: {why}", SETUP_FAILED],
        bad="ConfigMgr.Manifest.cab",
    )


def case_redist_manifest_tampered(site: LabSite, tmp: Path) -> Breakage:
    data = flip(redist(site, "ConfigMgr.Manifest.cab").read_bytes(), 200)
    return manifest_untrusted(site, data, VerdictStatus.DIGEST_MISMATCH, tmp)


def case_redist_manifest_unsigned(site: LabSite, tmp: Path) -> Breakage:
    data = unsigned_copy(redist(site, "ConfigMgr.Manifest.cab"), tmp).read_bytes()
    return manifest_untrusted(site, data, VerdictStatus.NOT_SIGNED, tmp)


def case_redist_manifest_other_ca(site: LabSite, tmp: Path) -> Breakage:
    unsigned = unsigned_copy(redist(site, "ConfigMgr.Manifest.cab"), tmp)
    data = signed_by(unsigned, rogue_ca(tmp), tmp)
    return manifest_untrusted(site, data, VerdictStatus.UNTRUSTED_ROOT, tmp)


def case_redist_missing(site: LabSite, tmp: Path) -> Breakage:
    src = redist(site, "sqlncli.msi")
    why = f"Failed to download sqlncli.msi from {src}: [Errno 2] No such file or directory: '{src}'"
    return Breakage(
        src, None, f"Failed to download redist for {g}: {why}", [f"ERROR: {why}", SETUP_FAILED]
    )


def case_redist_hash(site: LabSite, tmp: Path) -> Breakage:
    src = redist(site, "msodbcsql.msi")
    good = src.read_bytes()
    data = flip(good, len(good) - 1)  # same size, one bit different
    why = (
        f"File hash check failed for msodbcsql.msi: expected "
        f"{hashlib.sha256(good).hexdigest().upper()}, actual "
        f"{hashlib.sha256(data).hexdigest().upper()}"
    )
    return Breakage(
        src,
        data,
        f"Failed to download redist for {g}: {why}",
        [f"ERROR: {why}", SETUP_FAILED],
        bad="msodbcsql.msi",
    )


def case_redist_truncated(site: LabSite, tmp: Path) -> Breakage:
    src = redist(site, "NDP462-KB3151800-x86-x64-AllOS-ENU.exe")
    good = src.read_bytes()
    data = good[:1000]
    why = (
        f"File size check failed for NDP462-KB3151800-x86-x64-AllOS-ENU.exe: expected "
        f"{len(good)} bytes, got 1000"
    )
    return Breakage(
        src,
        data,
        f"Failed to download redist for {g}: {why}",
        [f"ERROR: {why}", SETUP_FAILED],
        bad="NDP462-KB3151800-x86-x64-AllOS-ENU.exe",
    )


def case_redist_oversize(site: LabSite, tmp: Path) -> Breakage:
    src = redist(site, "LanguagePack/MobileDevice/SMSSETUP/BIN/X64/MobileDeviceLangPack.msi")
    good = src.read_bytes()
    why = f"MobileDeviceLangPack.msi is larger than the {len(good)} bytes expected"
    return Breakage(
        src,
        good + b"\0" * 4096,
        f"Failed to download redist for {g}: {why}",
        [f"ERROR: {why}", SETUP_FAILED],
        bad="MobileDeviceLangPack.msi",
        kept=good,  # SetupDL stops reading at the size the manifest gives
    )


CASES: dict[str, Callable[[LabSite, Path], Breakage]] = {
    "payload_tampered": case_payload_tampered,
    "payload_unsigned": case_payload_unsigned,
    "payload_other_ca": case_payload_other_ca,
    "payload_resigned_by_lab_ca": case_payload_resigned,
    "payload_missing": case_payload_missing,
    "redist_manifest_tampered": case_redist_manifest_tampered,
    "redist_manifest_unsigned": case_redist_manifest_unsigned,
    "redist_manifest_other_ca": case_redist_manifest_other_ca,
    "redist_missing": case_redist_missing,
    "redist_hash_differs": case_redist_hash,
    "redist_truncated": case_redist_truncated,
    "redist_oversize": case_redist_oversize,
}


@pytest.mark.parametrize("case", list(CASES))
def test_failed_download_is_reported_quarantined_and_retried_cleanly(
    site: LabSite, tmp_path: Path, case: str
) -> None:
    brk = CASES[case](site, tmp_path)
    original = brk.target.read_bytes()
    if brk.data is None:
        brk.target.unlink()
    else:
        brk.target.write_bytes(brk.data)
    easy = site.path / "EasySetupPayload"
    local = downloaded_as(site, brk.target)
    site.start()
    site.download(G)
    site.wait_for(lambda: settled(site, State.DOWNLOAD_FAILED), timeout=60, what=f"{case} failed")

    # The logs say why, in the order the code writes it.
    moved = []
    if brk.bad is not None:
        moved = [f"ERROR: Moved bad file {local} to {easy / 'BAD' / brk.bad}: {brk.reason}"]
    errors = error_lines(site, "dmpdownloader.log")
    assert errors == [
        f"ERROR: {brk.reason}~~",
        *moved,
        f"ERROR: Failed to download package {g}~~",
    ]
    assert error_lines(site, "ConfigMgrSetup.log") == brk.setup_errors
    assert f"Updated CMUpdatePackage state to {int(State.DOWNLOAD_FAILED)} (PackageGuid={g})" in (
        site.log("hman.log")
    )

    # The offending file is kept, with its reason; nothing half-made is left.
    bad = easy / "BAD"
    if brk.bad is None:
        assert not bad.exists()
    else:
        assert sorted(p.name for p in bad.iterdir()) == [brk.bad, f"{brk.bad}.reason"]
        assert (bad / brk.bad).read_bytes() == (brk.kept or brk.data)
        reason_file = (bad / f"{brk.bad}.reason").read_text()
        assert reason_file == f"{local}\n{brk.reason}\n"
    assert not (easy / g).exists()
    assert not (easy / f"{g}.cab.partial").exists()
    assert temporaries(site.path) == []
    assert site.running

    # Repair the content source: the same request goes through cleanly.
    brk.target.write_bytes(original)
    site.download(G)
    site.wait_for(lambda: settled(site, State.DOWNLOAD_SUCCESS), timeout=60, what=f"{case} retried")
    assert error_lines(site, "dmpdownloader.log") == errors  # no new error
    assert site.stop() == 0
    assert_downloaded(site)
    assert "INFO: Setup downloader setupdl.exe: FINISHED" in site.log("ConfigMgrSetup.log")


# -- malformed CMU notifications ---------------------------------------------------------------


def cmu(guid: str, state: object) -> bytes:
    return (
        f'<ConfigurationManagerUpdateContent Guid="{guid}" State="{state}" '
        'ReportTime="2026-11-21T14:49:55" />'
    ).encode()


UNKNOWN = "11111111-2222-3333-4444-555555555555"
DOWNLOAD_STATES = (
    "(262145 (DOWNLOAD_IN_PROGRESS), 262146 (DOWNLOAD_SUCCESS), 327679 (DOWNLOAD_FAILED))"
)
UNKNOWN_2 = "66666666-7777-8888-9999-AAAAAAAAAAAA"
BAD_CMUS: dict[str, tuple[bytes, str]] = {
    # file name: (content, the reason HMAN gives; ending in ": ", the parser's words follow)
    f"{G}.CMU": (
        b'<ConfigurationManagerUpdateContent Guid="' + G.encode() + b'" State="262146"',
        f"CMU file {G}.CMU is not well-formed XML: ",
    ),
    f"{SAMPLE_HIDDEN}.CMU": (
        cmu(SAMPLE_HIDDEN, 262146).replace(b"UpdateContent", b"Update"),
        f"CMU file {SAMPLE_HIDDEN}.CMU root is <ConfigurationManagerUpdate>, expected "
        "<ConfigurationManagerUpdateContent>",
    ),
    f"{SAMPLE_NOT_APPLICABLE}.CMU": (
        cmu(G, 262146),
        f"{SAMPLE_NOT_APPLICABLE}.CMU: the file names package {SAMPLE_NOT_APPLICABLE} but "
        f"its Guid is {G}",
    ),
    f"{g}.CMU": (
        cmu(g, int(State.APPLICABILITY_SUCCESS)),
        f"{g}.CMU: State '327682' is not a download state {DOWNLOAD_STATES}",
    ),
    f"{SAMPLE_HIDDEN.lower()}.CMU": (
        cmu(SAMPLE_HIDDEN.lower(), "downloaded"),
        f"{SAMPLE_HIDDEN.lower()}.CMU: State 'downloaded' is not a download state "
        + DOWNLOAD_STATES,
    ),
    f"{UNKNOWN}.CMU": (
        cmu(UNKNOWN, 262146),
        f"{UNKNOWN}.CMU: there is no update package {UNKNOWN} in CM_UpdatePackages",
    ),
    f"{SAMPLE_NOT_APPLICABLE.lower()}.CMU": (
        cmu(SAMPLE_NOT_APPLICABLE.lower(), 262146)[:-2] + b" " * 70_000 + b"/>",
        f"{SAMPLE_NOT_APPLICABLE.lower()}.CMU is over 65536 bytes: not a CMU notification",
    ),
    f"{UNKNOWN_2}.CMU": (BOMB, f"CMU file {UNKNOWN_2}.CMU refused: "),
    f"{UNKNOWN_2.lower()}.CMU": (b"", f"CMU file {UNKNOWN_2.lower()}.CMU is not well-formed XML: "),
    "update.CMU": (cmu(G, 262146), "update.CMU: the file name is not <PackageGuid>.CMU"),
}


def snapshot(site: LabSite) -> list[list[tuple[object, ...]]]:
    return [
        site.query("SELECT * FROM CM_UpdatePackages ORDER BY PackageGuid"),
        site.query("SELECT * FROM CM_UpdatePackageSiteStatus ORDER BY PackageGuid"),
        site.query("SELECT * FROM CM_UpdatePackagesToDownload ORDER BY PackageGuid"),
    ]


def test_malformed_cmu_files_are_quarantined_and_change_nothing(site: LabSite) -> None:
    cfd = site.inbox("hman.box/CFD")
    before = snapshot(site)
    site.start()
    for name, (data, _) in BAD_CMUS.items():
        site.drop("hman.box/CFD", name, data)
    reasons = [cfd / "BAD" / f"{name}.reason" for name in BAD_CMUS]
    # The .reason file is written before the log line that says so: wait for both.
    site.wait_for(
        lambda: (
            all(r.exists() for r in reasons) and len(error_lines(site, "hman.log")) >= len(BAD_CMUS)
        ),
        timeout=60,
        what="every CMU quarantined",
    )
    hman_errors = error_lines(site, "hman.log")
    for name, (data, why) in BAD_CMUS.items():
        shown, text, *_ = (cfd / "BAD" / f"{name}.reason").read_text().split("\n")
        assert shown == str(cfd / name)
        if why.endswith(": "):
            assert text.startswith(why) and len(text) > len(why), (name, text)
        else:
            assert text == why, (name, text)
        assert (cfd / "BAD" / name).read_bytes() == data
        assert f"ERROR: Moved bad file {cfd / name} to {cfd / 'BAD' / name}: {text}" in (
            hman_errors
        )
    assert len(hman_errors) == len(BAD_CMUS)
    assert snapshot(site) == before
    assert "Updated CMUpdatePackage state" not in "\n".join(site.log("hman.log"))
    assert site.waiting_files() == []
    # HMAN's CMUHandler keeps serving: a real download is recorded.
    assert site.running
    site.download(G)
    site.wait_for(lambda: settled(site, State.DOWNLOAD_SUCCESS), timeout=60, what="a good download")
    assert site.stop() == 0
    assert_downloaded(site)


# -- what `cmlab download` refuses -------------------------------------------------------------


@pytest.mark.parametrize(
    ("guid", "code", "message"),
    [
        (UNKNOWN, 5, f"cmlab: no update package {UNKNOWN} in CM_UpdatePackages"),
        (
            SAMPLE_NOT_APPLICABLE,
            4,
            f"cmlab: Configuration Manager 2409 Hotfix Rollup ({SAMPLE_NOT_APPLICABLE}) is "
            "APPLICABILITY_NA (393214): only a package that is APPLICABILITY_SUCCESS or "
            "DOWNLOAD_FAILED can be downloaded",
        ),
        (
            SAMPLE_HIDDEN,
            4,
            f"cmlab: Configuration Manager 2503 Hotfix Rollup ({SAMPLE_HIDDEN}) is "
            "APPLICABILITY_HIDE (393213): only a package that is APPLICABILITY_SUCCESS or "
            "DOWNLOAD_FAILED can be downloaded",
        ),
    ],
)
def test_download_refuses_a_package_it_cannot_download(
    site: LabSite, guid: str, code: int, message: str
) -> None:
    """What the command line says (no daemon runs: the refusal is the SMS Provider's): an
    unknown GUID is "not found" (exit code 5); a state it cannot download from is "refused"
    (4)."""
    before = snapshot(site)
    proc = cmlab("download", str(site.path), guid, check=False)
    assert proc.returncode == code
    assert proc.stdout == ""
    assert proc.stderr.strip() == message
    assert snapshot(site) == before
    assert site.waiting_files() == []
