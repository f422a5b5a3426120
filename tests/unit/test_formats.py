"""cmlab.site.formats: one pattern per identifier, and every format that has a writer and a
parser gives back what was written (a malformed input raises the format's own error)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import cmlab
from cmlab.core.errors import CmlabError, ManifestError
from cmlab.site.formats.cmu import (
    MANIFEST_MCM,
    CmuError,
    CmuNotification,
    cmu_mcm_name,
    forwarded_name,
    is_manifest_mcm,
    parse_cmu,
    render_cmu,
)
from cmlab.site.formats.ids import (
    is_guid,
    is_job_id,
    is_package_id,
    is_sha256,
    is_site_code,
    is_site_code_either_case,
    is_upper_sha256,
)
from cmlab.site.formats.notifications import (
    NotificationError,
    cme_name,
    cme_package_guid,
    cmi_name,
)
from cmlab.site.formats.redist_manifest import (
    RedistFile,
    RedistGroup,
    RedistManifest,
    parse_redist_manifest,
    render_redist_manifest,
)
from cmlab.site.formats.replication import (
    Recovery,
    ReplicationFormatError,
    delivered_package_name,
    ins_name,
    parse_resend_reason,
    parse_resend_request_name,
    parse_send_request,
    pck_name,
    pck_version,
    read_recovery_sidecar,
    recovery_sidecar_path,
    render_recovery_sidecar,
    render_resend_request,
    render_send_request,
    resend_request_name,
    srq_name,
)
from cmlab.site.formats.sample_binary import (
    read_sample_header,
    sample_binary,
    sample_build_number,
    sample_redist,
)
from cmlab.site.formats.state_message import (
    StateMessage,
    StateMessageError,
    parse_state_message,
    random_smx_name,
    render_state_message,
)
from cmlab.site.state_codes import PackageState

GUID = "3B1E0A8D-5C2F-4E6A-9D7B-B3C1F2E6A9D0"
HASH = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"

# -- ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [GUID, GUID.lower(), "00000000-0000-0000-0000-000000000000"])
def test_a_guid_is_accepted_in_either_case(text: str) -> None:
    assert is_guid(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        GUID + "\n",  # `^...$` with match let this through
        "\n" + GUID,
        GUID + "0",
        GUID[:-1],
        "{" + GUID + "}",
        GUID.replace("-", ""),
        GUID.replace("B", "G"),
        GUID.replace("3", "\uff13"),  # a full-width digit
    ],
)
def test_anything_but_a_whole_guid_is_refused(text: str) -> None:
    assert not is_guid(text)


def test_site_codes_package_ids_and_job_ids_are_upper_case_ascii() -> None:
    assert is_site_code("CAS") and is_site_code("PR1") and is_site_code("123")
    for bad in ("cas", "CA", "CASX", "CAS\n", "\u212aAS", "C-S"):
        assert not is_site_code(bad), bad
    assert is_site_code_either_case("cas") and is_site_code_either_case("Pr1")
    for bad in ("CA", "CASX", "CAS\n", "\u017fAS", "\u0131AS", "C-S"):
        assert not is_site_code_either_case(bad), bad
    assert is_package_id("CAS10001") and is_package_id("PR1000AF")
    for bad in ("cas10001", "CAS1000G", "CAS1000", "CAS100011", "CAS10001\n", "\u212aAS10001"):
        assert not is_package_id(bad), bad
    assert is_job_id("00000391") and is_job_id("ABCDEF01") and is_job_id("00000000")
    for bad in ("00000391\n", "abcdef01", "391", "0000039G", "000003911"):
        assert not is_job_id(bad), bad


def test_sha256_either_case_or_upper_only() -> None:
    assert is_sha256(HASH) and is_sha256(HASH.lower())
    assert is_upper_sha256(HASH) and not is_upper_sha256(HASH.lower())
    for bad in (HASH + "\n", HASH[:-1], HASH + "0", HASH.replace("E", "G")):
        assert not is_sha256(bad) and not is_upper_sha256(bad), bad


def test_no_module_keeps_its_own_guid_pattern() -> None:
    """The GUID pattern is written once, in cmlab.site.formats.ids."""
    root = Path(cmlab.__file__).parent
    owners = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "{8}-" in path.read_text(encoding="utf-8")
    )
    assert owners == ["site/formats/ids.py"]


# -- .SMX state message ------------------------------------------------------------------------


def test_a_state_message_name_is_cmu_and_eight_random_characters() -> None:
    names = {random_smx_name() for _ in range(50)}
    assert len(names) == 50
    assert all(re.fullmatch(r"___CMU[a-z0-9]{8}\.SMX", n) for n in names)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty"),
        (b"<StateMessage Component='C' TopicID='x' StateID='1'/>", "TopicID 'x' is not a GUID"),
        (f"<StateMessage Component='C' TopicID='{GUID}' StateID='one'/>".encode(), "StateID"),
        (f"<StateMessage TopicID='{GUID}' StateID='1'/>".encode(), "Component is missing"),
        (f"<Other Component='C' TopicID='{GUID}' StateID='1'/>".encode(), "StateMessage"),
    ],
)
def test_a_malformed_state_message_raises_state_message_error(body: bytes, reason: str) -> None:
    with pytest.raises(StateMessageError, match=reason):
        parse_state_message(body)


def test_a_state_message_round_trips_with_its_topic_in_lower_case() -> None:
    msg = StateMessage("SMS_DMP_DOWNLOADER", "cas.lab", GUID, 25, "", "2026-11-21T00:00:00")
    back = parse_state_message(render_state_message(msg))
    assert back == StateMessage(
        "SMS_DMP_DOWNLOADER", "cas.lab", GUID.lower(), 25, "", "2026-11-21T00:00:00"
    )


# -- CMU notification and forwarding messages --------------------------------------------------


@pytest.mark.parametrize("state", sorted(PackageState(s) for s in (262145, 262146, 327679)))
def test_a_cmu_notification_round_trips_through_its_forwarding_message(
    state: PackageState,
) -> None:
    note = CmuNotification(GUID.lower(), int(state), "2026-11-21T13:15:08")
    cmu = forwarded_name(cmu_mcm_name(note.guid))
    assert cmu == f"{GUID.lower()}.CMU"
    assert parse_cmu(cmu, render_cmu(note).encode()) == note


@pytest.mark.parametrize(
    ("name", "body", "reason"),
    [
        ("x.CMU", b"<a/>", "the file name is not <PackageGuid>.CMU"),
        (f"{GUID}.CMU", b"", "CMU file"),
        (f"{GUID}.CMU", b"<Other/>", "ConfigurationManagerUpdateContent"),
        (
            f"{GUID}.CMU",
            b'<ConfigurationManagerUpdateContent Guid="x" State="262146"/>',
            "Guid 'x' is not a GUID",
        ),
        (
            f"{GUID}.CMU",
            f'<ConfigurationManagerUpdateContent Guid="{GUID[:-1]}1" State="262146"/>'.encode(),
            "the file names package",
        ),
        (
            f"{GUID}.CMU",
            f'<ConfigurationManagerUpdateContent Guid="{GUID}" State="196612"/>'.encode(),
            "is not a download state",
        ),
        (
            f"{GUID}.CMU",
            b"<ConfigurationManagerUpdateContent " + b" " * 70000 + b"/>",
            "the limit is 65536",
        ),
    ],
)
def test_a_malformed_cmu_notification_raises_cmu_error(name: str, body: bytes, reason: str) -> None:
    with pytest.raises(CmuError, match=re.escape(reason)):
        parse_cmu(name, body)


def test_forwarding_message_names() -> None:
    assert is_manifest_mcm(MANIFEST_MCM) and is_manifest_mcm("___cabX.MCM")
    assert not is_manifest_mcm(cmu_mcm_name(GUID))
    assert forwarded_name(MANIFEST_MCM) == "ConfigMgr.Update.Manifest.CAB"
    assert forwarded_name(f"___cmu{GUID}.mcm") == f"{GUID}.CMU"
    for bad, reason in (
        ("___CAB.mcm", "does not name a CAB"),
        ("___CAB.hidden.mcm", "does not name a CAB"),
        ("___CMUnot-a-guid.MCM", "does not carry an update package GUID"),
        ("other.MCM", "is not a forwarding message HMAN knows"),
    ):
        with pytest.raises(CmuError, match=reason):
            forwarded_name(bad)


def test_notification_names() -> None:
    assert cme_package_guid(cme_name(GUID)) == GUID
    assert cme_package_guid(f"{GUID.lower()}.cme") == GUID.lower()
    assert cmi_name(GUID) == f"{GUID}.CMI"
    for bad in ("x.CME", f"{GUID}.CMI", f"{GUID}\n.CME"):
        with pytest.raises(
            NotificationError, match=re.escape("the file name is not <PackageGuid>.CME")
        ):
            cme_package_guid(bad)


# -- replication: send and resend requests, names, the recovery sidecar -----------------------


def test_a_send_request_round_trips() -> None:
    for job_id in (1, 0x391, 0xFFFFFFFF):
        name = srq_name(f"{job_id:08X}")
        assert parse_send_request(name, render_send_request(job_id).encode()) == job_id
    assert render_send_request(0x391) == "Job=00000391\nInstruction=tosend/00000391.Idb\n"


@pytest.mark.parametrize(
    ("name", "body", "reason"),
    [
        ("00000391.JOB", b"Job=00000391\n", "the file name is not <JobID>.SRQ"),
        ("00000000.SRQ", b"Job=00000000\n", "job IDs start at 1"),
        ("00000391.SRQ", b"Job=00000391\n" * 100, "larger than 1024 bytes"),
        ("00000391.SRQ", b"Job=\xff\n", "not UTF-8 text"),
        ("00000391.SRQ", b"Job=00000391\nJob=00000391\n", "unexpected line"),
        ("00000391.SRQ", b"Other=1\n", "unexpected line"),
        ("00000391.SRQ", b"Job=00000392\n", "the request names job '00000392'"),
        ("00000391.SRQ", b"Job=00000391\nInstruction=../x.Idb\n", "not tosend/00000391.Idb"),
    ],
)
def test_a_malformed_send_request_raises_replication_format_error(
    name: str, body: bytes, reason: str
) -> None:
    with pytest.raises(ReplicationFormatError, match=re.escape(reason)):
        parse_send_request(name, body)


def test_a_resend_request_round_trips() -> None:
    name = resend_request_name("pr1", "cas10001", 12)
    assert name == "PR1_CAS10001_12.RSQ"
    assert parse_resend_request_name(name) == ("PR1", "CAS10001", 12)
    assert parse_resend_request_name(name.lower()) == ("PR1", "CAS10001", 12)
    reason = "ds_00000391.pkg: SHA-256 1234, the instruction says 5678"
    assert parse_resend_reason(name, render_resend_request(reason).encode()) == reason
    assert parse_resend_reason(name, b"a\tb\x00\r\n c\n") == "a b c"
    for bad in ("PR1_CAS10001_0.RSQ", "PR1_CAS1000G_1.RSQ", "P1_CAS10001_1.RSQ", "x.RSQ"):
        with pytest.raises(ReplicationFormatError, match=r"<ChildSite>_<PkgID>_<Version>\.RSQ"):
            parse_resend_request_name(bad)
    with pytest.raises(ReplicationFormatError, match="not UTF-8"):
        parse_resend_reason(name, b"\xff")


def test_delivery_and_pck_names() -> None:
    assert ins_name("0000abcd") == "0000ABCD.INS"
    assert delivered_package_name("0000ABCD") == "ds_0000abcd.pkg"
    assert pck_version(pck_name("cas10001", 7), "CAS10001") == 7
    assert pck_version("CAS10001.PCK.7", "cas10001") == 7
    for other in ("CAS10001.PCK.0", "CAS10001.PCK.temp", "CAS10002.PCK.7", "cas10001.PCK.7"):
        assert pck_version(other, "CAS10001") is None


def test_the_recovery_sidecar_round_trips(tmp_path: Path) -> None:
    package = tmp_path / "SEC.RCV.1"
    recovery = Recovery(9135, "5.00.9135.1000", "5.00.9135.1000", (GUID,))
    assert recovery_sidecar_path(package) == tmp_path / "SEC.RCV.1.json"
    recovery_sidecar_path(package).write_text(render_recovery_sidecar(recovery))
    assert read_recovery_sidecar(package) == recovery
    recovery_sidecar_path(package).write_text('{"Build": 1}')
    with pytest.raises(ValueError, match=r"SEC\.RCV\.1\.json: Recovery has no Version"):
        read_recovery_sidecar(package)


# -- the payload: redist manifests, sample binaries --------------------------------------------


def _redist(name: str, url: str, digest: str = HASH) -> RedistFile:
    return RedistFile(name, "a redist", url, "https://example/x", name, 8192, "SHA256", digest)


def test_a_redist_manifest_round_trips() -> None:
    manifest = RedistManifest(
        "Redist",
        9141,
        (
            RedistGroup("Dot_Net_Framework", (_redist("ndp.exe", "ndp.exe"),)),
            RedistGroup(
                "LanguagePack",
                (
                    _redist("a.msi", "LanguagePack/X64/a.msi"),
                    _redist("b.msi", "LanguagePack/X64/b.msi"),
                ),
            ),
            RedistGroup("Empty", ()),
        ),
    )
    assert parse_redist_manifest(render_redist_manifest(manifest)) == manifest
    lower = RedistManifest("LanguagePack", 1, (RedistGroup("g", (_redist("a", "a", "ab" * 32),)),))
    assert parse_redist_manifest(render_redist_manifest(lower)).groups[0].files[0].hash == (
        "AB" * 32
    )


@pytest.mark.parametrize(
    "manifest",
    [
        RedistManifest("Other", 1, ()),
        RedistManifest("Redist", 1, (RedistGroup("g", (_redist("a", "../a"),)),)),
        RedistManifest("Redist", 1, (RedistGroup("g", (_redist("a", "/etc/a"),)),)),
        RedistManifest("Redist", 1, (RedistGroup("g", (_redist("", "a"),)),)),
        RedistManifest("Redist", 1, (RedistGroup("g", (_redist("a/b", "a"),)),)),
        RedistManifest("Redist", 1, (RedistGroup("g", (_redist("a", "a", HASH[:-1]),)),)),
        RedistManifest("Redist", 1, (RedistGroup("g", (_redist("a", "a", "G" * 64),)),)),
    ],
)
def test_a_malformed_redist_manifest_raises_manifest_error(manifest: RedistManifest) -> None:
    with pytest.raises(ManifestError):
        parse_redist_manifest(render_redist_manifest(manifest))


def test_a_sample_binary_gives_back_its_header(tmp_path: Path) -> None:
    path = tmp_path / "cmupdate.exe"
    path.write_bytes(sample_binary("cmupdate.exe", 9141, "5.00.9141.1000", 5000))
    assert path.stat().st_size == 5000
    assert read_sample_header(path) == {"build": "9141", "version": "5.00.9141.1000"}
    assert sample_build_number(path) == 9141
    redist = tmp_path / "ndp.exe"
    redist.write_bytes(sample_redist("ndp.exe", "a redist", 300))
    assert read_sample_header(redist) == {}
    with pytest.raises(CmlabError, match="not a cmlab sample binary"):
        sample_build_number(redist)
    with pytest.raises(CmlabError, match="smaller than its header"):
        sample_binary("cmupdate.exe", 9141, "5.00.9141.1000", 10)
    assert sample_binary("a", 1, "1", 500) == sample_binary("a", 1, "1", 500)
    assert sample_binary("a", 1, "1", 500) != sample_binary("a", 2, "1", 500)
