"""The inbox engine: how every component notices, claims, processes and retires drop files.

Guarantees (DESIGN.md, "The inbox engine"):
1. A drop file is deleted only after its handler returned, i.e. after everything it caused is
   durable (handlers commit and write outputs atomically before returning).
2. Handlers are idempotent, so the re-run after a crash changes nothing.
3. Files are noticed three ways: a startup scan of the backlog, watchdog events, and a
   periodic rescan. One file is claimed by one worker at a time.
4. Files written in place by someone else are taken only once closed (or unchanged for
   `settle` seconds); files renamed in are taken at once.
5. Bad input is moved to `BAD/` beside the file with a `.reason` file; links are never followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import sqlite3
import stat
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

# BadInput is cmlab.core.errors' family of bad input, re-exported for the handlers.
from cmlab.core.errors import BadInput as BadInput
from cmlab.core.errors import CmlabError
from cmlab.core.fs import remove_stale_tmp, write_atomic
from cmlab.site.contract import matches_any
from cmlab.site.sms_log import SmsLog

if TYPE_CHECKING:
    # inotify_c loads libc's inotify calls when imported: only on Linux, at the first watch.
    from watchdog.observers.inotify_c import CallbackId, InotifyEvent, WatchDescriptor

BAD_FOLDER = "BAD"


class _QuietStopRace(logging.Filter):
    """watchdog logs an error when its inotify thread is asked for events while stopping; at
    our shutdown that race is expected and harmless, and it would alarm a trainee."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_QuietStopRace())
TRANSIENT_RETRIES = 5


class Outcome(enum.Enum):
    DONE = "done"  # effects are durable: the engine deletes the drop file
    CONSUMED = "consumed"  # the handler moved or deleted the file itself
    RETRY = "retry"  # leave the file; offer it again after `retry_after`
    # Leave the file as a marker (HMAN's <GUID>.CME stays while an update is in progress); it
    # is offered again only once it changes: re-dropped (a new inode) or touched.
    KEEP = "keep"


Handler = Callable[[Path], Awaitable[Outcome | None]]


@dataclass
class InboxSpec:
    name: str  # e.g. "hman.box/CFD", used in logs and status
    folder: Path
    patterns: tuple[str, ...]  # case-insensitive globs: the guide writes both 2.esc and 2.ESC
    handler: Handler
    log: SmsLog | None = None
    workers: int = 1
    retry_after: float = 1.0
    show: Callable[[Path], str] = str
    # Called after the engine deleted a handled file (HMAN logs "deleted file ..." then).
    on_deleted: Callable[[Path], None] | None = None

    def matches(self, name: str) -> bool:
        return matches_any(name, self.patterns)


class Inbox:
    """One watched folder with its queue and workers."""

    def __init__(self, spec: InboxSpec, engine: InboxEngine) -> None:
        self.spec = spec
        self.engine = engine
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.pending: set[str] = set()
        self.in_flight: set[str] = set()
        # names re-dropped while in flight -> whether that drop is known complete
        self.again: dict[str, bool] = {}
        self.attempts: dict[str, int] = {}
        # names left in place by Outcome.KEEP -> (inode, device, mtime) when they were kept
        self.kept: dict[str, tuple[int, int, int]] = {}
        self.settling: dict[str, asyncio.TimerHandle] = {}
        self.workers: list[asyncio.Task[None]] = []
        self.idle = asyncio.Event()
        self.idle.set()
        # time.monotonic() of the event that made each queued name ready, for latency stats
        self.ready_at: dict[str, float] = {}
        self.on_handler_start: Callable[[str, float], None] | None = None

    # -- noticing ------------------------------------------------------------------------------

    def offer(self, name: str, *, ready: bool, seen_at: float | None = None) -> None:
        if not self.spec.matches(name):
            return
        if name in self.in_flight:
            self.again[name] = self.again.get(name, False) or ready
            return
        if name in self.pending:
            return
        if name in self.kept and self._unchanged_since_kept(name):
            return
        if not ready:
            self._settle_later(name)
            return
        timer = self.settling.pop(name, None)
        if timer is not None:
            timer.cancel()
        self.pending.add(name)
        self.ready_at[name] = seen_at if seen_at is not None else time.monotonic()
        self.idle.clear()
        self.queue.put_nowait(name)

    def _unchanged_since_kept(self, name: str) -> bool:
        try:
            st = os.lstat(self.spec.folder / name)
        except FileNotFoundError:
            self.kept.pop(name, None)
            return True
        if (st.st_ino, st.st_dev, st.st_mtime_ns) == self.kept[name]:
            return True
        del self.kept[name]
        return False

    def _settle_later(self, name: str) -> None:
        if name in self.settling:
            return
        loop = asyncio.get_running_loop()
        self.settling[name] = loop.call_later(self.engine.settle, self._settle_check, name)

    def _settle_check(self, name: str) -> None:
        self.settling.pop(name, None)
        try:
            st = os.lstat(self.spec.folder / name)
        except FileNotFoundError:
            return
        age = time.time() - st.st_mtime
        if age >= self.engine.settle or _is_link(st):
            self.offer(name, ready=True)
        else:
            self._settle_later(name)

    def scan(self) -> None:
        """Offer every matching file already in the folder (startup backlog and rescans)."""
        self.offer_listing(self.listing())

    def listing(self) -> tuple[float, list[tuple[str, os.stat_result]]]:
        """The time, and each matching entry of the folder with its lstat. It touches no
        engine state, so the periodic rescan runs it on a worker thread: the walk of a
        100k-file backlog took 0.7-1.0 s on the 2-vCPU reference VM (10k: 60-90 ms)."""
        try:
            entries = list(os.scandir(self.spec.folder))
        except FileNotFoundError:
            return 0.0, []
        now = time.time()
        found: list[tuple[str, os.stat_result]] = []
        for entry in entries:
            if not self.spec.matches(entry.name):
                continue
            try:
                found.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
        return now, found

    def offer_listing(self, listing: tuple[float, list[tuple[str, os.stat_result]]]) -> None:
        now, found = listing
        # Oldest first: the order the files were dropped in.
        ready: list[tuple[float, str]] = []
        for name, st in found:
            if name in self.pending or name in self.in_flight:
                continue
            if _is_link(st) or now - st.st_mtime >= self.engine.settle:
                ready.append((st.st_mtime, name))
            else:
                self.offer(name, ready=False)
        for _, name in sorted(ready):
            self.offer(name, ready=True)

    # -- processing ----------------------------------------------------------------------------

    async def worker(self) -> None:
        while True:
            name = await self.queue.get()
            self.pending.discard(name)
            self.in_flight.add(name)
            try:
                await self._process(name)
            finally:
                self.in_flight.discard(name)
                self.queue.task_done()
                if name in self.again:
                    ready = self.again.pop(name)
                    # An lstat in a local inbox stays on the loop, as in offer() and _retire():
                    # it costs the loop less than a hand-off to a thread would (bench_async_io:
                    # async_io.lstat.thread.loop_cpu).
                    if os.path.lexists(self.spec.folder / name):  # noqa: ASYNC240
                        self.offer(name, ready=ready)
                if not self.pending and not self.in_flight:
                    self.idle.set()

    async def _process(self, name: str) -> None:
        path = self.spec.folder / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if _is_link(st):
            await self._quarantine(
                path, "it is a symbolic link; cmlab never follows a link in an inbox"
            )
            return
        if not _is_regular(st):
            await self._quarantine(path, "it is not a regular file")
            return
        seen = self.ready_at.pop(name, None)
        if seen is not None:
            lag = time.monotonic() - seen
            if self.on_handler_start is not None:
                self.on_handler_start(name, lag)
        try:
            outcome = await self.spec.handler(path)
        except asyncio.CancelledError:
            raise
        except CmlabError as exc:
            self.attempts.pop(name, None)
            await self._quarantine(path, str(exc))
            return
        except (OSError, sqlite3.OperationalError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOENT and not path.exists():
                return  # someone else took the file (e.g. a trainee cleaning up by hand)
            tries = self.attempts.get(name, 0) + 1
            self.attempts[name] = tries
            if tries >= TRANSIENT_RETRIES:
                self.attempts.pop(name, None)
                await self._quarantine(path, f"failed {tries} times: {type(exc).__name__}: {exc}")
                return
            self._log(f"Failed to process {self.spec.show(path)} ({exc}); will retry.")
            self._retry_later(name, self.spec.retry_after * tries)
            return
        except Exception as exc:
            self.attempts.pop(name, None)
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            print(traceback.format_exc(), file=sys.stderr)
            await self._quarantine(path, f"internal error while processing: {detail}")
            return
        self.attempts.pop(name, None)
        if outcome is None or outcome is Outcome.DONE:
            self._retire(path, st)
        elif outcome is Outcome.RETRY:
            self._retry_later(name, self.spec.retry_after)
        elif outcome is Outcome.KEEP:
            self.kept[name] = (st.st_ino, st.st_dev, st.st_mtime_ns)

    def _retire(self, path: Path, claimed: os.stat_result) -> None:
        """Delete the drop file we processed, but not a new one dropped over it meanwhile
        (producers rename in, so a re-drop is a different inode): that one is offered again."""
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            return
        same = (now.st_ino, now.st_dev, now.st_mtime_ns) == (
            claimed.st_ino,
            claimed.st_dev,
            claimed.st_mtime_ns,
        )
        if same:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            if self.spec.on_deleted is not None:
                self.spec.on_deleted(path)
        else:
            self.again.setdefault(path.name, False)

    def _retry_later(self, name: str, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self.idle.clear()
        loop.call_later(delay, self._retry_fire, name)

    def _retry_fire(self, name: str) -> None:
        if os.path.lexists(self.spec.folder / name):
            self.offer(name, ready=True)
        elif not self.pending and not self.in_flight:
            self.idle.set()

    def quarantine(self, path: Path, reason: str) -> Path | None:
        log = self.spec.log.error if self.spec.log is not None else None
        return quarantine(path, reason, self.spec.show, log)

    async def _quarantine(self, path: Path, reason: str) -> None:
        # Off the loop: the `.reason` file is written durably, and one 1 KB write with its
        # fsync held the loop up to 24 ms on the reference VM (bench_async_io,
        # async_io.write.1k.blocking.max_lag).
        await asyncio.to_thread(self.quarantine, path, reason)

    def _log(self, message: str) -> None:
        if self.spec.log is not None:
            self.spec.log.write(message, level="error" if message.startswith("ERROR") else "info")


def quarantine(
    path: Path,
    reason: str,
    show: Callable[[Path], str] = str,
    log: Callable[[str], object] | None = None,
    *,
    bad: Path | None = None,
) -> Path | None:
    """Move `path` (never following a link) to BAD/ beside it (or to `bad`, on the same
    filesystem), with a `.reason` file, and say so in the component's log."""
    bad = bad or path.parent / BAD_FOLDER
    bad.mkdir(parents=True, exist_ok=True)
    dest = bad / path.name
    if os.path.lexists(dest):
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        dest = bad / f"{path.name}.{stamp}"
    try:
        os.rename(path, dest)
    except FileNotFoundError:
        return None
    write_atomic(dest.with_name(dest.name + ".reason"), f"{show(path)}\n{reason}\n")
    if log is not None:
        log(f"ERROR: Moved bad file {show(path)} to {show(dest)}: {reason}")
    return dest


def _is_link(st: os.stat_result) -> bool:
    return stat.S_ISLNK(st.st_mode)


def _is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


class _Forwarder:
    """Runs on watchdog's inotify thread: hands each inbox's events to the loop, nothing else.

    It is registered straight on watchdog's shared inotify reader (`InotifyFD`) rather than
    through an Observer, whose emitter and dispatcher threads would add two thread hand-offs
    per file; at a thousand drops a second those wake-ups cost more than the handling. Events
    that arrive before the loop took the previous ones ride along: one loop wake-up per burst.
    """

    def __init__(self, inbox: Inbox, loop: asyncio.AbstractEventLoop) -> None:
        self.inbox = inbox
        self.loop = loop
        self._lock = threading.Lock()
        self._batch: list[tuple[bool, str, float]] = []  # (complete?, name, seen at)
        self._scheduled = False

    # -- watchdog's WatchCallback protocol, on its thread -------------------------------------

    def on_event(self, event: InotifyEvent) -> None:
        if event.is_directory or not event.name:
            return
        if event.is_moved_to or event.is_close_write:
            self._push(True, os.fsdecode(event.name))
        elif event.is_create:
            self._push(False, os.fsdecode(event.name))

    def on_queue_overflow(self) -> None:
        # The kernel dropped events: look at the folder instead.
        self._call(self.inbox.scan)

    def on_watch_deleted(self, wd: int) -> None:
        self._call(self.inbox.scan)

    def _call(self, fn: Callable[[], None]) -> None:
        # Never raise on watchdog's shared reader thread: it would stop every watch's events.
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self.loop.call_soon_threadsafe(fn)

    def _push(self, complete: bool, name: str) -> None:
        with self._lock:
            self._batch.append((complete, name, time.monotonic()))
            if self._scheduled:
                return
            self._scheduled = True
        self._call(self._drain)

    # -- on the loop ---------------------------------------------------------------------------

    def _drain(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, []
            self._scheduled = False
        for complete, name, seen in batch:
            if complete:
                self.inbox.offer(name, ready=True, seen_at=seen)
            else:
                self._maybe(name)

    def _maybe(self, name: str) -> None:
        # A symlink or hard link appears with IN_CREATE and no close; check it now. A file
        # written in place without a close event is taken once unchanged for `settle`.
        try:
            st = os.lstat(self.inbox.spec.folder / name)
        except FileNotFoundError:
            return
        if _is_link(st):
            self.inbox.offer(name, ready=True)
        else:
            self.inbox.offer(name, ready=False)


class _Watches:
    """The inboxes' inotify watches on watchdog's shared reader thread."""

    def __init__(self) -> None:
        from watchdog.observers.inotify_c import InotifyConstants, InotifyFD, Mask

        self._fd = InotifyFD.get_instance()
        # Only what the engine acts on: each other event (the handlers' own opens, reads and
        # deletes) would wake the reader thread for nothing.
        self._mask = Mask(
            InotifyConstants.IN_MOVED_TO
            | InotifyConstants.IN_CLOSE_WRITE
            | InotifyConstants.IN_CREATE
            | InotifyConstants.IN_ONLYDIR
        )
        self._added: list[tuple[WatchDescriptor, CallbackId]] = []

    def add(self, folder: Path, forwarder: _Forwarder) -> None:
        from watchdog.observers.inotify_c import CallbackId

        key = CallbackId(id(forwarder))
        wd = self._fd.add_callback(os.fsencode(folder), self._mask, forwarder, key)
        self._added.append((wd, key))

    def stop(self) -> None:
        added, self._added = self._added, []
        if added:
            self._fd.remove_callbacks(added)


class InboxEngine:
    """All inboxes of one process, one watchdog observer, one rescan timer."""

    def __init__(self, *, rescan: float = 5.0, settle: float = 0.25) -> None:
        self.rescan = rescan
        self.settle = settle
        self.inboxes: list[Inbox] = []
        self._watches: _Watches | None = None
        self._rescan_task: asyncio.Task[None] | None = None

    def add(self, spec: InboxSpec) -> Inbox:
        inbox = Inbox(spec, self)
        self.inboxes.append(inbox)
        return inbox

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        watches = _Watches()
        self._watches = watches
        for inbox in self.inboxes:
            inbox.spec.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(inbox.spec.folder)
            watches.add(inbox.spec.folder, _Forwarder(inbox, loop))
        # Watches exist before the backlog scan, so nothing dropped in between is missed.
        for inbox in self.inboxes:
            inbox.scan()
            for _ in range(inbox.spec.workers):
                inbox.workers.append(asyncio.create_task(inbox.worker(), name=inbox.spec.name))
        if self.rescan > 0:
            self._rescan_task = asyncio.create_task(self._rescan_loop(), name="inbox-rescan")

    def stop_watching(self) -> None:
        """Stop noticing events (the periodic rescan goes on until `stop`)."""
        if self._watches is not None:
            self._watches.stop()
            self._watches = None

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.rescan)
            for inbox in self.inboxes:
                inbox.offer_listing(await asyncio.to_thread(inbox.listing))

    async def stop(self, grace: float = 5.0) -> None:
        """Stop noticing, let in-flight handlers finish (or abandon them after `grace`
        seconds). Not a timeout on stop itself: after the grace period the workers are
        cancelled and stop still finishes, so a caller's asyncio.timeout is no substitute."""
        if self._rescan_task is not None:
            self._rescan_task.cancel()
        self.stop_watching()
        for inbox in self.inboxes:
            for timer in inbox.settling.values():
                timer.cancel()
            inbox.settling.clear()
        busy = [inbox for inbox in self.inboxes if inbox.in_flight]
        if busy:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(*(self._drain_in_flight(i) for i in busy))
        tasks = [t for inbox in self.inboxes for t in inbox.workers]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._rescan_task is not None:
            await asyncio.gather(self._rescan_task, return_exceptions=True)

    @staticmethod
    async def _drain_in_flight(inbox: Inbox) -> None:
        # Drop what is queued but not started: it stays on disk and is found at next start.
        while not inbox.queue.empty():
            inbox.queue.get_nowait()
            inbox.queue.task_done()
        inbox.pending.clear()
        if inbox.in_flight:
            inbox.idle.clear()  # the worker sets it when its handler returns
            await inbox.idle.wait()
