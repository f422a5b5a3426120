"""cmlab.testing for a test author (issue 14): how fast a test gets a clean, synced site, how
long a whole update takes inside a test, and how long 100 such tests take under pytest, each
against the same thing done with the daemon as a child process (`--cmlab-mode=subprocess`,
what cmlab's own suite did for every site test before the plugin), in the same run.

- `testing_site_ready`: a `cmlab_site` as the plugin makes it: a copy of the session's synced
  template, its daemon started in-process (every component serving), then stopped; the
  figure is copy + start (what a test waits for before its first line), the stop is in the
  details. Baseline: the same copy with the daemon as `python -m cmlab run` (ready at
  sd_notify's READY=1).
- `testing_install`: on a copy of the downloaded template, `install(SAMPLE_UPDATE,
  wait=True)`, from the call to INSTALL_SUCCESS read in the database. Baseline: the same in
  subprocess mode.
- `testing_100_tests`: `python -m pytest` on a file of 100 tests, each taking `cmlab_site` at
  stage "downloaded" and installing the sample update to INSTALL_SUCCESS: the whole run's wall
  time, templates included. Baseline: the same file with `--cmlab-mode=subprocess`.

Full run: 20 repetitions of the first two, 100 tests (about 3 minutes with the baseline on 2
cores); `--quick`: 5 repetitions and 10 tests (about 40 s). Run standalone with
`python -m bench.bench_testing [--quick]`."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench._common import Target, result
from cmlab.testing import SAMPLE_UPDATE, LabSite, State
from cmlab.testing.plugin import Templates


def _site_ready(templates: Templates, work: Path, mode: str, n: int) -> tuple[float, float]:
    path = work / f"{mode}-{n}" / "CAS"
    start = time.perf_counter()
    site = LabSite(path, template=templates.get("synced"), mode=mode)  # type: ignore[arg-type]
    site.start()
    ready = time.perf_counter() - start
    stop_start = time.perf_counter()
    site.stop()
    return ready, time.perf_counter() - stop_start


def _install(templates: Templates, work: Path, mode: str, n: int) -> float:
    path = work / f"install-{mode}-{n}" / "CAS"
    with LabSite(path, template=templates.get("downloaded"), mode=mode) as site:  # type: ignore[arg-type]
        start = time.perf_counter()
        site.install(SAMPLE_UPDATE, wait=True)
        took = time.perf_counter() - start
        assert site.state(SAMPLE_UPDATE) == State.INSTALL_SUCCESS
    return took


TEST_FILE = """
import pytest
from cmlab.testing import SAMPLE_UPDATE, State

@pytest.mark.parametrize("n", range({count}))
@pytest.mark.cmlab(stage="downloaded")
def test_install(cmlab_site, n):
    cmlab_site.install(SAMPLE_UPDATE, wait=True)
    assert cmlab_site.state(SAMPLE_UPDATE) == State.INSTALL_SUCCESS
"""


def _pytest_run(work: Path, count: int, mode: str) -> float:
    folder = work / f"pytest-{mode}"
    folder.mkdir()
    (folder / "test_many.py").write_text(textwrap.dedent(TEST_FILE.format(count=count)))
    (folder / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--cmlab-mode={mode}",
            # Its own base folder: pytest's default one also removes the oldest runs' folders
            # under /tmp/pytest-of-<user>, seconds of unrelated deletes (10 s measured).
            f"--basetemp={folder / 'tmp'}",
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"pytest ({mode}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    return took


def run(quick: bool) -> list[dict[str, Any]]:
    reps = 5 if quick else 20
    count = 10 if quick else 100
    work = Path(tempfile.mkdtemp(prefix="cmlab-bench-testing-"))
    try:
        templates = Templates(work / "templates")
        start = time.perf_counter()
        templates.get("synced")
        templates.get("downloaded")
        template_seconds = time.perf_counter() - start
        ready: dict[str, list[float]] = {"inprocess": [], "subprocess": []}
        stops: dict[str, list[float]] = {"inprocess": [], "subprocess": []}
        install: dict[str, list[float]] = {"inprocess": [], "subprocess": []}
        for n in range(reps):
            # Alternate the two modes so a slow moment of the machine falls on both.
            for mode in ("inprocess", "subprocess") if n % 2 == 0 else ("subprocess", "inprocess"):
                r, s = _site_ready(templates, work, mode, n)
                ready[mode].append(r)
                stops[mode].append(s)
                install[mode].append(_install(templates, work, mode, n))
        many = {mode: _pytest_run(work, count, mode) for mode in ("inprocess", "subprocess")}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def ms(values: list[float]) -> list[float]:
        return [v * 1000 for v in values]

    return [
        result(
            name="testing_site_ready",
            measured="a cmlab_site ready for a test: copy of the synced template + daemon "
            "started in-process (median)",
            unit="ms",
            figure=statistics.median(ms(ready["inprocess"])),
            samples=ms(ready["inprocess"]),
            samples_are="repetitions",
            repetitions=reps,
            baseline_figure=statistics.median(ms(ready["subprocess"])),
            baseline="the same copy with the daemon as `python -m cmlab run` (READY=1)",
            target=Target("<", 100.0, "issue 14: under 100 ms per test from the template"),
            details={
                "stop_ms_inprocess": statistics.median(ms(stops["inprocess"])),
                "stop_ms_subprocess": statistics.median(ms(stops["subprocess"])),
                "templates_seconds": template_seconds,
            },
        ),
        result(
            name="testing_install",
            measured="install(SAMPLE_UPDATE, wait=True) to INSTALL_SUCCESS inside a test, "
            "in-process (median)",
            unit="s",
            figure=statistics.median(install["inprocess"]),
            samples=install["inprocess"],
            samples_are="repetitions",
            repetitions=reps,
            baseline_figure=statistics.median(install["subprocess"]),
            baseline="the same in subprocess mode",
            target=Target("<", 0.5, "issue 14: a full lifecycle inside a test under 0.5 s"),
        ),
        result(
            name="testing_100_tests",
            measured=f"pytest on {count} tests, each a cmlab_site installing the sample update "
            "(wall time, in-process)",
            unit="s",
            figure=many["inprocess"],
            samples=[many["inprocess"]],
            samples_are="one run",
            repetitions=1,
            baseline_figure=many["subprocess"],
            baseline="the same file with --cmlab-mode=subprocess",
            target=Target("<", 60.0 * count / 100, "issue 14: 100 such tests under 60 s"),
            details={"tests": count},
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    rows = run(parser.parse_args().quick)
    print(json.dumps(rows, indent=2))
