"""verify_cab: one test per verdict, built from real signed files."""

from __future__ import annotations

import datetime as dt
import os
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from cmlab.core.errors import CmlabError
from cmlab.site.trust import (
    LabCA,
    Signer,
    SigningError,
    TrustStore,
    TrustStoreError,
    Verdict,
    VerdictStatus,
    sign_cab,
    verify_cab,
)
from cmlab.site.trust.authenticode import parse_signature
from cmlab.site.trust.cab_layout import authenticode_digest, locate_signature, read_header
from tests.helpers.trust_helpers import Signed, make_odd_ca, now, root_of, trust_for

# Session fixtures (CAs, CABs) shared by all trust tests.
pytest_plugins = ["tests.helpers.trust_helpers"]


def signature_span(path: Path) -> tuple[int, int]:
    with path.open("rb") as f:
        location = locate_signature(read_header(f, path.stat().st_size))
    assert location is not None
    return location.offset, location.length


def write_variant(src: Path, dst: Path, edit) -> Path:
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


def test_trusted(signed_cab: Signed) -> None:
    verdict = verify_cab(signed_cab.path, signed_cab.trust)
    assert verdict.status is VerdictStatus.TRUSTED and verdict.trusted
    assert verdict.digest_algorithm == "sha256"
    assert verdict.signer_subject is not None and "Code Signing" in verdict.signer_subject
    assert len(verdict.chain) == 3
    assert verdict.chain[-1] == root_of(signed_cab.ca)
    assert verdict.root_subject == "CN=cmlab Lab Root,O=cmlab"
    assert verdict.signing_time is not None
    assert abs(verdict.signing_time - now()) < dt.timedelta(minutes=5)
    assert verdict.ms_root


@pytest.mark.parametrize("digest", ["sha256", "sha384", "sha1"])
@pytest.mark.parametrize("ca_name", ["rsa_ca", "ecdsa_ca"])
def test_digests_and_key_types(
    request: pytest.FixtureRequest, tmp_path: Path, unsigned_cab: Path, digest: str, ca_name: str
) -> None:
    ca: LabCA = request.getfixturevalue(ca_name)
    out = tmp_path / "s.cab"
    sign_cab(unsigned_cab, out, ca.signer(digest))
    verdict = verify_cab(out, trust_for(ca))
    assert verdict.status is VerdictStatus.TRUSTED, verdict.reason
    assert verdict.digest_algorithm == digest
    assert not verdict.ms_root


def test_ms_root_only_for_microsoft_roots(
    signed_cab: Signed, rsa_ca: LabCA, other_ca: LabCA, tmp_path: Path, unsigned_cab: Path
) -> None:
    both = trust_for(rsa_ca, other_ca, microsoft=(other_ca,))
    verdict = verify_cab(signed_cab.path, both)
    assert verdict.trusted and not verdict.ms_root
    assert verdict.root_subject == "CN=cmlab Lab Root,O=cmlab"

    other_signed = tmp_path / "other.cab"
    sign_cab(unsigned_cab, other_signed, other_ca.signer())
    verdict = verify_cab(other_signed, both)
    assert verdict.trusted and verdict.ms_root
    assert verdict.root_subject == "CN=Other Root,O=cmlab"
    assert len(verdict.chain) == 2  # no intermediate in this CA


def test_microsoft_root_file_alone_is_trusted(signed_cab: Signed) -> None:
    store = TrustStore.from_pem_files([], [signed_cab.ca.root_cert])
    verdict = verify_cab(signed_cab.path, store)
    assert verdict.trusted and verdict.ms_root


def test_not_signed(unsigned_cab: Path, signed_cab: Signed) -> None:
    verdict = verify_cab(unsigned_cab, signed_cab.trust)
    assert verdict.status is VerdictStatus.NOT_SIGNED
    assert verdict.digest_algorithm is None and verdict.chain == ()


def test_not_signed_with_empty_reserve(signed_cab: Signed, tmp_path: Path) -> None:
    offset, _ = signature_span(signed_cab.path)

    def strip(data: bytearray) -> None:
        del data[offset:]
        data[40:56] = bytes(16)

    path = write_variant(signed_cab.path, tmp_path / "empty.cab", strip)
    assert verify_cab(path, signed_cab.trust).status is VerdictStatus.NOT_SIGNED


def test_digest_mismatch(signed_cab: Signed, tmp_path: Path) -> None:
    offset, _ = signature_span(signed_cab.path)

    def flip(data: bytearray) -> None:
        data[offset - 1] ^= 0x01

    verdict = verify_cab(write_variant(signed_cab.path, tmp_path / "t.cab", flip), signed_cab.trust)
    assert verdict.status is VerdictStatus.DIGEST_MISMATCH
    assert verdict.reason == (
        "the CAB digest does not match the signed digest (file was modified after signing)"
    )
    assert verdict.digest_algorithm == "sha256" and verdict.signer_subject is not None


def test_bad_signer_signature(signed_cab: Signed, tmp_path: Path) -> None:
    offset, length = signature_span(signed_cab.path)
    blob = signed_cab.path.read_bytes()[offset : offset + length]
    value = cms.ContentInfo.load(blob)["content"]["signer_infos"][0]["signature"]
    at = offset + blob.index(value.native) + 10

    def flip(data: bytearray) -> None:
        data[at] ^= 0xFF

    verdict = verify_cab(write_variant(signed_cab.path, tmp_path / "t.cab", flip), signed_cab.trust)
    assert verdict.status is VerdictStatus.BAD_SIGNER_SIGNATURE
    assert "signature over the signed attributes" in verdict.reason


def test_bad_signer_signature_when_indirect_data_is_forged(
    signed_cab: Signed, tmp_path: Path
) -> None:
    """Rewriting the signed digest to match a modified file breaks the messageDigest link."""
    offset, length = signature_span(signed_cab.path)
    data = bytearray(signed_cab.path.read_bytes())
    parsed = parse_signature(bytes(data[offset : offset + length]))
    data[offset - 1] ^= 0x01
    with_modified = tmp_path / "m.cab"
    with_modified.write_bytes(bytes(data))
    with with_modified.open("rb") as f:
        new_digest = authenticode_digest(f, read_header(f, len(data)), offset, "sha256")
    at = offset + bytes(data[offset:]).index(parsed.digest)
    data[at : at + len(new_digest)] = new_digest
    with_modified.write_bytes(bytes(data))
    verdict = verify_cab(with_modified, signed_cab.trust)
    assert verdict.status is VerdictStatus.BAD_SIGNER_SIGNATURE
    assert "messageDigest" in verdict.reason


def test_untrusted_root(signed_cab: Signed, other_ca: LabCA) -> None:
    verdict = verify_cab(signed_cab.path, trust_for(other_ca))
    assert verdict.status is VerdictStatus.UNTRUSTED_ROOT
    assert verdict.root_subject is None and not verdict.ms_root
    # The chain as found: leaf, intermediate, and the (untrusted) root is not embedded.
    assert len(verdict.chain) == 2
    assert "not a trusted root" in verdict.reason


def test_untrusted_root_without_intermediate(
    tmp_path: Path, rsa_ca: LabCA, unsigned_cab: Path
) -> None:
    assert rsa_ca.intermediate_cert is not None
    signer = rsa_ca.signer()
    out = tmp_path / "s.cab"
    sign_cab(unsigned_cab, out, replace(signer, chain=()))
    verdict = verify_cab(out, trust_for(rsa_ca))
    assert verdict.status is VerdictStatus.UNTRUSTED_ROOT
    assert verdict.chain == (signer.cert,)


@pytest.fixture(scope="module")
def odd_cas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LabCA]:
    base = tmp_path_factory.mktemp("odd")
    day = dt.timedelta(days=1)
    return {
        "expired": make_odd_ca(
            base / "expired", leaf_not_before=now() - 10 * day, leaf_not_after=now() - day
        ),
        "future": make_odd_ca(base / "future", key_type="ecdsa", leaf_not_before=now() + day),
        "no_eku": make_odd_ca(base / "no-eku", leaf_eku=(), intermediate=False),
        "server_eku": make_odd_ca(base / "server-eku", leaf_eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
        "ca_eku": make_odd_ca(
            base / "ca-eku", key_type="ecdsa", intermediate_eku=[ExtendedKeyUsageOID.SERVER_AUTH]
        ),
    }


@pytest.mark.parametrize(
    ("name", "status", "words"),
    [
        ("expired", VerdictStatus.EXPIRED, "expired on"),
        ("future", VerdictStatus.NOT_YET_VALID, "valid only from"),
        ("no_eku", VerdictStatus.MISSING_CODE_SIGNING_EKU, "has no extendedKeyUsage"),
        ("server_eku", VerdictStatus.MISSING_CODE_SIGNING_EKU, "without codeSigning"),
        ("ca_eku", VerdictStatus.MISSING_CODE_SIGNING_EKU, "CA certificate"),
    ],
)
def test_certificate_problems(
    odd_cas: dict[str, LabCA],
    tmp_path: Path,
    unsigned_cab: Path,
    name: str,
    status: VerdictStatus,
    words: str,
) -> None:
    ca = odd_cas[name]
    out = tmp_path / "s.cab"
    sign_cab(unsigned_cab, out, ca.signer())
    verdict = verify_cab(out, trust_for(ca))
    assert verdict.status is status
    assert words in verdict.reason
    assert verdict.chain[-1] == root_of(ca)


def test_signing_time_decides_validity(
    odd_cas: dict[str, LabCA], tmp_path: Path, unsigned_cab: Path
) -> None:
    """An expired leaf is fine for a signature made while it was valid (per signingTime)."""
    ca = odd_cas["expired"]
    out = tmp_path / "s.cab"
    sign_cab(unsigned_cab, out, ca.signer(), signing_time=now() - dt.timedelta(days=5))
    verdict = verify_cab(out, trust_for(ca))
    assert verdict.trusted, verdict.reason
    assert verdict.signing_time is not None and verdict.signing_time < now()


def test_at_is_used_without_signing_time(
    odd_cas: dict[str, LabCA], tmp_path: Path, unsigned_cab: Path
) -> None:
    """signtool writes no signingTime attribute (osslsigncode always does); `at` decides then."""
    ca = odd_cas["expired"]
    signer = ca.signer()
    assert isinstance(signer.key, rsa.RSAPrivateKey)
    out = tmp_path / "s.cab"
    sign_cab(unsigned_cab, out, signer)
    offset, length = signature_span(out)
    data = out.read_bytes()
    info = cms.ContentInfo.load(data[offset : offset + length])
    signer_info = info["content"]["signer_infos"][0]
    attrs = cms.CMSAttributes(
        [a for a in signer_info["signed_attrs"] if a["type"].native != "signing_time"]
    )
    signature = signer.key.sign(attrs.dump(), padding.PKCS1v15(), hashes.SHA256())
    signer_info["signed_attrs"] = attrs
    signer_info["signature"] = signature
    blob = info.dump(force=True)
    blob += b"\0" * (-len(blob) % 8)
    rebuilt = bytearray(data[:offset] + blob)
    struct.pack_into("<I", rebuilt, 48, len(blob))
    out.write_bytes(bytes(rebuilt))
    verdict = verify_cab(out, trust_for(ca), at=now() - dt.timedelta(days=5))
    assert verdict.trusted and verdict.signing_time is None, verdict.reason
    assert verify_cab(out, trust_for(ca)).status is VerdictStatus.EXPIRED


@pytest.mark.parametrize(
    "case",
    ["garbage", "pointer_beyond_eof", "trailing_bytes", "bad_magic", "length_zero", "not_pkcs7"],
)
def test_malformed_signature(signed_cab: Signed, tmp_path: Path, case: str) -> None:
    offset, length = signature_span(signed_cab.path)

    def edit(data: bytearray) -> None:
        if case == "garbage":
            data[offset:] = os.urandom(length)
        elif case == "pointer_beyond_eof":
            struct.pack_into("<I", data, 44, len(data) + 4096)
        elif case == "trailing_bytes":
            data += b"tail"
        elif case == "bad_magic":
            data[42] = 0x11
        elif case == "length_zero":
            struct.pack_into("<I", data, 48, 0)
        elif case == "not_pkcs7":
            data[offset:] = b"\x30\x03\x02\x01\x01" + bytes(length - 5)

    verdict = verify_cab(write_variant(signed_cab.path, tmp_path / "t.cab", edit), signed_cab.trust)
    assert verdict.status is VerdictStatus.MALFORMED_SIGNATURE, verdict.reason


@pytest.mark.parametrize("case", ["random", "empty", "truncated_header", "truncated_folders"])
def test_not_a_cab(signed_cab: Signed, tmp_path: Path, case: str) -> None:
    data = signed_cab.path.read_bytes()
    content = {
        "random": os.urandom(4096),
        "empty": b"",
        "truncated_header": data[:30],
        "truncated_folders": data[:62],
    }[case]
    path = tmp_path / "x.cab"
    path.write_bytes(content)
    verdict = verify_cab(path, signed_cab.trust)
    assert verdict.status is VerdictStatus.NOT_A_CAB
    assert isinstance(verdict, Verdict) and not verdict.trusted


def test_every_byte_outside_the_signature_is_protected(signed_cab: Signed, tmp_path: Path) -> None:
    offset, _ = signature_span(signed_cab.path)
    original = signed_cab.path.read_bytes()
    target = tmp_path / "t.cab"
    for position in range(offset):
        data = bytearray(original)
        data[position] ^= 0x01
        target.write_bytes(bytes(data))
        verdict = verify_cab(target, signed_cab.trust)
        assert not verdict.trusted, f"flipping byte {position} went unnoticed"


def test_unreadable_path_raises_oserror(tmp_path: Path, signed_cab: Signed) -> None:
    with pytest.raises(OSError):
        verify_cab(tmp_path / "missing.cab", signed_cab.trust)
    with pytest.raises(OSError):
        verify_cab(tmp_path, signed_cab.trust)


def test_sign_rejects_non_cab(tmp_path: Path, rsa_ca: LabCA) -> None:
    src = tmp_path / "x.cab"
    src.write_bytes(b"not a cabinet at all, just text" * 4)
    with pytest.raises(CmlabError):
        sign_cab(src, tmp_path / "out.cab", rsa_ca.signer())
    assert not (tmp_path / "out.cab").exists() and not (tmp_path / "out.cab.tmp").exists()


def test_signer_validation(rsa_ca: LabCA, ecdsa_ca: LabCA, tmp_path: Path) -> None:
    with pytest.raises(SigningError, match="digest"):
        rsa_ca.signer("md5")
    rsa, ec = rsa_ca.signer(), ecdsa_ca.signer()
    with pytest.raises(SigningError, match="does not match"):
        Signer(key=rsa.key, cert=ec.cert)
    bundle = tmp_path / "bundle.pem"
    assert rsa_ca.intermediate_cert is not None
    bundle.write_bytes(rsa_ca.intermediate_cert.read_bytes() + rsa_ca.signing_cert.read_bytes())
    loaded = Signer.from_pem_files(rsa_ca.signing_key, bundle, digest="sha384")
    assert loaded.cert == rsa.cert and loaded.chain == rsa.chain and loaded.digest == "sha384"
    with pytest.raises(SigningError, match="no certificate matches"):
        Signer.from_pem_files(rsa_ca.signing_key, ecdsa_ca.signing_cert)
    pem = rsa.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    (tmp_path / "enc.key").write_bytes(pem)
    with pytest.raises(SigningError, match="unencrypted"):
        Signer.from_pem_files(tmp_path / "enc.key", rsa_ca.signing_cert)


def test_trust_store_from_pem_files(rsa_ca: LabCA, other_ca: LabCA, tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(rsa_ca.root_cert.read_bytes() + other_ca.root_cert.read_bytes())
    store = TrustStore.from_pem_files([both, rsa_ca.root_cert], [other_ca.root_cert])
    assert store.roots == (root_of(rsa_ca), root_of(other_ca))
    assert store.microsoft_roots == (root_of(other_ca),)
    (tmp_path / "junk.pem").write_text("nothing here")
    with pytest.raises(TrustStoreError):
        TrustStore.from_pem_files([tmp_path / "junk.pem"], [])


def test_empty_trust_store(signed_cab: Signed) -> None:
    verdict = verify_cab(signed_cab.path, TrustStore(roots=(), microsoft_roots=()))
    assert verdict.status is VerdictStatus.UNTRUSTED_ROOT
