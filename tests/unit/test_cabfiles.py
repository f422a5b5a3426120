"""cmlab.site.cab: safe extraction of real and hostile cabinets, and creation."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import struct
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmlab.core.errors import CabError, CabLimitError, CabPathError, CmlabError
from cmlab.site import cab as cabfiles
from cmlab.site.cab import (
    CabEntry,
    ExtractLimits,
    create_cab,
    extract_cab,
    extract_cab_into,
    list_cab,
    normalize_member_name,
)

# ---------------------------------------------------------------------------------------
# A minimal CAB writer that, unlike cabarchive, writes whatever it is told: hostile names,
# lying sizes and offsets, header flags. One folder; stored (0) or MSZIP (1) blocks.


def raw_cab(
    entries: list[tuple[bytes, bytes]],
    *,
    comp: int = 0,
    sizes: list[int] | None = None,
    offsets: list[int] | None = None,
    flags: int = 0,
    attribs: int = 0x20,
    checksums: bool = True,
) -> bytes:
    data = b"".join(content for _, content in entries)
    chunks = [data[i : i + 0x8000] for i in range(0, len(data), 0x8000)] or []
    blocks = []
    for chunk in chunks:
        if comp == 1:
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            payload = b"CK" + c.compress(chunk) + c.flush()
        else:
            payload = chunk
        csum = _checksum(payload, struct.pack("<HH", len(payload), len(chunk))) if checksums else 0
        blocks.append(struct.pack("<IHH", csum, len(payload), len(chunk)) + payload)
    extra = b""
    if flags & 0x1:
        extra += b"prev.cab\0disk\0"
    if flags & 0x2:
        extra += b"next.cab\0disk\0"
    cffiles = b""
    offset = 0
    for i, (name, content) in enumerate(entries):
        size = sizes[i] if sizes else len(content)
        off = offsets[i] if offsets else offset
        cffiles += struct.pack("<IIHHHH", size, off, 0, 0x5A21, 0x6000, attribs) + name + b"\0"
        offset += len(content)
    header_len = 36 + len(extra)
    coff_files = header_len + 8
    coff_data = coff_files + len(cffiles)
    body = b"".join(blocks)
    total = coff_data + len(body)
    header = struct.pack(
        "<4sIIIIIBBHHHHH", b"MSCF", 0, total, 0, coff_files, 0, 3, 1, 1, len(entries), flags, 7, 0
    )
    folder = struct.pack("<IHH", coff_data, len(blocks), comp)
    return header + extra + folder + cffiles + body


def _checksum(data: bytes, tail: bytes) -> int:
    """The CFDATA checksum (MS-CAB 2.6), over the data then cbData/cbUncomp."""

    def fold(buf: bytes, seed: int) -> int:
        csum = seed
        n = len(buf) // 4
        for (word,) in struct.iter_unpack("<I", buf[: n * 4]):
            csum ^= word
        rest = buf[n * 4 :]
        ul = 0
        if len(rest) == 3:
            ul = rest[0] << 16 | rest[1] << 8 | rest[2]
        elif len(rest) == 2:
            ul = rest[0] << 8 | rest[1]
        elif len(rest) == 1:
            ul = rest[0]
        return csum ^ ul

    return fold(tail, fold(data, 0))


# ---------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(params=["libmspack", "pylibmspack"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the one-pass libmspack reader and with the per-member fallback."""
    if request.param == "libmspack":
        if cabfiles._load_libmspack() is None:
            pytest.skip("libmspack could not be loaded through ctypes")
        monkeypatch.setattr(cabfiles, "_USE_LIBMSPACK_DIRECT", True)
    else:
        monkeypatch.setattr(cabfiles, "_USE_LIBMSPACK_DIRECT", False)
    return request.param


def tree(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        assert not p.is_symlink()
        if p.is_file():
            out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


SAMPLE = {
    "SMSSetup\\update.map": b"BEGIN_COMPONENT_FILELIST\r\n" * 10,
    "SMSSetup/bin/x64/cmupdate.exe": random.Random(1).randbytes(100_000),
    "SMSSetup\\bin\\x64\\empty.msi": b"",
    "splash.hta": b"<html>cmlab</html>",
    "CMUClient/ccmsetup.exe": b"x" * 70_000,
    "Dossier/\u00e9t\u00e9.txt": b"unicode name",
}


def expected_tree(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k.replace("\\", "/"): v for k, v in files.items()}


# ---------------------------------------------------------------------------------------
# Round trips


def test_roundtrip_mszip(tmp_path: Path, backend: str) -> None:
    cab = tmp_path / "p.cab"
    create_cab(SAMPLE, cab)
    assert cab.read_bytes()[:4] == b"MSCF"
    listed = list_cab(cab)
    assert {e.path for e in listed} == set(expected_tree(SAMPLE))
    assert all("/" not in e.name for e in listed)
    by_path = {e.path: e for e in listed}
    assert by_path["SMSSetup/bin/x64/cmupdate.exe"] == CabEntry(
        "SMSSetup\\bin\\x64\\cmupdate.exe", "SMSSetup/bin/x64/cmupdate.exe", 100_000
    )
    seen: list[CabEntry] = []
    entries = extract_cab(cab, tmp_path / "out", on_file=seen.append)
    assert tree(tmp_path / "out") == expected_tree(SAMPLE)
    assert entries == listed
    assert sorted(seen, key=lambda e: e.path) == sorted(listed, key=lambda e: e.path)
    assert leftovers(tmp_path) == []
    # the stored DOS timestamp becomes the file's mtime
    stamp = (tmp_path / "out" / "splash.hta").stat().st_mtime
    assert time.gmtime(stamp)[:3] == (2000, 1, 1)


def test_roundtrip_stored_blocks_from_raw_writer(tmp_path: Path, backend: str) -> None:
    files = [(b"a\\one.bin", os.urandom(50_000)), (b"two.txt", b"hello")]
    cab = tmp_path / "s.cab"
    cab.write_bytes(raw_cab(files))
    extract_cab(cab, tmp_path / "out")
    assert tree(tmp_path / "out") == {"a/one.bin": files[0][1], "two.txt": b"hello"}


def _libmspack_test_cabs() -> dict[str, bytes]:
    try:
        from pylibmspack import vendor
    except ImportError:
        return {}
    tarballs = list(Path(vendor.__file__).parent.glob("libmspack*.tar.gz"))
    if not tarballs:
        return {}
    out = {}
    with tarfile.open(tarballs[0]) as tar:
        for member in tar.getmembers():
            if "/test/test_files/cabd/" in member.name and member.name.endswith(".cab"):
                f = tar.extractfile(member)
                if f is not None:
                    out[Path(member.name).name] = f.read()
    return out


LIBMSPACK_CABS = _libmspack_test_cabs()


def test_lzx_and_quantum_from_libmspack_test_corpus(tmp_path: Path, backend: str) -> None:
    """No LZX compressor is available here; libmspack's own test cabinet (MSZIP, LZX and
    Quantum folders) with the MD5s its test suite expects stands in."""
    if "mszip_lzx_qtm.cab" not in LIBMSPACK_CABS:
        pytest.skip("libmspack test corpus not shipped with pylibmspack")
    cab = tmp_path / "mszip_lzx_qtm.cab"
    cab.write_bytes(LIBMSPACK_CABS["mszip_lzx_qtm.cab"])
    entries = extract_cab(cab, tmp_path / "out")
    assert [e.path for e in entries] == ["mszip.txt", "lzx.txt", "qtm.txt"]
    out = tmp_path / "out"
    md5 = {e.path: hashlib.md5((out / e.path).read_bytes()).hexdigest() for e in entries}
    assert md5 == {
        "mszip.txt": "940cba86658fbceb582faecd2b5975d1",
        "lzx.txt": "703474293b614e7110b3eb8ac2762b53",
        "qtm.txt": "98fcfa4962a0f169a3c7fdbcb445cf17",
    }


@pytest.mark.parametrize("name", sorted(LIBMSPACK_CABS) or ["none"])
def test_libmspack_corpus_returns_or_raises_cmlab_errors(tmp_path: Path, name: str) -> None:
    """Every cabinet of libmspack's test suite (CVE reproducers, truncations, bad folder
    indices, multi-part sets) is either extracted or refused with a CmlabError."""
    if name == "none":
        pytest.skip("libmspack test corpus not shipped with pylibmspack")
    cab = tmp_path / name
    cab.write_bytes(LIBMSPACK_CABS[name])
    try:
        list_cab(cab)
        extract_cab(cab, tmp_path / "out", limits=ExtractLimits(max_total_size=64 * 1024**2))
    except CmlabError:
        assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_many_files_in_one_folder(tmp_path: Path) -> None:
    """2,000 files in one MSZIP folder: libmspack decodes the folder once (see module doc);
    the per-member API took 35 s for this."""
    rnd = random.Random(7)
    files = {f"d\\f{i:05}.bin": rnd.randbytes(1024) + b"z" * 3072 for i in range(2000)}
    cab = tmp_path / "many.cab"
    create_cab(files, cab)
    started = time.perf_counter()
    entries = extract_cab(cab, tmp_path / "out")
    elapsed = time.perf_counter() - started
    assert len(entries) == 2000
    assert (tmp_path / "out" / "d" / "f01999.bin").read_bytes() == files["d\\f01999.bin"]
    print(f"extracted 2000 files in {elapsed:.2f}s")


# ---------------------------------------------------------------------------------------
# Replacement semantics


def test_existing_dest_is_replaced_whole(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    (dest / "stale").mkdir(parents=True)
    (dest / "stale" / "old.txt").write_text("old")
    cab = tmp_path / "p.cab"
    create_cab({"new.txt": b"new"}, cab)
    extract_cab(cab, dest)
    assert tree(dest) == {"new.txt": b"new"}
    assert leftovers(tmp_path) == []


def test_dest_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    dest = tmp_path / "out"
    dest.symlink_to(target)
    cab = tmp_path / "p.cab"
    create_cab({"new.txt": b"new"}, cab)
    extract_cab(cab, dest)
    assert not dest.is_symlink()
    assert tree(dest) == {"new.txt": b"new"}
    assert tree(target) == {"keep.txt": b"keep"}


def test_failed_extraction_keeps_existing_dest(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    good = tmp_path / "good.cab"
    create_cab({"a.bin": os.urandom(200_000)}, good)
    bad = tmp_path / "bad.cab"
    bad.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CabError):
        extract_cab(bad, dest)
    assert tree(dest) == {"old.txt": b"old"}
    assert leftovers(tmp_path) == []


def test_extract_into_replaces_top_level_entries_and_keeps_siblings(
    tmp_path: Path, backend: str
) -> None:
    staging = tmp_path / "CMUStaging"
    (staging / "OTHER-GUID").mkdir(parents=True)
    (staging / "OTHER-GUID" / "x.txt").write_text("other package")
    (staging / "ApplicabilityChecks").mkdir()
    (staging / "ApplicabilityChecks" / "stale.sql").write_text("stale")
    (staging / "Manifest.xml").write_text("<old/>")
    cab = tmp_path / "ConfigMgr.Update.Manifest.cab"
    create_cab(
        {"Manifest.xml": b"<new/>", "ApplicabilityChecks\\CM2509_AppCheck.sql": b"SELECT 1;"},
        cab,
    )
    seen: list[str] = []
    entries = extract_cab_into(cab, staging, on_file=lambda e: seen.append(e.path))
    assert sorted(seen) == sorted(e.path for e in entries)
    assert tree(staging) == {
        "ApplicabilityChecks/CM2509_AppCheck.sql": b"SELECT 1;",
        "Manifest.xml": b"<new/>",
        "OTHER-GUID/x.txt": b"other package",
    }
    assert not [p for p in staging.iterdir() if p.name.startswith(".")]


def test_extract_into_file_replaces_folder_of_same_name(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    (dest / "thing").mkdir(parents=True)
    (dest / "thing" / "inner").write_text("x")
    cab = tmp_path / "c.cab"
    create_cab({"thing": b"now a file"}, cab)
    extract_cab_into(cab, dest)
    assert (dest / "thing").read_bytes() == b"now a file"
    assert [p.name for p in dest.iterdir()] == ["thing"]


def test_symlinked_cab_is_not_followed(tmp_path: Path) -> None:
    cab = tmp_path / "real.cab"
    create_cab({"a": b"a"}, cab)
    link = tmp_path / "link.cab"
    link.symlink_to(cab)
    with pytest.raises(CabPathError, match="symbolic link"):
        list_cab(link)
    with pytest.raises(CabPathError):
        extract_cab(link, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# Hostile cabinets


HOSTILE_NAMES = [
    b"..\\evil.txt",
    b"../evil.txt",
    b"a\\..\\..\\evil.txt",
    b"a/../../evil.txt",
    b"\\abs.txt",
    b"/etc/evil",
    b"\\\\server\\share\\x",
    b"C:\\Windows\\evil.dll",
    b"C:evil.dll",
    b"ok.txt:stream",
    b"a\\\\b.txt",
    b"a\\.\\b.txt",
    b"dir\\",
    b"..",
    b"bell\x07.txt",
]


@pytest.mark.parametrize("bad", HOSTILE_NAMES, ids=lambda b: repr(b)[2:-1])
def test_hostile_names_are_refused_before_anything_is_written(
    tmp_path: Path, bad: bytes, backend: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    cab = work / "hostile.cab"
    cab.write_bytes(raw_cab([(b"good.txt", b"fine"), (bad, b"pwned")]))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(CabPathError):
        list_cab(cab)
    called: list[CabEntry] = []
    with pytest.raises(CabPathError):
        extract_cab(cab, work / "dest" / "out", on_file=called.append)
    with pytest.raises(CabPathError):
        extract_cab_into(cab, work / "into", on_file=called.append)
    assert called == []
    # validation comes first: not even the destination folders were created
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not list(tmp_path.rglob("evil*")) and not list(tmp_path.rglob("pwned"))


def test_nul_and_empty_names_rejected_by_normalizer() -> None:
    for bad in ("", "a\x00b", "a\\\x00"):
        with pytest.raises(CabPathError):
            normalize_member_name(bad)
    assert normalize_member_name("SMSSetup\\bin\\x64\\a.dll") == "SMSSetup/bin/x64/a.dll"


@pytest.mark.parametrize(
    "names",
    [
        [b"same.txt", b"same.txt"],
        [b"Same.txt", b"sAME.TXT"],
        [b"a\\b.txt", b"a/b.txt"],
        [b"thing", b"thing\\inside.txt"],
        [b"THING\\inside.txt", b"thing"],
    ],
)
def test_duplicate_and_clashing_names(tmp_path: Path, names: list[bytes]) -> None:
    cab = tmp_path / "dup.cab"
    cab.write_bytes(raw_cab([(n, b"x") for n in names]))
    with pytest.raises(CabPathError):
        extract_cab(cab, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_non_utf8_name_without_flag_is_read_as_cp437(tmp_path: Path) -> None:
    cab = tmp_path / "oem.cab"
    cab.write_bytes(raw_cab([(b"caf\x82.txt", b"x")]))
    assert list_cab(cab)[0].path == "caf\u00e9.txt"
    cab.write_bytes(raw_cab([(b"caf\x82.txt", b"x")], attribs=0xA0))
    with pytest.raises(CabPathError, match="UTF-8"):
        list_cab(cab)


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        (ExtractLimits(max_files=2), "3 files exceed"),
        (ExtractLimits(max_file_size=999), "per-file limit"),
        (ExtractLimits(max_total_size=2500), "over the limit"),
    ],
)
def test_caps_are_checked_before_writing(
    tmp_path: Path, limits: ExtractLimits, match: str, backend: str
) -> None:
    cab = tmp_path / "c.cab"
    create_cab({"a": b"a" * 1000, "b": b"b" * 1000, "c": b"c" * 1000}, cab)
    called: list[CabEntry] = []
    with pytest.raises(CabLimitError, match=match):
        extract_cab(cab, tmp_path / "out", limits=limits, on_file=called.append)
    assert called == []
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_lying_declared_sizes(tmp_path: Path) -> None:
    """A header that declares far more data than the cabinet holds: over the cap it is
    refused up front; under the cap the missing data is a CabError, not a short file."""
    cab = tmp_path / "bomb.cab"
    cab.write_bytes(raw_cab([(b"big.bin", b"tiny")], sizes=[1536 * 1024**2]))
    with pytest.raises(CabLimitError):
        extract_cab(cab, tmp_path / "out", limits=ExtractLimits(max_file_size=1024**2))
    with pytest.raises(CabError, match="missing"):
        extract_cab(cab, tmp_path / "out")
    # more than one CAB folder can ever hold: impossible, so corrupt rather than over-cap
    cab.write_bytes(raw_cab([(b"big.bin", b"tiny")], sizes=[3 * 1024**3]))
    with pytest.raises(CabError, match="beyond"):
        extract_cab(cab, tmp_path / "out")
    cab.write_bytes(raw_cab([(b"big.bin", b"tiny")], sizes=[40_000]))
    with pytest.raises(CabError):
        extract_cab(cab, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_far_offset_counts_against_the_cap(tmp_path: Path) -> None:
    """One byte at offset 1 GiB would make libmspack decode 1 GiB to reach it."""
    cab = tmp_path / "far.cab"
    cab.write_bytes(raw_cab([(b"far.bin", b"x")], offsets=[1024**3]))
    with pytest.raises(CabLimitError, match="decompress"):
        extract_cab(cab, tmp_path / "out", limits=ExtractLimits(max_total_size=1024**2))


def test_overlapping_entries_are_refused(tmp_path: Path) -> None:
    cab = tmp_path / "overlap.cab"
    cab.write_bytes(
        raw_cab([(b"a", b"x" * 100), (b"b", b"y" * 100)], offsets=[0, 50], sizes=[100, 100])
    )
    with pytest.raises(CabError, match="overlaps"):
        list_cab(cab)


@pytest.mark.parametrize("flags", [0x1, 0x2, 0x3])
def test_multi_cabinet_sets_are_refused(tmp_path: Path, flags: int) -> None:
    cab = tmp_path / "part.cab"
    cab.write_bytes(raw_cab([(b"a", b"x")], flags=flags))
    with pytest.raises(CabError, match="multi-cabinet"):
        extract_cab(cab, tmp_path / "out")


def _valid_mszip_cab(tmp_path: Path) -> bytes:
    cab = tmp_path / "valid.cab"
    rnd = random.Random(3)
    create_cab(
        {"one.bin": rnd.randbytes(40_000), "dir\\two.txt": b"two " * 20_000, "three": b"3"}, cab
    )
    return cab.read_bytes()


def test_truncated_cabinets(tmp_path: Path, backend: str) -> None:
    data = _valid_mszip_cab(tmp_path)
    cuts = [0, 3, 4, 20, 35, 36, 43, 44, 60, 90, 200, 1000, len(data) // 2, len(data) - 1]
    for cut in cuts:
        cab = tmp_path / f"cut{cut}.cab"
        cab.write_bytes(data[:cut])
        with pytest.raises(CabError):
            extract_cab(cab, tmp_path / "out")
        assert not (tmp_path / "out").exists(), cut
        assert leftovers(tmp_path) == [], cut


def test_flipped_bytes_in_compressed_data(tmp_path: Path, backend: str) -> None:
    data = _valid_mszip_cab(tmp_path)
    coff_data = struct.unpack_from("<I", data, 36)[0]
    rnd = random.Random(5)
    for i in range(12):
        pos = rnd.randrange(coff_data + 10, len(data))
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        cab = tmp_path / f"flip{i}.cab"
        cab.write_bytes(bytes(bad))
        with pytest.raises(CabError, match=r"checksum|corrupt"):
            extract_cab(cab, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_corrupt_deflate_without_checksums(tmp_path: Path) -> None:
    """With checksums off, libmspack's MSZIP decoder itself must catch the damage."""
    good = raw_cab([(b"a.txt", b"hello world " * 5000)], comp=1, checksums=False)
    coff_data = struct.unpack_from("<I", good, 36 + 8 - 8)[0]
    bad = bytearray(good)
    start = coff_data + 8  # CFDATA header, then the "CK" signature
    bad[start : start + 2] = b"XX"
    cab = tmp_path / "nock.cab"
    cab.write_bytes(bytes(bad))
    with pytest.raises(CabError, match="corrupt"):
        extract_cab(cab, tmp_path / "out")


@pytest.mark.parametrize("content", [b"", b"MSCF", b"PK\x03\x04" + b"\0" * 100, os.urandom(4096)])
def test_not_a_cabinet(tmp_path: Path, content: bytes) -> None:
    cab = tmp_path / "x.cab"
    cab.write_bytes(content)
    with pytest.raises(CabError):
        list_cab(cab)


def test_unknown_compression_is_refused(tmp_path: Path) -> None:
    cab = tmp_path / "c.cab"
    cab.write_bytes(raw_cab([(b"a", b"x")], comp=7))
    with pytest.raises(CabError, match="compression"):
        list_cab(cab)


# ---------------------------------------------------------------------------------------
# Fuzz: random mutations of valid cabinets


def _seed_cabs() -> list[bytes]:
    with tempfile.TemporaryDirectory() as d:
        cab = Path(d) / "seed.cab"
        create_cab({"a.txt": b"alpha " * 3000, "b\\c.bin": bytes(range(256)) * 40}, cab)
        seeds = [cab.read_bytes()]
    seeds.append(raw_cab([(b"x.txt", b"stored data"), (b"y\\z", b"more")]))
    seeds.append(raw_cab([(b"m.txt", b"mszip " * 100)], comp=1))
    return seeds


SEEDS = _seed_cabs()


@st.composite
def mutated_cab(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "set", "word", "cut", "insert"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if not data:
            break
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "word" and pos + 4 <= len(data):
            # header fields are little-endian words: aim at them too
            value = draw(st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            data[pos : pos + 4] = struct.pack("<I", value)
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated_cab())
def test_fuzz_mutated_cabs_raise_only_cmlab_errors(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        cab = root / "m.cab"
        cab.write_bytes(data)
        with contextlib.suppress(CmlabError):
            list_cab(cab)
        small = ExtractLimits(max_files=50, max_file_size=1024**2, max_total_size=4 * 1024**2)
        try:
            extract_cab(cab, root / "out", limits=small)
        except CmlabError:
            assert not (root / "out").exists()
        assert sorted(p.name for p in root.iterdir()) in (["m.cab"], ["m.cab", "out"])


# ---------------------------------------------------------------------------------------
# create_cab


def test_create_is_deterministic_and_atomic(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"from a file")
    files: dict[str, Path | bytes] = {"b/x.txt": b"bytes", "a\\from_file.bin": src}
    create_cab(files, tmp_path / "one.cab")
    create_cab(files, tmp_path / "two.cab")
    assert (tmp_path / "one.cab").read_bytes() == (tmp_path / "two.cab").read_bytes()
    assert [e.name for e in list_cab(tmp_path / "one.cab")] == ["a\\from_file.bin", "b\\x.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.cab", "src.bin", "two.cab"]


def test_create_honours_source_date_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(1_700_000_000))
    create_cab({"a": b"a"}, tmp_path / "a.cab")
    extract_cab(tmp_path / "a.cab", tmp_path / "out")
    assert abs((tmp_path / "out" / "a").stat().st_mtime - 1_700_000_000) <= 2


@pytest.mark.parametrize(
    "files",
    [
        {"../evil": b"x"},
        {"C:\\evil": b"x"},
        {"/abs": b"x"},
        {"a": b"x", "A": b"y"},
        {"a": b"x", "a/b": b"y"},
    ],
)
def test_create_refuses_bad_names(tmp_path: Path, files: dict[str, bytes]) -> None:
    with pytest.raises(CabPathError):
        create_cab(files, tmp_path / "x.cab")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_create_refuses_empty_and_links(tmp_path: Path) -> None:
    with pytest.raises(CabError):
        create_cab({}, tmp_path / "x.cab")
    real = tmp_path / "real"
    real.write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(OSError):
        create_cab({"a": link}, tmp_path / "x.cab")
    assert not (tmp_path / "x.cab").exists()


def test_create_empty_files_only(tmp_path: Path) -> None:
    create_cab({"empty1": b"", "d\\empty2": b""}, tmp_path / "e.cab")
    extract_cab(tmp_path / "e.cab", tmp_path / "out")
    assert tree(tmp_path / "out") == {"d/empty2": b"", "empty1": b""}


def test_raw_writer_checksum_matches_cabarchive(tmp_path: Path) -> None:
    """Guards the test's own CAB writer: its checksums agree with cabarchive's."""
    from cabarchive.utils import _checksum_compute

    payload = os.urandom(1001)
    tail = struct.pack("<HH", 1001, 1001)
    assert _checksum(payload, tail) == _checksum_compute(tail, _checksum_compute(payload))
    assert io.BytesIO(raw_cab([(b"a", payload)])).read(4) == b"MSCF"


def test_on_file_failure_cleans_up(tmp_path: Path) -> None:
    cab = tmp_path / "c.cab"
    create_cab({"a": b"a", "b": b"b"}, cab)

    def boom(entry: CabEntry) -> None:
        raise RuntimeError(f"callback failed on {entry.path}")

    with pytest.raises(RuntimeError, match="callback failed"):
        extract_cab(cab, tmp_path / "out", on_file=boom)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(RuntimeError):
        extract_cab_into(cab, into, on_file=boom)
    assert list(into.iterdir()) == []


def test_extract_into_replaces_a_link_without_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    dest = tmp_path / "staging"
    dest.mkdir()
    (dest / "pkg").symlink_to(victim)
    cab = tmp_path / "c.cab"
    create_cab({"pkg\\new.txt": b"new"}, cab)
    extract_cab_into(cab, dest)
    assert not (dest / "pkg").is_symlink()
    assert tree(dest) == {"pkg/new.txt": b"new"}
    assert tree(victim) == {"keep.txt": b"keep"}
