"""`LabSite`: one lab site for a test, made, run, driven and read as a test author needs.

    with LabSite(tmp_path / "CAS") as site:          # `cmlab init`, then `cmlab run`
        site.sync(wait=True)
        site.download(SAMPLE_UPDATE, wait=True)
        site.install(SAMPLE_UPDATE, wait=True)
        assert site.state(SAMPLE_UPDATE) == State.INSTALL_SUCCESS

Every action goes through the site database as the SMS Provider's do (cmlab.admin.actions),
every wait through cmlab.admin.waiting (the same goals as `cmlab ... --wait`), every read is a
fresh read-only look at the database or the logs. Nothing here reaches into a running
component: a test sees the site as a tool watching a real site server would."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cmlab.admin import actions, waiting
from cmlab.admin.init import InitOptions, init_site
from cmlab.admin.reset import ResetReport, reset_package
from cmlab.core.fs import write_atomic
from cmlab.site.config import SiteConfig, load_config, set_value
from cmlab.site.contract import load_contract, waiting_drop_files
from cmlab.site.sitedb import connected, overview, scripts, servicing
from cmlab.site.sms_log import read_messages
from cmlab.site.state_codes import PackageFlag, PackageState
from cmlab.testing.lifecycle import StartStop
from cmlab.testing.modes import DEFAULT_TIMEOUT, MODES, Mode
from cmlab.testing.runners import InProcessDaemon, LabError, Runner, SubprocessDaemon

T = TypeVar("T")

# Start and stop are milliseconds in-process and well under a second as a child process;
# these bounds only keep a broken site from hanging a test run.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# How many log lines a failed wait_log shows.
SHOWN_LINES = 15

# What a test site is made with unless the test says otherwise: synchronization and
# downloads only on request, so a test decides when each stage starts.
TEST_INIT_DEFAULTS: dict[str, Any] = {
    "sync_interval": 0.0,
    "rescan_interval": 0.5,
    "auto_download": False,
}


class WaitTimeout(AssertionError):
    """A wait's deadline passed; the message says what was awaited and what was seen."""


class WaitFailed(AssertionError):
    """A wait ended at a state that ends it badly (a failure state, a refused install)."""


def _state(value: int) -> PackageState | int:
    try:
        return PackageState(value)
    except ValueError:
        return value


def _named(value: int) -> str:
    return f"{PackageState.name_of(value)} ({value})"


class LabSite(StartStop):
    """A lab site in `path`: made by `cmlab init` (or copied from `template`) the first time
    it starts, run in this process (`mode="inprocess"`, the default: ready in milliseconds)
    or as `cmlab run` in a child process (`mode="subprocess"`: the only mode `kill()` works
    in). A folder that already holds a site is used as it is.

    `init_options` are `cmlab init`'s (site_code, role, parent, sync_interval,
    rescan_interval, auto_download, ...); a test site syncs and downloads only on request
    unless they say otherwise (TEST_INIT_DEFAULTS). As a context manager (`with` or `async
    with`) it starts the daemon on entry and stops it on exit."""

    def __init__(
        self,
        path: Path | str,
        *,
        site_code: str = "CAS",
        mode: Mode = "inprocess",
        template: Path | str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        command_prefix: Sequence[str] = (),
        **init_options: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.path = Path(path).absolute()
        self.site_code = site_code.upper()
        self.mode: Mode = mode
        self.template = Path(template) if template is not None else None
        self.timeout = timeout
        self.init_options = {**TEST_INIT_DEFAULTS, **init_options}
        self._runner: Runner = (
            InProcessDaemon(self.path)
            if mode == "inprocess"
            else SubprocessDaemon(self.path, prefix=command_prefix)
        )
        self._config: SiteConfig | None = None

    def __repr__(self) -> str:
        running = "running" if self.running else "stopped"
        return f"<LabSite {self.site_code} {self.mode} {running} at {self.path}>"

    # -- the site folder --------------------------------------------------------------------

    def create(self) -> LabSite:
        """Make the site now if its folder holds none: a copy of the template, or `cmlab
        init`. Called by start(); call it first to change site.toml before the daemon runs."""
        if (self.path / "site.toml").exists():
            return self
        if self.template is not None:
            shutil.copytree(self.template, self.path, symlinks=True)
        else:
            init_site(
                InitOptions(site_dir=self.path, site_code=self.site_code, **self.init_options)
            )
        self._config = None
        return self

    @property
    def config(self) -> SiteConfig:
        """site.toml as the daemon reads it (read again after `set()`)."""
        if self._config is None:
            self.create()
            self._config = load_config(self.path)
            self.site_code = self._config.site_code
        return self._config

    def set(self, table: str, key: str, value: object) -> None:
        """Change one key of site.toml (`site.set("facts", "pending_restart", True)`). The
        daemon reads site.toml when it starts: restart() a running site to apply it."""
        self.create()
        set_value(self.path, table, key, value)
        self._config = None

    @property
    def logs(self) -> Path:
        return self.config.paths.logs

    # -- the daemon --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._runner.alive()

    def start(self, **env: str) -> LabSite:
        """Create the site if needed and start its daemon; returns when every component
        serves. `env`: environment variables for the daemon (mode="subprocess" only)."""
        self.create()
        self._config = None  # read again: a test may have changed site.toml
        if self.running:
            raise LabError(f"{self.site_code}: the daemon is already running")
        self._runner.start(START_TIMEOUT, env)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Stop the daemon gracefully (SIGTERM in subprocess mode); returns its exit code."""
        return self._runner.stop(timeout)

    def restart(self, **env: str) -> LabSite:
        self.stop()
        return self.start(**env)

    def kill(self) -> None:
        """SIGKILL the daemon (mode="subprocess"): a crash, for a test of what a tool under
        test does when the site server dies. Start it again with start()."""
        self._runner.kill()

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for a subprocess daemon to end by itself (a crash point); its exit code."""
        if not isinstance(self._runner, SubprocessDaemon):
            raise LabError("wait_exit() needs mode='subprocess'")
        return self._runner.wait_exit(timeout)

    def daemon_output(self) -> str:
        """A subprocess daemon's stdout (JSON log lines) of its latest run; "" in-process."""
        return self._runner.output()

    def daemon_stderr(self) -> str:
        return self._runner.stderr() if isinstance(self._runner, SubprocessDaemon) else ""

    # -- the administrator's actions (cmlab.admin.actions) ------------------------------------

    def sync(self, *, wait: bool = False, timeout: float | None = None) -> int:
        """Check for updates (spRequestSync); with wait=True, until the synchronization is
        over and every package's applicability decided. Returns the SyncHistory ID."""
        sync_id = actions.request_sync(self.path)
        if wait:
            self._wait(
                waiting.sync_check(self.path, sync_id),
                timeout,
                f"synchronization {sync_id} to finish",
            )
        return sync_id

    def download(self, guid: str, *, wait: bool = False, timeout: float | None = None) -> bool:
        """The console's Download (spAddPackageToDownload); with wait=True, until
        DOWNLOAD_SUCCESS. False if the package was already queued."""
        queued = actions.download(self.path, guid)
        if wait:
            self._wait_goal(guid, waiting.DOWNLOAD_GOAL, timeout)
        return queued

    def prereq(self, guid: str, *, wait: bool = False, timeout: float | None = None) -> int:
        """Run prerequisite check (InitiateUpgrade, Flag 1); with wait=True, until its
        result (PREREQ_SUCCESS or PREREQ_WARNING). Returns the state it started from."""
        was = actions.initiate_upgrade(self.path, guid, PackageFlag.PREREQ_ONLY)
        if wait:
            self._wait_goal(guid, waiting.run_goal(PackageFlag.PREREQ_ONLY), timeout)
        return was

    def install(
        self,
        guid: str,
        *,
        ignore_warnings: bool = False,
        wait: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Install (InitiateUpgrade, Flag 0, or 2 with ignore_warnings); with wait=True,
        until INSTALL_SUCCESS. Returns the state it started from."""
        flag = PackageFlag.IGNORE_WARNINGS if ignore_warnings else PackageFlag.NORMAL
        was = actions.initiate_upgrade(self.path, guid, flag)
        if wait:
            self._wait_goal(guid, waiting.run_goal(flag), timeout)
        return was

    def retry_replication(
        self, guid: str, *, wait: bool = False, timeout: float | None = None
    ) -> str:
        """RetryContentReplication; with wait=True, until the run it restarts ends as its
        flag says (a prerequisite check or an installation). Returns the package ID."""
        package_id = actions.retry_replication(self.path, guid)
        if wait:
            flag = self._progress(guid).flag
            self._wait_goal(guid, waiting.run_goal(PackageFlag(flag)), timeout)
        return package_id

    def recover_secondary(self, site_code: str) -> int:
        """Recover Secondary Site, asked at this primary; returns the request number."""
        return actions.recover_secondary(self.path, site_code)

    def reset(self, guid: str, *, force: bool = False) -> ResetReport:
        """The Update Reset Tool (CMUpdateReset.exe) on `guid`: its report."""
        return reset_package(self.path, guid, force=force)

    # -- waiting ------------------------------------------------------------------------------

    def wait_state(
        self,
        guid: str,
        state: int | str,
        timeout: float | None = None,
        *,
        fail_on: Iterable[int] = waiting.FAILURE_STATES,
    ) -> PackageState | int:
        """Wait until `guid`'s CM_UpdatePackages.State is `state` (a State or its name);
        fails at once at a failure state (fail_on) the run stops at. Returns the state."""
        target = _as_state(state)
        result = self._wait_goal(guid, waiting.state_goal(target, fail_on), timeout)
        return _state(result.state if result.state is not None else target)

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until no drop file waits in any inbox and SMSDBMon has no change left to turn
        into one: everything the site was asked to do so far is done or waiting on time."""
        self._wait(waiting.idle_check(self.path), timeout, "the site to be idle")

    def wait_settled(self, guid: str, state: int | str, timeout: float | None = None) -> None:
        """`guid` at `state` with the site idle (HMAN can reach a state before its last
        notification is handled)."""
        target = int(_as_state(state))
        self.wait_for(
            lambda: self.state(guid) == target and self._idle(),
            timeout,
            what=f"{guid} to settle at {_named(target)}",
            seen=lambda: _named(self.state(guid) or 0),
        )

    def wait_log(
        self, log: str, pattern: str | re.Pattern[str], timeout: float | None = None
    ) -> str:
        """Wait until the log `log` (e.g. "hman.log") has a line matching `pattern`: a str
        is a whole line's message exactly as the guide prints it; a compiled pattern is
        searched. Returns the matching message."""

        def found() -> str:
            for line in self.log(log):
                if line == pattern if isinstance(pattern, str) else pattern.search(line):
                    return line
            return ""

        shown = pattern if isinstance(pattern, str) else f"/{pattern.pattern}/"

        def tail() -> str:
            lines = self.log(log)
            return f"{len(lines)} lines; last: " + " | ".join(lines[-SHOWN_LINES:])

        return self.wait_for(found, timeout, what=f"{shown!r} in {log}", seen=tail)

    def wait_gone(self, path: Path | str, timeout: float | None = None) -> None:
        """Wait until a drop file is consumed (gone from its inbox; BAD/ keeps the ones a
        component refused, with a .reason beside each)."""
        target = Path(path)
        self.wait_for(lambda: not target.exists(), timeout, what=f"{target} to be consumed")

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float | None = None,
        *,
        what: str = "",
        seen: Callable[[], str] | None = None,
    ) -> T:
        """Poll `predicate` until it returns something true, or raise WaitTimeout saying
        `what` was awaited and what the site showed at the end (`seen`, or every package's
        state and the drop files waiting). An in-process daemon that died meanwhile ends the
        wait at once with its error."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            value = predicate()
            if value:
                return value
            self._raise_if_daemon_died(what or str(predicate))
            if time.monotonic() > deadline:
                detail = seen() if seen is not None else self._snapshot()
                raise WaitTimeout(
                    f"{self.site_code}: timed out after {limit} s waiting for "
                    f"{what or predicate}\n  seen: {detail}"
                )
            time.sleep(waiting.POLL_SECONDS)

    def _snapshot(self) -> str:
        """What a timeout shows when the test gave no `seen`: the packages and the inboxes."""
        states = ", ".join(f"{g}={_named(int(s))}" for g, s in self.states().items())
        return f"states: {states or 'none'}; waiting drop files: {self.waiting_files() or 'none'}"

    def _raise_if_daemon_died(self, what: str) -> None:
        error = self._runner.failure()
        if error is not None:
            raise LabError(
                f"{self.site_code}: the daemon stopped with an error while waiting for {what}: "
                f"{error!r}"
            ) from error

    async def wait_state_async(
        self,
        guid: str,
        state: int | str,
        timeout: float | None = None,
        *,
        fail_on: Iterable[int] = waiting.FAILURE_STATES,
    ) -> PackageState | int:
        """wait_state, off the event loop (for `async def` tests)."""
        return await asyncio.to_thread(self.wait_state, guid, state, timeout, fail_on=fail_on)

    async def wait_log_async(
        self, log: str, pattern: str | re.Pattern[str], timeout: float | None = None
    ) -> str:
        return await asyncio.to_thread(self.wait_log, log, pattern, timeout)

    async def wait_idle_async(self, timeout: float | None = None) -> None:
        await asyncio.to_thread(self.wait_idle, timeout)

    def _wait(self, check: waiting.Check, timeout: float | None, what: str) -> waiting.WaitResult:
        limit = self.timeout if timeout is None else timeout

        def watched() -> waiting.Progress:
            self._raise_if_daemon_died(what)
            return check()

        try:
            result = waiting.wait(watched, limit)
        finally:
            check.close()
        if result.verdict is waiting.Verdict.DONE:
            return result
        seen = " -> ".join(result.seen)
        if result.verdict is waiting.Verdict.FAILED:
            raise WaitFailed(
                f"{self.site_code}: waiting for {what}, stopped at {result.line} after "
                f"{result.seconds:.1f} s\n  seen: {seen}\n  logs: {self.logs}"
            )
        raise WaitTimeout(
            f"{self.site_code}: timed out after {limit} s waiting for {what}; last "
            f"{result.line}\n  seen: {seen}\n  logs: {self.logs}"
        )

    def _wait_goal(
        self, guid: str, goal: waiting.Goal, timeout: float | None
    ) -> waiting.WaitResult:
        return self._wait(
            waiting.package_check(self.path, guid, goal), timeout, f"{guid} to reach {goal.what}"
        )

    def _idle(self) -> bool:
        return waiting.site_idle(self.config)

    def _progress(self, guid: str) -> servicing.PackageProgress:
        with connected(self.config.paths.db_file, self.site_code) as conn:
            progress = servicing.package_progress(conn, guid)
        if progress is None:
            raise LookupError(f"no update package {guid} in CM_UpdatePackages")
        return progress

    # -- reading the site ----------------------------------------------------------------------

    def state(self, guid: str) -> PackageState | int | None:
        """`guid`'s CM_UpdatePackages.State now (None if the site has no such package)."""
        with connected(self.config.paths.db_file, self.site_code) as conn:
            progress = servicing.package_progress(conn, guid)
        return None if progress is None else _state(progress.state)

    def states(self) -> dict[str, PackageState | int]:
        """Every package's state: PackageGuid (upper case) -> State."""
        with connected(self.config.paths.db_file, self.site_code) as conn:
            rows = overview.packages(conn)
        return {p.guid.upper(): _state(p.state) for p in rows}

    def history(self, guid: str, site_code: str | None = None) -> list[PackageState | int]:
        """Every state this site's status row for `guid` passed through, in order
        (CM_UpdatePackageSiteStatus_HIST); `site_code` for another site of the hierarchy as
        this site's database knows it."""
        with connected(self.config.paths.db_file, self.site_code) as conn:
            states = overview.site_history(conn, guid, (site_code or self.site_code).upper())
        return [_state(s) for s in states]

    def site_states(self, guid: str) -> dict[str, PackageState | int]:
        """Site code -> state for `guid`, every site this database knows (the guide's
        Installation-stage query over CM_UpdatePackageSiteStatus and ServerData)."""
        with connected(self.config.paths.db_file, self.site_code) as conn:
            rows = overview.site_states(conn, guid)
        return {code: _state(s) for code, s in rows.items()}

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one query against the site database, written as in SQL Server Management
        Studio or as SQLite (`dbo.`, `TOP n` and the site's functions work, as in `cmlab
        sql`)."""
        with connected(self.config.paths.db_file, self.site_code) as conn:
            _, rows = scripts.run_query(conn, sql, params)
        return rows

    def log(self, name: str) -> list[str]:
        """The messages of one log (`Logs/<name>`), one per line, without the trace
        log's time and component fields."""
        return read_messages(self.logs / name)

    def inbox(self, name: str) -> Path:
        """An inbox folder by its name in the inbox contract: "hman.box", "hman.box/CFD",
        "distmgr.box" (with or without the leading "inboxes/")."""
        folder = name if name.startswith("inboxes/") else f"inboxes/{name}"
        known = sorted({entry.folder for entry in load_contract()})
        if folder.rstrip("/") not in known:
            raise LookupError(
                f"no inbox {name!r}; the inboxes are "
                + ", ".join(k.removeprefix("inboxes/") for k in known)
            )
        return self.path.joinpath(*folder.rstrip("/").split("/"))

    def drop(self, inbox: str, name: str, content: bytes | str = b"") -> Path:
        """Drop a file into an inbox whole (a temporary name, then a rename, as ConfigMgr's
        components and cmlab's own do), so the watcher never sees half of it."""
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise ValueError(f"a drop file's name is one path component, not {name!r}")
        path = self.inbox(inbox) / name
        write_atomic(path, content.encode("utf-8") if isinstance(content, str) else content)
        return path

    def waiting_files(self) -> list[str]:
        """The drop files waiting in the inboxes (site-relative; BAD/ not included)."""
        return waiting_drop_files(self.path)

    def bad_files(self, inbox: str) -> list[str]:
        """The files a component moved to `inbox`/BAD, each with its `.reason` beside it."""
        bad = self.inbox(inbox) / "BAD"
        if not bad.is_dir():
            return []
        return sorted(p.name for p in bad.iterdir() if not p.name.endswith(".reason"))


def _as_state(state: int | str) -> int:
    if isinstance(state, str):
        try:
            return PackageState[state.upper()]
        except KeyError:
            raise ValueError(f"no state named {state!r} (see cmlab.testing.State)") from None
    return int(state)
