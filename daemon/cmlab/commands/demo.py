"""`cmlab demo`: a fresh lab site, its daemon, and one update taken from synchronization to
INSTALL_SUCCESS, printed stage by stage as it happens. Everything it shows is read back from
the site's own database and logs, the way a trainee would watch it.

The watcher polls on the daemon's own event loop, 20 times a second: its file reads are
awaited (CMUpdate.log streamed with aiofiles, the inbox walk in a thread), so the components
it watches are not held up by it."""

from __future__ import annotations

import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path

import aiofiles
import aiofiles.os

from cmlab.admin.init import InitOptions, init_site
from cmlab.admin.status import collect_status, print_status
from cmlab.daemon import SiteDaemon
from cmlab.site.config import load_config
from cmlab.site.contract import waiting_drop_files
from cmlab.site.sitedb import connect, overview, procs, servicing, transaction
from cmlab.site.sms_log import message_of
from cmlab.site.state_codes import PackageFlag, PackageState

# The states at which a package stops moving on its own (auto-download takes the applicable
# update on to DOWNLOAD_SUCCESS, "Ready to install"; the administrator takes it further).
RESTING = {
    PackageState.APPLICABILITY_HIDE,
    PackageState.APPLICABILITY_NA,
    PackageState.APPLICABILITY_FAILED,
    PackageState.DOWNLOAD_SUCCESS,
    PackageState.DOWNLOAD_FAILED,
    PackageState.CONTENT_REPLICATION_FAILED,
    # PREREQ_SUCCESS is not among them: the demo installs (Flag 0), which goes on from it.
    PackageState.PREREQ_WARNING,
    PackageState.PREREQ_ERROR,
    PackageState.INSTALL_SUCCESS,
    PackageState.INSTALL_FAILED,
    PackageState.INSTALL_CMU_FAILED,
}
STAGE_NAMES: dict[int, str] = {
    PackageState.APPLICABILITY_CHECKING: "Applicability",
    PackageState.APPLICABILITY_SUCCESS: "Applicability",
    PackageState.APPLICABILITY_HIDE: "Applicability",
    PackageState.APPLICABILITY_NA: "Applicability",
    PackageState.APPLICABILITY_FAILED: "Applicability",
    PackageState.DOWNLOAD_IN_PROGRESS: "Download",
    PackageState.DOWNLOAD_SUCCESS: "Download",
    PackageState.DOWNLOAD_FAILED: "Download",
    PackageState.ENABLED: "Replication",
    PackageState.CONTENT_REPLICATING: "Replication",
    PackageState.CONTENT_REPLICATION_SUCCESS: "Replication",
    PackageState.CONTENT_REPLICATION_FAILED: "Replication",
    PackageState.PREREQ_IN_PROGRESS: "Prerequisites",
    PackageState.PREREQ_SUCCESS: "Prerequisites",
    PackageState.PREREQ_WARNING: "Prerequisites",
    PackageState.PREREQ_ERROR: "Prerequisites",
}
_FOLLOW_READ = 1024 * 1024  # bytes per awaited read of a followed log: bench_async_io's chunk
INSTALL_STEP = re.compile(r"INFO: Running install step (\d+) \((\w+)\): (.*)")


def stage_name(state: int) -> str:
    return STAGE_NAMES.get(state, "Installation" if state >> 16 == 3 else "Update")


def label(state: int) -> str:
    return _color(
        f"{PackageState.name_of(state)} ({state})", "1;32" if state in RESTING else "1;33"
    )


def _color(text: str, code: str) -> str:
    return f"\033[{code}m{text}\033[0m" if sys.stdout.isatty() else text


class LogFollower:
    """The messages appended to an SMS log since the last call, read as a stream: only the new
    bytes, and a line only once it is whole. A log that rolled over (a new file under the name)
    is followed from its start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.file_id: tuple[int, int] | None = None

    async def new_messages(self) -> list[str]:
        try:
            st = await aiofiles.os.stat(self.path)
        except FileNotFoundError:
            return []
        if (st.st_dev, st.st_ino) != self.file_id or st.st_size < self.offset:
            self.file_id, self.offset, self.partial = (st.st_dev, st.st_ino), 0, b""
        if st.st_size == self.offset:
            return []  # nothing new: the poll runs 20 times a second, the log is not re-read
        out: list[str] = []
        async with aiofiles.open(self.path, "rb") as f:
            await f.seek(self.offset)
            # In chunks, each an awaited read: a stream never holds the loop for a whole file
            # (bench_async_io: async_io.read.large.aiofiles_chunks against .aiofiles).
            while chunk := await f.read(_FOLLOW_READ):
                self.offset += len(chunk)
                *lines, self.partial = (self.partial + chunk).split(b"\n")
                out.extend(message_of(ln.decode("utf-8", "replace").rstrip("\r")) for ln in lines)
        return out


class Watcher:
    def __init__(self, site: Path) -> None:
        config = load_config(site)
        self.root = config.root
        self.conn = connect(config.paths.db_file, config.site_code)
        self.seen_messages = 0
        self.seen_history = 0
        self.cmupdate = LogFollower(self.root / "Logs" / "CMUpdate.log")
        self.states: dict[str, int] = {}
        self.names: dict[str, str] = {}
        self.t0 = time.monotonic()

    def stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:6.2f}s]"

    async def poll(self) -> None:
        for state_id, name, topic in overview.state_messages_after(self.conn, self.seen_messages):
            self.seen_messages += 1
            stage = "Synchronization" if topic.startswith("00000000") else "Download"
            print(
                f"{self.stamp()} {stage:16} DMPDownloader state message {state_id:>2} {name}"
                + ("" if topic.startswith("00000000") else f" ({topic})")
            )
        for p in overview.packages(self.conn):
            self.names[p.guid] = p.name
            if self.states.get(p.guid) != p.state:
                self.states[p.guid] = p.state
                print(f"{self.stamp()} {stage_name(p.state):16} {p.name}: {label(p.state)}")
        # The site's own states: during install steps 5 to 13 SMSDBMon's triggers are gone, so
        # the package's state stands still while the site's moves (the console shows the same).
        for hist_id, guid, state in overview.site_history_after(self.conn, self.seen_history):
            self.seen_history = hist_id
            if state >> 16 in (1, 2, 3):  # replication, prerequisite check, installation
                name = self.names.get(guid, guid)
                print(f"{self.stamp()} {stage_name(state):16} {name} at site: {label(state)}")
        for line in await self.cmupdate.new_messages():
            found = INSTALL_STEP.fullmatch(line)
            if found:
                print(f"{self.stamp()} {'':16}   step {found[1]:>2}/16 {found[3]}")

    async def settled(self) -> bool:
        sync = overview.unfinished_syncs(self.conn)
        return (
            sync == 0
            and bool(self.states)
            and all(s in RESTING for s in self.states.values())
            and not await asyncio.to_thread(self.backlog)
        )

    def backlog(self) -> int:
        """Drop files still waiting in the inboxes (e.g. the last state messages after HMAN
        has already recorded DOWNLOAD_SUCCESS)."""
        return len(waiting_drop_files(self.root))

    def close(self) -> None:
        self.conn.close()


async def _settle(watcher: Watcher, deadline: float) -> bool:
    while time.monotonic() < deadline:
        await watcher.poll()
        if await watcher.settled():
            await watcher.poll()  # what was recorded between the poll and the check
            return True
        await asyncio.sleep(0.05)
    return False


async def _demo(site: Path, deadline_s: float) -> int:
    daemon = SiteDaemon(load_config(site), json_stdout=False)
    await daemon.start()
    watcher = Watcher(site)
    try:
        with transaction(watcher.conn):
            procs.spRequestSync(watcher.conn, procs.SyncReason.ADMIN)
        print(f"{watcher.stamp()} Administrator    Check for updates (SyncHistory request)")
        deadline = time.monotonic() + deadline_s
        if not await _settle(watcher, deadline):
            print("The demo did not settle in time; see the logs in", site / "Logs")
            return 1
        ready = [g for g, s in watcher.states.items() if s == PackageState.DOWNLOAD_SUCCESS]
        for guid in ready:
            with transaction(watcher.conn):
                servicing.InitiateUpgrade(watcher.conn, guid, PackageFlag.NORMAL)
            print(
                f"{watcher.stamp()} Administrator    Install Update Pack (InitiateUpgrade, Flag=0)"
            )
            if not await _settle(watcher, deadline):
                print("The demo did not settle in time; see the logs in", site / "Logs")
                return 1
    finally:
        watcher.close()
        await daemon.stop()
    return 0


def run_demo(folder: Path | None = None, *, deadline_s: float = 120.0) -> int:
    base = folder if folder is not None else Path(tempfile.mkdtemp(prefix="cmlab-demo-"))
    site = base / "CAS"
    print(f"Creating lab site CAS in {site} ...")
    init_site(InitOptions(site_dir=site, site_code="CAS", sync_interval=0, rescan_interval=1.0))
    print(
        "Starting the site's components: SMSDBMon, statesys, HMAN, MPFDM, DMPDownloader, "
        "DistMgr, CMUpdate\n"
    )
    rc = asyncio.run(_demo(site, deadline_s))
    print()
    print_status(collect_status(site))
    print(
        f"\nLogs: {site / 'Logs'}  (hman.log, dmpdownloader.log, ConfigMgrSetup.log, "
        "SMSDBMon.log, statesys.log, distmgr.log, CMUpdate.log, ConfigMgrPrereq.log)"
    )
    return rc
