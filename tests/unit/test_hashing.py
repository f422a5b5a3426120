"""cmlab.core.hashing: SHA-256 of files and the folder hash of docs/formats.md."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cmlab.core.errors import CabPathError, CmlabError
from cmlab.core.hashing import EMPTY_SHA256, folder_hash, sha256_bytes, sha256_file, staging_hash


def test_empty_sha256() -> None:
    assert hashlib.sha256(b"").hexdigest().upper() == EMPTY_SHA256
    assert sha256_bytes(b"") == EMPTY_SHA256


def test_sha256_file_streams_a_multi_mib_file(tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 12345)  # not a multiple of the 1 MiB chunk
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest().upper()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == EMPTY_SHA256


def make_example(root: Path) -> None:
    """The worked example of docs/formats.md, "Folder hash"."""
    (root / "empty").mkdir(parents=True)
    (root / "sub").mkdir()
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "B.txt").write_bytes(b"B")
    (root / "sub" / "b.bin").write_bytes(b"")


def test_folder_hash_hand_computed(tmp_path: Path) -> None:
    make_example(tmp_path)

    def h(data: bytes) -> bytes:
        return hashlib.sha256(data).hexdigest().upper().encode()

    # Sorted bytewise: "B.txt" < "a.txt" < "empty" < "sub/b.bin"; the empty folder gets "/".
    fed = (
        b"B.txt\n" + h(b"B") + b"\n"
        b"a.txt\n" + h(b"hello\n") + b"\n"
        b"empty/\n"
        b"sub/b.bin\n" + h(b"") + b"\n"
    )
    expected = "30AB28253638EDB3D4870BCCACC3B9D528939F196532CA41E3BB213E0A57E474"
    assert hashlib.sha256(fed).hexdigest().upper() == expected
    assert folder_hash(tmp_path) == expected


def test_folder_hash_of_empty_folder_is_empty_sha256(tmp_path: Path) -> None:
    assert folder_hash(tmp_path) == EMPTY_SHA256


def test_folder_hash_sees_content_names_and_empty_folders(tmp_path: Path) -> None:
    make_example(tmp_path)
    base = folder_hash(tmp_path)
    (tmp_path / "a.txt").write_bytes(b"hello!\n")
    changed_content = folder_hash(tmp_path)
    (tmp_path / "a.txt").write_bytes(b"hello\n")
    assert folder_hash(tmp_path) == base
    (tmp_path / "a.txt").rename(tmp_path / "A.txt")
    renamed = folder_hash(tmp_path)
    (tmp_path / "A.txt").rename(tmp_path / "a.txt")
    (tmp_path / "empty" / "x").mkdir()
    nested_empty = folder_hash(tmp_path)
    assert len({base, changed_content, renamed, nested_empty}) == 4
    # mtimes and the root's own name are not part of the hash
    os.utime(tmp_path / "a.txt", (0, 0))
    (tmp_path / "empty" / "x").rmdir()
    assert folder_hash(tmp_path) == base


def test_folder_hash_refuses_symlinks(tmp_path: Path) -> None:
    make_example(tmp_path / "tree")
    (tmp_path / "tree" / "link.txt").symlink_to(tmp_path / "tree" / "a.txt")
    with pytest.raises(CabPathError, match="symbolic link"):
        folder_hash(tmp_path / "tree")
    (tmp_path / "tree" / "link.txt").unlink()
    (tmp_path / "tree" / "dirlink").symlink_to(tmp_path)
    with pytest.raises(CabPathError):
        folder_hash(tmp_path / "tree")
    (tmp_path / "tree" / "dirlink").unlink()
    (tmp_path / "rootlink").symlink_to(tmp_path / "tree")
    with pytest.raises(CabPathError):
        folder_hash(tmp_path / "rootlink")
    assert (
        folder_hash(tmp_path / "tree")
        == "30AB28253638EDB3D4870BCCACC3B9D528939F196532CA41E3BB213E0A57E474"
    )


def test_folder_hash_refuses_special_files_and_odd_names(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CmlabError, match="not a regular file"):
        folder_hash(tmp_path)
    (tmp_path / "fifo").unlink()
    (tmp_path / "line\nbreak").write_bytes(b"")
    with pytest.raises(CmlabError, match="line break"):
        folder_hash(tmp_path)
    with pytest.raises(CmlabError, match="not a folder"):
        folder_hash(tmp_path / "line\nbreak")


def test_content_library_and_staging_folder_hash_are_one_algorithm(tmp_path: Path) -> None:
    """DistMgr's recorded hash (content library), CMUpdate's staging folder hash and the folder
    hash agree on the hand-computed example, before and after CMUpdate extracts update.map."""
    from cmlab.site.content_library import ContentLibrary

    source = tmp_path / "source"
    source.mkdir()
    make_example(source)
    (source / "SMSSetup").mkdir()
    (source / "SMSSetup" / "update.map.cab").write_bytes(b"MSCF")

    def h(data: bytes) -> bytes:
        return hashlib.sha256(data).hexdigest().upper().encode()

    # "SMSSetup/..." sorts between "B.txt" and "a.txt" ("S" is 0x53, "a" 0x61).
    fed = (
        b"B.txt\n" + h(b"B") + b"\n"
        b"SMSSetup/update.map.cab\n" + h(b"MSCF") + b"\n"
        b"a.txt\n" + h(b"hello\n") + b"\n"
        b"empty/\n"
        b"sub/b.bin\n" + h(b"") + b"\n"
    )
    expected = hashlib.sha256(fed).hexdigest().upper()
    library = ContentLibrary(tmp_path / "SCCMContentLib")
    snapshot = library.store_snapshot("CAS10001", 1, source)
    assert snapshot.hash == library.content_hash("CAS10001", 1) == expected
    staging = tmp_path / "CMUStaging" / "GUID"
    staging.parent.mkdir()
    assert library.extract("CAS10001", 1, staging) == expected
    assert staging_hash(staging) == folder_hash(staging) == expected
    # CMUpdate extracts update.map beside its CAB: the staging hash leaves it out...
    (staging / "SMSSetup" / "update.map").write_text("BEGIN_COMPONENT_FILELIST\n")
    assert staging_hash(staging) == expected != folder_hash(staging)
    # ...but nothing else.
    (staging / "stray.txt").write_text("x")
    assert staging_hash(staging) != expected
