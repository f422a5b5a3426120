"""CAB header parsing, the signature reserve and the Authenticode digest, checked against
osslsigncode's own output."""

from __future__ import annotations

import hashlib
import io
import re
import struct
import tracemalloc
from pathlib import Path

import cabarchive
import pytest

from cmlab.core.errors import CabError, SignatureFormatError
from cmlab.site.trust import LabCA, VerdictStatus, sign_cab, verify_cab
from cmlab.site.trust.cab_layout import (
    FLAG_RESERVE_PRESENT,
    RESERVE_GROWTH,
    CabHeader,
    NotACabError,
    authenticode_digest,
    locate_signature,
    plan_reserved_layout,
    read_header,
)
from tests.helpers.trust_helpers import (
    needs_osslsigncode,
    osslsigncode_sign,
    osslsigncode_verify,
    trust_for,
)

# Session fixtures (CAs, CABs) shared by all trust tests.
pytest_plugins = ["tests.helpers.trust_helpers"]


def header_of(data: bytes) -> CabHeader:
    return read_header(io.BytesIO(data), len(data))


def signature_offset(data: bytes) -> int:
    location = locate_signature(header_of(data))
    assert location is not None
    return location.offset


def test_unsigned_cab_header(unsigned_cab: Path) -> None:
    data = unsigned_cab.read_bytes()
    header = header_of(data)
    assert header.folder_count == 1 and header.file_count == 2
    assert not header.flags & FLAG_RESERVE_PRESENT
    assert header.coff_files == header.folders_end == 36 + 8
    assert locate_signature(header) is None


@needs_osslsigncode
def test_reserve_and_digest_match_osslsigncode(
    tmp_path: Path, rsa_ca: LabCA, unsigned_cab: Path
) -> None:
    theirs, ours = tmp_path / "theirs.cab", tmp_path / "ours.cab"
    osslsigncode_sign(rsa_ca, unsigned_cab, theirs)
    sign_cab(unsigned_cab, ours, rsa_ca.signer())
    a, b = theirs.read_bytes(), ours.read_bytes()
    hb = header_of(b)
    # Everything before the signature is byte-identical except the (unhashed) blob length.
    offset = signature_offset(a)
    assert offset == signature_offset(b) == len(unsigned_cab.read_bytes()) + 24
    assert a[:48] == b[:48] and a[52:offset] == b[52:offset]

    source = header_of(unsigned_cab.read_bytes())
    assert hb.cb_cabinet == source.cb_cabinet + RESERVE_GROWTH
    assert hb.coff_files == source.coff_files + RESERVE_GROWTH
    assert hb.folder_data_offsets() == [o + RESERVE_GROWTH for o in source.folder_data_offsets()]
    assert hb.flags == source.flags | FLAG_RESERVE_PRESENT
    assert b[36:44] == bytes.fromhex("1400000000001000")

    # The digest osslsigncode reports is the one cmlab computes.
    report = osslsigncode_verify(rsa_ca.root_cert, ours).stdout
    reported = re.search(r"Calculated message digest\s*:\s*([0-9A-F]+)", report)
    assert reported is not None
    with ours.open("rb") as f:
        digest = authenticode_digest(f, hb, offset, "sha256")
    assert digest.hex().upper() == reported.group(1)


def test_digest_skips_exactly_the_unhashed_fields(tmp_path: Path, rsa_ca: LabCA) -> None:
    signed = tmp_path / "s.cab"
    src = tmp_path / "u.cab"
    src.write_bytes(_tiny_cab())
    sign_cab(src, signed, rsa_ca.signer())
    data = signed.read_bytes()
    header = header_of(data)
    offset = signature_offset(data)
    expected = hashlib.sha256(data[0:4] + data[8:34] + data[56:offset]).digest()
    with signed.open("rb") as f:
        assert authenticode_digest(f, header, offset, "sha256") == expected


def test_resigning_replaces_the_signature(tmp_path: Path, rsa_ca: LabCA) -> None:
    src = tmp_path / "u.cab"
    src.write_bytes(_tiny_cab())
    once, twice = tmp_path / "once.cab", tmp_path / "twice.cab"
    sign_cab(src, once, rsa_ca.signer())
    sign_cab(once, twice, rsa_ca.signer("sha384"))
    a, b = once.read_bytes(), twice.read_bytes()
    offset = signature_offset(a)
    assert signature_offset(b) == offset
    assert a[:48] == b[:48] and a[52:offset] == b[52:offset]
    trust = trust_for(rsa_ca)
    verdict = verify_cab(twice, trust)
    assert verdict.status is VerdictStatus.TRUSTED and verdict.digest_algorithm == "sha384"
    # In place: src and dst may be the same file.
    sign_cab(twice, twice, rsa_ca.signer("sha1"))
    assert verify_cab(twice, trust).digest_algorithm == "sha1"
    assert not (tmp_path / "twice.cab.tmp").exists()


def test_signed_cab_still_extracts(tmp_path: Path, rsa_ca: LabCA) -> None:
    files = {"x.bin": bytes(range(256)) * 300, "y.txt": b"why\n"}
    arc = cabarchive.CabArchive()
    for name, data in files.items():
        arc[name] = cabarchive.CabFile(data)
    src, dst = tmp_path / "u.cab", tmp_path / "s.cab"
    src.write_bytes(arc.save(compress=True))
    sign_cab(src, dst, rsa_ca.signer())
    extracted = cabarchive.CabArchive(dst.read_bytes())
    assert {name: extracted[name].buf for name in files} == files


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than"),
        (b"MSCF" + bytes(20), "shorter than"),
        (b"PK\x03\x04" + bytes(60), "MSCF"),
        (b"MSCF\x01\x00\x00\x00" + bytes(60), "reserved1"),
    ],
)
def test_not_a_cab(data: bytes, message: str) -> None:
    with pytest.raises(NotACabError, match=message):
        header_of(data)


def test_truncated_folder_table() -> None:
    data = bytearray(_tiny_cab())
    struct.pack_into("<H", data, 26, 500)
    with pytest.raises(NotACabError, match="CFFOLDER"):
        header_of(bytes(data))


def test_foreign_reserve_cannot_be_signed() -> None:
    data = bytearray(_tiny_cab())
    # A 4-byte header reserve that is not the Authenticode one.
    reserved = data[:36] + struct.pack("<HBB", 4, 0, 0) + bytes(4) + data[36:]
    struct.pack_into("<H", reserved, 30, FLAG_RESERVE_PRESENT)
    struct.pack_into("<I", reserved, 16, struct.unpack_from("<I", data, 16)[0] + 8)
    struct.pack_into("<I", reserved, 44, struct.unpack_from("<I", data, 36)[0] + 8)
    header = header_of(bytes(reserved))
    assert locate_signature(header) is None
    with pytest.raises(CabError, match="not an Authenticode"):
        plan_reserved_layout(header)


def test_signature_pointer_beyond_eof(tmp_path: Path, rsa_ca: LabCA) -> None:
    src, dst = tmp_path / "u.cab", tmp_path / "s.cab"
    src.write_bytes(_tiny_cab())
    sign_cab(src, dst, rsa_ca.signer())
    data = bytearray(dst.read_bytes())
    struct.pack_into("<I", data, 44, len(data) + 100)
    with pytest.raises(SignatureFormatError, match="beyond the end"):
        locate_signature(header_of(bytes(data)))


def test_streaming_keeps_memory_flat(tmp_path: Path, rsa_ca: LabCA) -> None:
    """Sign and verify a 48 MiB cabinet while tracking Python allocations."""
    src, dst = tmp_path / "big.cab", tmp_path / "big-signed.cab"
    header = bytearray(_tiny_cab()[:44])
    size = 48 << 20
    struct.pack_into("<I", header, 8, size)
    with src.open("wb") as f:
        f.write(header)
        f.truncate(size)  # sparse: the body is never parsed, only hashed
    tracemalloc.start()
    try:
        sign_cab(src, dst, rsa_ca.signer())
        verdict = verify_cab(dst, trust_for(rsa_ca))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert verdict.status is VerdictStatus.TRUSTED
    assert peak < 8 << 20


def _tiny_cab() -> bytes:
    arc = cabarchive.CabArchive()
    arc["t.txt"] = cabarchive.CabFile(b"tiny")
    return arc.save(compress=False)
