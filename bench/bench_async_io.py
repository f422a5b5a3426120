"""File I/O from a coroutine: a blocking call on the event loop, the thread pool, or aiofiles.

What it decides (issue 13, item 4): where cmlab's async handlers do their file work. Each
operation runs from a coroutine three ways:
- `blocking`: the plain call, on the loop (what a handler does when it forgets);
- `thread`: `await asyncio.to_thread(...)`, which is what `Component.in_thread` does (the
  loop's default executor);
- `aiofiles`: `aiofiles.open` and its awaited methods (it runs each call in the same default
  executor, one hand-off per call).
Large files also run streamed in 1 MiB chunks (`thread_chunks`: one `to_thread` per chunk;
`aiofiles_chunks`: `await f.read(n)` / `await f.write(chunk)`), as a log follower or a copy
would, and, for reads, `thread_stream`: one `to_thread` of a function that reads chunk by
chunk, the shape of cmlab's own `sha256_file` and `copy_hashing`. A streamed read counts its
chunks instead of joining them (a consumer takes each as it comes).

Operations: read a whole file (warm: the file was just written, so the page cache holds it),
and write a new file and fsync it (every drop file and output cmlab writes is durable). Sizes:
1 KB (a drop file) and a large file (64 MB full, 16 MB quick). And `lstat` of an inbox entry,
the call the inbox engine makes per drop file.

Figures, each with a baseline measured in the same run (methods interleaved per repetition,
so the noise of a shared machine hits all of them):
(a) `async_io.<op>.<size>.<method>.time`: median time per operation; baseline: `blocking`.
(b) `async_io.<op>.<size>.<method>.max_lag`: how late a 1 ms ticker on the same loop woke,
    at worst, while the operations ran; baseline: the same ticker on an idle loop.
(c) `async_io.<op>.1k.<method>.loop_cpu` and `async_io.lstat.thread.loop_cpu`: CPU time the
    loop's own thread spends per operation (`time.thread_time`), i.e. what the call costs every
    other coroutine; baseline: `blocking`.

MB is 2**20 bytes here (the file sizes are powers of two). Run standalone with
`PYTHONPATH=daemon python bench/bench_async_io.py [--quick]`; set TMPDIR to measure another
filesystem (fsync on tmpfs costs nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from bench._common import percentile, result

KB = 1024
MB = 1024 * 1024
CHUNK = MB
TICK = 0.001  # the ticker's period: 1 ms

_fsync_async = aiofiles.os.wrap(os.fsync)


@dataclass(frozen=True)
class Plan:
    small_ops: int  # 1 KB operations per repetition
    large_size: int
    reps: int
    cpu_ops: int  # operations for the loop-CPU figures
    idle_seconds: float  # the idle ticker's run, per repetition


FULL = Plan(small_ops=1000, large_size=64 * MB, reps=5, cpu_ops=2000, idle_seconds=1.0)
QUICK = Plan(small_ops=200, large_size=16 * MB, reps=2, cpu_ops=500, idle_seconds=0.5)


# -- the operations, each as a coroutine function taking a path (and the data to write) ----------


def _read_blocking(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_blocking(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


async def read_on_loop(path: Path) -> bytes:
    return _read_blocking(path)


async def read_in_thread(path: Path) -> bytes:
    return await asyncio.to_thread(_read_blocking, path)


async def read_aiofiles(path: Path) -> bytes:
    async with aiofiles.open(path, "rb") as f:
        return await f.read()


def _count_chunks(path: Path) -> int:
    total = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            total += len(chunk)
    return total


async def read_thread_stream(path: Path) -> int:
    return await asyncio.to_thread(_count_chunks, path)


# A stream's consumer takes each chunk as it comes (a follower prints it, a copy writes it):
# the chunks are counted, not joined, which would copy the whole file on the loop.
async def read_thread_chunks(path: Path) -> int:
    total = 0
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            total += len(chunk)
    finally:
        await asyncio.to_thread(f.close)
    return total


async def read_aiofiles_chunks(path: Path) -> int:
    total = 0
    async with aiofiles.open(path, "rb") as f:
        while chunk := await f.read(CHUNK):
            total += len(chunk)
    return total


async def write_on_loop(path: Path, data: bytes) -> None:
    _write_blocking(path, data)


async def write_in_thread(path: Path, data: bytes) -> None:
    await asyncio.to_thread(_write_blocking, path, data)


async def write_aiofiles(path: Path, data: bytes) -> None:
    async with aiofiles.open(path, "wb") as f:
        await f.write(data)
        await f.flush()
        await _fsync_async(f.fileno())


async def write_thread_chunks(path: Path, data: bytes) -> None:
    view = memoryview(data)
    f = await asyncio.to_thread(open, path, "wb")
    try:
        for start in range(0, len(view), CHUNK):
            await asyncio.to_thread(f.write, view[start : start + CHUNK])
        await asyncio.to_thread(_flush_and_sync, f)
    finally:
        await asyncio.to_thread(f.close)


async def write_aiofiles_chunks(path: Path, data: bytes) -> None:
    view = memoryview(data)
    async with aiofiles.open(path, "wb") as f:
        for start in range(0, len(view), CHUNK):
            await f.write(view[start : start + CHUNK])
        await f.flush()
        await _fsync_async(f.fileno())


def _flush_and_sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


async def lstat_on_loop(path: Path) -> os.stat_result:
    return os.lstat(path)


async def lstat_in_thread(path: Path) -> os.stat_result:
    return await asyncio.to_thread(os.lstat, path)


READS: dict[str, Callable[[Path], Awaitable[object]]] = {
    "blocking": read_on_loop,
    "thread": read_in_thread,
    "aiofiles": read_aiofiles,
    "thread_stream": read_thread_stream,
    "thread_chunks": read_thread_chunks,
    "aiofiles_chunks": read_aiofiles_chunks,
}
WRITES: dict[str, Callable[[Path, bytes], Awaitable[None]]] = {
    "blocking": write_on_loop,
    "thread": write_in_thread,
    "aiofiles": write_aiofiles,
    "thread_chunks": write_thread_chunks,
    "aiofiles_chunks": write_aiofiles_chunks,
}
SMALL_METHODS = ("blocking", "thread", "aiofiles")  # a 1 KB file is one chunk


# -- measuring ------------------------------------------------------------------------------------


class Ticker:
    """A task that sleeps 1 ms over and over and records how late each wake-up was."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(TICK)
            self.lags.append(time.perf_counter() - t - TICK)

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)  # let it start its first sleep
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class Run:
    times: list[float]  # seconds per operation
    max_lag: float  # seconds
    p99_lag: float


async def _timed(ops: list[Callable[[], Awaitable[object]]]) -> Run:
    times = []
    async with Ticker() as ticker:
        for op in ops:
            t = time.perf_counter()
            await op()
            times.append(time.perf_counter() - t)
            # A handler yields between drop files: the lag is what one operation costs the
            # loop, not a whole batch of blocking calls that never yield.
            await asyncio.sleep(0)
        await asyncio.sleep(2 * TICK)  # the last late tick is counted
    lags = sorted(ticker.lags) or [0.0]
    return Run(times, lags[-1], percentile(lags, 99))


async def _loop_cpu(ops: list[Callable[[], Awaitable[object]]]) -> float:
    """CPU seconds of the loop's thread per operation (no ticker running)."""
    t = time.thread_time()
    for op in ops:
        await op()
    return (time.thread_time() - t) / len(ops)


async def _idle(seconds: float) -> Run:
    async with Ticker() as ticker:
        await asyncio.sleep(seconds)
    lags = sorted(ticker.lags) or [0.0]
    return Run([], lags[-1], percentile(lags, 99))


def _read_ops(fn: Callable[[Path], Awaitable[object]], paths: list[Path]) -> list[Any]:
    return [lambda p=p: fn(p) for p in paths]


def _write_ops(
    fn: Callable[[Path, bytes], Awaitable[None]], paths: list[Path], data: bytes
) -> list[Any]:
    return [lambda p=p: fn(p, data) for p in paths]


def _rotated(items: tuple[str, ...], n: int) -> tuple[str, ...]:
    k = n % len(items)
    return items[k:] + items[:k]


async def _measure(plan: Plan, work: Path) -> dict[str, Any]:
    small = os.urandom(KB)
    large = os.urandom(plan.large_size)
    small_in = [work / f"in-{i:05d}.MCM" for i in range(plan.small_ops)]
    for p in small_in:
        p.write_bytes(small)
    large_in = work / "large.in"
    large_in.write_bytes(large)
    _read_blocking(large_in)  # warm

    # (time, lag) samples: key (op, size, method) -> list of Run, one per repetition
    runs: dict[tuple[str, str, str], list[Run]] = {}
    idle: list[Run] = []
    for rep in range(plan.reps):
        idle.append(await _idle(plan.idle_seconds))
        # Each repetition starts the rotation at another method: none always runs first (after
        # the idle pause) or right after the largest writes' writeback.
        for method in _rotated(SMALL_METHODS, rep):
            runs.setdefault(("read", "1k", method), []).append(
                await _timed(_read_ops(READS[method], small_in))
            )
            outs = [work / f"out-{rep}-{method}-{i:05d}.MCM" for i in range(plan.small_ops)]
            runs.setdefault(("write", "1k", method), []).append(
                await _timed(_write_ops(WRITES[method], outs, small))
            )
            for p in outs:
                p.unlink()
        for method in _rotated(tuple(READS), rep):
            runs.setdefault(("read", "large", method), []).append(
                await _timed([lambda m=method: READS[m](large_in)])
            )
        for method in _rotated(tuple(WRITES), rep):
            out = work / f"large-{method}.out"
            runs.setdefault(("write", "large", method), []).append(
                await _timed([lambda m=method, o=out: WRITES[m](o, large)])
            )
            out.unlink()

    cpu: dict[tuple[str, str], float] = {}
    cpu_paths = [small_in[i % len(small_in)] for i in range(plan.cpu_ops)]
    for method in SMALL_METHODS:
        cpu[("read", method)] = await _loop_cpu(_read_ops(READS[method], cpu_paths))
        outs = [work / f"cpu-{method}-{i:05d}" for i in range(plan.cpu_ops // 4)]
        cpu[("write", method)] = await _loop_cpu(_write_ops(WRITES[method], outs, small))
        for p in outs:
            p.unlink()
    cpu[("lstat", "blocking")] = await _loop_cpu(_read_ops(lstat_on_loop, cpu_paths))
    cpu[("lstat", "thread")] = await _loop_cpu(_read_ops(lstat_in_thread, cpu_paths))
    lstat_time = {
        "blocking": statistics.median((await _timed(_read_ops(lstat_on_loop, cpu_paths))).times),
        "thread": statistics.median((await _timed(_read_ops(lstat_in_thread, cpu_paths))).times),
    }
    return {"runs": runs, "idle": idle, "cpu": cpu, "lstat_time": lstat_time}


# -- the report -----------------------------------------------------------------------------------


def _rows(plan: Plan, m: dict[str, Any]) -> list[dict[str, Any]]:
    runs: dict[tuple[str, str, str], list[Run]] = m["runs"]
    idle: list[Run] = m["idle"]
    large_label = f"{plan.large_size // MB} MB"
    rows: list[dict[str, Any]] = []
    idle_max = [r.max_lag * 1e3 for r in idle]
    idle_base = statistics.median(idle_max)

    def per_rep(key: tuple[str, str, str]) -> list[float]:
        return [statistics.median(r.times) for r in runs[key]]

    for (op, size, method), reps in sorted(runs.items()):
        label = "1 KB" if size == "1k" else large_label
        what = "read a warm file whole" if op == "read" else "write a new file and fsync it"
        if method.endswith(("_chunks", "_stream")):
            what += " in 1 MiB chunks"
        how = {
            "blocking": "a blocking call on the loop",
            "thread": "asyncio.to_thread (Component.in_thread)",
            "aiofiles": "aiofiles",
            "thread_stream": "one asyncio.to_thread of a loop over the chunks (as sha256_file)",
            "thread_chunks": "one asyncio.to_thread per chunk",
            "aiofiles_chunks": "aiofiles, one awaited call per chunk",
        }[method]
        ms = per_rep((op, size, method))
        base = per_rep((op, size, "blocking"))
        unit, scale = ("us", 1e6) if size == "1k" else ("ms", 1e3)
        name = f"async_io.{op}.{'1k' if size == '1k' else 'large'}.{method}"
        if method != "blocking":
            rows.append(
                result(
                    name=f"{name}.time",
                    measured=f"median time to {what}, {label}, from a coroutine via {how}",
                    unit=unit,
                    figure=statistics.median(ms) * scale,
                    samples=[x * scale for x in ms],
                    samples_are="repetitions (median of each)",
                    repetitions=len(reps),
                    baseline_figure=statistics.median(base) * scale,
                    baseline="the same operation as a blocking call on the loop, same run",
                    details={"size_bytes": KB if size == "1k" else plan.large_size},
                )
            )
        lags = [r.max_lag * 1e3 for r in reps]
        rows.append(
            result(
                name=f"{name}.max_lag",
                measured=(
                    f"worst lateness of a 1 ms ticker on the loop while it ran "
                    f"{plan.small_ops if size == '1k' else 1} x ({what}, {label}, via {how})"
                ),
                unit="ms",
                figure=statistics.median(lags),
                samples=lags,
                samples_are="repetitions (max lag of each)",
                repetitions=len(reps),
                baseline_figure=idle_base,
                baseline=f"the same ticker on an idle loop for {plan.idle_seconds} s, same run",
                details={"p99_lag_ms": statistics.median(r.p99_lag * 1e3 for r in reps)},
            )
        )
    cpu: dict[tuple[str, str], float] = m["cpu"]
    for (op, method), seconds in sorted(cpu.items()):
        if method == "blocking":
            continue
        what = {
            "read": "read a warm 1 KB file",
            "write": "write a new 1 KB file and fsync it",
            "lstat": "lstat a file",
        }[op]
        size = "" if op == "lstat" else ".1k"
        rows.append(
            result(
                name=f"async_io.{op}{size}.{method}.loop_cpu",
                measured=f"CPU time of the loop's thread per operation: {what} via {method}",
                unit="us",
                figure=seconds * 1e6,
                samples=[seconds * 1e6],
                samples_are="one run of many operations (the mean)",
                repetitions=1,
                baseline_figure=cpu[(op, "blocking")] * 1e6,
                baseline="the same operation as a blocking call on the loop, same run",
                details=(
                    {
                        "time_per_op_us": m["lstat_time"]["thread"] * 1e6,
                        "blocking_time_per_op_us": m["lstat_time"]["blocking"] * 1e6,
                    }
                    if op == "lstat"
                    else {}
                ),
            )
        )
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    plan = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="cmlab-bench-aio-") as tmp:
        measured = asyncio.run(_measure(plan, Path(tmp)))
    return _rows(plan, measured)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=2))
