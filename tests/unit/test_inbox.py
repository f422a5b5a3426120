"""The inbox engine's guarantees, on real folders with real inotify events."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cmlab.core.errors import CmlabError
from cmlab.core.fs import write_atomic
from cmlab.site.inbox import InboxEngine, InboxSpec, Outcome
from tests.helpers.waiting import await_until


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.contents: list[bytes] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self, path: Path) -> Outcome:
        self.calls.append(path.name)
        self.contents.append(path.read_bytes())
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return Outcome.DONE


def make_engine(folder: Path, handler, patterns=("*.ESC",), settle=0.2, rescan=0.0):
    engine = InboxEngine(rescan=rescan, settle=settle)
    engine.add(InboxSpec(name="test", folder=folder, patterns=patterns, handler=handler))
    return engine


async def test_backlog_present_at_start_is_processed_in_drop_order(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    for i in range(20):
        (box / f"{i}.ESC").write_bytes(b"")
        os.utime(box / f"{i}.ESC", (1000 + i, 1000 + i))
    (box / "ignored.txt").write_text("not a drop file")
    rec = Recorder()
    engine = make_engine(box, rec)
    await engine.start()
    try:
        await await_until(lambda: len(rec.calls) == 20, what="20 backlog files")
        await await_until(lambda: not any(p.suffix == ".ESC" for p in box.iterdir()))
    finally:
        await engine.stop()
    assert rec.calls == [f"{i}.ESC" for i in range(20)]
    assert (box / "ignored.txt").exists()


async def test_renamed_in_file_is_taken_at_once_and_case_insensitively(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    rec = Recorder()
    # A settle delay far beyond the test's deadline proves the rename event, not a timer, woke it.
    engine = make_engine(box, rec, settle=3600)
    await engine.start()
    try:
        outside = tmp_path / "2.esc"
        outside.write_bytes(b"")
        os.rename(outside, box / "2.esc")
        await await_until(lambda: rec.calls == ["2.esc"], timeout=10)
        write_atomic(box / "196612.ESC", b"")
        await await_until(lambda: rec.calls == ["2.esc", "196612.ESC"], timeout=10)
    finally:
        await engine.stop()


async def test_file_written_in_place_is_taken_only_after_close(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    rec = Recorder()
    engine = make_engine(box, rec, patterns=("*.MCM",), settle=3600)
    await engine.start()
    try:
        with open(box / "___CMUx.MCM", "wb") as f:
            f.write(b"<first half")
            f.flush()
            await asyncio.sleep(0)  # let the loop see the create/modify events
            assert rec.calls == []
            f.write(b" second half/>")
        await await_until(lambda: rec.calls == ["___CMUx.MCM"], timeout=10)
    finally:
        await engine.stop()
    assert rec.contents == [b"<first half second half/>"]


async def test_symlink_is_quarantined_without_touching_its_target(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read me")
    rec = Recorder()
    engine = make_engine(box, rec, settle=3600)
    await engine.start()
    try:
        os.symlink(secret, box / "2.ESC")
        await await_until(lambda: (box / "BAD" / "2.ESC.reason").exists(), timeout=10)
    finally:
        await engine.stop()
    assert rec.calls == []
    assert (box / "BAD" / "2.ESC").is_symlink()
    assert "symbolic link" in (box / "BAD" / "2.ESC.reason").read_text()
    assert secret.read_text() == "do not read me"


async def test_bad_input_goes_to_bad_with_reason_and_the_inbox_keeps_serving(
    tmp_path: Path,
) -> None:
    box = tmp_path / "box"
    box.mkdir()
    seen: list[str] = []

    async def handler(path: Path) -> Outcome:
        if path.read_bytes() == b"poison":
            raise CmlabError("the file is poison")
        seen.append(path.name)
        return Outcome.DONE

    engine = make_engine(box, handler, settle=3600)
    await engine.start()
    try:
        write_atomic(box / "1.ESC", b"poison")
        write_atomic(box / "2.ESC", b"fine")
        await await_until(lambda: seen == ["2.ESC"], timeout=10)
        await await_until(lambda: (box / "BAD" / "1.ESC.reason").exists(), timeout=10)
    finally:
        await engine.stop()
    assert (box / "BAD" / "1.ESC").read_bytes() == b"poison"
    assert "the file is poison" in (box / "BAD" / "1.ESC.reason").read_text()
    assert not (box / "1.ESC").exists() and not (box / "2.ESC").exists()


async def test_internal_error_is_quarantined_not_looped(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()

    async def handler(path: Path) -> Outcome:
        raise ZeroDivisionError("bug")

    engine = make_engine(box, handler, settle=3600)
    await engine.start()
    try:
        write_atomic(box / "1.ESC", b"")
        await await_until(lambda: (box / "BAD" / "1.ESC.reason").exists(), timeout=10)
    finally:
        await engine.stop()
    assert "ZeroDivisionError" in (box / "BAD" / "1.ESC.reason").read_text()


async def test_redrop_while_processing_is_not_lost(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    rec = Recorder()
    rec.gate = asyncio.Event()
    engine = make_engine(box, rec, settle=3600)
    await engine.start()
    try:
        write_atomic(box / "2.ESC", b"first")
        await asyncio.wait_for(rec.started.wait(), 10)
        # The same notification is dropped again while the first is being handled.
        write_atomic(box / "2.ESC", b"second")
        await await_until(lambda: "2.ESC" in engine.inboxes[0].again, timeout=10)
        rec.gate.set()
        await await_until(lambda: rec.contents == [b"first", b"second"], timeout=10)
        await await_until(lambda: not (box / "2.ESC").exists(), timeout=10)
    finally:
        await engine.stop()


async def test_transient_error_is_retried(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    attempts: list[int] = []

    async def handler(path: Path) -> Outcome:
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError(5, "disk hiccup")
        return Outcome.DONE

    engine = InboxEngine(rescan=0, settle=3600)
    engine.add(
        InboxSpec(name="t", folder=box, patterns=("*.ESC",), handler=handler, retry_after=0.01)
    )
    await engine.start()
    try:
        write_atomic(box / "2.ESC", b"")
        await await_until(lambda: not (box / "2.ESC").exists(), timeout=10)
    finally:
        await engine.stop()
    assert len(attempts) == 3
    assert not (box / "BAD").exists()


async def test_periodic_rescan_finds_files_the_watcher_missed(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    rec = Recorder()
    engine = make_engine(box, rec, settle=0.05, rescan=0.1)
    await engine.start()
    try:
        # Stop the watcher so only the rescan can notice the new file.
        engine.stop_watching()
        (box / "7.ESC").write_bytes(b"")
        await await_until(lambda: rec.calls == ["7.ESC"], timeout=10)
    finally:
        await engine.stop()


@pytest.mark.parametrize("leftover", [".~cmlab-abc-2.ESC.tmp"])
async def test_stale_temporary_files_are_cleaned_at_start(tmp_path: Path, leftover: str) -> None:
    box = tmp_path / "box"
    box.mkdir()
    (box / leftover).write_bytes(b"half")
    rec = Recorder()
    engine = make_engine(box, rec)
    await engine.start()
    await engine.stop()
    assert not (box / leftover).exists()
    assert rec.calls == []


async def test_kept_marker_is_offered_again_only_when_redropped(tmp_path: Path) -> None:
    """Outcome.KEEP (HMAN's <GUID>.CME marker): the file stays, rescans leave it alone, and a
    re-drop (a new inode, as SMSDBMon's rename makes) or a touch wakes the handler again."""
    box = tmp_path / "box"
    box.mkdir()
    calls: list[str] = []

    async def keep(path: Path) -> Outcome:
        calls.append(path.name)
        return Outcome.KEEP

    engine = make_engine(box, keep, patterns=("*.CME",))
    await engine.start()
    try:
        write_atomic(box / "A.CME", b"")
        await await_until(lambda: calls == ["A.CME"], timeout=10)
        inbox = engine.inboxes[0]
        # Rescans (the safety net's) leave an unchanged marker alone.
        for _ in range(10):
            inbox.scan()
        await inbox.idle.wait()
        assert calls == ["A.CME"]
        assert (box / "A.CME").exists()
        write_atomic(box / "A.CME", b"")
        await await_until(lambda: calls == ["A.CME", "A.CME"], timeout=10)
        st = (box / "A.CME").stat()
        os.utime(box / "A.CME", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        inbox.scan()
        await await_until(lambda: len(calls) == 3, timeout=10)
    finally:
        await engine.stop()
