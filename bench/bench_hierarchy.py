"""The hierarchy's lifecycle on real daemons: `cmlab install CAS GUID` until INSTALL_SUCCESS at
the CAS and at every child primary, for 1, 5 and 20 child primaries (each site its own folder,
database and daemon process, all on this machine), against the same update on the CAS alone
(0 children) measured in the same run; how it grows per child.

The lab, untimed: one CAS made like bench_lifecycle's sample site (`init_site` with its own CA
and the bundled content source; `sync` 0, `rescan` 0.5 s, `settle` 0.05 s, `auto_download`
off) and `replication.cmupdates_interval` 0.5 s, synced (`cmlab sync`) and downloaded
(`cmlab download`) once by its daemon: the template ("Ready to install"). For each size N a
tree: the template copied as `CAS`, and N child primaries `P01`..`PNN` made by `init_site(...,
role="primary", parent=CAS)` (what `cmlab init --parent` does: both databases and the CAS's
site.toml record the child; the children trust the CAS's lab CA), with the same settings. A
size run more than once is copied to a pristine folder, and every later repetition starts
from a fresh copy of it at the same paths (the sites record each other's absolute folders).

`replication.cmupdates_interval` is 0.5 s rather than the product's 60 s: the CMUpdates
replication group carries the CAS's run down and the children's results up, so with the real
default the interval (up to four passes: the run down, each child's results up, the CAS's
INSTALL_SUCCESS down, the children's INSTALL_SUCCESS up) would be most of the figure. The
bench measures cmlab's work; the interval is a lab knob. The Sender's retry delay is left at
its default (60 s): a send that had to be retried would show as a run a minute long.

Each repetition, for each size in a rotating order, on a fresh copy of its tree: every daemon
(`python -m cmlab run SITE`, one process per site, each with its own NOTIFY_SOCKET) started
at once, and waited for until each has sent READY=1 (it is serving: components and inboxes
started); then until the hierarchy is quiet (no drop file in any site's inboxes and no
pending TableChangeNotifications, steadily for longer than one replication interval: the
CMUpdates messages every site sends at start are applied); `os.sync()`. The start-up (spawn
-> every READY) and the quiet wait are reported, outside the timed figure.

Timed, from starting `python -m cmlab install CAS GUID`: a read-only connection reads the CAS's
`CM_UpdatePackages.State` (the roll-up: the worst of every primary site's row) every 20 ms,
with the CAS's site status rows (a failed state at any site stops the run), until the roll-up
is INSTALL_SUCCESS; then every child's own row is checked in its own database. The stage
ends are read afterwards from each site's `CM_UpdatePackageSiteStatus_HIST` (every state of a
site status row, stamped by SQLite when written, UTC, ms) and placed on the bench's clock
against the command's start read on both clocks:

- each site's own end: the first INSTALL_SUCCESS of its own row in its own database;
- the CAS's view of each child: the first INSTALL_SUCCESS of that child's row in the CAS's
  database (replicated up);
- the roll-up's end: `CM_UpdatePackages.LastUpdateTime` of the CAS's row (written with the
  state), checked against the poll (it must lie between the start and the poll's read);
- the total: the latest of all of them (in practice the roll-up).

The details also give each site's milestones (CONTENT_REPLICATION_SUCCESS, PREREQ_SUCCESS,
INSTALL_WAITING_PARENT, INSTALL_IN_PROGRESS, INSTALL_SUCCESS: first row of each after the
start), the CPU seconds the daemons used during the timed run (/proc/PID/stat), the ERROR and
WARNING lines of every site's logs and anything a daemon wrote to stderr. Peak RSS: the sum of
the daemons' VmHWM (/proc/PID/status) at the end.

Every daemon is stopped (SIGTERM to all, then SIGKILL to any still running after 30 s) when
the run ends or fails, and the scratch folder is removed.

Rows: `hierarchy.total.N` (N = 0, 1, 5, 20; baseline: the CAS alone, N = 0),
`hierarchy.cas_end.N` and `hierarchy.last_child_end.N` (N > 0; baselines: the CAS alone's own
end, its total), `hierarchy.slope` (seconds per child: least-squares slope of the total over
N = 1, 5, 20; its samples are the per-child increments (total(N) - total(0)) / N, so a flat
spread means linear growth; its details give the residuals and (T20 - T5) / (T5 - T1), 3.75
if linear; baseline: the CPU-bound floor, the slope of the daemons' CPU seconds over N divided
by the usable cores), `hierarchy.startup.N` (baseline: one daemon) and `hierarchy.peak_rss.N`
(baseline: the CAS alone's daemon).

Full run: 3 repetitions of N = 0, 1 and 5, 2 of N = 20 (about 2 minutes on 2 cores);
`--quick`: N = 0, 1, 5 once. A few hundred MB in `$TMPDIR`. Run standalone with
`PYTHONPATH=daemon python -m bench.bench_hierarchy [--quick]`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import selectors
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._common import result, slope_per_unit, spread
from bench.bench_download import GUID, MB, _child_env
from bench.bench_lifecycle import FAILED, RESCAN, SETTLE, _init, inbox_files
from cmlab.site.state_codes import PackageState

CAS = "CAS"
INTERVAL = 0.5  # seconds: replication.cmupdates_interval at every site (the product: 60)
POLL = 0.02  # seconds between reads of the CAS's roll-up
QUIET_FOR = 0.75  # seconds of no drop file and no pending change before the clock starts
QUIET_POLL = 0.05
READY_TIMEOUT = 120.0
RUN_TIMEOUT = 600.0
STOP_TIMEOUT = 30.0
HISTORY = "CM_UpdatePackageSiteStatus_HIST"
MILESTONES = (
    PackageState.ENABLED,
    PackageState.CONTENT_REPLICATION_SUCCESS,
    PackageState.PREREQ_SUCCESS,
    PackageState.INSTALL_WAITING_PARENT,
    PackageState.INSTALL_IN_PROGRESS,
    PackageState.INSTALL_SUCCESS,
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Plan:
    reps: dict[int, int]  # children -> repetitions; 0 is the baseline (the CAS alone)


FULL = Plan({0: 2, 1: 2, 5: 2, 20: 1})  # make bench stays within its 10 minutes
QUICK = Plan({0: 1, 1: 1, 5: 1})


def log(message: str) -> None:
    print(f"  bench_hierarchy: {message}", file=sys.stderr, flush=True)


def child_codes(n: int) -> list[str]:
    return [f"P{i:02d}" for i in range(1, n + 1)]


# -- the lab ---------------------------------------------------------------------------------


def set_toml(site: Path, table: str, key: str, value: str) -> None:
    """Rewrite one `key = value` line in a table of site.toml (value is TOML text)."""
    path = site / "site.toml"
    lines = path.read_text(encoding="utf-8").splitlines()
    current = ""
    for i, line in enumerate(lines):
        if line.startswith("["):
            current = line.strip().strip("[]")
        elif current == table and line.split("=")[0].strip() == key:
            lines[i] = f"{key} = {value}"
            break
    else:
        raise KeyError(f"{table}.{key} not in {path}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _lab_settings(site: Path) -> None:
    set_toml(site, "intervals", "settle", repr(SETTLE))
    set_toml(site, "replication", "cmupdates_interval", repr(INTERVAL))


@dataclasses.dataclass
class Tree:
    n: int
    root: Path
    sites: dict[str, Path]  # code -> folder (CAS first)
    pristine: Path | None  # a copy to start later repetitions from; None: run once
    build_seconds: float
    used: bool = False


def build_template(work: Path, env: dict[str, str]) -> Path:
    """The CAS, synced and downloaded once by its own daemon: "Ready to install"."""
    site = work / "template" / CAS
    _init(site, None, None)
    _lab_settings(site)
    sites = {CAS: site}
    with Daemons(sites, work / "out" / "template", env) as daemons:
        daemons.start()
        _cmlab(env, "sync", str(site))
        _wait(
            lambda: _package_state(site) == PackageState.APPLICABILITY_SUCCESS,
            "the template's sync",
        )
        _wait(lambda: _quiet(site), "the template's sync to settle")
        _cmlab(env, "download", str(site), GUID)
        _wait(
            lambda: _package_state(site) == PackageState.DOWNLOAD_SUCCESS, "the template's download"
        )
        _wait(lambda: _quiet(site), "the template's download to settle")
    return site


def build_tree(work: Path, template: Path, n: int, reps: int) -> Tree:
    from cmlab.admin.init import InitOptions, init_site

    t0 = time.perf_counter()
    root = work / f"n{n}"
    real = root / "sites"
    real.mkdir(parents=True)
    cas = real / CAS
    shutil.copytree(template, cas, symlinks=True)
    sites = {CAS: cas}
    for code in child_codes(n):
        sites[code] = init_site(
            InitOptions(
                site_dir=real / code,
                site_code=code,
                role="primary",
                parent=cas,
                address=real / code,
                ca_dir=cas / "trust",
                content_source=cas / "cloud",
                sync_interval=0.0,
                rescan_interval=RESCAN,
                auto_download=False,
            )
        )
        _lab_settings(sites[code])
    pristine = None
    if reps > 1:
        pristine = root / "pristine"
        shutil.copytree(real, pristine, symlinks=True)
    return Tree(n, root, sites, pristine, time.perf_counter() - t0)


def reset_tree(tree: Tree) -> None:
    """A fresh copy of the pristine tree at the same paths (after the first repetition)."""
    if tree.used:
        if tree.pristine is None:
            raise RuntimeError(f"N={tree.n} has no pristine copy for another repetition")
        real = tree.root / "sites"
        shutil.rmtree(real)
        shutil.copytree(tree.pristine, real, symlinks=True)
    tree.used = True


def _cmlab(env: dict[str, str], *args: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cmlab", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cmlab {' '.join(args)} -> {proc.returncode}: {proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def _wait(predicate: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(QUIET_POLL)


# -- the daemons -----------------------------------------------------------------------------


@dataclasses.dataclass
class Proc:
    code: str
    site: Path
    sock: socket.socket
    sock_path: Path
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    ready: float | None = None  # seconds from the first spawn to its READY=1
    returncode: int | None = None


class Daemons:
    """One `python -m cmlab run SITE` per site, all spawned at once, each with its own
    NOTIFY_SOCKET; `start()` returns when every one has sent READY=1. Leaving the block stops
    them all: SIGTERM to every one, then SIGKILL to any still running after STOP_TIMEOUT."""

    def __init__(self, sites: dict[str, Path], out: Path, env: dict[str, str]) -> None:
        self.sites = sites
        self.out = out
        self.env = env
        self.procs: dict[str, Proc] = {}
        self.startup = math.nan
        self.killed: list[str] = []

    def __enter__(self) -> Daemons:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        sel = selectors.DefaultSelector()
        t0 = time.perf_counter()
        try:
            for code, site in self.sites.items():
                sock_path = self.out / f"{code}.sock"
                sock_path.unlink(missing_ok=True)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.bind(os.fspath(sock_path))
                stderr_path = self.out / f"{code}.stderr.txt"
                with (
                    open(self.out / f"{code}.stdout.jsonl", "wb") as out,
                    open(stderr_path, "wb") as err,
                ):
                    try:
                        proc = subprocess.Popen(
                            [sys.executable, "-m", "cmlab", "run", str(site)],
                            stdout=out,
                            stderr=err,
                            env={**self.env, "NOTIFY_SOCKET": os.fspath(sock_path)},
                        )
                    except BaseException:
                        sock.close()
                        raise
                self.procs[code] = Proc(code, site, sock, sock_path, proc, stderr_path)
                sel.register(sock, selectors.EVENT_READ, code)
            waiting = set(self.procs)
            deadline = time.monotonic() + READY_TIMEOUT
            while waiting:
                for key, _ in sel.select(timeout=0.5):
                    code = key.data
                    data = self.procs[code].sock.recv(4096)
                    if b"READY=1" in data and code in waiting:
                        self.procs[code].ready = time.perf_counter() - t0
                        waiting.discard(code)
                        sel.unregister(self.procs[code].sock)
                dead = [c for c in waiting if self.procs[c].proc.poll() is not None]
                if dead:
                    raise RuntimeError(
                        f"daemons exited before READY: {dead}: {self.stderr_tail(dead[0])}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not READY in {READY_TIMEOUT} s: {sorted(waiting)}")
            self.startup = time.perf_counter() - t0
        finally:
            sel.close()

    def alive(self) -> bool:
        return all(p.proc.poll() is None for p in self.procs.values())

    def dead(self) -> list[str]:
        return [c for c, p in self.procs.items() if p.proc.poll() is not None]

    def stderr_tail(self, code: str, size: int = 2000) -> str:
        path = self.procs[code].stderr_path
        return path.read_text(errors="replace")[-size:] if path.is_file() else ""

    def pids(self) -> dict[str, int]:
        return {c: p.proc.pid for c, p in self.procs.items()}

    def stop(self) -> None:
        for p in self.procs.values():
            if p.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for p in self.procs.values():
            try:
                p.returncode = p.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.killed.append(p.code)
                p.proc.kill()
                p.returncode = p.proc.wait(STOP_TIMEOUT)
        for p in self.procs.values():
            p.sock.close()
            p.sock_path.unlink(missing_ok=True)

    def exit_codes(self) -> dict[str, int | None]:
        return {c: p.returncode for c, p in self.procs.items()}


def _proc_status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS of a process, in bytes (empty once it has exited)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (threads included), from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# -- reading the sites -----------------------------------------------------------------------


def _reader(site: Path) -> sqlite3.Connection:
    db = site / "db" / "site.db"
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)


def _query(site: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = _reader(site)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _package_state(site: Path) -> int | None:
    rows = _query(site, "SELECT State FROM CM_UpdatePackages WHERE PackageGuid = ?", (GUID,))
    return int(rows[0][0]) if rows else None


def _quiet(site: Path) -> bool:
    return not inbox_files(site) and not _query(
        site, "SELECT 1 FROM TableChangeNotifications LIMIT 1"
    )


def _site_rows(conn: sqlite3.Connection) -> dict[str, int]:
    """Site code -> state of the update's site status rows, as this database knows them."""
    return {
        str(code): int(state)
        for code, state in conn.execute(
            "SELECT d.SiteCode, s.State FROM CM_UpdatePackageSiteStatus s "
            "JOIN ServerData d ON d.ID = s.SiteNumber WHERE s.PackageGuid = ?",
            (GUID,),
        )
    }


def _history_id(site: Path) -> int:
    return int(_query(site, f"SELECT COALESCE(MAX(ID), 0) FROM {HISTORY}")[0][0])


def _history(site: Path, after_id: int) -> list[tuple[str, float, int]]:
    """(site code, epoch seconds, State) of every history row of the update after `after_id`,
    in order. UpdateTime is UTC, 'YYYY-MM-DD HH:MM:SS.fff'."""
    rows = _query(
        site,
        f"SELECT d.SiteCode, h.UpdateTime, h.State FROM {HISTORY} h "
        "JOIN ServerData d ON d.ID = h.SiteNumber WHERE h.PackageGuid = ? AND h.ID > ? "
        "ORDER BY h.ID",
        (GUID, after_id),
    )
    return [(str(code), _utc_epoch(str(stamp)), int(state)) for code, stamp, state in rows]


def _utc_epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC).timestamp()


def _log_lines(sites: dict[str, Path]) -> dict[str, dict[str, list[str]]]:
    """ERROR and WARNING lines of every site's logs, the site's folder shown as `<site>`:
    kind -> "log: message" -> the sites that wrote it."""
    from cmlab.site.sms_log import read_messages

    found: dict[str, dict[str, list[str]]] = {}
    for code, site in sites.items():
        for path in sorted((site / "Logs").glob("*.log")):
            try:
                messages = read_messages(path)
            except (OSError, ValueError):
                continue
            for m in messages:
                for kind in ("ERROR", "WARNING"):
                    if kind in m:
                        text = f"{path.name}: {m[:300]}".replace(str(site), "<site>")
                        where = found.setdefault(kind.lower(), {}).setdefault(text, [])
                        if code not in where:
                            where.append(code)
    return found


# -- one run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class HierarchyRun:
    n: int
    total: float  # the latest end of all (roll-up, every own end, the CAS's view of each)
    rollup: float  # the CAS's CM_UpdatePackages.State at INSTALL_SUCCESS (LastUpdateTime)
    rollup_polled: float  # when the poll read it
    own_end: dict[str, float]  # site -> its own first INSTALL_SUCCESS, own database
    cas_view: dict[str, float]  # child -> its first INSTALL_SUCCESS in the CAS's database
    milestones: dict[str, dict[str, float | None]]  # site -> state name -> seconds
    startup: float
    ready: dict[str, float]
    quiet_wait: float
    cli_seconds: float
    cpu_seconds: float
    idle_cores: float  # the daemons' CPU use while quiet, before the clock
    wall_seconds: float  # spawn of the first daemon -> every daemon stopped
    hwm: dict[str, int]
    hwm_ready: dict[str, int]
    logs: dict[str, dict[str, list[str]]]
    stderr: dict[str, str]
    exit_codes: dict[str, int | None]
    killed: list[str]


def run_once(tree: Tree, out: Path, env: dict[str, str]) -> HierarchyRun:
    reset_tree(tree)
    sites = tree.sites
    cas = sites[CAS]
    children = [c for c in sites if c != CAS]
    started = time.perf_counter()
    with Daemons(sites, out, env) as daemons:
        daemons.start()
        pids = daemons.pids()
        hwm_ready = {c: _proc_status(pid).get("VmHWM", 0) for c, pid in pids.items()}
        t_quiet = time.perf_counter()
        idle_cores = _wait_quiet(sites, daemons)
        quiet_wait = time.perf_counter() - t_quiet
        if _package_state(cas) != PackageState.DOWNLOAD_SUCCESS:
            raise RuntimeError(f"the CAS is not Ready to install: {_package_state(cas)}")
        last_ids = {c: _history_id(s) for c, s in sites.items()}
        os.sync()
        cpu0 = {c: _cpu_seconds(pid) for c, pid in pids.items()}
        reader = _reader(cas)
        try:
            t0_epoch, t0 = time.time(), time.perf_counter()
            cli = subprocess.Popen(
                [sys.executable, "-m", "cmlab", "install", str(cas), GUID],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            polled, cli_seconds = _watch_rollup(reader, cli, daemons, t0, sites)
        finally:
            reader.close()
        cpu1 = {c: _cpu_seconds(pid) for c, pid in pids.items()}
        hwm = {c: _proc_status(pid).get("VmHWM", 0) for c, pid in pids.items()}
        # Every child's own row, in its own database (the roll-up implies it: check).
        for code in children:
            _wait(
                lambda code=code: _own_state(sites[code], code) == PackageState.INSTALL_SUCCESS,
                f"{code}'s own row at INSTALL_SUCCESS",
                timeout=30,
            )
    wall = time.perf_counter() - started

    def on_clock(epoch: float) -> float:
        return epoch - t0_epoch

    own_end: dict[str, float] = {}
    milestones: dict[str, dict[str, float | None]] = {}
    cas_view: dict[str, float] = {}
    for code, site in sites.items():
        rows = _history(site, last_ids[code])
        own = [(on_clock(e), s) for c, e, s in rows if c == code]
        milestones[code] = {
            PackageState.name_of(m): next((t for t, s in own if s == m), None) for m in MILESTONES
        }
        end = milestones[code][PackageState.name_of(PackageState.INSTALL_SUCCESS)]
        if end is None:
            raise RuntimeError(f"{code}: no INSTALL_SUCCESS in its own history: {own}")
        own_end[code] = end
        if code == CAS:
            for c, e, s in rows:
                if c != CAS and s == PackageState.INSTALL_SUCCESS and c not in cas_view:
                    cas_view[c] = on_clock(e)
    missing = [c for c in children if c not in cas_view]
    if missing:
        raise RuntimeError(f"the CAS's history has no INSTALL_SUCCESS of {missing}")
    stamp = _query(
        cas, "SELECT LastUpdateTime FROM CM_UpdatePackages WHERE PackageGuid = ?", (GUID,)
    )
    rollup = on_clock(_utc_epoch(str(stamp[0][0])))
    if not 0 <= rollup <= polled + 0.05:
        # LastUpdateTime moved after the roll-up (something else wrote the row): the poll.
        rollup = polled
    total = max([rollup, *own_end.values(), *cas_view.values()])
    return HierarchyRun(
        n=tree.n,
        total=total,
        rollup=rollup,
        rollup_polled=polled,
        own_end=own_end,
        cas_view=cas_view,
        milestones=milestones,
        startup=daemons.startup,
        ready={c: p.ready or math.nan for c, p in daemons.procs.items()},
        quiet_wait=quiet_wait,
        cli_seconds=cli_seconds,
        cpu_seconds=sum(cpu1[c] - cpu0[c] for c in pids),
        idle_cores=idle_cores,
        wall_seconds=wall,
        hwm=hwm,
        hwm_ready=hwm_ready,
        logs=_log_lines(sites),
        stderr={
            c: t
            for c in sites
            if (t := (out / f"{c}.stderr.txt").read_text(errors="replace")[-1000:].strip())
        },
        exit_codes=daemons.exit_codes(),
        killed=daemons.killed,
    )


def _own_state(site: Path, code: str) -> int | None:
    conn = _reader(site)
    try:
        return _site_rows(conn).get(code)
    finally:
        conn.close()


def _wait_quiet(sites: dict[str, Path], daemons: Daemons) -> float:
    """Until no site has a drop file waiting or a change pending, steadily for QUIET_FOR.
    Returns the daemons' CPU use over that quiet window, in cores (CPU seconds per second):
    what the idle hierarchy costs (timers, polls, rescans)."""
    deadline = time.monotonic() + READY_TIMEOUT
    since: float | None = None
    cpu_since = 0.0
    pids = list(daemons.pids().values())
    while True:
        now = time.monotonic()
        if all(_quiet(s) for s in sites.values()):
            if since is None:
                since, cpu_since = now, sum(_cpu_seconds(pid) for pid in pids)
            elif now - since >= QUIET_FOR:
                cpu = sum(_cpu_seconds(pid) for pid in pids) - cpu_since
                return cpu / (time.monotonic() - since)
        else:
            since = None
        if not daemons.alive():
            raise RuntimeError(f"daemons exited during start-up: {daemons.dead()}")
        if now > deadline:
            busy = {c: inbox_files(s) for c, s in sites.items() if not _quiet(s)}
            raise TimeoutError(f"the hierarchy is not quiet after start-up: {busy}")
        time.sleep(QUIET_POLL)


def _watch_rollup(
    reader: sqlite3.Connection,
    cli: subprocess.Popen[bytes],
    daemons: Daemons,
    t0: float,
    sites: dict[str, Path],
) -> tuple[float, float]:
    """Poll the CAS's roll-up until INSTALL_SUCCESS: (seconds when read, the CLI's run)."""
    cli_seconds = math.nan
    deadline = time.monotonic() + RUN_TIMEOUT
    last_check = 0.0
    while True:
        row = reader.execute(
            "SELECT State FROM CM_UpdatePackages WHERE PackageGuid = ?", (GUID,)
        ).fetchone()
        now = time.perf_counter()
        if math.isnan(cli_seconds) and cli.poll() is not None:
            cli_seconds = now - t0
            if cli.returncode != 0:
                err = cli.stderr.read().decode(errors="replace") if cli.stderr else ""
                raise RuntimeError(f"cmlab install -> {cli.returncode}: {err[-2000:]}")
        if row is not None and int(row[0]) == PackageState.INSTALL_SUCCESS:
            if math.isnan(cli_seconds):
                cli.wait(60)
                cli_seconds = time.perf_counter() - t0
            return now - t0, cli_seconds
        if now - last_check > 0.5:
            last_check = now
            failed = {
                c: PackageState.name_of(s) for c, s in _site_rows(reader).items() if s in FAILED
            }
            if row is not None and int(row[0]) in FAILED:
                failed[f"{CAS} roll-up"] = PackageState.name_of(int(row[0]))
            if failed:
                raise RuntimeError(f"failed: {failed}; {_errors(sites)}")
            if not daemons.alive():
                raise RuntimeError(f"daemons exited during the run: {daemons.dead()}")
        if time.monotonic() > deadline:
            state = None if row is None else PackageState.name_of(int(row[0]))
            raise TimeoutError(f"the roll-up is {state} after {RUN_TIMEOUT} s")
        time.sleep(POLL)


def _errors(sites: dict[str, Path]) -> str:
    found = _log_lines(sites).get("error")
    return f"ERROR lines: {found}" if found else "no ERROR line in any site's logs"


# -- entry points ----------------------------------------------------------------------------


def run(quick: bool) -> list[dict[str, Any]]:
    plan = QUICK if quick else FULL
    work = Path(tempfile.mkdtemp(prefix="cmlab-bench-hierarchy-"))
    try:
        return _run(plan, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(plan: Plan, work: Path) -> list[dict[str, Any]]:
    started = time.perf_counter()
    env = _child_env()
    t0 = time.perf_counter()
    template = build_template(work, env)
    template_seconds = time.perf_counter() - t0
    log(f"template CAS synced and downloaded in {template_seconds:.1f} s")
    trees: dict[int, Tree] = {}
    for n, reps in plan.reps.items():
        trees[n] = build_tree(work, template, n, reps)
        log(f"N={n}: tree built in {trees[n].build_seconds:.1f} s")
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[int, list[HierarchyRun]] = {n: [] for n in plan.reps}
    sizes = sorted(plan.reps)
    for rep in range(max(plan.reps.values())):
        order = sizes if rep % 2 == 0 else sizes[::-1]
        for n in order:
            if len(runs[n]) >= plan.reps[n]:
                continue
            r = run_once(trees[n], work / "out" / f"n{n}-rep{rep + 1}", env)
            runs[n].append(r)
            kids = [r.own_end[c] for c in r.own_end if c != CAS]
            log(
                f"N={n} rep {rep + 1}: total {r.total:.2f} s (CAS own {r.own_end[CAS]:.2f} s"
                + (f", children {min(kids):.2f}-{max(kids):.2f} s" if kids else "")
                + f"); start-up {r.startup:.2f} s, quiet after {r.quiet_wait:.2f} s "
                f"(idle {r.idle_cores:.2f} cores); "
                f"daemon CPU {r.cpu_seconds:.1f} s; sum VmHWM {sum(r.hwm.values()) / MB:.0f} MB"
            )
    rows = _rows(plan, runs, trees, template_seconds, load_before)
    log(f"done in {time.perf_counter() - started:.1f} s")
    return rows


def _sp(values: list[float]) -> dict[str, float | None]:
    """min / median / max for the details, rounded; null when there is nothing."""
    return {k: None if math.isnan(v) else round(v, 4) for k, v in spread(values).items()}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _rows(
    plan: Plan,
    runs: dict[int, list[HierarchyRun]],
    trees: dict[int, Tree],
    template_seconds: float,
    load_before: list[float],
) -> list[dict[str, Any]]:
    sizes = sorted(plan.reps)
    grown = [n for n in sizes if n > 0]
    total = {n: _median([r.total for r in runs[n]]) for n in sizes}
    base = total[0]
    cas_alone = _median([r.own_end[CAS] for r in runs[0]])
    settings = {
        "replication.cmupdates_interval": INTERVAL,
        "replication.cmupdates_interval_is": "0.5 s, a lab knob: the product's default is 60 s, "
        "which would dominate every figure (the bench measures cmlab's work)",
        "replication.sender_retry_delay": 60.0,
        "intervals": {"sync": 0.0, "rescan": RESCAN, "settle": SETTLE, "auto_download": False},
        "poll_interval_seconds": POLL,
    }
    common: dict[str, Any] = {
        "settings": settings,
        "repetitions_per_size": {str(n): plan.reps[n] for n in sizes},
        "template_seconds": round(template_seconds, 2),
        "tree_build_seconds": {str(n): round(trees[n].build_seconds, 2) for n in sizes},
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }

    def children_of(r: HierarchyRun) -> list[str]:
        return [c for c in r.own_end if c != CAS]

    def per_size(n: int) -> dict[str, Any]:
        rs = runs[n]
        d: dict[str, Any] = {
            **common,
            "children": n,
            "samples": [round(r.total, 4) for r in rs],
            "cas_own_end_seconds": [round(r.own_end[CAS], 4) for r in rs],
            "rollup_end_seconds": [round(r.rollup, 4) for r in rs],
            "rollup_read_by_poll_seconds": [round(r.rollup_polled, 4) for r in rs],
            "cli_exit_seconds": [round(r.cli_seconds, 4) for r in rs],
            "startup_seconds": [round(r.startup, 3) for r in rs],
            "quiet_wait_seconds": [round(r.quiet_wait, 3) for r in rs],
            "quiet_wait_is": "after every READY, until no drop file and no pending change at "
            f"any site for {QUIET_FOR} s (the start-up's CMUpdates messages applied)",
            "daemon_cpu_seconds": [round(r.cpu_seconds, 2) for r in rs],
            "daemon_cpu_is": "utime + stime of every daemon during the timed run "
            "(/proc/PID/stat); 2 cores",
            "idle_cpu_cores": [round(r.idle_cores, 3) for r in rs],
            "idle_cpu_is": "the daemons' CPU seconds per second over the quiet window before "
            "the clock (nothing to do: timers, polls, inbox rescans)",
            "sum_vmhwm_mb": [round(sum(r.hwm.values()) / MB, 1) for r in rs],
            "wall_seconds": [round(r.wall_seconds, 2) for r in rs],
            "wall_is": "the whole repetition: spawn, quiet wait, timed run, every daemon stopped",
            "milestones": [
                {
                    c: {k: None if v is None else round(v, 3) for k, v in m.items()}
                    for c, m in r.milestones.items()
                }
                for r in rs
            ],
            "milestones_are": "per repetition, seconds from the command's start to the first "
            f"row of each state of the site's own row in its own {HISTORY}",
            "log_errors_and_warnings": [r.logs for r in rs],
            "daemon_stderr": [r.stderr for r in rs],
            "daemon_exit_codes_nonzero": [
                {c: rc for c, rc in r.exit_codes.items() if rc != 0} for r in rs
            ],
            "daemons_killed": [r.killed for r in rs],
        }
        if n:
            ends = [[r.own_end[c] for c in children_of(r)] for r in rs]
            views = [[r.cas_view[c] for c in children_of(r)] for r in rs]
            d["children_own_end_seconds"] = [_sp(e) for e in ends]
            d["children_own_end_spread_seconds"] = [round(max(e) - min(e), 4) for e in ends]
            d["children_end_seen_at_cas_seconds"] = [_sp(v) for v in views]
            d["children_end_seen_at_cas_is"] = (
                "first INSTALL_SUCCESS of each child's row in the CAS's history (replicated up)"
            )
            d["slowest_child"] = [max(children_of(r), key=lambda c: r.own_end[c]) for r in rs]

            def gap(r: HierarchyRun, a: str, b: str, c: str) -> float | None:
                x, y = r.milestones[c][a], r.milestones[c][b]
                return None if x is None or y is None else y - x

            ok, ip, ws, ins = (
                PackageState.name_of(PackageState.INSTALL_SUCCESS),
                PackageState.name_of(PackageState.INSTALL_IN_PROGRESS),
                PackageState.name_of(PackageState.INSTALL_WAITING_PARENT),
                PackageState.name_of(PackageState.CONTENT_REPLICATION_SUCCESS),
            )
            phases: dict[str, list[float]] = {
                "content_replicated": [],
                "prereq_check": [],
                "waiting_parent": [],
                "install": [],
                "cas_success_to_child_install_start": [],
            }
            for r in rs:
                for c in children_of(r):
                    m = r.milestones[c]
                    if m[ins] is not None:
                        phases["content_replicated"].append(m[ins])
                    pq = gap(r, ins, PackageState.name_of(PackageState.PREREQ_SUCCESS), c)
                    if pq is not None:
                        phases["prereq_check"].append(pq)
                    w = gap(r, ws, ip, c)
                    if w is not None:
                        phases["waiting_parent"].append(w)
                    i = gap(r, ip, ok, c)
                    if i is not None:
                        phases["install"].append(i)
                    if m[ip] is not None:
                        phases["cas_success_to_child_install_start"].append(m[ip] - r.own_end[CAS])
            d["children_phases_seconds"] = {k: _sp(v) for k, v in phases.items()}
            d["children_phases_are"] = (
                "over every child of every repetition, from its own history: "
                "content_replicated, the command's start -> CONTENT_REPLICATION_SUCCESS; "
                "prereq_check, -> PREREQ_SUCCESS; waiting_parent, INSTALL_WAITING_PARENT -> "
                "INSTALL_IN_PROGRESS; install, INSTALL_IN_PROGRESS -> INSTALL_SUCCESS; "
                "cas_success_to_child_install_start, the CAS's own INSTALL_SUCCESS -> the "
                "child's INSTALL_IN_PROGRESS (the CMUpdates message down, HMAN's CMI)"
            )
        return d

    rows: list[dict[str, Any]] = []
    baseline_desc = (
        f"the same update on the CAS alone (0 children), same settings, same run ({base:.3f} s)"
    )
    for n in sizes:
        samples = [r.total for r in runs[n]]
        rows.append(
            result(
                name=f"hierarchy.total.{n}",
                measured=f"seconds from starting `cmlab install CAS GUID` until INSTALL_SUCCESS "
                f"at the CAS and at each of {n} child primaries (each site's own row in its "
                "own database, each child's row at the CAS, the CAS's roll-up "
                "CM_UpdatePackages.State); one daemon per site, started before the clock; "
                f"cmupdates_interval {INTERVAL} s",
                unit="s",
                figure=total[n],
                samples=samples,
                samples_are="repetitions",
                repetitions=len(samples),
                baseline_figure=base,
                baseline=baseline_desc if n else "itself: this is the baseline",
                details=per_size(n),
            )
        )
    for n in grown:
        samples = [r.own_end[CAS] for r in runs[n]]
        rows.append(
            result(
                name=f"hierarchy.cas_end.{n}",
                measured=f"seconds from starting `cmlab install CAS GUID` to the CAS's own "
                f"INSTALL_SUCCESS (its own row, {HISTORY}) with {n} child primaries",
                unit="s",
                figure=_median(samples),
                samples=samples,
                samples_are="repetitions",
                repetitions=len(samples),
                baseline_figure=cas_alone,
                baseline="the CAS's own INSTALL_SUCCESS with no children, same run",
                details={"children": n, "settings": settings},
            )
        )
    for n in grown:
        samples = [max(r.own_end[c] for c in children_of(r)) for r in runs[n]]
        rows.append(
            result(
                name=f"hierarchy.last_child_end.{n}",
                measured="seconds from starting `cmlab install CAS GUID` to the last child "
                f"primary's own INSTALL_SUCCESS (its own row, its own {HISTORY}), {n} children",
                unit="s",
                figure=_median(samples),
                samples=samples,
                samples_are="repetitions",
                repetitions=len(samples),
                baseline_figure=base,
                baseline=baseline_desc,
                details={
                    "children": n,
                    "children_own_end_seconds": [
                        _sp([r.own_end[c] for c in children_of(r)]) for r in runs[n]
                    ],
                    "slowest_child": [
                        max(children_of(r), key=lambda c: r.own_end[c]) for r in runs[n]
                    ],
                    "settings": settings,
                },
            )
        )
    rows.append(_slope_row(grown, total, base, runs, common))
    for n in sizes:
        samples = [r.startup for r in runs[n]]
        rows.append(
            result(
                name=f"hierarchy.startup.{n}",
                measured=f"seconds from spawning {n + 1} daemons at once (`python -m cmlab run "
                "SITE`, one per site) until every one has sent READY=1; not in the totals",
                unit="s",
                figure=_median(samples),
                samples=samples,
                samples_are="repetitions",
                repetitions=len(samples),
                baseline_figure=_median([r.startup for r in runs[0]]),
                baseline="one daemon (the CAS alone), same run",
                details={
                    "daemons": n + 1,
                    "ready_seconds_per_daemon": [_sp(list(r.ready.values())) for r in runs[n]],
                    "quiet_wait_seconds": [round(r.quiet_wait, 3) for r in runs[n]],
                    "quiet_wait_is": "after the last READY until the hierarchy is quiet (the "
                    "start-up CMUpdates messages applied); not in the totals either",
                },
            )
        )
    for n in sizes:
        samples = [sum(r.hwm.values()) / MB for r in runs[n]]
        rows.append(
            result(
                name=f"hierarchy.peak_rss.{n}",
                measured=f"MB (10^6 bytes), the sum of the {n + 1} daemons' VmHWM "
                "(/proc/PID/status) at the end of the run",
                unit="MB",
                figure=_median(samples),
                samples=samples,
                samples_are="repetitions",
                repetitions=len(samples),
                baseline_figure=_median([sum(r.hwm.values()) / MB for r in runs[0]]),
                baseline="the CAS alone's daemon, same run",
                details={
                    "daemons": n + 1,
                    "vmhwm_per_daemon_mb": [_sp([v / MB for v in r.hwm.values()]) for r in runs[n]],
                    "sum_vmhwm_at_ready_mb": [
                        round(sum(r.hwm_ready.values()) / MB, 1) for r in runs[n]
                    ],
                },
            )
        )
    return rows


def _slope_row(
    grown: list[int],
    total: dict[int, float],
    base: float,
    runs: dict[int, list[HierarchyRun]],
    common: dict[str, Any],
) -> dict[str, Any]:
    xs = [float(n) for n in grown]
    ys = [total[n] for n in grown]
    slope = slope_per_unit(xs, ys)
    intercept = statistics.fmean(ys) - slope * statistics.fmean(xs)
    increments = [(total[n] - base) / n for n in grown]
    last_child = {
        n: _median([max(r.own_end[c] for c in r.own_end if c != CAS) for r in runs[n]])
        for n in grown
    }
    cas_end = {n: _median([r.own_end[CAS] for r in runs[n]]) for n in grown}
    # The CPU-bound floor: the daemons' extra CPU seconds per child spread over every usable
    # core. A slope at this floor means each child's work runs back to back on busy cores,
    # with no waiting; above it, the children also wait (intervals, hand-offs one at a time).
    cores = len(os.sched_getaffinity(0))
    cpu = {n: _median([r.cpu_seconds for r in runs[n]]) for n in grown}
    cpu_slope = slope_per_unit(xs, [cpu[n] for n in grown])
    floor = cpu_slope / cores
    details: dict[str, Any] = {
        **common,
        "sizes": grown,
        "total_medians": {str(n): round(total[n], 4) for n in [0, *grown]},
        "intercept_seconds": round(intercept, 4),
        "residuals_seconds": {str(n): round(total[n] - (intercept + slope * n), 4) for n in grown},
        "residuals_are": "median total minus the fitted line over N = "
        + ", ".join(map(str, grown))
        + (" (two sizes: always zero)" if len(grown) < 3 else ""),
        "per_child_increment_seconds": {
            str(n): round(v, 4) for n, v in zip(grown, increments, strict=True)
        },
        "per_child_increment_is": "(total(N) - total(0)) / N: flat when the growth is linear "
        "with no fixed cost of having children",
        "last_child_end_slope": round(slope_per_unit(xs, [last_child[n] for n in grown]), 4),
        "cas_end_slope": round(slope_per_unit(xs, [cas_end[n] for n in grown]), 4),
        "runs_of_each_size": {str(n): len(runs[n]) for n in [0, *grown]},
        "daemon_cpu_medians_seconds": {str(n): round(cpu[n], 3) for n in grown},
        "daemon_cpu_slope_seconds_per_child": round(cpu_slope, 4),
        "usable_cores": cores,
        "single_site_total_seconds": round(base, 4),
        "slope_as_share_of_single_site": round(slope / base, 4) if base else None,
        "slope_as_share_of_single_site_is": "the slope over the CAS alone's whole lifecycle: "
        "what one more child costs, as a share of one single-site install",
    }
    if 5 in total and 20 in total and 1 in total:
        # Linear growth: (T20 - T5) / (T5 - T1) = 15 / 4 = 3.75, whatever the intercept.
        d51 = total[5] - total[1]
        details["ratio_20_vs_5"] = round(total[20] / total[5], 4)
        details["increase_5_to_20_over_1_to_5"] = (
            round((total[20] - total[5]) / d51, 4) if d51 else None
        )
        details["increase_ratio_if_linear"] = 3.75
    return result(
        name="hierarchy.slope",
        measured="seconds per child primary: least-squares slope of the total (medians) over "
        f"N = {', '.join(map(str, grown))} children; lower is better",
        unit="s/child",
        figure=slope,
        samples=increments,
        samples_are="per-child increment at each size, (total(N) - total(0)) / N",
        repetitions=len(grown),
        baseline_figure=floor,
        baseline=f"the CPU-bound floor: the slope of the daemons' CPU seconds over N "
        f"({cpu_slope:.3f} s per child) / {cores} usable cores; ratio 1 means the growth is "
        "all CPU on saturated cores, above 1 the children also wait",
        details=details,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 0, 1, 5 once")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
