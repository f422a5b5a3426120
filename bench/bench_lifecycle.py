"""An update's whole lifecycle on the real daemon, stage by stage: `cmlab sync` to
APPLICABILITY_SUCCESS, `cmlab download` to DOWNLOAD_SUCCESS, `cmlab install` (Flag 0) to
CONTENT_REPLICATION_SUCCESS, on to PREREQ_SUCCESS and on to INSTALL_SUCCESS in the same run,
for the sample update (payload about 100 KB) and for a 200 MB payload, every figure against a
baseline measured in the same run.

The stages are the list `STAGES`: each names the `cmlab` command that starts it (None when it
follows the previous stage inside the same command's run), the state that ends it, the states
it passes on the way, where its end is read (`clock`) and its bare file work (the baseline of
the 200 MB case). The rows and the total follow from the list.

The lab: the sample site is `init_site` with its own CA and the bundled content source; the
200 MB content source (four 50 MB incompressible binaries added to the 2509 package, signed
with a lab CA) is made by `bench_download.build_lab`, imported, and a fresh site is initialised
against it. Both sites are made once with `sync` 0 (sync only on `cmlab sync`), `rescan` 0.5 s,
`settle` 0.05 s and `auto_download` off, and kept as untouched templates. The 200 MB files sit
in `SMSSetup/bench/`, outside update.map's components: the installation carries them in the
staging folder and cd.latest, and INSTALL_FILES installs the package's own bin/x64 files.

Each repetition, on a fresh copy of the template: the real daemon (`python -m cmlab run SITE`,
`bench_download.Daemon`, READY=1 through NOTIFY_SOCKET), `os.sync()`; then, for each command,
from starting `python -m cmlab <command> SITE [GUID]` a read-only connection reads
`CM_UpdatePackages.State` every 5 ms and stamps every change, until the command's last stage's
state is read there (it stays), and the site's state, to stop at a failure. `CM_UpdatePackages`
is HMAN's roll-up of the site's status and can skip a state (PREREQ_SUCCESS when the run goes
straight on to the installation) or stand still (install steps 5-13 delete SMSDBMon's
triggers), so a stage's end is read from `CM_UpdatePackageSiteStatus_HIST`, the database's
record of every state of the site's status row, in order, stamped when written (UTC, ms): the
first row of its ending state after the stage's start (or of a later stage's state, should the
site skip its own: `missed` in the details), placed on the bench's clock against the command's
start read on both clocks. The sync stage alone is timed on the poll: applicability has no site
status row yet (the history starts at DOWNLOAD_IN_PROGRESS). The details give, per stage, how
long after its end the poll read the same state at the package level
(`package_level_lag_seconds`, null when it never did) and both timelines of the first
repetition. After the command's last stage, the bench waits for the CLI to exit and for every
inbox to be empty (drop files consumed; `settle_seconds` in the details) before the next
command. The daemon's VmHWM (/proc/PID/status) is read at READY and at the end. The details
also give when the bench read each command's own commit (`cli_commit_seconds`: SyncHistory
row, CM_UpdatePackagesToDownload row, State = ENABLED) and, per stage, what is left after it
(`after_cli_commit_seconds`: the daemon's share).

Baselines, in the same run:

- the CLI floor: `python -m cmlab status SITE` as a subprocess (start-up, one read of the
  database, exit), three times per repetition: what every `cmlab` command that starts a stage
  pays before the daemon sees anything. It is the baseline of every stage a command starts;
  the sample's other stages (the prerequisite check and the installation, which follow inside
  the daemon) have none (`baseline_figure` null): an equal number of SQLite commits and
  renames in a loop would say nothing about what the daemon should cost.
- 200 MB, the bare file work of each stage, in a plain Python loop on the same bytes, warm
  cache, added to the floor for stages a command starts: download, copy + SHA-256 of the
  payload CAB and its extraction (`cabextract`, else `bsdtar`, else cmlab.site.cab);
  replication, SHA-256 of every file of the extracted folder and a copy of it (HMAN's folder
  hash and DistMgr's snapshot); prerequisite check, a second copy and its SHA-256 (CMUpdate's
  extraction from the content library into CMUStaging); installation, SHA-256 of every file of
  that staging copy (CMUpdate's check of the staging folder against the content library), a
  copy of its bin/x64 files with an fsync each (INSTALL_FILES, update.map's SITE_SERVER
  files), and a copy of the whole folder (cd.latest). No other fsync: the writeback left
  undone is measured after (`os.sync()`).
- peak RSS: the daemon's VmHWM at READY (start-up and idle).

Daemon runs and baselines alternate in order from one repetition to the next. Full run: 5
repetitions of the sample, 3 of the 200 MB payload (about 85 s on 2 cores, 20-30 s of it
building the 200 MB content source); `--quick`: 1 of the sample only (about 4 s). About 3 GB
in `$TMPDIR`. Run standalone with `PYTHONPATH=daemon python -m bench.bench_lifecycle [--quick]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from bench._common import result, spread
from bench.bench_download import (
    GUID,
    MB,
    POLL,
    SITE_CODE,
    STEP_TIMEOUT,
    Daemon,
    Lab,
    Plan,
    _child_env,
    _reader,
    _state,
    build_lab,
)
from cmlab.site.state_codes import PackageState

RESCAN = 0.5  # seconds: the inbox safety-net rescan
SETTLE = 0.05  # seconds: a drop file with no close/rename event is taken once this old
FLOOR_RUNS = 3  # `cmlab status` runs per repetition
SETTLE_POLL = 0.01  # seconds between looks at the inboxes after a command's last stage

FAILED = frozenset(
    {
        PackageState.APPLICABILITY_FAILED,
        PackageState.APPLICABILITY_NA,
        PackageState.APPLICABILITY_HIDE,
        PackageState.DOWNLOAD_FAILED,
        PackageState.CONTENT_REPLICATION_FAILED,
        PackageState.PREREQ_ERROR,
        PackageState.PREREQ_WARNING,
        PackageState.INSTALL_FAILED,
        PackageState.INSTALL_CMU_FAILED,
    }
)


def log(message: str) -> None:
    print(f"  bench_lifecycle: {message}", file=sys.stderr, flush=True)


# -- the stages ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scratch:
    """Where a baseline repetition works: the payload CAB it starts from, a folder for it."""

    cab: Path
    dir: Path
    extract: Callable[[Path, Path], None]


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    # The `cmlab` command that starts it: (subcommand, *args after SITE; "GUID" is replaced by
    # the update's GUID). None: it follows the previous stage inside the same command's run.
    command: tuple[str, ...] | None
    ends_at: PackageState
    passes: tuple[PackageState, ...]  # the states it goes through before `ends_at`, in order
    what: str
    # The bare file work of the stage (200 MB baseline); returns its steps' seconds.
    work: Callable[[Scratch], dict[str, float]] | None
    work_is: str
    # A query whose value changes when the command's own transaction commits (the hand-off
    # to the daemon); None: the first change of State is the command's own write.
    queued_sql: str | None = None
    # Where its end is read: "history", the first row of its ending state in this site's
    # CM_UpdatePackageSiteStatus_HIST (every site state, stamped by the database when written);
    # "package", the first poll reading of it in CM_UpdatePackages.State (HMAN's roll-up,
    # which can skip a state or stand still). Only a stage with no site status row yet (the
    # applicability check) is timed on the package.
    clock: Literal["history", "package"] = "history"


def _timed(steps: dict[str, float], name: str, fn: Callable[[], object]) -> None:
    t0 = time.perf_counter()
    fn()
    steps[name] = time.perf_counter() - t0


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _hash_tree(root: Path) -> None:
    for path in _files(root):
        _sha256(path)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in _files(root))


def work_download(s: Scratch) -> dict[str, float]:
    steps: dict[str, float] = {}
    copy = s.dir / s.cab.name
    _timed(steps, "copy_cab", lambda: shutil.copyfile(s.cab, copy))
    _timed(steps, "sha256_cab", lambda: _sha256(copy))
    _timed(steps, "extract_cab", lambda: s.extract(copy, s.dir / "payload"))
    return steps


def work_replication(s: Scratch) -> dict[str, float]:
    steps: dict[str, float] = {}
    _timed(steps, "sha256_folder", lambda: _hash_tree(s.dir / "payload"))
    _timed(steps, "copy_folder", lambda: shutil.copytree(s.dir / "payload", s.dir / "library"))
    return steps


def work_prereq_check(s: Scratch) -> dict[str, float]:
    steps: dict[str, float] = {}
    _timed(steps, "copy_folder", lambda: shutil.copytree(s.dir / "library", s.dir / "staging"))
    _timed(steps, "sha256_folder", lambda: _hash_tree(s.dir / "staging"))
    return steps


def _install_files(staging: Path, dest: Path) -> None:
    """Copy the files INSTALL_FILES installs (update.map's SITE_SERVER directory, bin/x64),
    each flushed with fsync, as an installer must before it says the files are in place."""
    source = staging / "SMSSetup" / "bin" / "x64"
    dest.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.is_file():
            target = dest / path.name
            shutil.copyfile(path, target)
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def work_install(s: Scratch) -> dict[str, float]:
    steps: dict[str, float] = {}
    staging = s.dir / "staging"
    _timed(steps, "sha256_staging", lambda: _hash_tree(staging))
    _timed(steps, "install_files", lambda: _install_files(staging, s.dir / "site" / "x64"))
    _timed(steps, "copy_cd_latest", lambda: shutil.copytree(staging, s.dir / "cd.latest"))
    return steps


STAGES: tuple[Stage, ...] = (
    Stage(
        "sync",
        ("sync",),
        PackageState.APPLICABILITY_SUCCESS,
        passes=(PackageState.APPLICABILITY_CHECKING,),
        what="`cmlab sync` -> APPLICABILITY_SUCCESS: DMPDownloader's synchronization (manifest "
        "CAB copied, verified, extracted), HMAN's applicability check",
        work=None,
        work_is="none (the manifest does not grow with the payload): the CLI floor only",
        queued_sql="SELECT COUNT(*) FROM SyncHistory",
        clock="package",
    ),
    Stage(
        "download",
        ("download", "GUID"),
        PackageState.DOWNLOAD_SUCCESS,
        passes=(PackageState.DOWNLOAD_IN_PROGRESS,),
        what="`cmlab download` -> DOWNLOAD_SUCCESS: DMPDownloader copies, verifies and extracts "
        "the payload and redists, hashes the folder; HMAN records it",
        work=work_download,
        work_is="copy of the payload CAB, its SHA-256, its extraction",
        queued_sql="SELECT COUNT(*) FROM CM_UpdatePackagesToDownload WHERE PackageGuid = :guid",
    ),
    Stage(
        "replication",
        ("install", "GUID"),
        PackageState.CONTENT_REPLICATION_SUCCESS,
        passes=(PackageState.ENABLED, PackageState.CONTENT_REPLICATING),
        what="`cmlab install` (Flag 0) -> CONTENT_REPLICATION_SUCCESS: InitiateUpgrade, "
        "SMSDBMon, HMAN's folder hash of EasySetupPayload, DistMgr's snapshot into "
        "SCCMContentLib",
        work=work_replication,
        work_is="SHA-256 of every file of the extracted payload folder, a copy of it",
    ),
    Stage(
        "prereq_check",
        None,
        PackageState.PREREQ_SUCCESS,
        passes=(PackageState.PREREQ_IN_PROGRESS,),
        what="CONTENT_REPLICATION_SUCCESS -> PREREQ_SUCCESS: HMAN's CMI, CMUpdate's extraction "
        "from the content library into CMUStaging, update.map, the prerequisite checker",
        work=work_prereq_check,
        work_is="a second copy of the folder and its SHA-256",
    ),
    Stage(
        "install",
        None,
        PackageState.INSTALL_SUCCESS,
        passes=(
            PackageState.INSTALL_IN_PROGRESS,
            PackageState.INSTALL_CMU_VALIDATING,
            PackageState.INSTALL_CMU_STOPPED,
            PackageState.INSTALL_CMU_INSTALLFILES,
            PackageState.INSTALL_CMU_STARTED,
            PackageState.INSTALL_CMU_SUCCESS,
            PackageState.INSTALL_UPGRADEDATABASE,
            PackageState.INSTALL_INSTALLSYSTEM,
            PackageState.INSTALL_INSTALLFILES,
            PackageState.INSTALL_UPGRADESITECTRLIMAGE,
            PackageState.INSTALL_CONFIGURESERVICEBROKER,
            PackageState.INSTALL_INSTALLBASESERVICES,
            PackageState.INSTALL_UPDATE_SITES,
            PackageState.INSTALL_UPDATEADMINCONSOLE,
            PackageState.INSTALL_SSB_ACTIVATION_ON,
        ),
        what="PREREQ_SUCCESS -> INSTALL_SUCCESS: CMUpdate's self-upgrade, the staging folder "
        "checked against the content library, the redists and media check, install.map's 16 "
        "steps, cd.latest, the client files, the post-installation checks",
        work=work_install,
        work_is="SHA-256 of every file of the staging folder, a copy of its bin/x64 files with "
        "an fsync each (INSTALL_FILES), a copy of the folder (cd.latest)",
    ),
)


def steps_of(stages: tuple[Stage, ...]) -> list[list[Stage]]:
    """The stages grouped by the command that starts them."""
    out: list[list[Stage]] = []
    for stage in stages:
        if stage.command is not None:
            out.append([stage])
        elif out:
            out[-1].append(stage)
        else:
            raise ValueError(f"the first stage ({stage.name}) needs a command")
    return out


# -- the lab ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # "sample" or "200mb"
    lab: Lab  # lab.site: where each repetition runs; lab.pristine: the template (not synced)
    payload_cab: Path
    reps: int


@dataclasses.dataclass(frozen=True)
class Runs:
    sample_reps: int
    big_reps: int  # 0: no 200 MB case
    big_files: int = 4
    big_file_bytes: int = 50 * MB


FULL = Runs(sample_reps=5, big_reps=3)
QUICK = Runs(sample_reps=1, big_reps=0)


def _set_intervals(site: Path) -> None:
    """`settle` is not an init option: rewrite its line in site.toml's [intervals]."""
    path = site / "site.toml"
    lines = path.read_text(encoding="utf-8").splitlines()
    table = ""
    for i, line in enumerate(lines):
        if line.startswith("["):
            table = line.strip().strip("[]")
        elif table == "intervals" and line.split("=")[0].strip() == "settle":
            lines[i] = f"settle = {SETTLE}"
            break
    else:
        raise KeyError("intervals.settle not in site.toml")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _init(site: Path, content_source: Path | None, ca_dir: Path | None) -> None:
    from cmlab.admin.init import InitOptions, init_site

    init_site(
        InitOptions(
            site_dir=site,
            site_code=SITE_CODE,
            sync_interval=0.0,
            rescan_interval=RESCAN,
            auto_download=False,
            content_source=content_source,
            ca_dir=ca_dir,
        )
    )
    _set_intervals(site)


def sample_case(work: Path, reps: int) -> Case:
    site = work / "site" / SITE_CODE
    _init(site, None, None)  # its own CA, the bundled content source in site/cloud
    template = work / "template" / SITE_CODE
    shutil.copytree(site, template, symlinks=True)
    lab = Lab(
        work=work,
        cloud=site / "cloud",
        site=site,
        pristine=template,
        payload_cab=site / "cloud" / f"{GUID}.cab",
        redist=site / "cloud" / GUID / "redist",
        env=_child_env(),
        setup_seconds={},
    )
    return Case("sample", lab, lab.payload_cab, reps)


def big_case(work: Path, plan: Runs) -> Case:
    t0 = time.perf_counter()
    built = build_lab(work, Plan(plan.big_files, plan.big_file_bytes, plan.big_reps))
    # build_lab leaves a synced site; the lifecycle starts before the sync, on a new site.
    shutil.rmtree(built.site.parent)
    shutil.rmtree(built.pristine.parent)
    site = work / "lifecycle" / SITE_CODE
    _init(site, built.cloud, work / "labca")
    template = work / "template" / SITE_CODE
    shutil.copytree(site, template, symlinks=True)
    lab = dataclasses.replace(built, site=site, pristine=template, daemons=0)
    lab.setup_seconds["total"] = time.perf_counter() - t0
    return Case("200mb", lab, lab.payload_cab, plan.big_reps)


def _reset(lab: Lab) -> None:
    if lab.site.exists():
        shutil.rmtree(lab.site)
    shutil.copytree(lab.pristine, lab.site, symlinks=True)


def inbox_files(site: Path) -> list[str]:
    """Drop files waiting in the inboxes, as tests/sites.py counts them."""
    from cmlab.site.contract import waiting_drop_files

    return waiting_drop_files(site)


def _vm(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


# -- one lifecycle on the daemon -------------------------------------------------------------


@dataclasses.dataclass
class LifecycleRun:
    stages: dict[str, float]  # stage name -> seconds
    total: float  # the sum of the stages (the settle waits between commands left out)
    wall: float  # from the first command to the last step's inboxes empty
    missed: list[str]  # stages whose ending state was not seen where the stage is timed
    settle: dict[str, float]  # command -> seconds from its last state to empty inboxes
    cli_exit: dict[str, float]  # command -> seconds from its start to the CLI's exit
    queued: dict[str, float]  # command -> seconds from its start to its commit being read
    transitions: dict[str, list[tuple[float, str]]]  # command -> (seconds, state) as read
    history: dict[str, list[tuple[float, str]]]  # command -> (seconds, site state) recorded
    # stage -> seconds from its end (as timed) until the package-level State was read at its
    # ending state; None: never read there (HMAN's roll-up skipped it, or it lasted < a poll)
    package_lag: dict[str, float | None]
    ready_seconds: float
    hwm_ready: int
    hwm_end: int
    rss_end: int


def run_lifecycle(case: Case) -> LifecycleRun:
    lab = case.lab
    _reset(lab)
    stages: dict[str, float] = {}
    missed: list[str] = []
    settle: dict[str, float] = {}
    cli_exit: dict[str, float] = {}
    queued: dict[str, float] = {}
    transitions: dict[str, list[tuple[float, str]]] = {}
    history: dict[str, list[tuple[float, str]]] = {}
    package_lag: dict[str, float | None] = {}
    with Daemon(lab) as daemon:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        hwm_ready = _vm(pid)["VmHWM"]
        reader = _reader(lab)
        try:
            os.sync()
            first = time.perf_counter()
            for step in steps_of(STAGES):
                command = step[0].command
                assert command is not None
                label = command[0]
                args = [a.replace("GUID", GUID) for a in command[1:]]
                last_id = _history_id(reader)
                t0_epoch = time.time()
                t0 = time.perf_counter()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "cmlab", command[0], str(lab.site), *args],
                    env=lab.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                watch = _watch(lab, reader, step[0], step[-1].ends_at, daemon, proc)
                seen = watch.seen
                end = seen[-1][0]
                _, err = proc.communicate(timeout=STEP_TIMEOUT)
                if proc.returncode != 0:
                    raise RuntimeError(f"cmlab {label} -> {proc.returncode}: {err[-2000:]!r}")
                exited = watch.cli_exited or time.perf_counter()
                cli_exit[label] = exited - t0
                if watch.queued is not None:
                    queued[label] = watch.queued - t0
                _wait_empty(lab, daemon)
                settle[label] = time.perf_counter() - end
                transitions[label] = [
                    (round(t - t0, 4), "none" if s is None else PackageState.name_of(s))
                    for t, s in seen
                ]
                # The site's history, on the bench's clock: its database timestamps are UTC
                # wall-clock time, placed against the command's start read on both clocks.
                recorded = [
                    (t0 + (epoch - t0_epoch), state)
                    for epoch, state in _history_since(reader, last_id)
                ]
                history[label] = [(round(t - t0, 4), PackageState.name_of(s)) for t, s in recorded]
                # seen[0] is the state the command found; the stage's states come after.
                polled = seen[1:]
                start = t0
                for i, stage in enumerate(step):
                    later = {stage.ends_at}
                    for nxt in step[i + 1 :]:
                        later.update(nxt.passes)
                        later.add(nxt.ends_at)
                    events = recorded if stage.clock == "history" else polled
                    after = [(t, s) for t, s in events if t >= start]
                    hit = next((t for t, s in after if s in later), None)
                    if hit is None:
                        raise RuntimeError(
                            f"{stage.name}: no {PackageState.name_of(stage.ends_at)} "
                            "nor a later state in "
                            f"the {stage.clock} states: {history[label]} / {transitions[label]}"
                        )
                    if not any(s == stage.ends_at for _, s in after):
                        missed.append(stage.name)
                    at_package = next((t for t, s in polled if s == stage.ends_at), None)
                    package_lag[stage.name] = None if at_package is None else at_package - hit
                    stages[stage.name] = hit - start
                    start = hit
            wall = time.perf_counter() - first
        finally:
            reader.close()
        vm = _vm(pid)
        ready = daemon.ready_seconds
    return LifecycleRun(
        stages=stages,
        total=sum(stages.values()),
        wall=wall,
        missed=missed,
        settle=settle,
        cli_exit=cli_exit,
        queued=queued,
        transitions=transitions,
        history=history,
        package_lag=package_lag,
        ready_seconds=ready,
        hwm_ready=hwm_ready,
        hwm_end=vm["VmHWM"],
        rss_end=vm["VmRSS"],
    )


HISTORY = "CM_UpdatePackageSiteStatus_HIST"


def _site_state(reader: sqlite3.Connection) -> int | None:
    """The update's state at the site (CM_UpdatePackageSiteStatus; the lab has one site): a
    failure shows here first, and during install steps 5-13 only here."""
    row = reader.execute(
        "SELECT State FROM CM_UpdatePackageSiteStatus WHERE PackageGuid = ?", (GUID,)
    ).fetchone()
    return None if row is None else int(row[0])


def _history_id(reader: sqlite3.Connection) -> int:
    return int(reader.execute(f"SELECT COALESCE(MAX(ID), 0) FROM {HISTORY}").fetchone()[0])


def _history_since(reader: sqlite3.Connection, last_id: int) -> list[tuple[float, int]]:
    """(epoch seconds, State) of every site state of the update recorded after `last_id`, in
    order (the lab has one site). UpdateTime is UTC, 'YYYY-MM-DD HH:MM:SS.fff'."""
    rows = reader.execute(
        f"SELECT UpdateTime, State FROM {HISTORY} WHERE PackageGuid = ? AND ID > ? ORDER BY ID",
        (GUID, last_id),
    ).fetchall()
    return [(_utc_epoch(str(stamp)), int(state)) for stamp, state in rows]


def _utc_epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC).timestamp()


@dataclasses.dataclass
class Watch:
    seen: list[tuple[float, int | None]]  # (perf_counter, State) at every change read
    queued: float | None  # perf_counter when the command's own commit was first seen
    cli_exited: float | None  # perf_counter when the command was first seen to have exited


def _watch(
    lab: Lab,
    reader: sqlite3.Connection,
    stage: Stage,
    want: int,
    daemon: Daemon,
    cli: subprocess.Popen[bytes],
) -> Watch:
    """Read the update's State every POLL seconds until it is `want`; every change stamped,
    with the command's commit (`stage.queued_sql`, else the first change of State) and exit.
    A failed state at the package or at the site stops it."""

    def queued_value() -> object:
        if stage.queued_sql is None:
            return None
        return reader.execute(stage.queued_sql, {"guid": GUID}).fetchone()[0]

    w = Watch([], None, None)
    before = queued_value()
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        state = _state(reader)
        marker = queued_value()
        now = time.perf_counter()
        if not w.seen or w.seen[-1][1] != state:
            w.seen.append((now, state))
        if w.queued is None and (marker != before or len(w.seen) > 1):
            w.queued = now
        if w.cli_exited is None and cli.poll() is not None:
            w.cli_exited = now
            if cli.returncode != 0:
                raise RuntimeError(f"the cmlab command exited with {cli.returncode}")
        if state == want:
            return w
        for failed in (state, _site_state(reader)):
            if failed is not None and failed in FAILED:
                raise RuntimeError(f"{GUID} is {PackageState.name_of(failed)}: {_log_errors(lab)}")
        if daemon.proc is None or daemon.proc.poll() is not None:
            raise RuntimeError("the daemon exited during the lifecycle")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{GUID} still at {state}, waiting for {want}")
        time.sleep(POLL)


def _log_errors(lab: Lab, keep: int = 8) -> str:
    """The last ERROR lines of the site's logs, for the exception that stops the run."""
    lines = []
    for log_file in sorted((lab.site / "Logs").glob("*.log")):
        text = log_file.read_text(encoding="utf-8", errors="replace")
        lines += [f"{log_file.name}: {x}" for x in text.splitlines() if "ERROR" in x]
    return "\n".join(lines[-keep:]) or f"no ERROR line in {lab.site / 'Logs'}"


def _wait_empty(lab: Lab, daemon: Daemon) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    while inbox_files(lab.site):
        if daemon.proc is None or daemon.proc.poll() is not None:
            raise RuntimeError("the daemon exited with drop files left")
        if time.monotonic() > deadline:
            raise TimeoutError(f"drop files left: {inbox_files(lab.site)}")
        time.sleep(SETTLE_POLL)


# -- the baselines ---------------------------------------------------------------------------


def cli_floor(lab: Lab) -> float:
    """One `python -m cmlab status SITE`: start-up, one read of the database, exit. Waited
    for with a blocking wait(): `subprocess.run(timeout=...)` polls in sleeps of up to 50 ms,
    which rounds the figure up to the next step of its schedule (0.115, 0.165, 0.215 s ...)."""
    cmd = [sys.executable, "-m", "cmlab", "status", str(lab.site)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=lab.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    timer = threading.Timer(STEP_TIMEOUT, proc.kill)
    timer.start()
    try:
        returncode = proc.wait()
    finally:
        timer.cancel()
    seconds = time.perf_counter() - t0
    if returncode != 0:
        raise subprocess.CalledProcessError(returncode, cmd)
    return seconds


def python_start() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t0


@dataclasses.dataclass
class WorkRun:
    stages: dict[str, float]
    steps: dict[str, dict[str, float]]
    sync_after: float  # writeback the plain loop left undone (`os.sync()` after it)
    bytes: dict[str, int]


def run_work(case: Case, extract: Callable[[Path, Path], None]) -> WorkRun:
    scratch = case.lab.work / "baseline"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    s = Scratch(case.payload_cab, scratch, extract)
    os.sync()
    stages: dict[str, float] = {}
    steps: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        if stage.work is None:
            continue
        t0 = time.perf_counter()
        steps[stage.name] = {k: round(v, 4) for k, v in stage.work(s).items()}
        stages[stage.name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    os.sync()
    sync_after = time.perf_counter() - t0
    sizes = {"payload_cab": case.payload_cab.stat().st_size}
    sizes["extracted_folder"] = _tree_bytes(scratch / "payload")
    shutil.rmtree(scratch)
    return WorkRun(stages, steps, sync_after, sizes)


def extractor() -> tuple[str, Callable[[Path, Path], None]]:
    cabextract = shutil.which("cabextract")
    if cabextract:

        def run_cabextract(cab: Path, dest: Path) -> None:
            cmd = [cabextract, "-q", "-d", str(dest), str(cab)]
            # stderr kept apart: cabextract warns of the bytes of the Authenticode signature.
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)

        return "cabextract -q -d", run_cabextract
    bsdtar = shutil.which("bsdtar")
    if bsdtar:

        def run_bsdtar(cab: Path, dest: Path) -> None:
            dest.mkdir(parents=True)
            cmd = [bsdtar, "-x", "-f", str(cab), "-C", str(dest)]
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)

        return "bsdtar -x", run_bsdtar
    from cmlab.site.cab import extract_cab

    def run_cmlab(cab: Path, dest: Path) -> None:
        extract_cab(cab, dest)

    return "cmlab.site.cab.extract_cab", run_cmlab


# -- entry points ----------------------------------------------------------------------------


def run(quick: bool) -> list[dict[str, Any]]:
    plan = QUICK if quick else FULL
    work = Path(tempfile.mkdtemp(prefix="cmlab-bench-lifecycle-"))
    try:
        return _run(plan, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(plan: Runs, work: Path) -> list[dict[str, Any]]:
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    sample = sample_case(work / "sample", plan.sample_reps)
    log(f"sample site ready in {time.perf_counter() - t0:.1f} s")
    rows += _measure(sample, None)
    shutil.rmtree(work / "sample", ignore_errors=True)
    if plan.big_reps:
        needed = 16 * plan.big_files * plan.big_file_bytes
        free = shutil.disk_usage(work).free
        if free < needed:
            raise RuntimeError(f"needs {needed / MB:,.0f} MB free in {work}, has {free / MB:,.0f}")
        t0 = time.perf_counter()
        big = big_case(work / "big", plan)
        log(
            f"200 MB lab ready in {time.perf_counter() - t0:.1f} s: payload CAB "
            f"{big.payload_cab.stat().st_size / MB:.0f} MB"
        )
        rows += _measure(big, extractor())
    log(f"done in {time.perf_counter() - started:.1f} s")
    return rows


def _measure(
    case: Case, work_tool: tuple[str, Callable[[Path, Path], None]] | None
) -> list[dict[str, Any]]:
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: list[LifecycleRun] = []
    works: list[WorkRun] = []
    floors: list[float] = []
    for rep in range(case.reps):
        order = ["daemon", "work"] if rep % 2 == 0 else ["work", "daemon"]
        for what in order:
            if what == "daemon":
                runs.append(run_lifecycle(case))
            elif work_tool is not None:
                works.append(run_work(case, work_tool[1]))
        floors += [cli_floor(case.lab) for _ in range(FLOOR_RUNS)]
        r = runs[-1]
        log(
            f"{case.name} {rep + 1}/{case.reps}: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in r.stages.items())
            + f", total {r.total:.2f} s"
            + (f"; file work {sum(works[-1].stages.values()):.2f} s" if works else "")
            + f"; cmlab status {statistics.median(floors[-FLOOR_RUNS:]):.3f} s"
        )
    starts = [python_start() for _ in range(3)]
    floor = statistics.median(floors)

    def baseline_of(stage: Stage) -> float:
        """The floor if a command starts the stage, plus its file work (200 MB)."""
        value = floor if stage.command is not None else 0.0
        if work_tool is not None and stage.work is not None:
            value += statistics.median(w.stages[stage.name] for w in works)
        return value if value else math.nan

    common: dict[str, Any] = {
        "case": case.name,
        "payload_cab_bytes": case.payload_cab.stat().st_size,
        "intervals": {"sync": 0.0, "rescan": RESCAN, "settle": SETTLE, "auto_download": False},
        "poll_interval_seconds": POLL,
        "cli_floor_seconds": spread(floors),
        "cli_floor_is": "`python -m cmlab status SITE` as a subprocess: interpreter and cmlab "
        "start-up, one read of the database, exit; what every command pays",
        "python_start_seconds": round(statistics.median(starts), 4),
        "daemon_ready_seconds": spread([r.ready_seconds for r in runs]),
        "settle_seconds": {k: spread([r.settle[k] for r in runs]) for k in runs[0].settle},
        "cli_exit_seconds": {k: spread([r.cli_exit[k] for r in runs]) for k in runs[0].cli_exit},
        "cli_commit_seconds": {k: spread([r.queued[k] for r in runs]) for k in runs[0].queued},
        "cli_commit_is": "from starting the command until the bench reads its own commit "
        "(SyncHistory row, CM_UpdatePackagesToDownload row, State = ENABLED): the CLI's share "
        "of the stage it starts; cli_exit_seconds: until it was seen to have exited",
        "wall_seconds": spread([r.wall for r in runs]),
        "wall_is": "from the first command until the last command's inboxes are empty (the "
        "stages, plus the waits for empty inboxes between commands)",
        "transitions_first_repetition": runs[0].transitions,
        "transitions_are": "CM_UpdatePackages.State as polled (HMAN's roll-up), seconds from "
        "the command's start",
        "site_history_first_repetition": runs[0].history,
        "site_history_is": f"{HISTORY}: every state of the site's status row, in order, at "
        "the time the database stamped it (UTC, ms), seconds from the command's start",
        "missed_states": [r.missed for r in runs],
        "daemon_vmhwm_bytes": {
            "at_ready": spread([r.hwm_ready for r in runs]),
            "at_end": spread([r.hwm_end for r in runs]),
        },
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    if works:
        common["extracted_folder_bytes"] = works[0].bytes["extracted_folder"]
        common["file_work_tool"] = work_tool[0] if work_tool else None
        common["file_work_steps_seconds"] = {
            stage: {k: spread([w.steps[stage][k] for w in works]) for k in steps}
            for stage, steps in works[0].steps.items()
        }
        common["file_work_sync_after_seconds"] = spread([w.sync_after for w in works])
        common["caches"] = (
            "warm for both sides (dropping them needs root); os.sync() before each; the daemon "
            "fsyncs what it writes, the file work does not (file_work_sync_after_seconds)"
        )

    rows = []
    for stage in STAGES:
        samples = [r.stages[stage.name] for r in runs]
        base = baseline_of(stage)
        if stage.command is not None and stage.work is not None and works:
            baseline = f"CLI floor ({floor:.3f} s) + file work: {stage.work_is}"
        elif stage.command is not None:
            baseline = f"CLI floor: `cmlab status SITE` ({floor:.3f} s)"
        elif works:
            baseline = f"file work: {stage.work_is}"
        else:
            baseline = (
                "none: started by the daemon itself, no command; its file work on a 100 KB "
                "payload is negligible and a loop of as many commits and renames would be no "
                "floor"
            )
        lags = [r.package_lag[stage.name] for r in runs]
        details = {
            **common,
            "stage": stage.what,
            "samples": [round(s, 4) for s in samples],
            "end_read_in": "CM_UpdatePackages.State, polled"
            if stage.clock == "package"
            else f"{HISTORY}, first row of the ending state",
            "package_level_lag_seconds": [None if x is None else round(x, 4) for x in lags],
            "package_level_lag_is": "from the stage's end as timed until the poll read the "
            "same state in CM_UpdatePackages.State (HMAN's roll-up); null: never read there",
        }
        if stage.command is not None and all(stage.command[0] in r.queued for r in runs):
            # What is left of the stage once the command has committed: the daemon's share.
            details["after_cli_commit_seconds"] = spread(
                [r.stages[stage.name] - r.queued[stage.command[0]] for r in runs]
            )
        if works and stage.work is not None:
            details["file_work_samples"] = [round(w.stages[stage.name], 4) for w in works]
        rows.append(
            result(
                name=f"lifecycle.{case.name}.{stage.name}",
                measured=f"seconds, {stage.what}; real daemon, {case.name} payload",
                unit="s",
                figure=statistics.median(samples),
                samples=samples,
                samples_are="repetitions",
                repetitions=len(samples),
                baseline_figure=base,
                baseline=baseline,
                details=details,
            )
        )
    totals = [r.total for r in runs]
    bases = [baseline_of(s) for s in STAGES]
    total_base = sum(b for b in bases if not math.isnan(b))
    commands = sum(1 for s in STAGES if s.command is not None)
    rows.append(
        result(
            name=f"lifecycle.{case.name}.total",
            measured="seconds, the sum of the stages: "
            + " -> ".join(f"{s.name} ({PackageState.name_of(s.ends_at)})" for s in STAGES)
            + f"; real daemon, {case.name} payload (waits for empty inboxes left out)",
            unit="s",
            figure=statistics.median(totals),
            samples=totals,
            samples_are="repetitions",
            repetitions=len(totals),
            baseline_figure=total_base,
            baseline=f"{commands} x the CLI floor"
            + (" + the file work of every stage" if works else ""),
            details={**common, "samples": [round(s, 4) for s in totals]},
        )
    )
    hwm = [r.hwm_end for r in runs]
    ready = [r.hwm_ready for r in runs]
    rows.append(
        result(
            name=f"lifecycle.{case.name}.peak_rss",
            measured="MB (10^6 bytes), the daemon's VmHWM (/proc/PID/status) at the end of the "
            f"lifecycle, {case.name} payload",
            unit="MB",
            figure=statistics.median(hwm) / MB,
            samples=[h / MB for h in hwm],
            samples_are="repetitions",
            repetitions=len(hwm),
            baseline_figure=statistics.median(ready) / MB,
            baseline="the daemon's VmHWM at READY (start-up, idle)",
            details={
                "vmrss_at_end_mb": spread([r.rss_end / MB for r in runs]),
                "load_average_before": load_before,
            },
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the sample update, once")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
