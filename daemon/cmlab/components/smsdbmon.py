"""SMSDBMon (SMS_DATABASE_NOTIFICATION_MONITOR): drains TableChangeNotifications, which the
table triggers fill, and drops the file each row names (`2.ESC`, `<GUID>.CME`, `CAS.SCU`, ...).

It wakes on every write to the database's WAL (watchdog), with a periodic poll as the safety
net. A row is deleted only after its file is durable, and dropping the same empty file twice is
harmless, so a crash between the two replays cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import write_atomic
from cmlab.site.component import Component, SiteContext
from cmlab.site.sitedb import triggers
from cmlab.site.sitedb.triggers import Notification

BATCH = 500


class _WalWatcher(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> None:
        self.loop = loop
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if os.fsdecode(event.src_path).endswith(("-wal", ".db")):
            self.loop.call_soon_threadsafe(self.wake.set)


class SMSDBMon(Component):
    component = "SMS_DATABASE_NOTIFICATION_MONITOR"
    log_file = "SMSDBMon.log"

    def __init__(self, ctx: SiteContext) -> None:
        super().__init__(ctx)
        # Not `self.wake`: that name is Component.wake(), the sweeps' re-drop of a lost file.
        self._changed = asyncio.Event()
        self._observer: BaseObserver | None = None

    async def start(self) -> None:
        defs = await self.db.tx(triggers.install_triggers, self.config.site_code)
        if self.config.log_verbose:
            for t in defs:
                cols = f"({', '.join(t.columns)})" if t.columns else ""
                folder = self.show(self.paths.inboxes / t.directory, trailing_sep=True)
                self.say(
                    f"Modified trigger definition for {t.component}[{t.name}]: table "
                    f"{t.table}{cols} on {t.action.lower()}, file {t.extension} in dir {folder}"
                )
        loop = asyncio.get_running_loop()
        observer = Observer()
        observer.schedule(_WalWatcher(loop, self._changed), os.fspath(self.paths.db_dir))
        observer.start()
        self._observer = observer
        self._changed.set()
        self.spawn(self._run(), "drain")

    async def stop(self) -> None:
        await super().stop()
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join, 2.0)

    async def _run(self) -> None:
        poll = self.config.intervals.smsdbmon_poll or 1.0
        while True:
            # Not asyncio.wait_for: in Python 3.11 it can swallow a cancellation that arrives as
            # the wake-up completes, and this loop would then outlive the daemon's stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll):
                    await self._changed.wait()
            self._changed.clear()
            while True:
                try:
                    handled = await self.drain_once()
                except (OSError, sqlite3.OperationalError) as exc:
                    self.say(
                        f"ERROR: Failed to process table change notifications: {exc}", level="error"
                    )
                    break
                if handled < BATCH:
                    break

    async def drain_once(self) -> int:
        rows = await self.db.read(triggers.pending_notifications, BATCH)
        if not rows:
            return 0
        done = await self.in_thread(self._drop_all, rows)
        crashpoint("smsdbmon.after_drop")
        await self.db.tx(triggers.delete_notifications, done)
        return len(rows)

    def _target(self, n: Notification) -> Path | None:
        inboxes = self.paths.inboxes.resolve()
        folder = (self.paths.inboxes / n.directory).resolve()
        name_ok = n.file_name and "/" not in n.file_name and "\\" not in n.file_name
        if not name_ok or n.file_name in (".", "..") or not folder.is_relative_to(inboxes):
            return None
        return folder / n.file_name

    def _drop_all(self, rows: list[Notification]) -> list[int]:
        done: list[int] = []
        verbose = self.config.log_verbose
        for n in rows:
            if verbose:
                self.say(f"RCV: {n.action} on {n.table} for {n.trigger} [{n.key}  ]")
            target = self._target(n)
            if target is None:
                self.say(
                    f"ERROR: Notification {n.id} of {n.trigger} names {n.directory}/{n.file_name}, "
                    "which is not a file inside the site's inboxes; ignored.",
                    level="error",
                )
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(target, b"")
                if verbose:
                    self.say(f"SND: Dropped {self.show(target)}")
            done.append(n.id)
        return done
