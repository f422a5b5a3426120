"""cmlab.site.formats.replication and cmlab.site.file_replication: the instruction a parent
sends a child is parsed as hostile input
(strict
keys, types, sizes and names), package files are verified by size and SHA-256, and a PCK is
byte-identical every time it is built from the same content."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmlab.core.hashing import folder_hash, sha256_bytes
from cmlab.site.cab import extract_cab
from cmlab.site.content_library import ContentLibrary
from cmlab.site.file_replication import (
    DamagedPackage,
    build_pck,
    package_file_path,
    verify_package_file,
)
from cmlab.site.formats.replication import (
    INSTRUCTION_MAX,
    Instruction,
    Recovery,
    ReplicationFormatError,
    build_instruction,
    job_name,
    parse_instruction,
    parse_job_name,
    pck_name,
    read_instruction,
)
from cmlab.site.inbox import BadInput

HASH = "A" * 64
GOOD: dict[str, Any] = {
    "Job": "00000391",
    "JobType": "SWD",
    "SourceSite": "CAS",
    "DestSite": "PR1",
    "PackageID": "CAS10001",
    "Version": 1,
    "PackageGuid": "420E3E18-73C5-4BE9-88B0-6F1E30A012CA",
    "PackageName": "Configuration Manager Easy Setup Package",
    "Source": r"\\cas.cmlab.local\EasySetupPayLoad\420E3E18-73C5-4BE9-88B0-6F1E30A012CA",
    "PackageFile": r"C:\SMSPKG\CAS10001.PCK.1",
    "FileSize": 1234,
    "FileHash": HASH,
    "ContentHash": "B" * 64,
}
RECOVERY = {
    **GOOD,
    "JobType": "SiteRecovery",
    "DestSite": "SEC",
    "PackageID": "SEC",
    "PackageGuid": "",
    "PackageName": "Secondary Site Recovery",
    "Source": "",
    "PackageFile": r"C:\SMSPKG\SEC.RCV.1",
    "Recovery": {
        "Build": 9135,
        "Version": "5.00.9135.1000",
        "FullVersion": "5.00.9135.1006",
        "InstalledUpdates": ["420e3e18-73c5-4be9-88b0-6f1e30a012ca"],
    },
}


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_a_good_instruction_round_trips() -> None:
    instr = parse_instruction(encode(GOOD))
    assert instr.job == "00000391" and instr.job_id == 0x391
    assert (instr.package_id, instr.version, instr.file_size) == ("CAS10001", 1, 1234)
    assert instr.recovery is None
    assert parse_instruction(build_instruction(instr)) == instr


def test_a_site_recovery_instruction_round_trips() -> None:
    instr = parse_instruction(encode(RECOVERY))
    assert instr.recovery == Recovery(
        9135, "5.00.9135.1000", "5.00.9135.1006", ("420E3E18-73C5-4BE9-88B0-6F1E30A012CA",)
    )
    assert parse_instruction(build_instruction(instr)) == instr


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k != key}


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ([GOOD], "not a JSON object"),
        ("text", "not a JSON object"),
        (without("FileHash"), "has no FileHash"),
        ({**GOOD, "Extra": 1}, "unknown keys: Extra"),
        ({**GOOD, "Recovery": RECOVERY["Recovery"]}, "unknown keys: Recovery"),
        ({**GOOD, "Job": "391"}, "Job '391' is not 8 upper-case hex digits"),
        ({**GOOD, "Job": "0000039g"}, "is not 8 upper-case hex digits"),
        ({**GOOD, "Job": "00000000"}, "not a job ID"),
        ({**GOOD, "Job": 391}, "Job 'int' is not"),
        ({**GOOD, "JobType": "swd"}, "JobType 'swd' is not SWD or SiteRecovery"),
        ({**GOOD, "SourceSite": "CASX"}, "SourceSite 'CASX' is not a site code"),
        ({**GOOD, "DestSite": "../"}, "DestSite '../' is not a site code"),
        ({**GOOD, "DestSite": "CAS"}, "SourceSite and DestSite are both CAS"),
        ({**GOOD, "PackageID": "../../x"}, "PackageID '../../x' is not a PackageID"),
        ({**GOOD, "PackageID": "CAS1000Z"}, "is not a PackageID"),
        ({**GOOD, "Version": "1"}, "Version must be an integer"),
        ({**GOOD, "Version": True}, "Version must be an integer"),
        ({**GOOD, "Version": 0}, "Version must be an integer from 1"),
        ({**GOOD, "Version": 2**31}, "Version must be an integer"),
        ({**GOOD, "Version": 1.0}, "Version must be an integer"),
        ({**GOOD, "FileSize": -1}, "FileSize must be an integer from 0"),
        ({**GOOD, "FileSize": 2**64}, "FileSize must be an integer"),
        ({**GOOD, "FileHash": "a" * 64}, "FileHash"),
        ({**GOOD, "FileHash": "A" * 63}, "FileHash"),
        ({**GOOD, "ContentHash": None}, "ContentHash"),
        ({**GOOD, "PackageGuid": "not-a-guid"}, "PackageGuid 'not-a-guid' is not a GUID"),
        ({**GOOD, "PackageGuid": ""}, "PackageGuid '' is not a GUID"),
        ({**GOOD, "PackageName": "a/b"}, "PackageName contains a path separator"),
        ({**GOOD, "PackageName": "a\\b"}, "PackageName contains a path separator"),
        ({**GOOD, "PackageName": ""}, "PackageName is empty"),
        ({**GOOD, "PackageName": "x\x00y"}, "PackageName contains control characters"),
        ({**GOOD, "Source": ""}, "Source is empty"),
        ({**GOOD, "PackageFile": "x" * 1025}, "PackageFile is longer than 1024"),
        ({**GOOD, "PackageFile": "a\nb"}, "PackageFile contains control characters"),
        ({**RECOVERY, "PackageID": "CAS10001"}, "PackageID 'CAS10001' is not a site code"),
        ({**RECOVERY, "Recovery": None}, "Recovery must be an object"),
        ({**RECOVERY, "Recovery": {"Build": 1}}, "Recovery has no Version"),
        (
            {**RECOVERY, "Recovery": {**RECOVERY["Recovery"], "InstalledUpdates": ["x"]}},
            "is not a GUID",
        ),
        (
            {**RECOVERY, "Recovery": {**RECOVERY["Recovery"], "InstalledUpdates": "x"}},
            "InstalledUpdates must be a list",
        ),
        (
            {**RECOVERY, "Recovery": {**RECOVERY["Recovery"], "Version": "5.0;rm"}},
            "is not a version",
        ),
    ],
)
def test_malformed_instructions_are_refused(obj: Any, reason: str) -> None:
    with pytest.raises(ReplicationFormatError) as info:
        parse_instruction(encode(obj), where="00000391.INS")
    assert str(info.value).startswith("00000391.INS: ")
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"\xef\xbb\xbf" + encode(GOOD), "not valid JSON"),  # a BOM
        (encode(GOOD)[:-1], "not valid JSON"),
        (b'{"Job": "00000391", "Job": "00000392"}', "key 'Job' is given twice"),
        (encode(GOOD).replace(b"1234", b"NaN"), "NaN is not a JSON number"),
        (encode(GOOD).replace(b"1234", b"Infinity"), "Infinity is not a JSON number"),
        (b"[" * 40000 + b"]" * 40000, "larger than"),
        (b"[" * 30000 + b"]" * 30000, "nested too deeply"),
        (encode({**GOOD, "PackageFile": "x" * INSTRUCTION_MAX}), "larger than 65536 bytes"),
    ],
)
def test_hostile_bytes_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ReplicationFormatError, match="instruction: ") as info:
        parse_instruction(data)
    assert reason in str(info.value)


def test_every_truncation_is_refused() -> None:
    data = build_instruction(parse_instruction(encode(RECOVERY)))
    for end in range(len(data) - 1):  # the last byte is the newline
        with pytest.raises(ReplicationFormatError):
            parse_instruction(data[:end])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_bytes_only_ever_raise_bad_input(data: bytes) -> None:
    with contextlib.suppress(ReplicationFormatError):
        parse_instruction(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(RECOVERY)), json_values)
def test_fuzz_one_value_replaced(key: str, value: Any) -> None:
    """Any value in place of a good one gives an Instruction that builds again, or
    ReplicationFormatError."""
    obj = {**RECOVERY, key: value}
    try:
        instr = parse_instruction(encode(obj))
    except ReplicationFormatError:
        return
    assert parse_instruction(build_instruction(instr)) == instr


def test_build_refuses_what_parse_would() -> None:
    instr = parse_instruction(encode(GOOD))
    bad = Instruction(**{**instr.__dict__, "package_name": "a/b"})
    with pytest.raises(ValueError, match="path separator"):
        build_instruction(bad)


def test_read_instruction_never_follows_a_link_and_reads_at_most_the_cap(tmp_path: Path) -> None:
    good = tmp_path / "00000391.INS"
    good.write_bytes(encode(GOOD))
    assert read_instruction(good).job == "00000391"
    link = tmp_path / "00000392.INS"
    os.symlink(good, link)
    with pytest.raises(ReplicationFormatError, match="symbolic link"):
        read_instruction(link)
    (tmp_path / "dir.INS").mkdir()
    with pytest.raises(ReplicationFormatError, match="not a regular file"):
        read_instruction(tmp_path / "dir.INS")
    big = tmp_path / "00000393.INS"
    big.write_bytes(b" " * (10 * INSTRUCTION_MAX))
    with pytest.raises(ReplicationFormatError, match="larger than"):
        read_instruction(big)


# -- names -----------------------------------------------------------------------------------------


def test_names() -> None:
    assert pck_name("cas10001", 3) == "CAS10001.PCK.3"
    assert job_name(0x391) == "00000391"
    assert parse_job_name("0000abcd") == 0xABCD
    for bad in ("", "391", "000003911", "0000039G", "00000000", "0000 391", "٠٠٠٠٠٠٠١"):
        with pytest.raises(ReplicationFormatError):
            parse_job_name(bad)
    for args in (("../x", 1), ("CAS10001", 0), ("CAS10001", True)):
        with pytest.raises(ValueError):
            pck_name(*args)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        job_name(0)
    root = Path("/site")
    assert package_file_path(root, "SMSPKG/CAS10001.PCK.1") == root / "SMSPKG/CAS10001.PCK.1"
    for bad in ("SMSPKG/../db/site.db", "/etc/passwd", "db/site.db", "SMSPKG/a/b", "SMSPKG/.."):
        with pytest.raises(ValueError):
            package_file_path(root, bad)


# -- package files ---------------------------------------------------------------------------------


def test_verify_package_file(tmp_path: Path) -> None:
    data = os.urandom(5000)
    path = tmp_path / "ds_00000391.pkg"
    path.write_bytes(data)
    verify_package_file(path, len(data), sha256_bytes(data))
    verify_package_file(path, len(data), sha256_bytes(data).lower())
    with pytest.raises(DamagedPackage, match="4999"):
        verify_package_file(path, 4999, sha256_bytes(data))
    with pytest.raises(DamagedPackage, match="SHA-256"):
        verify_package_file(path, len(data), HASH)
    with pytest.raises(DamagedPackage, match="missing"):
        verify_package_file(tmp_path / "gone.pkg", 1, HASH)
    os.symlink(path, tmp_path / "link.pkg")
    with pytest.raises(DamagedPackage, match="symbolic link"):
        verify_package_file(tmp_path / "link.pkg", len(data), sha256_bytes(data))
    with pytest.raises(DamagedPackage, match="not a regular file"):
        verify_package_file(tmp_path, 0, HASH)
    assert issubclass(DamagedPackage, BadInput)


def test_pck_is_the_stored_content_and_byte_identical_when_rebuilt(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "a" / "b").mkdir(parents=True)
    (source / "a" / "b" / "one.bin").write_bytes(os.urandom(70_000))
    (source / "two.txt").write_text("two\n")
    library = ContentLibrary(tmp_path / "SCCMContentLib")
    snap = library.store_snapshot("CAS10001", 2, source)
    smspkg = tmp_path / "SMSPKG"
    first = build_pck(library, "CAS10001", 2, smspkg)
    assert first.path == smspkg / "CAS10001.PCK.2"
    data = first.path.read_bytes()
    assert (first.size, first.sha256) == (len(data), sha256_bytes(data))
    second = build_pck(library, "CAS10001", 2, smspkg)
    assert second == first and first.path.read_bytes() == data
    assert [p.name for p in smspkg.iterdir()] == ["CAS10001.PCK.2"]  # no temporaries left
    extract_cab(first.path, tmp_path / "out")
    assert folder_hash(tmp_path / "out") == snap.hash
