"""Crash leftovers: temporaries of dead writers are swept, those of live writers are kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cmlab.core.fs import make_tmp_dir, remove_stale_tmp, tmp_name_for, write_atomic


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_write_atomic_leaves_no_temporary_and_names_carry_the_writer(tmp_path: Path) -> None:
    write_atomic(tmp_path / "2.ESC", b"")
    assert [p.name for p in tmp_path.iterdir()] == ["2.ESC"]
    assert tmp_name_for(tmp_path / "x.CMU").name.startswith(f".~cmlab-{os.getpid()}-")


def test_sweep_removes_dead_writers_files_and_folders_at_any_depth(tmp_path: Path) -> None:
    deep = tmp_path / "EasySetupPayload" / "GUID"
    deep.mkdir(parents=True)
    dead = dead_pid()
    stale_file = deep / f".~cmlab-{dead}-0123456789ab-x.cab.tmp"
    stale_file.write_bytes(b"half")
    stale_dir = tmp_path / f".~cmlab-{dead}-0123456789ab-GUID.extract"
    (stale_dir / "sub").mkdir(parents=True)
    legacy = tmp_path / ".~cmlab-abc-2.ESC.tmp"  # a name from before the pid was recorded
    legacy.write_bytes(b"")
    mine = make_tmp_dir(tmp_path / "CMUStaging")  # this process counts as a previous incarnation
    live = deep / f".~cmlab-{os.getppid()}-0123456789ab-y.cab.tmp"
    live.write_bytes(b"in progress")
    keep = deep / "payload.cab"
    keep.write_bytes(b"x")

    assert remove_stale_tmp(tmp_path) == 3  # top level only
    assert stale_file.exists()
    assert remove_stale_tmp(tmp_path, recursive=True) == 1
    assert not stale_file.exists() and not stale_dir.exists() and not legacy.exists()
    assert not mine.exists()
    assert live.exists() and keep.exists()


def test_sweep_does_not_follow_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / f".~cmlab-{dead_pid()}-0123456789ab-v.tmp"
    victim.write_bytes(b"not ours")
    site = tmp_path / "site"
    site.mkdir()
    (site / "link").symlink_to(outside)
    remove_stale_tmp(site, recursive=True)
    assert victim.exists()
