"""How the sync stage grows with the manifest: `cmlab sync` until every package of a manifest of
1, 10 and 50 update packages is decided, on the real daemon; packages decided per second; the
least-squares slope in seconds per extra package; every figure against a baseline measured in
the same run.

The lab, once per size N and untimed: a `packages.toml` of N synthetic packages (distinct
GUIDs, names, versions; no payload, so `cmlab.admin.lab_cloud.build_content_source` gives each a
small
signed stub CAB) and one applicability script per package, in three kinds taken in turn:
applicable (the site's version in the package's window: APPLICABILITY_SUCCESS), not applicable
(outside it, with a PRINT: APPLICABILITY_NA), superseded by the first package (a lookup in
CM_UpdatePackages, as the 2503 hotfix rollup's: APPLICABILITY_HIDE). The content source is
signed with one lab CA (`create_lab_ca`, as `bench_download.build_lab` does) and a site is
initialised against it with bench_lifecycle's settings (`sync` 0, `rescan` 0.5 s, `settle`
0.05 s, `auto_download` off) and kept as the template.

Each repetition, for each N in a rotating order, on a fresh copy of the template: the real
daemon (`bench_download.Daemon`: `python -m cmlab run SITE`, READY=1 through NOTIFY_SOCKET),
`os.sync()`; then, timed, from starting `python -m cmlab sync SITE` a read-only connection
reads every row of `CM_UpdatePackages` every 5 ms until all N have left APPLICABILITY_CHECKING
(DMPDownloader's manifest download, trust check and hand-off; HMAN's trust check, extraction,
upsert of every package and one applicability script per package). Every package must end in
the state its script was written for; anything else (a failure, a wrong decision, a package
missing, a timeout) stops the run with the logs' ERROR lines.

Baselines, in the same run:

- the CLI floor (`bench_lifecycle.cli_floor`: `python -m cmlab status SITE`), three times per
  repetition and size; what every command pays before the daemon sees anything;
- the bare file work for each N: a copy of the manifest CAB, its SHA-256 and its extraction
  (`bench_lifecycle.extractor`: cabextract, else bsdtar, else cmlab.site.cab), warm cache, no
  signature check, no fsync.

A size's baseline is the floor (median over the run) plus its file work (median); the slope's
baseline is the slope of those baselines (the file work's, since the floor is one figure).

Before the timed runs, one sync of N=1 and one floor, untimed, warm the page cache. Full run:
5 repetitions (about 25 s on 2 cores, under 2 s of it building the three content sources);
`--quick`: 1 repetition (about 7 s). A few MB in `$TMPDIR`. Run standalone with
`PYTHONPATH=daemon python -m bench.bench_scale [--quick]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench._common import result, slope_per_unit, spread
from bench.bench_download import POLL, SITE_CODE, STEP_TIMEOUT, Daemon, Lab, _child_env, _reader
from bench.bench_lifecycle import (
    FLOOR_RUNS,
    RESCAN,
    SETTLE,
    _init,
    _log_errors,
    cli_floor,
    extractor,
)
from bench.bench_lifecycle import _reset as reset_site
from cmlab.site.sms_log import LINE_RE
from cmlab.site.state_codes import PackageState

if TYPE_CHECKING:
    from cmlab.site.trust import Signer

SIZES = (1, 10, 50)
SITE_VERSION_INT = 5009135  # the lab site is 2503, build 9135
NAMESPACE = uuid.UUID("6f1c2a4e-3b7d-4c55-9a0e-0c3b5d8e9f21")  # the bench's synthetic GUIDs
MANIFEST_CAB = "ConfigMgr.Update.Manifest.cab"


@dataclasses.dataclass(frozen=True)
class Plan:
    reps: int


FULL = Plan(reps=5)
QUICK = Plan(reps=1)


def log(message: str) -> None:
    print(f"  bench_scale: {message}", file=sys.stderr, flush=True)


# -- the manifests ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Package:
    guid: str
    sql_name: str
    sql: str
    expect: PackageState


def packages(n: int) -> list[Package]:
    """N synthetic packages; the first is applicable, so the third kind has a package to be
    superseded by."""
    out: list[Package] = []
    first = ""
    for i in range(n):
        guid = str(uuid.uuid5(NAMESPACE, f"package-{i}")).upper()
        first = first or guid
        kind = i % 3
        if kind == 0:
            low, high, expect = 5009128, SITE_VERSION_INT, PackageState.APPLICABILITY_SUCCESS
        else:
            low, high = 5009130, SITE_VERSION_INT - 1
            expect = PackageState.APPLICABILITY_NA if kind == 1 else PackageState.APPLICABILITY_HIDE
        if kind == 2:
            sql = (
                f"-- Bench package {i}: superseded by {first} once that one is offered.\n"
                "SELECT CASE\n"
                f"    WHEN dbo.fnCurrentSiteVersion_INT() <> {SITE_VERSION_INT}\n"
                "        THEN PRINT('Not a 2503 build, skip this hotfix')\n"
                "    WHEN EXISTS (SELECT 1 FROM CM_UpdatePackages\n"
                f"                 WHERE PackageGuid = '{first}')\n"
                f"        THEN PRINT('Superseded by {first}, hide this hotfix') + 2\n"
                "    ELSE 1\n"
                "END AS Applicable;\n"
            )
        else:
            sql = (
                f"-- Bench package {i}: applies to builds {low} through {high}.\n"
                "SELECT CASE\n"
                f"    WHEN dbo.fnCurrentSiteVersion_INT() BETWEEN {low} AND {high} THEN 1\n"
                "    ELSE PRINT('Site version ' || dbo.fnCurrentSiteVersion() || "
                f"' is outside {low}-{high}, skip this update')\n"
                "END AS Applicable;\n"
            )
        out.append(Package(guid, f"BENCH-{i:03d}_AppCheck_{guid[:8]}.sql", sql, expect))
    return out


def write_payloads(root: Path, pkgs: list[Package]) -> None:
    """A `payloads/` folder holding only the manifest source (no package has a payload)."""
    checks = root / "manifest" / "ApplicabilityChecks"
    checks.mkdir(parents=True)
    entries = [f'manifest_version = "5.00.9135.1006.{len(pkgs)}"\n']
    for i, p in enumerate(pkgs):
        (checks / p.sql_name).write_text(p.sql, encoding="utf-8")
        entries.append(
            "\n[[package]]\n"
            f'guid = "{p.guid}"\n'
            f'name = "Configuration Manager Bench Hotfix {i:03d}"\n'
            'type = "Hotfix"\n'
            f'update = "2503 BENCH {i:03d}"\n'
            f'full_version = "5.00.9135.{1100 + i}"\n'
            'min_cm_version = "5.00.9135.1000"\n'
            f'max_cm_version = "5.00.9135.{1099 + i}"\n'
            'more_info_link = "https://go.microsoft.com/fwlink/?LinkID=2298747"\n'
            f'description = "Synthetic package {i} of {len(pkgs)} (bench_scale)."\n'
            'date_released = "2025-07-14"\n'
            f'applicability = "{p.sql_name}"\n'
        )
    (root / "manifest" / "packages.toml").write_text("".join(entries), encoding="utf-8")


@dataclasses.dataclass
class Case:
    n: int
    lab: Lab
    packages: list[Package]
    manifest_cab: Path


def build_case(work: Path, n: int, ca_dir: Path, signer: Signer) -> Case:
    from cmlab.admin.lab_cloud import build_content_source

    pkgs = packages(n)
    write_payloads(work / "payloads", pkgs)
    cloud = work / "cloud"
    build_content_source(cloud, signer, payloads=work / "payloads")
    site = work / "site" / SITE_CODE
    _init(site, cloud, ca_dir)
    template = work / "template" / SITE_CODE
    shutil.copytree(site, template, symlinks=True)
    lab = Lab(
        work=work,
        cloud=cloud,
        site=site,
        pristine=template,
        payload_cab=cloud / MANIFEST_CAB,
        redist=cloud,
        env=_child_env(),
        setup_seconds={},
    )
    return Case(n, lab, pkgs, cloud / MANIFEST_CAB)


# -- one sync on the daemon ------------------------------------------------------------------


@dataclasses.dataclass
class SyncRun:
    seconds: float  # `cmlab sync` started -> every package decided
    queued: float | None  # -> the CLI's SyncHistory row read
    first_row: float | None  # -> the first CM_UpdatePackages row read (HMAN's upsert)
    first_decided: float | None  # -> the first package read decided
    hman: dict[str, float | None]  # phases from hman.log's ms timestamps
    ready_seconds: float


def run_sync(case: Case) -> SyncRun:
    lab = case.lab
    reset_site(lab)
    expect = {p.guid: p.expect for p in case.packages}
    with Daemon(lab) as daemon:
        reader = _reader(lab)
        try:
            if reader.execute("SELECT COUNT(*) FROM CM_UpdatePackages").fetchone()[0]:
                raise RuntimeError("the template site already has update packages")
            history = _sync_history(reader)
            os.sync()
            start_wall, t0 = time.time(), time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "cmlab", "sync", str(lab.site)],
                env=lab.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            queued = first_row = first_decided = None
            deadline = time.monotonic() + STEP_TIMEOUT
            while True:
                rows = dict(reader.execute("SELECT PackageGuid, State FROM CM_UpdatePackages"))
                now = time.perf_counter()
                if queued is None and _sync_history(reader) != history:
                    queued = now
                if first_row is None and rows:
                    first_row = now
                decided = {
                    g: s for g, s in rows.items() if s != PackageState.APPLICABILITY_CHECKING
                }
                if first_decided is None and decided:
                    first_decided = now
                if len(decided) == case.n:
                    end = now
                    break
                failed = [g for g, s in rows.items() if s == PackageState.APPLICABILITY_FAILED]
                if failed:
                    raise RuntimeError(f"{failed[0]} is APPLICABILITY_FAILED: {_log_errors(lab)}")
                if daemon.proc is None or daemon.proc.poll() is not None:
                    raise RuntimeError("the daemon exited during the sync")
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{len(decided)} of {case.n} packages decided after {STEP_TIMEOUT} s"
                    )
                time.sleep(POLL)
            _, err = proc.communicate(timeout=STEP_TIMEOUT)
            if proc.returncode != 0:
                raise RuntimeError(f"cmlab sync -> {proc.returncode}: {err[-2000:]!r}")
        finally:
            reader.close()
        ready = daemon.ready_seconds
    wrong = {
        g: PackageState.name_of(rows.get(g)) if g in rows else "missing"
        for g, want in expect.items()
        if rows.get(g) != want
    }
    if wrong or len(rows) != case.n:
        raise RuntimeError(
            f"N={case.n}: {len(wrong)} packages not in the expected state ({wrong}), "
            f"{len(rows)} rows: {_log_errors(lab)}"
        )
    seconds = end - t0
    return SyncRun(
        seconds=seconds,
        queued=None if queued is None else queued - t0,
        first_row=None if first_row is None else first_row - t0,
        first_decided=None if first_decided is None else first_decided - t0,
        hman=_hman_phases(lab.site / "Logs" / "hman.log", start_wall, seconds, case.n),
        ready_seconds=ready,
    )


def _sync_history(reader: sqlite3.Connection) -> int:
    return int(reader.execute("SELECT COUNT(*) FROM SyncHistory").fetchone()[0])


_DECIDED = ("is applicable", "is not applicable and should be filtered")


def _hman_phases(
    log_file: Path, start_wall: float, total: float, n: int
) -> dict[str, float | None]:
    """HMAN's share, from hman.log's ms timestamps: `to_manifest`, from the command's start
    to "Processing ... manifest file" (the CLI, DMPDownloader, HMAN's trust check and
    extraction); `applicability`, from there to the last package's decision (the upsert and
    N scripts); `to_read`, from that line to the bench reading the last state."""
    stamps: list[tuple[float, str]] = []
    try:
        lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        m = LINE_RE.match(line)
        if m:
            when = datetime.strptime(f"{m['date']} {m['time']}", "%m-%d-%Y %H:%M:%S.%f")
            if when.timestamp() >= start_wall - 0.001:
                stamps.append((when.timestamp(), m["message"]))
    processing = next((w for w, msg in stamps if "Update manifest file" in msg), None)
    decisions = [w for w, msg in stamps if any(d in msg for d in _DECIDED)]
    if processing is None or len(decisions) != n:
        return {"to_manifest": None, "applicability": None, "to_read": None}
    return {
        "to_manifest": round(processing - start_wall, 4),
        "applicability": round(decisions[-1] - processing, 4),
        "to_read": round(start_wall + total - decisions[-1], 4),
    }


# -- the file work ---------------------------------------------------------------------------


def run_work(case: Case, extract: Callable[[Path, Path], None]) -> dict[str, float]:
    scratch = case.lab.work / "baseline"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    copy = scratch / MANIFEST_CAB
    t0 = time.perf_counter()
    shutil.copyfile(case.manifest_cab, copy)
    t1 = time.perf_counter()
    with open(copy, "rb") as f:
        hashlib.file_digest(f, "sha256")
    t2 = time.perf_counter()
    extract(copy, scratch / "manifest")
    t3 = time.perf_counter()
    extracted = sum(1 for p in (scratch / "manifest").rglob("*") if p.is_file())
    shutil.rmtree(scratch)
    if extracted != case.n + 1:
        raise RuntimeError(f"the manifest CAB of N={case.n} held {extracted} files")
    return {"copy": t1 - t0, "sha256": t2 - t1, "extract": t3 - t2, "total": t3 - t0}


# -- entry points ----------------------------------------------------------------------------


def run(quick: bool) -> list[dict[str, Any]]:
    plan = QUICK if quick else FULL
    work = Path(tempfile.mkdtemp(prefix="cmlab-bench-scale-"))
    try:
        return _run(plan, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(plan: Plan, work: Path) -> list[dict[str, Any]]:
    from cmlab.site.trust import create_lab_ca

    started = time.perf_counter()
    ca_dir = work / "labca"
    signer = create_lab_ca(ca_dir, common_name=f"cmlab Lab Root ({SITE_CODE})").signer()
    cases = []
    for n in SIZES:
        t0 = time.perf_counter()
        cases.append(build_case(work / f"n{n}", n, ca_dir, signer))
        log(f"N={n}: content source and site ready in {time.perf_counter() - t0:.1f} s")
    tool, extract = extractor()
    # Untimed: the first daemon and CLI of the run read cmlab's modules from a cold page
    # cache (0.1-0.15 s more in trials), which would land on whichever size goes first.
    run_sync(cases[0])
    cli_floor(cases[0].lab)
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[int, list[SyncRun]] = {c.n: [] for c in cases}
    works: dict[int, list[dict[str, float]]] = {c.n: [] for c in cases}
    floors: list[float] = []
    for rep in range(plan.reps):
        # Sizes in a rotating order, daemon and file work alternating, so drift hits all alike.
        for case in cases[rep % len(cases) :] + cases[: rep % len(cases)]:
            order = ("daemon", "work") if rep % 2 == 0 else ("work", "daemon")
            for what in order:
                if what == "daemon":
                    runs[case.n].append(run_sync(case))
                else:
                    works[case.n].append(run_work(case, extract))
            floors += [cli_floor(case.lab) for _ in range(FLOOR_RUNS)]
        log(
            f"repetition {rep + 1}/{plan.reps}: "
            + ", ".join(f"N={n} {runs[n][-1].seconds:.3f} s" for n in SIZES)
            + f"; cmlab status {statistics.median(floors[-FLOOR_RUNS * len(SIZES) :]):.3f} s"
        )
    floor = statistics.median(floors)
    latency = {n: statistics.median(r.seconds for r in runs[n]) for n in SIZES}
    work_median = {n: statistics.median(w["total"] for w in works[n]) for n in SIZES}
    base = {n: floor + work_median[n] for n in SIZES}

    common: dict[str, Any] = {
        "sizes": list(SIZES),
        "intervals": {"sync": 0.0, "rescan": RESCAN, "settle": SETTLE, "auto_download": False},
        "poll_interval_seconds": POLL,
        "cli_floor_seconds": spread(floors),
        "cli_floor_is": "`python -m cmlab status SITE` as a subprocess (bench_lifecycle."
        "cli_floor): start-up, one read of the database, exit",
        "file_work_tool": tool,
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }

    def per_size(n: int) -> dict[str, Any]:
        r = runs[n]
        hman = {k: spread([x.hman[k] for x in r if x.hman[k] is not None]) for k in r[0].hman}
        applicability = [x.hman["applicability"] for x in r if x.hman["applicability"]]
        return {
            **common,
            "packages": n,
            "expected_states": {
                PackageState.name_of(s): sum(1 for p in _case(cases, n).packages if p.expect == s)
                for s in (
                    PackageState.APPLICABILITY_SUCCESS,
                    PackageState.APPLICABILITY_NA,
                    PackageState.APPLICABILITY_HIDE,
                )
            },
            "manifest_cab_bytes": _case(cases, n).manifest_cab.stat().st_size,
            "samples": [round(x.seconds, 4) for x in r],
            "cli_commit_seconds": spread([x.queued for x in r if x.queued is not None]),
            "first_row_seconds": spread([x.first_row for x in r if x.first_row is not None]),
            "first_decided_seconds": spread(
                [x.first_decided for x in r if x.first_decided is not None]
            ),
            "polled_are": "seconds from the command's start until the bench read the CLI's "
            "SyncHistory row, the first CM_UpdatePackages row (HMAN's upsert of the "
            "manifest), the first package decided",
            "hman_phases_seconds": hman,
            "hman_phases_are": "from hman.log's ms timestamps: to_manifest, the command's "
            "start to 'Processing ... manifest file' (CLI, DMPDownloader, HMAN's trust check "
            "and extraction); applicability, from there to the last package's decision "
            "(upsert and N scripts); to_read, from that line to the bench's read",
            "hman_applicability_packages_per_second": spread([n / a for a in applicability]),
            "file_work_seconds": {
                k: spread([w[k] for w in works[n]]) for k in ("copy", "sha256", "extract", "total")
            },
            "daemon_ready_seconds": spread([x.ready_seconds for x in r]),
        }

    rows: list[dict[str, Any]] = []
    baseline_desc = (
        f"CLI floor (`cmlab status`, {floor:.3f} s) + the file work: copy, SHA-256 and "
        f"extraction ({tool}) of the same manifest CAB"
    )
    for n in SIZES:
        samples = [r.seconds for r in runs[n]]
        rows.append(
            result(
                name=f"scale.sync_latency.{n}",
                measured=f"seconds from starting `python -m cmlab sync SITE` until all {n} "
                "packages of the manifest have left APPLICABILITY_CHECKING (DMPDownloader's "
                "manifest download and trust check, HMAN's trust check, extraction and one "
                "applicability script per package); real daemon",
                unit="s",
                figure=latency[n],
                samples=samples,
                samples_are="repetitions",
                repetitions=len(samples),
                baseline_figure=base[n],
                baseline=baseline_desc,
                details=per_size(n),
            )
        )
    for n in SIZES:
        rates = [n / r.seconds for r in runs[n]]
        rows.append(
            result(
                name=f"scale.sync_throughput.{n}",
                measured=f"packages decided per second: {n} / the latency of the same run "
                "(`cmlab sync` -> every package decided); higher is better",
                unit="pkg/s",
                figure=n / latency[n],
                samples=rates,
                samples_are="repetitions",
                repetitions=len(rates),
                baseline_figure=n / base[n],
                baseline=f"{n} / (the CLI floor + the file work of the manifest CAB)",
                details={
                    "packages": n,
                    "hman_applicability_packages_per_second": per_size(n)[
                        "hman_applicability_packages_per_second"
                    ],
                    "hman_applicability_is": "N / HMAN's applicability phase from hman.log "
                    "(upsert and N scripts, without the fixed costs before it)",
                },
            )
        )
    xs = [float(n) for n in SIZES]
    per_rep = [slope_per_unit(xs, [runs[n][i].seconds for n in SIZES]) for i in range(plan.reps)]
    slope = slope_per_unit(xs, [latency[n] for n in SIZES])
    base_slope = slope_per_unit(xs, [base[n] for n in SIZES])
    hman_slope = None
    hman_medians = [per_size(n)["hman_phases_seconds"]["applicability"]["median"] for n in SIZES]
    if all(v == v for v in hman_medians):  # NaN when a log line was missing
        hman_slope = round(slope_per_unit(xs, hman_medians), 6)
    intercept = statistics.fmean(latency.values()) - slope * statistics.fmean(xs)
    rows.append(
        result(
            name="scale.sync_slope",
            measured="seconds per extra package: least-squares slope of the sync latency "
            f"(medians) over N = {', '.join(map(str, SIZES))}; lower is better",
            unit="s/pkg",
            figure=slope,
            samples=per_rep,
            samples_are="repetitions (the slope fitted to each repetition's three sizes)",
            repetitions=len(per_rep),
            baseline_figure=base_slope,
            baseline="the slope of the baselines (the floor is one figure, so the file work's: "
            "copy, SHA-256 and extraction of the manifest CAB)",
            details={
                **common,
                "intercept_seconds": round(intercept, 4),
                "latency_medians": {str(n): round(latency[n], 4) for n in SIZES},
                "baseline_medians": {str(n): round(base[n], 4) for n in SIZES},
                "residuals_seconds": {
                    str(n): round(latency[n] - (intercept + slope * n), 4) for n in SIZES
                },
                "residuals_are": "median latency minus the fitted line: a positive middle and "
                "negative ends (or the reverse) mean the growth is not linear",
                "hman_applicability_slope_seconds_per_package": hman_slope,
                "hman_applicability_medians": {
                    str(n): m for n, m in zip(SIZES, hman_medians, strict=True)
                },
            },
        )
    )
    log(
        f"done in {time.perf_counter() - started:.1f} s: slope {slope * 1000:.2f} ms/package "
        f"(baseline {base_slope * 1000:.3f} ms/package), intercept {intercept:.3f} s"
    )
    return rows


def _case(cases: list[Case], n: int) -> Case:
    return next(c for c in cases if c.n == n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
