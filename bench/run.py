"""`make bench`: run every benchmark module in bench/ and write one JSON report.

    python -m bench.run [--quick] [--only NAME] [--out FILE]     (from the repository root)

Each `bench/bench_*.py` exposes `run(quick: bool) -> list[dict]` (rows built with
`_common.result`). The report (bench/results/latest.json unless --out) holds the machine,
Python and package versions and every row; a short table goes to the terminal. Missed targets
do not change the exit code (benchmarks inform, tests decide); a benchmark that crashes does.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import sqlite3
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: the bench modules import each other as `bench.<name>`
    sys.exit("bench/run.py is part of the package bench: run `python -m bench.run` (make bench)")

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_OUT = BENCH / "results" / "latest.json"
PACKAGES = (
    "cmlab",
    "watchdog",
    "cryptography",
    "asn1crypto",
    "structlog",
    "aiofiles",
    "pylibmspack",
    "cabarchive",
    "defusedxml",
)


def discover() -> list[str]:
    return sorted(p.stem for p in BENCH.glob("bench_*.py"))


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpuinfo("model name") or platform.processor() or None,
        "memory_bytes": _meminfo("MemTotal"),
        "kernel": f"{platform.system()} {platform.release()}",
        "load_average_at_start": list(os.getloadavg()),
    }
    import tempfile

    scratch = tempfile.gettempdir()
    info["bench_dir"] = scratch
    info["bench_dir_filesystem"] = _filesystem_of(scratch)
    return info


def _cpuinfo(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        pass
    return None


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    except OSError:
        pass
    return None


def _filesystem_of(path: str) -> str | None:
    """The filesystem type of the mount holding `path` (ext4 vs tmpfs changes every figure)."""
    try:
        mounts = [ln.split() for ln in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for fields in mounts:
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > best[0]):
            best = (len(point), fields[2])
    return best[1] if best else None


def python_info() -> dict[str, Any]:
    return {
        "version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "sqlite": sqlite3.sqlite_version,
    }


def packages() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            module = sys.modules.get(name)
            # cmlab run from the source tree (PYTHONPATH=daemon) is not an installed distribution.
            version = getattr(module, "__version__", None)
            out[name] = f"{version} (source tree)" if version else None
    return out


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }


def table(results: list[dict[str, Any]]) -> str:
    header = ("benchmark", "figure", "baseline", "ratio", "min / median / max", "target", "met")
    rows = [header]
    for r in results:
        unit = r["unit"]
        target = r.get("target")
        met = r.get("met")
        rows.append(
            (
                r["name"],
                f"{_num(r['figure'])} {unit}",
                f"{_num(r['baseline_figure'])} {unit}",
                f"{_num(r['ratio'])}x",
                f"{_num(r['min'])} / {_num(r['median'])} / {_num(r['max'])}",
                f"{target['op']} {_num(target['value'])}" if target else "-",
                "-" if met is None else ("yes" if met else "NO"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _jsonable(value: Any) -> Any:
    """JSON has no NaN: a figure that could not be measured is written as null."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class WarningCounter(logging.Handler):
    """Libraries' warnings (e.g. watchdog's "Inotify queue overflowed") go into the report,
    counted, instead of interleaving with the table."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[tuple[str, str], int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = (record.name, record.getMessage())
        self.counts[key] = self.counts.get(key, 0) + 1

    def report(self) -> list[dict[str, Any]]:
        return [
            {"logger": name, "message": message, "count": n}
            for (name, message), n in sorted(self.counts.items(), key=lambda kv: -kv[1])
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this module (bench_inbox or inbox); repeatable",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report file")
    args = parser.parse_args(argv)

    modules = discover()
    if args.only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only}
        unknown = wanted - set(modules)
        if unknown:
            parser.error(f"no such benchmark: {', '.join(sorted(unknown))} (have {modules})")
        modules = [m for m in modules if m in wanted]

    warnings = WarningCounter()
    logging.getLogger().addHandler(warnings)
    started = time.monotonic()
    doc: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        "quick": args.quick,
        "machine": machine(),
        "python": python_info(),
        "packages": packages(),
        "git": git_info(),
        "modules": {},
        "results": [],
        "errors": [],
    }
    for name in modules:
        t0 = time.monotonic()
        print(f"running {name}{' (quick)' if args.quick else ''} ...", file=sys.stderr, flush=True)
        try:
            module = importlib.import_module(f"bench.{name}")
            rows = module.run(quick=args.quick)
        except Exception:
            doc["errors"].append({"module": name, "traceback": traceback.format_exc()})
            print(traceback.format_exc(), file=sys.stderr)
            rows = []
        for row in rows:
            row.setdefault("module", name)
        doc["results"].extend(rows)
        doc["modules"][name] = {"seconds": round(time.monotonic() - t0, 1), "rows": len(rows)}
    doc["seconds"] = round(time.monotonic() - started, 1)
    doc["log_warnings"] = warnings.report()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)

    print(table(doc["results"]))
    for w in doc["log_warnings"]:
        print(f"warning x{w['count']} from {w['logger']}: {w['message']}")
    for err in doc["errors"]:
        print(f"\n{err['module']} FAILED:\n{err['traceback']}", file=sys.stderr)
    print(f"\n{len(doc['results'])} results in {doc['seconds']} s -> {args.out}")
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
