"""Waiting for a site to get somewhere: a package's state, the end of a synchronization, an
idle site. `cmlab wait`, the commands' `--wait` and cmlab.testing all wait through here, so a
"done", a "failed" and a "timed out" mean the same thing to a shell script and to a test.

A wait polls the site database read-only (and the inbox folders, for idleness) every few
milliseconds until its goal is met, a state that ends it badly is reached, or the deadline
passes; each poll is a fresh read, never a cached one. Polling keeps a waiter independent of
the daemon: it may be another process, on another host, or not running yet."""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cmlab.site.config import SiteConfig, load_config
from cmlab.site.contract import waiting_drop_files
from cmlab.site.sitedb import connect, connected, overview, servicing
from cmlab.site.state_codes import PackageFlag, PackageState

# The states that end a run badly: the guide's *_FAILED states and a prerequisite error.
FAILURE_STATES: frozenset[int] = frozenset(
    {
        PackageState.DOWNLOAD_FAILED,
        PackageState.APPLICABILITY_FAILED,
        PackageState.CONTENT_REPLICATION_FAILED,
        PackageState.PREREQ_ERROR,
        PackageState.INSTALL_FAILED,
        PackageState.INSTALL_CMU_FAILED,
    }
)

POLL_SECONDS = 0.01


class Verdict(enum.Enum):
    WAITING = "waiting"
    DONE = "done"
    FAILED = "failed"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class Goal:
    """What a wait on a package is for: the states that end it well, and those that end it
    badly once the run stops there (a state the run goes on from never ends a wait)."""

    done: frozenset[int]
    failed: frozenset[int]
    what: str

    def verdict(self, progress: servicing.PackageProgress) -> Verdict:
        if progress.state in self.done:
            return Verdict.DONE
        if progress.state in self.failed and not progress.goes_on:
            return Verdict.FAILED
        return Verdict.WAITING


def state_goal(state: int, fail_on: Iterable[int] = FAILURE_STATES) -> Goal:
    """`cmlab wait SITE GUID STATE`: that state, failing at any failure state but it."""
    return Goal(
        done=frozenset({int(state)}),
        failed=frozenset(int(s) for s in fail_on) - {int(state)},
        what=PackageState.name_of(int(state)),
    )


DOWNLOAD_GOAL = Goal(
    done=frozenset({PackageState.DOWNLOAD_SUCCESS}),
    failed=frozenset({PackageState.DOWNLOAD_FAILED}),
    what="the download (DOWNLOAD_SUCCESS)",
)


def run_goal(flag: PackageFlag) -> Goal:
    """Where a run started by InitiateUpgrade (or restarted by RetryContentReplication) ends:
    a prerequisite check at its result; an installation at INSTALL_SUCCESS. An installation
    without --ignore-warnings stops at PREREQ_WARNING, as the console's does."""
    if flag == PackageFlag.PREREQ_ONLY:
        return Goal(
            done=frozenset({PackageState.PREREQ_SUCCESS, PackageState.PREREQ_WARNING}),
            failed=FAILURE_STATES,
            what="the prerequisite check (PREREQ_SUCCESS or PREREQ_WARNING)",
        )
    failed = set(FAILURE_STATES)
    if flag == PackageFlag.NORMAL:
        failed.add(PackageState.PREREQ_WARNING)
    return Goal(
        done=frozenset({PackageState.INSTALL_SUCCESS}),
        failed=frozenset(failed),
        what="the installation (INSTALL_SUCCESS)",
    )


@dataclass(frozen=True)
class Progress:
    """One poll's view: the verdict so far and a line a person can read."""

    verdict: Verdict
    line: str
    state: int | None = None


@dataclass(frozen=True)
class WaitResult:
    verdict: Verdict
    line: str  # the last thing seen, as a person reads it
    state: int | None
    seen: tuple[str, ...]  # every distinct line seen, in order: what a timeout message shows
    seconds: float


class Reader:
    """One read connection for the length of a wait, opened at the first poll: a poll is then
    one query (about 0.05 ms) instead of a connect (1.3 ms, measured). In the same process as
    an in-process daemon (cmlab.testing) that difference is the daemon's: at a 10 ms poll,
    reconnecting made an install to INSTALL_SUCCESS 0.10-0.15 s slower."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self._conn: sqlite3.Connection | None = None

    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect(self.config.paths.db_file, self.config.site_code)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Check:
    """A poll (`check()` gives the Progress now) and the reader it polls with; `wait` closes
    it when the wait ends."""

    def __init__(self, poll: Callable[[sqlite3.Connection], Progress], reader: Reader) -> None:
        self._poll = poll
        self.reader = reader

    def __call__(self) -> Progress:
        return self._poll(self.reader.conn())

    def close(self) -> None:
        self.reader.close()


def package_check(site_dir: Path, guid: str, goal: Goal) -> Check:
    config = load_config(site_dir)

    def check(conn: sqlite3.Connection) -> Progress:
        progress = servicing.package_progress(conn, guid)
        if progress is None:
            return Progress(Verdict.WAITING, f"{guid}: not in CM_UpdatePackages (yet)")
        name = PackageState.name_of(progress.state)
        return Progress(goal.verdict(progress), f"{name} ({progress.state})", progress.state)

    return Check(check, Reader(config))


def site_idle(config: SiteConfig, conn: sqlite3.Connection | None = None) -> bool:
    """No drop file waiting in any inbox and no change SMSDBMon has still to turn into one,
    looking at the inboxes on both sides of that (a notification becomes a drop file)."""
    if waiting_drop_files(config.root):
        return False
    if conn is None:
        with connected(config.paths.db_file, config.site_code) as own:
            pending = overview.notifications_pending(own)
    else:
        pending = overview.notifications_pending(conn)
    return not pending and not waiting_drop_files(config.root)


def package_may_appear(config: SiteConfig) -> bool:
    """Whether a package CM_UpdatePackages does not hold may still come: no synchronization has
    succeeded yet, one is pending, or HMAN has not yet decided the last one's packages (the site
    is not idle). When none of these holds, a GUID it lacks is not there to wait for."""
    with connected(config.paths.db_file, config.site_code) as conn:
        last = overview.last_sync(conn)
        unfinished = overview.unfinished_syncs(conn)
    if last is None or last.finished is None or last.result != "success" or unfinished:
        return True
    return not site_idle(config)


def sync_check(site_dir: Path, sync_id: int) -> Check:
    """A synchronization is over when DMPDownloader finished its SyncHistory row and the site
    is idle again (HMAN decided every package's applicability)."""
    config = load_config(site_dir)

    def check(conn: sqlite3.Connection) -> Progress:
        result = overview.sync_finished(conn, sync_id)
        if result is None:
            return Progress(Verdict.WAITING, f"synchronization {sync_id} requested")
        if result != "success":
            return Progress(Verdict.FAILED, f"synchronization {sync_id}: {result}")
        if not site_idle(config, conn):
            return Progress(Verdict.WAITING, f"synchronization {sync_id}: checking applicability")
        return Progress(Verdict.DONE, f"synchronization {sync_id}: success")

    return Check(check, Reader(config))


def idle_check(site_dir: Path) -> Check:
    config = load_config(site_dir)

    def check(conn: sqlite3.Connection) -> Progress:
        if site_idle(config, conn):
            return Progress(Verdict.DONE, "idle")
        return Progress(Verdict.WAITING, "drop files or notifications waiting")

    return Check(check, Reader(config))


def wait(
    check: Callable[[], Progress],
    timeout: float,
    *,
    on_progress: Callable[[Progress, float], None] | None = None,
    interval: float = POLL_SECONDS,
) -> WaitResult:
    """Poll `check` until it says done or failed, or `timeout` seconds pass. `on_progress` is
    called with each poll's view and the seconds so far (a progress line on a terminal). A
    check with a `close` (a Check) is closed when the wait ends."""
    try:
        return _wait(check, timeout, on_progress, interval)
    finally:
        close = getattr(check, "close", None)
        if close is not None:
            close()


def _wait(
    check: Callable[[], Progress],
    timeout: float,
    on_progress: Callable[[Progress, float], None] | None,
    interval: float,
) -> WaitResult:
    start = time.monotonic()
    seen: list[str] = []
    while True:
        progress = check()
        elapsed = time.monotonic() - start
        if not seen or seen[-1] != progress.line:
            seen.append(progress.line)
        if on_progress is not None:
            on_progress(progress, elapsed)
        if progress.verdict is not Verdict.WAITING:
            return WaitResult(progress.verdict, progress.line, progress.state, tuple(seen), elapsed)
        if elapsed > timeout:
            return WaitResult(Verdict.TIMEOUT, progress.line, progress.state, tuple(seen), elapsed)
        time.sleep(interval)
