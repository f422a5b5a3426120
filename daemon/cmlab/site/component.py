"""What every emulated component shares: the site's config, paths, database, logs, trust and
inbox engine. Components never call each other: they drop files and write the database."""

from __future__ import annotations

import asyncio
import sys
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from cmlab.core.fs import write_atomic
from cmlab.site.config import SiteConfig
from cmlab.site.contract import entries_for, folder_of
from cmlab.site.inbox import Handler, InboxEngine, InboxSpec
from cmlab.site.paths import SitePaths
from cmlab.site.sitedb import SiteDB, procs
from cmlab.site.sms_log import LogRegistry, SmsLog
from cmlab.site.state_codes import IsComplete, SubStage

if TYPE_CHECKING:
    from cmlab.site.trust import TrustStore, Verdict

T = TypeVar("T")
P = ParamSpec("P")


@dataclass
class SiteContext:
    config: SiteConfig
    db: SiteDB
    logs: LogRegistry
    engine: InboxEngine

    @property
    def paths(self) -> SitePaths:
        return self.config.paths

    @cached_property
    def trust(self) -> TrustStore:
        from cmlab.site.trust import TrustStore

        return TrustStore.from_pem_files(self.config.trust_roots, self.config.microsoft_roots)


class Component:
    """Base of DMPDownloader, HMAN, SMSDBMon, statesys, ... (one module each)."""

    component = "SMS_COMPONENT"
    log_file = "component.log"

    def __init__(self, ctx: SiteContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.paths = ctx.paths
        self.db = ctx.db
        self.log: SmsLog = ctx.logs.get(self.log_file, self.component)
        self._tasks: list[asyncio.Task[object]] = []
        # Plain objects holding some of this component's handlers (HMAN's Easy Setup,
        # post-installation and secondary-site handlers): `inboxes()` looks the contract's
        # handler names up on the component first, then on these in order.
        self.handler_groups: tuple[object, ...] = ()
        # A stable pseudo thread id per component, so a trainee can filter a log by thread as
        # the guide suggests even though every component runs on one event loop.
        self.thread_id = 1000 + (sum(self.component.encode()) * 37) % 8000

    # -- hooks ---------------------------------------------------------------------------------

    def inboxes(self) -> list[InboxSpec]:
        """This component's inboxes, as the inbox contract (`inboxes/contract.toml`) lists them."""
        specs = []
        for entry in entries_for(self.component):
            owner = self._owner_of(entry.handler)
            handler = getattr(owner, entry.handler)
            folder = folder_of(entry, self.paths.root)
            name = entry.folder.removeprefix("inboxes/")
            spec = self.inbox(name, folder, entry.files, handler)
            spec.workers = entry.workers
            # A component that logs the deletion of its drop files names the hook after the
            # handler, beside it: on_cmu -> on_cmu_deleted.
            spec.on_deleted = getattr(owner, f"{entry.handler}_deleted", None)
            specs.append(spec)
        return specs

    def _owner_of(self, handler: str) -> object:
        """The component or handler group that has the contract's `handler`."""
        for owner in (self, *self.handler_groups):
            if hasattr(owner, handler):
                return owner
        raise AttributeError(f"{type(self).__name__} has no handler {handler!r}")

    async def start(self) -> None:
        """Start background loops (timers, pollers). Inboxes are started by the engine."""

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- helpers -------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, object], name: str) -> asyncio.Task[object]:
        task = asyncio.create_task(coro, name=f"{self.component}:{name}")
        self._tasks.append(task)
        return task

    def every(self, interval: float, work: Callable[[], Awaitable[object]], what: str) -> None:
        """Run `work` now and then every `interval` seconds (only now when it is 0), on its own
        task. These are safety nets (CMUpdate's poll, the sweeps for lost notifications): a
        pass that fails is logged as `ERROR: Failed to <what>: ...` and the next one runs."""

        async def loop() -> None:
            while True:
                try:
                    await work()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.say(f"ERROR: Failed to {what}: {exc}", level="error")
                    traceback.print_exc(file=sys.stderr)
                if interval <= 0:
                    return
                await asyncio.sleep(interval)

        self.spawn(loop(), what)

    def wake(self, drop_file: Path, why: str) -> None:
        """Drop a notification file SMSDBMon's trigger should have dropped (one lost while an
        installation had the triggers removed), unless it is waiting already."""
        if not drop_file.exists():
            self.say(why)
            write_atomic(drop_file, b"")

    def inbox(
        self, name: str, folder: Path, patterns: tuple[str, ...], handler: Handler
    ) -> InboxSpec:
        return InboxSpec(
            name=name,
            folder=folder,
            patterns=patterns,
            handler=handler,
            log=self.log,
            show=self.show,
        )

    def say(self, message: str, *, level: str = "info") -> None:
        self.log.write(message, thread=self.thread_id, level=level)

    def show(self, path: Path | str, *, trailing_sep: bool = False) -> str:
        return self.paths.show(path, trailing_sep=trailing_sep)

    async def in_thread(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Hashing, extracting and verifying release the GIL: run them off the loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def verify(self, path: Path) -> Verdict:
        from cmlab.site.trust import verify_cab

        return await self.in_thread(verify_cab, path, self.ctx.trust)

    async def report_status(
        self,
        guid: str,
        substage: SubStage,
        is_complete: IsComplete,
        progress: int,
        applicable: int = 1,
    ) -> None:
        """Record a substage in CM_UpdatePackage_MonitoringStatus, then say the guide's line."""
        await self.db.tx(
            procs.spCMUReportUpdateStatus, guid, substage, is_complete, progress, applicable
        )
        self.say(self.status_line(substage, is_complete, progress, applicable))

    def status_line(
        self, substage: SubStage, is_complete: IsComplete, progress: int, applicable: int = 1
    ) -> str:
        return (
            f"Successfully reported ConfigMgr update status (SiteCode={self.config.site_code}, "
            f"SubStageID=0x{int(substage):x}, IsComplete={int(is_complete)}, "
            f"Progress={progress}, Applicable={applicable})"
        )

    def trust_lines(self, shown: str, verdict: Verdict) -> None:
        """The guide's two lines for a trusted CAB."""
        self.say(f"File '{shown}' is signed and trusted.")
        if verdict.ms_root:
            self.say(f"File '{shown}' is signed with MS root cert.")


def utc_now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
