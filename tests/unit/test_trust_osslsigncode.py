"""Interoperability with osslsigncode 2.9, both ways, and tamper detection by both tools."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cabarchive
import pytest

from cmlab.site.trust import LabCA, VerdictStatus, sign_cab, verify_cab
from cmlab.site.trust.cab_layout import locate_signature, read_header
from tests.helpers.trust_helpers import (
    OSSLSIGNCODE,
    make_multi_folder_cab,
    needs_osslsigncode,
    osslsigncode_sign,
    osslsigncode_verify,
    trust_for,
)

pytestmark = needs_osslsigncode

# Header bytes that neither the digest nor osslsigncode's parser looks at: iCabinet (34-35)
# and the reserve's bytes 52-55. Only cmlab pins them, so a flip there is cmlab-only.
OSSLSIGNCODE_BLIND_SPOTS = {34, 35, 52, 53, 54, 55}

CASES = [
    ("rsa_ca", "sha256"),
    ("rsa_ca", "sha384"),
    ("ecdsa_ca", "sha256"),
    ("ecdsa_ca", "sha384"),
]

# Session fixtures (CAs, CABs) shared by all trust tests.
pytest_plugins = ["tests.helpers.trust_helpers"]


def signature_offset(path: Path) -> int:
    with path.open("rb") as f:
        location = locate_signature(read_header(f, path.stat().st_size))
    assert location is not None
    return location.offset


@pytest.mark.parametrize(("ca_name", "digest"), CASES)
def test_osslsigncode_signed_verifies_in_cmlab(
    request: pytest.FixtureRequest, tmp_path: Path, unsigned_cab: Path, ca_name: str, digest: str
) -> None:
    ca: LabCA = request.getfixturevalue(ca_name)
    assert ca.intermediate_cert is not None
    signed = tmp_path / "s.cab"
    osslsigncode_sign(ca, unsigned_cab, signed, digest)
    verdict = verify_cab(signed, trust_for(ca))
    assert verdict.status is VerdictStatus.TRUSTED, verdict.reason
    assert verdict.digest_algorithm == digest
    assert len(verdict.chain) == 3  # leaf, intermediate from the blob, root from the store


@pytest.mark.parametrize(("ca_name", "digest"), CASES)
def test_cmlab_signed_verifies_in_osslsigncode(
    request: pytest.FixtureRequest, tmp_path: Path, unsigned_cab: Path, ca_name: str, digest: str
) -> None:
    ca: LabCA = request.getfixturevalue(ca_name)
    signed = tmp_path / "s.cab"
    sign_cab(unsigned_cab, signed, ca.signer(digest))
    result = osslsigncode_verify(ca.root_cert, signed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Signature verification: ok" in result.stdout
    assert f"Message digest algorithm  : {digest.upper()}" in result.stdout


def test_osslsigncode_sha1(tmp_path: Path, unsigned_cab: Path, rsa_ca: LabCA) -> None:
    theirs, ours = tmp_path / "theirs.cab", tmp_path / "ours.cab"
    osslsigncode_sign(rsa_ca, unsigned_cab, theirs, "sha1")
    assert verify_cab(theirs, trust_for(rsa_ca)).digest_algorithm == "sha1"
    assert verify_cab(theirs, trust_for(rsa_ca)).trusted
    sign_cab(unsigned_cab, ours, rsa_ca.signer("sha1"))
    assert osslsigncode_verify(rsa_ca.root_cert, ours).returncode == 0


def test_osslsigncode_rejects_wrong_root(
    tmp_path: Path, unsigned_cab: Path, rsa_ca: LabCA, ecdsa_ca: LabCA
) -> None:
    """The positive interop tests mean something: osslsigncode does check the root."""
    signed = tmp_path / "s.cab"
    sign_cab(unsigned_cab, signed, rsa_ca.signer())
    assert osslsigncode_verify(ecdsa_ca.root_cert, signed).returncode != 0


@pytest.mark.parametrize("signed_by", ["cmlab", "osslsigncode"])
def test_one_byte_change_is_rejected_by_both(
    tmp_path: Path, unsigned_cab: Path, rsa_ca: LabCA, signed_by: str
) -> None:
    signed = tmp_path / "s.cab"
    if signed_by == "cmlab":
        sign_cab(unsigned_cab, signed, rsa_ca.signer())
    else:
        osslsigncode_sign(rsa_ca, unsigned_cab, signed)
    trust = trust_for(rsa_ca)
    assert verify_cab(signed, trust).trusted
    assert osslsigncode_verify(rsa_ca.root_cert, signed).returncode == 0

    original = signed.read_bytes()
    offset = signature_offset(signed)
    tampered = tmp_path / "t.cab"
    missed = []
    for position in range(offset):
        data = bytearray(original)
        data[position] ^= 0x01
        tampered.write_bytes(bytes(data))
        if verify_cab(tampered, trust).trusted:
            missed.append(("cmlab", position))
        checked_by_osslsigncode = position not in OSSLSIGNCODE_BLIND_SPOTS
        if (
            checked_by_osslsigncode
            and osslsigncode_verify(rsa_ca.root_cert, tampered).returncode == 0
        ):
            missed.append(("osslsigncode", position))
    assert missed == []


def test_several_folders_both_ways(tmp_path: Path, rsa_ca: LabCA) -> None:
    """Each CFFOLDER's coffCabStart moves by 24 bytes; both tools and an extractor agree."""
    folders = [
        {"a.txt": b"A" * 40000, "b.txt": b"bee"},
        {"c.bin": bytes(range(256)) * 200},
        {"d.txt": b"last folder"},
    ]
    unsigned = make_multi_folder_cab(tmp_path / "u.cab", folders)
    ours, theirs = tmp_path / "ours.cab", tmp_path / "theirs.cab"
    sign_cab(unsigned, ours, rsa_ca.signer())
    osslsigncode_sign(rsa_ca, unsigned, theirs)
    a, b = ours.read_bytes(), theirs.read_bytes()
    offset = signature_offset(ours)
    assert offset == signature_offset(theirs)
    assert a[:48] == b[:48] and a[52:offset] == b[52:offset]
    assert verify_cab(theirs, trust_for(rsa_ca)).trusted
    assert osslsigncode_verify(rsa_ca.root_cert, ours).returncode == 0
    extracted = cabarchive.CabArchive(a)
    assert {n: extracted[n].buf for n in extracted} == {
        n: d for folder in folders for n, d in folder.items()
    }


def test_osslsigncode_remove_signature_restores_the_original(
    tmp_path: Path, rsa_ca: LabCA, unsigned_cab: Path
) -> None:
    """Adding the reserve is exactly the inverse of osslsigncode's removal of it."""
    signed, restored = tmp_path / "s.cab", tmp_path / "r.cab"
    sign_cab(unsigned_cab, signed, rsa_ca.signer())
    assert OSSLSIGNCODE is not None
    subprocess.run(
        [OSSLSIGNCODE, "remove-signature", "-in", str(signed), "-out", str(restored)],
        check=True,
        capture_output=True,
    )
    assert restored.read_bytes() == unsigned_cab.read_bytes()
