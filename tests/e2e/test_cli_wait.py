"""`--wait` and `cmlab wait` against the real daemon, through the real command line (`python -m
cmlab` in a subprocess): the exit code a shell script gets at each end of a run, and the last
line it prints. Every wait has a deadline twice: the command's own `--timeout`, and the
subprocess's (tests.helpers.cli.cmlab). The daemon is only what the commands wait on: it runs
in-process (cmlab.testing's LabSite), holding the site lock a `cmlab run` would."""

from __future__ import annotations

import itertools
import os
import pty
import re
import subprocess
import sys

import pytest

from cmlab.testing import SAMPLE_UPDATE, SYNCED_STATES, LabSite, State
from tests.helpers.cli import cmlab

GUID = SAMPLE_UPDATE
DEADLINE = "90"  # seconds: each command's --timeout; a lab run takes about 1 s


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout.splitlines()[-1]


@pytest.mark.cmlab(stage="new")
def test_sync_then_download_with_wait_exit_0_once_each_is_over(cmlab_site: LabSite) -> None:
    site = cmlab_site.path
    synced = cmlab("sync", str(site), "--wait", "--timeout", DEADLINE, check=False)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert synced.stdout.splitlines()[0] == "Synchronization requested (SyncHistory ID=1)."
    assert re.fullmatch(r"Synchronization 1: success after \d+\.\d s\.", last_line(synced))
    assert synced.stderr == ""  # a daemon serves the site: no note
    # Over means every package decided, not just DMPDownloader's row finished.
    assert cmlab_site.states() == SYNCED_STATES

    got = cmlab("download", str(site), GUID, "--wait", "--timeout", DEADLINE, check=False)
    assert got.returncode == 0, got.stdout + got.stderr
    assert got.stdout.splitlines()[0] == f"Package {GUID} added to CM_UpdatePackagesToDownload."
    # Not a terminal: one line per state seen, from the first poll, then the outcome.
    progress = got.stdout.splitlines()[1:-1]
    assert progress[0].startswith("[   0.0 s] ")
    assert progress[-1].endswith("] DOWNLOAD_SUCCESS (262146)")
    seen = [line.split("] ", 1)[1] for line in progress]
    assert all(a != b for a, b in itertools.pairwise(seen)) and "\r" not in got.stdout
    assert re.fullmatch(
        r"Configuration Manager 2509: DOWNLOAD_SUCCESS \(262146\) after \d+\.\d s\.",
        last_line(got),
    )
    assert cmlab_site.states()[GUID] == State.DOWNLOAD_SUCCESS
    assert cmlab_site.stop() == 0


@pytest.mark.cmlab(stage="downloaded")
def test_install_with_wait_exits_0_at_install_success(cmlab_site: LabSite) -> None:
    site = cmlab_site.path
    done = cmlab("install", str(site), GUID, "--wait", "--timeout", DEADLINE, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == (
        f"InitiateUpgrade({GUID}, Flag=0 NORMAL): State DOWNLOAD_SUCCESS (262146) -> "
        "ENABLED (2). SMSDBMon drops 2.ESC for HMAN."
    )
    assert re.fullmatch(
        r"Configuration Manager 2509: INSTALL_SUCCESS \(196612\) after \d+\.\d s\.",
        last_line(done),
    )
    # A poll every 50 ms may miss a state the run passes in less: only the last is sure.
    assert done.stdout.splitlines()[-2].endswith("] INSTALL_SUCCESS (196612)")

    # On a terminal: one line redrawn in place, then cleared for the outcome.
    out = on_a_terminal("wait", str(site), GUID, "install_success", "--timeout", DEADLINE)
    assert out.startswith("\r\033[K[   0.0 s] INSTALL_SUCCESS (196612)\r\033[K")
    assert re.fullmatch(
        r"Configuration Manager 2509: INSTALL_SUCCESS \(196612\) after \d+\.\d s\.\r?\n",
        out.rsplit("\r\033[K", 1)[1],
    )
    assert cmlab_site.stop() == 0


@pytest.mark.cmlab(stage="downloaded")
def test_wait_for_a_state_that_never_comes_exits_3_with_what_it_saw(cmlab_site: LabSite) -> None:
    site = cmlab_site.path
    late = cmlab("wait", str(site), GUID, "INSTALL_SUCCESS", "--timeout", "0.2", check=False)
    assert late.returncode == 3, late.stdout + late.stderr
    assert last_line(late) == (
        "Configuration Manager 2509: timed out after 0.2 s waiting for INSTALL_SUCCESS; "
        "last state DOWNLOAD_SUCCESS (262146); seen: DOWNLOAD_SUCCESS (262146)."
    )
    assert cmlab_site.stop() == 0


# docs/prereq.md: "Pending system restart", an Error if true.
@pytest.mark.cmlab(stage="downloaded", settings={"facts.pending_restart": True})
def test_a_prerequisite_error_makes_prereq_wait_exit_1(cmlab_site: LabSite) -> None:
    site = cmlab_site.path
    failed = cmlab("prereq", str(site), GUID, "--wait", "--timeout", DEADLINE, check=False)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert re.fullmatch(
        r"Configuration Manager 2509: PREREQ_ERROR \(196607\) after \d+\.\d s, instead of "
        r"the prerequisite check \(PREREQ_SUCCESS or PREREQ_WARNING\); see "
        r"ConfigMgrPrereq\.log\.",
        last_line(failed),
    ), last_line(failed)
    assert cmlab_site.states()[GUID] == State.PREREQ_ERROR
    assert cmlab_site.stop() == 0


@pytest.mark.cmlab(stage="downloaded", start=False)
def test_prereq_wait_with_no_daemon_says_so_once_and_waits_for_one(cmlab_site: LabSite) -> None:
    """The request is recorded with no daemon; whoever starts one later ends the wait."""
    site = cmlab_site.path
    waiter = subprocess.Popen(
        [sys.executable, "-m", "cmlab", "prereq", str(site), GUID, "--wait", "--timeout", DEADLINE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert waiter.stderr is not None
        # The note comes once the request is recorded: only then start the daemon.
        note = waiter.stderr.readline()
        assert note == (
            f"cmlab: no daemon is running for {site}: the request waits for `cmlab run {site}`.\n"
        )
        with cmlab_site:
            out, err = waiter.communicate(timeout=120)
            assert cmlab_site.stop() == 0
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 0, out + err
    assert err == ""
    assert re.fullmatch(
        r"Configuration Manager 2509: PREREQ_SUCCESS \(131074\) after \d+\.\d s\.",
        out.splitlines()[-1],
    )


def on_a_terminal(*args: str) -> str:
    """Run `cmlab *args` with its stdout on a pseudo-terminal; what it wrote there."""
    main, child = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cmlab", *args],
            stdout=child,
            stderr=subprocess.DEVNULL,
        )
        os.close(child)
        chunks = []
        while True:
            try:
                data = os.read(main, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(main)
    return b"".join(chunks).decode()
