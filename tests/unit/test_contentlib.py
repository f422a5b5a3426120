"""cmlab.site.content_library: the SCCMContentLib store (docs/contentlib.md), on real files."""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmlab.core import flush
from cmlab.core.errors import ContentLibError
from cmlab.core.fs import remove_stale_tmp
from cmlab.core.hashing import folder_hash, sha256_bytes
from cmlab.site.content_library import ContentLibrary, Snapshot
from tests.helpers.site_files import temporaries

PKG = "CAS10001"
EXAMPLE_HASH = "30AB28253638EDB3D4870BCCACC3B9D528939F196532CA41E3BB213E0A57E474"
SHA_HELLO = "5891B5B522D5DF086D0FF0B110FBD9D21BB4FC7163AF34D08286A2E846F6BE03"
SHA_B = "DF7E70E5021544F4834BBEE64A9E3789FEBC4BE81470DF629CAD6DDB03320A5C"
SHA_EMPTY = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"
DAEMON = Path(__file__).resolve().parents[2] / "daemon"


def worked_example(root: Path) -> Path:
    """docs/formats.md, "Folder hash", worked example."""
    (root / "empty").mkdir(parents=True)
    (root / "sub").mkdir()
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "B.txt").write_bytes(b"B")
    (root / "sub" / "b.bin").write_bytes(b"")
    return root


def listing(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for a folder)."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return out


def blobs(lib: ContentLibrary) -> set[str]:
    return {p.name for p in lib.filelib.glob("*/*") if not p.name.endswith(".INI")}


class Crash(Exception):
    """Stands for the process dying at that point."""


# ---------------------------------------------------------------------------------------
# Layout and round trip


def test_hand_computed_hash_store_and_extract(tmp_path: Path) -> None:
    # The bytes fed to the folder hash, by hand, as in docs/formats.md.
    def h(data: bytes) -> bytes:
        return hashlib.sha256(data).hexdigest().upper().encode()

    fed = (
        b"B.txt\n" + h(b"B") + b"\n"
        b"a.txt\n" + h(b"hello\n") + b"\n"
        b"empty/\n"
        b"sub/b.bin\n" + h(b"") + b"\n"
    )
    assert hashlib.sha256(fed).hexdigest().upper() == EXAMPLE_HASH

    lib = ContentLibrary(tmp_path / "SCCMContentLib")
    snap = lib.store_snapshot(PKG, 1, worked_example(tmp_path / "src"))
    assert snap == Snapshot(PKG, 1, "CAS10001.1", EXAMPLE_HASH, files=3, size=7)
    assert lib.content_hash(PKG, 1) == EXAMPLE_HASH
    assert lib.snapshot_info(PKG, 1) == snap
    assert lib.current_version(PKG) == 1
    assert lib.verify(PKG, 1) == EXAMPLE_HASH
    (tmp_path / "staging").mkdir()
    assert lib.extract(PKG, 1, tmp_path / "staging" / "GUID") == EXAMPLE_HASH
    assert folder_hash(tmp_path / "staging" / "GUID") == EXAMPLE_HASH


def test_layout_and_ini_formats(tmp_path: Path) -> None:
    lib = ContentLibrary(tmp_path / "SCCMContentLib")
    lib.store_snapshot(PKG, 1, worked_example(tmp_path / "src"))
    root = lib.root
    assert (root / "PkgLib" / "CAS10001.INI").read_text() == "[Packages]\nCAS10001.1=\n"
    assert (root / "DataLib" / "CAS10001.1.INI").read_text() == (
        f"[Content]\nHash={EXAMPLE_HASH}\nSize=7\nFiles=3\nVersion=1\n"
    )
    tree = root / "DataLib" / "CAS10001.1"
    assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*")) == [
        "B.txt.INI",
        "a.txt.INI",
        "empty",
        "sub",
        "sub/b.bin.INI",
    ]
    assert (tree / "a.txt.INI").read_text() == f"[File]\nSize=6\nHash={SHA_HELLO}\n"
    assert (tree / "sub" / "b.bin.INI").read_text() == f"[File]\nSize=0\nHash={SHA_EMPTY}\n"
    assert (tree / "empty").is_dir() and not any((tree / "empty").iterdir())
    for sha, data in ((SHA_HELLO, b"hello\n"), (SHA_B, b"B"), (SHA_EMPTY, b"")):
        assert (root / "FileLib" / sha[:4] / sha).read_bytes() == data
        assert (root / "FileLib" / sha[:4] / f"{sha}.INI").read_text() == (
            "[File]\nLinks=CAS10001.1\n"
        )
    assert temporaries(root) == []


def test_round_trip_empty_folders_empty_files_and_a_multi_mib_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "deep" / "er" / "empty").mkdir(parents=True)
    (src / "SMSSetup" / "bin" / "x64").mkdir(parents=True)
    (src / "zero").write_bytes(b"")
    (src / "deep" / "zero").write_bytes(b"")
    big = os.urandom(2 * 1024 * 1024 + 777)  # crosses the 1 MiB chunk twice
    (src / "SMSSetup" / "bin" / "x64" / "cmupdate.exe").write_bytes(big)
    (src / "é non-ASCII.txt").write_bytes(b"x")
    lib = ContentLibrary(tmp_path / "lib")
    seen: list[str] = []
    snap = lib.store_snapshot(PKG, 1, src, on_file=seen.append)
    assert seen == [
        "SMSSetup/bin/x64/cmupdate.exe",
        "deep/zero",
        "zero",
        "é non-ASCII.txt",
    ]
    assert (snap.files, snap.size) == (4, len(big) + 1)
    assert snap.hash == folder_hash(src)

    calls: list[tuple[int, int]] = []
    dest = tmp_path / "CMUStaging" / "GUID"
    dest.parent.mkdir()
    assert lib.extract(PKG, 1, dest, progress=lambda d, t: calls.append((d, t))) == snap.hash
    assert folder_hash(dest) == snap.hash
    assert (dest / "deep" / "er" / "empty").is_dir()
    assert (dest / "SMSSetup" / "bin" / "x64" / "cmupdate.exe").read_bytes() == big
    # Progress: starts at 0, never goes back, ends at the total, in chunks of at most 1 MiB.
    assert calls[0] == (0, snap.size) and calls[-1] == (snap.size, snap.size)
    done = [d for d, _ in calls]
    assert done == sorted(done) and len(calls) >= 4
    assert max(b - a for a, b in itertools.pairwise(done)) <= 1024 * 1024
    # An independent copy, not a hard link into the library.
    exe = dest / "SMSSetup" / "bin" / "x64" / "cmupdate.exe"
    assert exe.stat().st_nlink == 1
    assert oct(dest.stat().st_mode & 0o777) == "0o755"
    assert temporaries(tmp_path) == []


def test_empty_source_folder(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    lib = ContentLibrary(tmp_path / "lib")
    snap = lib.store_snapshot(PKG, 1, tmp_path / "src")
    assert (snap.hash, snap.files, snap.size) == (SHA_EMPTY, 0, 0)
    assert lib.extract(PKG, 1, tmp_path / "out") == SHA_EMPTY
    assert list((tmp_path / "out").iterdir()) == []


def test_ini_named_source_files_are_described_without_ambiguity(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "x.INI.INI").mkdir(parents=True)  # a folder that looks like a definition's name
    (src / "x").write_bytes(b"1")
    (src / "x.INI").write_bytes(b"2")  # described as x.INI.INI... beside the folder above
    lib = ContentLibrary(tmp_path / "lib")
    with pytest.raises(ContentLibError, match="cannot both be stored"):
        lib.store_snapshot(PKG, 1, src)
    (src / "x.INI.INI").rmdir()
    (src / "y.INI").mkdir()  # a folder y.INI with no file y: fine
    (src / "y.INI" / "z").write_bytes(b"3")
    snap = lib.store_snapshot(PKG, 1, src)
    assert lib.extract(PKG, 1, tmp_path / "out") == snap.hash == folder_hash(src)


# ---------------------------------------------------------------------------------------
# Single instance, versions, idempotence


def test_two_versions_share_one_blob(tmp_path: Path) -> None:
    lib = ContentLibrary(tmp_path / "lib")
    v1 = worked_example(tmp_path / "v1")
    v2 = worked_example(tmp_path / "v2")
    (v2 / "B.txt").write_bytes(b"B2")
    (v2 / "copy-of-a.txt").write_bytes(b"hello\n")  # same content, again within v2
    lib.store_snapshot(PKG, 1, v1)
    before = blobs(lib)
    snap2 = lib.store_snapshot(PKG, 2, v2)
    assert blobs(lib) == before | {sha256_bytes(b"B2")}  # one new blob, the rest shared
    links = lib.filelib / SHA_HELLO[:4] / f"{SHA_HELLO}.INI"
    assert links.read_text() == "[File]\nLinks=CAS10001.1,CAS10001.2\n"
    assert lib.current_version(PKG) == 2
    # Version 1 is untouched by version 2.
    assert lib.verify(PKG, 1) == EXAMPLE_HASH
    assert lib.verify(PKG, 2) == snap2.hash == folder_hash(v2)


def test_store_again_is_idempotent(tmp_path: Path) -> None:
    lib = ContentLibrary(tmp_path / "lib")
    src = worked_example(tmp_path / "src")
    first = lib.store_snapshot(PKG, 1, src)
    before = listing(lib.root)
    calls: list[str] = []
    assert lib.store_snapshot(PKG, 1, src, on_file=calls.append) == first
    assert listing(lib.root) == before
    assert calls == []  # nothing was copied: the version was stored already


def test_retaking_a_version_with_changed_content_replaces_it(tmp_path: Path) -> None:
    lib = ContentLibrary(tmp_path / "lib")
    src = worked_example(tmp_path / "src")
    lib.store_snapshot(PKG, 1, src)
    (src / "a.txt").write_bytes(b"changed\n")
    snap = lib.store_snapshot(PKG, 1, src)
    assert snap.hash == folder_hash(src) != EXAMPLE_HASH
    assert lib.verify(PKG, 1) == snap.hash
    lib.remove_old_versions(PKG, 1)  # drops the link to the old a.txt, and its data
    assert SHA_HELLO not in blobs(lib)
    assert lib.verify(PKG, 1) == snap.hash


def test_remove_old_versions_keeps_shared_blob(tmp_path: Path) -> None:
    lib = ContentLibrary(tmp_path / "lib")
    v1 = worked_example(tmp_path / "v1")
    v2 = worked_example(tmp_path / "v2")
    (v2 / "B.txt").write_bytes(b"B2")
    lib.store_snapshot(PKG, 1, v1)
    other = lib.store_snapshot("PRI20001", 1, v2)  # another package shares a.txt too
    snap = lib.store_snapshot(PKG, 2, v2)
    with pytest.raises(ContentLibError, match="only the current version"):
        lib.remove_old_versions(PKG, 1)
    assert lib.snapshot_info(PKG, 1) is not None
    lib.remove_old_versions(PKG, 2)
    assert lib.snapshot_info(PKG, 1) is None
    assert not (lib.datalib / "CAS10001.1").exists()
    assert SHA_B not in blobs(lib) and not (lib.filelib / SHA_B[:4]).exists()
    assert SHA_HELLO in blobs(lib)
    links = lib.filelib / SHA_HELLO[:4] / f"{SHA_HELLO}.INI"
    assert links.read_text() == "[File]\nLinks=CAS10001.2,PRI20001.1\n"
    assert lib.verify(PKG, 2) == snap.hash
    assert lib.verify("PRI20001", 1) == other.hash
    before = listing(lib.root)
    lib.remove_old_versions(PKG, 2)
    assert listing(lib.root) == before


def test_ids_and_versions_are_checked(tmp_path: Path) -> None:
    lib = ContentLibrary(tmp_path / "lib")
    src = worked_example(tmp_path / "src")
    for pkg in ("cas10001", "CAS1000G", "CAS1000", "CAS100011", "../10001", "CAS10001\n", ""):
        with pytest.raises(ContentLibError, match="not a package ID"):
            lib.store_snapshot(pkg, 1, src)
        with pytest.raises(ContentLibError):
            lib.current_version(pkg)
    for version in (0, -1, True, 2**31, "1", 1.0):
        with pytest.raises(ContentLibError, match="not a content version"):
            lib.store_snapshot(PKG, version, src)  # type: ignore[arg-type]
    assert not lib.root.exists()
    assert lib.current_version("XYZ0ABCD") is None
    assert lib.snapshot_info(PKG, 1) is None
    with pytest.raises(ContentLibError, match="not in the content library"):
        lib.content_hash(PKG, 1)
    with pytest.raises(ContentLibError, match="not in the content library"):
        lib.verify(PKG, 1)


# ---------------------------------------------------------------------------------------
# Hostile source, tampered library


@pytest.mark.parametrize("kind", ["symlink", "dirlink", "fifo", "linebreak", "missing", "root"])
def test_store_refuses_hostile_source_and_writes_nothing(tmp_path: Path, kind: str) -> None:
    src = worked_example(tmp_path / "src")
    if kind == "symlink":
        (src / "sub" / "passwd").symlink_to("/etc/passwd")
    elif kind == "dirlink":
        (src / "etc").symlink_to("/etc")
    elif kind == "fifo":
        os.mkfifo(src / "fifo")
    elif kind == "linebreak":
        (src / "evil\nname").write_bytes(b"")
    elif kind == "missing":
        src = tmp_path / "nowhere"
    else:
        (tmp_path / "srclink").symlink_to(src)
        src = tmp_path / "srclink"
    lib = ContentLibrary(tmp_path / "lib")
    with pytest.raises(ContentLibError):
        lib.store_snapshot(PKG, 1, src)
    assert not lib.root.exists() or listing(lib.root) == {
        "DataLib": None,
        "FileLib": None,
        "PkgLib": None,
    }


def stored(tmp_path: Path) -> ContentLibrary:
    lib = ContentLibrary(tmp_path / "lib")
    lib.store_snapshot(PKG, 1, worked_example(tmp_path / "src"))
    return lib


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_damaged_blob_fails_verify_and_extract(tmp_path: Path, damage: str) -> None:
    lib = stored(tmp_path)
    blob = lib.filelib / SHA_HELLO[:4] / SHA_HELLO
    if damage == "garbage":
        blob.write_bytes(b"hellO\n")
        expect = "a.txt: its FileLib data is corrupt"
    else:
        blob.unlink()
        expect = "a.txt: its FileLib data .* is missing"
    with pytest.raises(ContentLibError, match=expect):
        lib.verify(PKG, 1)
    dest = tmp_path / "staging" / "GUID"
    dest.parent.mkdir()
    with pytest.raises(ContentLibError, match=expect):
        lib.extract(PKG, 1, dest)
    assert list(dest.parent.iterdir()) == []  # no dest, no temporary beside it
    # Storing the same content again repairs the data in place.
    (tmp_path / "src2").mkdir()
    (tmp_path / "src2" / "a.txt").write_bytes(b"hello\n")
    lib.store_snapshot(PKG, 2, tmp_path / "src2")
    assert lib.verify(PKG, 1) == EXAMPLE_HASH
    assert lib.extract(PKG, 1, dest) == EXAMPLE_HASH


def test_oversized_blob_is_not_copied_whole(tmp_path: Path) -> None:
    lib = stored(tmp_path)
    with (lib.filelib / SHA_B[:4] / SHA_B).open("ab") as f:
        f.truncate(50 * 1024 * 1024)  # sparse: 50 MiB appended to a 1-byte file
    calls: list[tuple[int, int]] = []
    with pytest.raises(ContentLibError, match=r"B\.txt: its FileLib data is corrupt"):
        lib.extract(PKG, 1, tmp_path / "out", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] <= 7 + 1024 * 1024  # stopped after one chunk
    assert not (tmp_path / "out").exists()
    assert temporaries(tmp_path) == []


def test_extract_refuses_an_existing_destination(tmp_path: Path) -> None:
    lib = stored(tmp_path)
    (tmp_path / "exists").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    for name in ("exists", "link", "dangling"):
        with pytest.raises(ContentLibError, match="already exists"):
            lib.extract(PKG, 1, tmp_path / name)
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert list((tmp_path / "exists").iterdir()) == []
    with pytest.raises(ContentLibError, match="does not exist"):
        lib.extract(PKG, 1, tmp_path / "no" / "parent")
    with pytest.raises(ContentLibError, match="not in the content library"):
        lib.extract(PKG, 2, tmp_path / "v2")
    assert not (tmp_path / "v2").exists()


CONTENT_INI = f"[Content]\nHash={EXAMPLE_HASH}\nSize=7\nFiles=3\nVersion=1\n"


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("", "empty or truncated"),
        (CONTENT_INI[:30], "truncated"),
        (CONTENT_INI.replace("Version=1\n", ""), "truncated: no Version"),
        ("\x00\xff garbage", "not UTF-8"),
        ("garbage\n[Content]\n", "expected \\[Content\\]"),
        (CONTENT_INI.replace(EXAMPLE_HASH, "../../../../etc/passwd"), "not 64 upper-case hex"),
        (CONTENT_INI.replace(EXAMPLE_HASH, EXAMPLE_HASH[:63]), "not 64 upper-case hex"),
        (CONTENT_INI.replace(EXAMPLE_HASH, EXAMPLE_HASH.lower()), "not 64 upper-case hex"),
        (CONTENT_INI.replace("Size=7", "Size=-7"), "not a number"),
        (CONTENT_INI.replace("Version=1", "Version=2"), "not 1"),
        (CONTENT_INI + "Hash=" + EXAMPLE_HASH + "\n", "given twice"),
        (CONTENT_INI + "Path=/etc\n", "unexpected"),
    ],
)
def test_tampered_content_definition(tmp_path: Path, text: str, expect: str) -> None:
    lib = stored(tmp_path)
    (lib.datalib / "CAS10001.1.INI").write_bytes(text.encode("latin-1"))
    with pytest.raises(ContentLibError, match=expect):
        lib.snapshot_info(PKG, 1)
    with pytest.raises(ContentLibError):
        lib.extract(PKG, 1, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_content_definition_that_lies_about_the_tree(tmp_path: Path) -> None:
    lib = stored(tmp_path)
    (lib.datalib / "CAS10001.1.INI").write_text(CONTENT_INI.replace("Size=7", "Size=8"))
    with pytest.raises(ContentLibError, match="does not match its definition"):
        lib.verify(PKG, 1)


@pytest.mark.parametrize(
    "tamper",
    [
        "bad-hash",
        "traversal-hash",
        "other-hash",
        "dropped",
        "added",
        "symlink",
        "bare",
        "fifo",
        "file-and-folder",
    ],
)
def test_tampered_datalib_tree(tmp_path: Path, tamper: str) -> None:
    lib = stored(tmp_path)
    tree = lib.datalib / "CAS10001.1"
    definition = tree / "a.txt.INI"
    outside = tmp_path / "outside"
    outside.mkdir()
    if tamper == "bad-hash":
        definition.write_text("[File]\nSize=6\nHash=XYZ\n")
    elif tamper == "traversal-hash":
        definition.write_text("[File]\nSize=6\nHash=../../../outside/x\n")
    elif tamper == "other-hash":  # a real blob, another file's: the folder hash changes
        definition.write_text(f"[File]\nSize=1\nHash={SHA_B}\n")
    elif tamper == "dropped":
        definition.unlink()
    elif tamper == "added":
        (tree / "empty" / "extra.INI").write_text(f"[File]\nSize=1\nHash={SHA_B}\n")
    elif tamper == "symlink":
        (tree / "sub" / "escape").symlink_to(outside)
    elif tamper == "bare":
        (tree / "no-definition-suffix").write_text("[File]\n")
    elif tamper == "fifo":
        os.mkfifo(tree / "fifo.INI")
    else:  # sub/b.bin.INI also as a folder sub/b.bin/
        (tree / "sub" / "b.bin" / "x").mkdir(parents=True)
    with pytest.raises(ContentLibError):
        lib.verify(PKG, 1)
    with pytest.raises(ContentLibError):
        lib.extract(PKG, 1, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(outside.iterdir()) == []
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[Packages]\n",
        "[Packages]\nCAS10001.1=\nCAS10001.2=\n",
        "[Packages]\nCAS10002.1=\n",
        "[Packages]\nCAS10001.1=x\n",
        "[Packages]\nCAS10001.0=\n",
        "[Content]\nCAS10001.1=\n",
    ],
)
def test_garbage_package_definition(tmp_path: Path, text: str) -> None:
    lib = stored(tmp_path)
    (lib.pkglib / "CAS10001.INI").write_text(text)
    with pytest.raises(ContentLibError):
        lib.current_version(PKG)


def test_links_file_damage_is_reported_not_overwritten(tmp_path: Path) -> None:
    lib = stored(tmp_path)
    links = lib.filelib / SHA_HELLO[:4] / f"{SHA_HELLO}.INI"
    links.write_text("[File]\nLinks=CAS10001.1,../x\n")
    with pytest.raises(ContentLibError, match="not a content ID"):
        lib.store_snapshot(PKG, 2, worked_example(tmp_path / "v2"))
    assert links.read_text() == "[File]\nLinks=CAS10001.1,../x\n"
    assert lib.current_version(PKG) == 1


def test_concurrent_stores_sharing_data(tmp_path: Path) -> None:
    src = worked_example(tmp_path / "src")
    libs = [ContentLibrary(tmp_path / "lib") for _ in range(4)]
    pkgs = ["CAS10001", "CAS10002", "PRI00003", "PRI00004"]
    errors: list[BaseException] = []

    def store(lib: ContentLibrary, pkg: str) -> None:
        try:
            for version in (1, 2, 3):
                lib.store_snapshot(pkg, version, src)
                lib.remove_old_versions(pkg, version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=store, args=a) for a in zip(libs, pkgs, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    links = libs[0].filelib / SHA_HELLO[:4] / f"{SHA_HELLO}.INI"
    assert links.read_text() == "[File]\nLinks=CAS10001.3,CAS10002.3,PRI00003.3,PRI00004.3\n"
    for pkg in pkgs:
        assert libs[0].verify(pkg, 3) == EXAMPLE_HASH


# ---------------------------------------------------------------------------------------
# Durability: one flush per phase, not one per file


def many_files(root: Path, n: int, tag: bytes) -> Path:
    """`n` files of distinct content in a few nested folders, and an empty folder."""
    (root / "empty").mkdir(parents=True)
    for i in range(n):
        folder = root / f"d{i % 4}" / "sub"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i}.bin").write_bytes(tag + b"-%d" % i)
    return root


class Flushes:
    """Counts os.fsync and syncfs calls, each still made for real, and fsyncs per inode.
    With `syncfs` False, syncfs reports itself unavailable: the fsync fallback runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, syncfs: bool) -> None:
        self.fsyncs = self.syncfs = 0
        self.per_inode: Counter[tuple[int, int]] = Counter()
        real_fsync, real_syncfs = os.fsync, flush.syncfs

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            self.per_inode[st.st_dev, st.st_ino] += 1
            self.fsyncs += 1
            real_fsync(fd)

        def flush_fs(fd: int) -> bool:
            if not syncfs:
                return False
            self.syncfs += 1
            return real_syncfs(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(flush, "syncfs", flush_fs)

    def take(self) -> tuple[int, int]:
        counts = (self.fsyncs, self.syncfs)
        self.fsyncs = self.syncfs = 0
        self.per_inode.clear()
        return counts


def test_a_store_flushes_once_per_phase_whatever_its_file_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if not flush.syncfs(probe):
            pytest.skip("no syncfs on this system (the fallback is tested below)")
    finally:
        os.close(probe)
    lib = ContentLibrary(tmp_path / "lib")
    lib.store_snapshot(PKG, 1, worked_example(tmp_path / "v1"))  # makes the library's folders
    flushes = Flushes(monkeypatch, syncfs=True)
    small = many_files(tmp_path / "small", 3, b"small")
    large = many_files(tmp_path / "large", 60, b"large")
    costs = []
    # New data; new data again, 20 times the files; the same data as a new version (every
    # blob reused: the single-instance path).
    for version, src in ((2, small), (3, large), (4, large)):
        flushes.take()
        lib.store_snapshot(PKG, version, src)
        store = flushes.take()
        assert lib.extract(PKG, version, tmp_path / f"out{version}") == folder_hash(src)
        costs.append((store, flushes.take()))
    # Store: syncfs for the data, its Links and the DataLib tree, syncfs for the renames, then
    # the definition and PkgLib, each fsynced with its folder. Extraction: one syncfs, then
    # the destination's folder after the rename.
    assert costs == [((4, 2), (1, 1))] * 3
    assert lib.verify(PKG, 3) == lib.verify(PKG, 4) == folder_hash(large)


def test_without_syncfs_every_file_and_folder_is_fsynced_once_per_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = ContentLibrary(tmp_path / "lib")
    lib.store_snapshot(PKG, 1, worked_example(tmp_path / "v1"))
    flushes = Flushes(monkeypatch, syncfs=False)
    n = 60
    src = many_files(tmp_path / "src", n, b"new")
    flushes.take()
    lib.store_snapshot(PKG, 2, src)
    # Each file's data, Links and DataLib .INI once; the FileLib prefix folders (one per
    # distinct data, mostly) once per flush; the tree's 10 folders; FileLib, DataLib, the
    # definition, PkgLib. The code this replaced made 6.5 fsyncs per file, 390 here.
    prefixes = len({sha256_bytes(f.read_bytes())[:4] for f in src.rglob("*.bin")})
    assert max(flushes.per_inode.values()) <= 2  # once per flush, at most
    assert flushes.take() == (3 * n + 2 * prefixes + 17, 0)
    lib.extract(PKG, 2, tmp_path / "out")
    assert max(flushes.per_inode.values()) == 1
    assert flushes.take() == (n + 11, 0)  # the files, the 10 folders, the destination's
    assert lib.verify(PKG, 2) == folder_hash(src)


# ---------------------------------------------------------------------------------------
# Interrupted stores


def test_store_interrupted_by_an_exception_then_completed(tmp_path: Path) -> None:
    lib = ContentLibrary(tmp_path / "lib")
    v1 = worked_example(tmp_path / "v1")
    lib.store_snapshot(PKG, 1, v1)
    v2 = worked_example(tmp_path / "v2")
    (v2 / "new.bin").write_bytes(b"new")

    def crash_at_second(rel: str) -> None:
        if rel == "a.txt":
            raise Crash(rel)

    with pytest.raises(Crash):
        lib.store_snapshot(PKG, 2, v2, on_file=crash_at_second)
    # Version 2 does not exist; version 1 is current and whole; the process cleaned up.
    assert lib.snapshot_info(PKG, 2) is None
    assert lib.current_version(PKG) == 1
    assert lib.extract(PKG, 1, tmp_path / "out1") == EXAMPLE_HASH
    assert temporaries(tmp_path) == []

    snap = lib.store_snapshot(PKG, 2, v2)
    assert lib.current_version(PKG) == 2
    assert lib.verify(PKG, 2) == snap.hash == folder_hash(v2)
    # Same library as one uninterrupted run would have made.
    clean = ContentLibrary(tmp_path / "clean")
    clean.store_snapshot(PKG, 1, v1)
    clean.store_snapshot(PKG, 2, v2)
    assert listing(lib.root) == listing(clean.root)


STORE = """
import sys
from pathlib import Path
from cmlab.site.content_library import ContentLibrary
ContentLibrary(Path(sys.argv[1])).store_snapshot("CAS10001", 2, Path(sys.argv[2]))
"""


@pytest.mark.parametrize(
    "point",
    [
        "contentlib.after_file:1",
        "contentlib.after_file:3",
        "contentlib.after_data:1",  # one new blob in place, the other still temporary
        "contentlib.after_tree",
        "contentlib.after_content_ini",
    ],
)
def test_store_killed_at_any_point_is_completed_by_the_next_call(
    tmp_path: Path, point: str
) -> None:
    lib = ContentLibrary(tmp_path / "lib")
    v1 = worked_example(tmp_path / "v1")
    lib.store_snapshot(PKG, 1, v1)
    v2 = worked_example(tmp_path / "v2")
    (v2 / "B.txt").write_bytes(b"B2")
    (v2 / "new" / "deeper").mkdir(parents=True)
    (v2 / "new" / "deeper" / "c.bin").write_bytes(os.urandom(3000))

    env = {**os.environ, "PYTHONPATH": str(DAEMON), "CMLAB_CRASHPOINTS": point}
    proc = subprocess.run(
        [sys.executable, "-c", STORE, str(lib.root), str(v2)], env=env, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL

    # Whatever was on disk at the kill: version 1 is current and whole.
    assert lib.current_version(PKG) == 1
    assert lib.verify(PKG, 1) == EXAMPLE_HASH
    if point == "contentlib.after_content_ini":
        assert lib.snapshot_info(PKG, 2) is not None  # stored, not yet current
    else:
        assert lib.snapshot_info(PKG, 2) is None
    if point.startswith(("contentlib.after_file", "contentlib.after_data")):
        assert temporaries(lib.root)  # the killed process's tree in the making
    # The daemon's start-up sweep clears what the dead process left.
    remove_stale_tmp(lib.root, recursive=True)
    assert temporaries(lib.root) == []

    snap = lib.store_snapshot(PKG, 2, v2)
    assert lib.current_version(PKG) == 2
    assert lib.verify(PKG, 2) == snap.hash == folder_hash(v2)
    assert lib.verify(PKG, 1) == EXAMPLE_HASH
    assert temporaries(lib.root) == []
    lib.remove_old_versions(PKG, 2)
    clean = ContentLibrary(tmp_path / "clean")
    clean.store_snapshot(PKG, 2, v2)
    assert listing(lib.root) == listing(clean.root)


# ---------------------------------------------------------------------------------------
# Property: extract(store(tree)) has the tree's folder hash


names = st.text(alphabet="aBIN.-_é", min_size=1, max_size=6).filter(
    lambda n: n not in {".", ".."} and not n.startswith(".~")
)
trees = st.recursive(
    st.binary(max_size=64),
    lambda children: st.dictionaries(names, children, max_size=4),
    max_leaves=8,
)


def build(root: Path, tree: dict[str, object]) -> None:
    root.mkdir()
    for name, node in tree.items():
        if isinstance(node, bytes):
            (root / name).write_bytes(node)
        else:
            build(root / name, node)  # type: ignore[arg-type]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=st.dictionaries(names, trees, max_size=5))
def test_property_extract_of_store_has_the_same_folder_hash(tree: dict[str, object]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        build(base / "src", tree)
        lib = ContentLibrary(base / "lib")
        try:
            snap = lib.store_snapshot(PKG, 1, base / "src")
        except ContentLibError as exc:
            assert "cannot both be stored" in str(exc)  # a file x beside a folder x.INI
            return
        assert snap.hash == folder_hash(base / "src")
        assert lib.extract(PKG, 1, base / "out") == snap.hash
        assert folder_hash(base / "out") == snap.hash
        assert lib.verify(PKG, 1) == snap.hash
