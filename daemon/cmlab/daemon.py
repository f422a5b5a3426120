"""`cmlab run SITE_DIR`: every component of one site on one event loop, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import signal
from collections.abc import Callable
from pathlib import Path

from cmlab.components.cmupdate.cmupdate import CMUpdate
from cmlab.components.despooler import Despooler
from cmlab.components.distmgr import DistributionManager
from cmlab.components.dmpdownloader.dmpdownloader import DMPDownloader
from cmlab.components.hman.hman import HierarchyManager
from cmlab.components.mpfdm import MPFileDispatchManager
from cmlab.components.rcm import ReplicationMonitor
from cmlab.components.scheduler import Scheduler
from cmlab.components.sender import Sender
from cmlab.components.smsdbmon import SMSDBMon
from cmlab.components.statesys import StateSystem
from cmlab.core import sd_notify
from cmlab.core.fs import remove_stale_tmp
from cmlab.site import site_lock as site_lock_module
from cmlab.site.component import Component, SiteContext
from cmlab.site.config import SiteConfig, load_config
from cmlab.site.inbox import InboxEngine
from cmlab.site.sitedb import SiteDB, connect, migrate
from cmlab.site.sms_log import LogRegistry, LogSink

# Start order: the database monitor and state system first, so nothing another component
# causes at start-up is missed; stop order is the reverse.
COMPONENTS: tuple[type[Component], ...] = (
    SMSDBMon,
    StateSystem,
    HierarchyManager,
    MPFileDispatchManager,
    DMPDownloader,
    DistributionManager,
    Scheduler,
    Sender,
    Despooler,
    ReplicationMonitor,
    CMUpdate,
)


SLOW_STOP_SECONDS = 15.0


def site_lock(config: SiteConfig) -> contextlib.AbstractContextManager[None]:
    """One daemon per site: two would claim the same drop files."""
    return site_lock_module.hold(config.paths.db_dir, config.root)


class SiteDaemon:
    def __init__(self, config: SiteConfig, *, json_stdout: bool | None = None) -> None:
        self.config = config
        sink = LogSink(
            folder=config.paths.logs,
            max_size=config.log_max_size,
            json_stdout=config.log_json_stdout if json_stdout is None else json_stdout,
            site_code=config.site_code,
        )
        self.logs = LogRegistry(sink)
        conn = connect(config.paths.db_file, config.site_code)
        try:
            migrate(conn)  # a site made by an older cmlab keeps working
        finally:
            conn.close()
        self.db = SiteDB(config.paths.db_file, config.site_code, durability=config.durability)
        self.engine = InboxEngine(rescan=config.intervals.rescan, settle=config.intervals.settle)
        self.ctx = SiteContext(config=config, db=self.db, logs=self.logs, engine=self.engine)
        self.components = [cls(self.ctx) for cls in COMPONENTS]
        for component in self.components:
            for spec in component.inboxes():
                self.engine.add(spec)

    async def start(self) -> None:
        for component in self.components:
            await component.start()
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.stop()
        for component in reversed(self.components):
            await component.stop()
        await asyncio.to_thread(self.db.close)
        self.logs.close()


async def serve(
    site_dir: Path,
    *,
    json_stdout: bool | None = None,
    stop: asyncio.Event | None = None,
    ready: Callable[[], None] | None = None,
) -> int:
    """Serve one site until SIGTERM/SIGINT, or until `stop` is set when the caller gives one
    (a daemon in a thread of another program, cmlab.testing's in-process sites: no signal
    handlers then, they belong to that program). `ready` is called once every component
    serves."""
    config = load_config(site_dir)
    with site_lock(config):
        # Under the lock no other daemon of this site writes here; a killed one may have left
        # temporaries. Other sites' daemons write into its inboxes too (a replication message):
        # a live local writer's temporary is kept (its pid is alive); one of a writer on
        # another host may be removed mid-write, and that write fails and is sent again.
        remove_stale_tmp(config.root, recursive=True)
        daemon = SiteDaemon(config, json_stdout=json_stdout)
        if stop is None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        await daemon.start()
        sd_notify.notify("READY=1\nSTATUS=serving site " + config.site_code)
        if ready is not None:
            ready()
        pinger = None
        interval = sd_notify.watchdog_interval()
        if interval:
            pinger = asyncio.create_task(_watchdog_pings(interval))
        await stop.wait()
        sd_notify.notify("STOPPING=1")
        # A stop that takes this long is a bug: leave every thread's stack on stderr (the
        # journal) so it can be found.
        faulthandler.dump_traceback_later(SLOW_STOP_SECONDS)
        if pinger is not None:
            pinger.cancel()
        await daemon.stop()
        faulthandler.cancel_dump_traceback_later()
    return 0


async def _watchdog_pings(interval: float) -> None:
    while True:
        sd_notify.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def run(site_dir: Path) -> int:
    return asyncio.run(serve(site_dir))
