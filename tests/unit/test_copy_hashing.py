"""cmlab.core.fs: the one copy-while-hashing loop and the no-follow opener every module uses."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from cmlab.core.fs import READ, WRITE_NEW, copy_hashing, open_nofollow
from cmlab.core.hashing import EMPTY_SHA256, sha256_fd

MIB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest().upper()


def copy(
    src: Path, dst: Path, limit: int | None = None, *, hash_all: bool = False, fsync: bool = False
) -> tuple[str, int]:
    s = open_nofollow(src, READ)
    d = open_nofollow(dst, WRITE_NEW)
    try:
        return copy_hashing(s, d, limit, hash_all=hash_all, fsync=fsync)
    finally:
        os.close(s)
        os.close(d)


def test_a_copy_has_every_byte_and_the_guides_upper_case_hash(tmp_path: Path) -> None:
    data = os.urandom(2 * MIB + 17)
    (tmp_path / "src").write_bytes(data)
    assert copy(tmp_path / "src", tmp_path / "dst", fsync=True) == (sha(data), len(data))
    assert (tmp_path / "dst").read_bytes() == data
    (tmp_path / "empty").write_bytes(b"")
    assert copy(tmp_path / "empty", tmp_path / "dst2") == (EMPTY_SHA256, 0)


def test_a_capped_copy_writes_at_most_the_cap_and_its_size_says_the_source_is_longer(
    tmp_path: Path,
) -> None:
    data = os.urandom(3 * MIB)
    (tmp_path / "src").write_bytes(data)
    digest, size = copy(tmp_path / "src", tmp_path / "dst", 10)
    # Reading stops after the chunk that passed the cap: a hostile source is not read whole.
    assert size == MIB and digest == sha(data[:MIB])
    assert (tmp_path / "dst").read_bytes() == data[:10]
    # Exactly at the cap is not over it.
    digest, size = copy(tmp_path / "src", tmp_path / "dst2", len(data))
    assert (digest, size) == (sha(data), len(data))


def test_hash_all_hashes_the_whole_source_and_still_writes_only_the_cap(tmp_path: Path) -> None:
    data = os.urandom(3 * MIB)
    (tmp_path / "src").write_bytes(data)
    assert copy(tmp_path / "src", tmp_path / "dst", 10, hash_all=True) == (sha(data), len(data))
    assert (tmp_path / "dst").read_bytes() == data[:10]


def test_a_resumed_copy_hashes_the_kept_bytes_as_they_are_not_as_the_source_has_them(
    tmp_path: Path,
) -> None:
    data = os.urandom(MIB + 5)
    (tmp_path / "src").write_bytes(data)
    chunks: list[int] = []
    for kept, expected in ((data[:1000], sha(data)), (b"X" * 1000, sha(b"X" * 1000 + data[1000:]))):
        part = tmp_path / "part"
        part.write_bytes(kept + b"left over past the offset")
        s = open_nofollow(tmp_path / "src", READ)
        d = open_nofollow(part, os.O_RDWR)
        try:
            got = copy_hashing(s, d, resume=1000, fsync=True, on_chunk=chunks.append)
        finally:
            os.close(s)
            os.close(d)
        assert got == (expected, len(data))
        assert part.read_bytes() == kept + data[1000:]
    assert chunks == [MIB + 5 - 1000] * 2


def test_without_a_destination_it_only_hashes(tmp_path: Path) -> None:
    data = os.urandom(MIB + 1)
    (tmp_path / "src").write_bytes(data)
    fd = open_nofollow(tmp_path / "src", READ)
    try:
        assert sha256_fd(fd) == sha(data)
    finally:
        os.close(fd)


def test_open_nofollow_refuses_a_link_and_does_not_hang_on_a_fifo(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError) as caught:
        open_nofollow(tmp_path / "link", READ)
    assert caught.value.errno == errno.ELOOP
    os.mkfifo(tmp_path / "fifo")
    fd = open_nofollow(tmp_path / "fifo", READ)  # no writer: a blocking open would hang here
    os.close(fd)
    with pytest.raises(FileExistsError):
        open_nofollow(tmp_path / "real", WRITE_NEW)
