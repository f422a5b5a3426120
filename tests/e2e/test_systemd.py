"""The systemd integration: the unit files are valid, and the daemon speaks sd_notify(3) the way
cmlab@.service (Type=notify, NotifyAccess=main, WatchdogSec=) expects."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cmlab.testing import LabSite, State

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
UNIT = SYSTEMD / "cmlab@.service"
SYSUSERS = SYSTEMD / "cmlab.sysusers.conf"
TMPFILES = SYSTEMD / "cmlab.tmpfiles.conf"

# Generous: the machine is shared and a cold start imports cryptography and opens the database.
DEADLINE = 60.0
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def _unit_settings() -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value (systemd allows a key more than once)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_has_the_settings_operators_rely_on() -> None:
    unit = _unit_settings()
    service = {k: v[-1] for k, v in unit["Service"].items()}
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"].endswith(" run /var/lib/cmlab/%i")
    assert service["ExecStart"].split()[0].endswith("/cmlab")
    assert service["WatchdogSec"] == "30"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["TimeoutStopSec"] == "15"
    assert service["User"] == "cmlab"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/cmlab"
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt install systemd); unit not verified")
    return exe


def _verify(exe: str, unit: Path) -> subprocess.CompletedProcess[str]:
    # --man=no: Documentation= is not looked up in the man database, which containers lack.
    return subprocess.run(
        [exe, "verify", "--man=no", os.fspath(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=unit.parent,
    )


def _verifiable_copy(exe: str, tmp_path: Path) -> Path:
    """The unit copied into tmp_path as an instance, with ExecStart pointing at a stand-in:
    systemd-analyze needs no running systemd, but it does check that ExecStart's program exists
    and is executable, and the real one lives in the operator's install."""
    fake = tmp_path / "bin" / "cmlab"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)

    probe = tmp_path / "probe" / "cmlab-probe.service"
    probe.parent.mkdir()
    probe.write_text(f"[Service]\nType=oneshot\nExecStart={fake}\n")
    baseline = _verify(exe, probe)
    if baseline.returncode != 0 or baseline.stderr.strip():
        pytest.skip(
            "systemd-analyze verify does not work in this environment even on a trivial unit: "
            + (baseline.stderr.strip() or f"exit code {baseline.returncode}")
        )

    text = UNIT.read_text(encoding="utf-8")
    exec_start = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    program = exec_start.removeprefix("ExecStart=").split()[0]
    units = tmp_path / "units"
    units.mkdir()
    (units / UNIT.name).write_text(text.replace(program, os.fspath(fake)))
    # A template cannot be checked on its own: check an instance, found via the template.
    return units / "cmlab@CAS.service"


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = _systemd_analyze()
    result = _verify(exe, _verifiable_copy(exe, tmp_path))
    # verify exits 0 on unknown keys and bad values (it only warns), so any output is a failure.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_unit_hardening_keeps_a_low_exposure_score(tmp_path: Path) -> None:
    exe = _systemd_analyze()
    instance = _verifiable_copy(exe, tmp_path)
    result = subprocess.run(
        [exe, "security", "--offline=true", "--no-pager", os.fspath(instance)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=instance.parent,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    if match is None:
        pytest.skip(
            "systemd-analyze security --offline is not available here: "
            + (result.stderr.strip() or f"exit code {result.returncode}")
        )
    # 0 is fully locked down, 10 is unprotected; the unit scored 0.7 when it was written.
    assert float(match.group(1)) <= 2.0, result.stdout


def test_sysusers_and_tmpfiles_make_the_user_and_state_folder(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    tmpfiles = shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        pytest.skip("systemd-sysusers / systemd-tmpfiles are not installed")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles --root needs root to chown the folder it creates")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(
        [sysusers, f"--root={root}", os.fspath(SYSUSERS)], check=True, capture_output=True
    )
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    assert "cmlab" in passwd
    uid, gid, home, shell = int(passwd["cmlab"][2]), int(passwd["cmlab"][3]), *passwd["cmlab"][5:]
    assert home == "/var/lib/cmlab"
    assert shell.endswith("nologin")
    assert "cmlab" in {line.split(":")[0] for line in (root / "etc/group").read_text().splitlines()}

    subprocess.run(
        [tmpfiles, f"--root={root}", "--create", os.fspath(TMPFILES)],
        check=True,
        capture_output=True,
    )
    st = os.stat(root / "var/lib/cmlab")
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o750
    assert (st.st_uid, st.st_gid) == (uid, gid)


# -- sd_notify ---------------------------------------------------------------------------------


@dataclass
class NotifyListener:
    """The NOTIFY_SOCKET end systemd would hold, with each sender's pid (SO_PASSCRED), since
    NotifyAccess=main makes systemd ignore messages from any process but the main one."""

    sock: socket.socket
    path: str
    messages: list[tuple[int, str]] = field(default_factory=list)

    def receive(self, timeout: float) -> bool:
        """Wait up to `timeout` for one datagram; False if none came."""
        self.sock.settimeout(timeout)
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return False
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:12])[0]
        for line in data.decode("utf-8").splitlines():
            self.messages.append((pid, line))
        return True

    def drain(self) -> None:
        while self.receive(0.05):
            pass

    def count(self, line: str, pid: int) -> int:
        return sum(1 for p, m in self.messages if m == line and p == pid)


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
    folder = tempfile.mkdtemp(prefix="cmlab-notify-", dir="/tmp")
    path = os.path.join(folder, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(path)
    try:
        yield NotifyListener(sock, path)
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def _make_site(tmp_path: Path) -> LabSite:
    """A lab site as `cmlab init` makes it by default (auto-download on, a 5 s rescan), never
    synchronized; the test runs its daemon itself, as systemd would."""
    return LabSite(tmp_path / "CAS", auto_download=True, rescan_interval=5.0).create()


# Where a synchronization ends on a lab site with auto-download on: the applicable update is
# downloaded (payload CAB verified and extracted, redists fetched), the others are filtered.
DECIDED = {State.DOWNLOAD_SUCCESS, State.APPLICABILITY_HIDE, State.APPLICABILITY_NA}


def _synchronized(site: Path) -> bool:
    conn = sqlite3.connect(f"file:{site / 'db' / 'site.db'}?mode=ro", uri=True, timeout=30)
    try:
        states = [row[0] for row in conn.execute("SELECT State FROM CM_UpdatePackages")]
    finally:
        conn.close()
    return bool(states) and all(state in DECIDED for state in states)


def _mdwe_supported() -> bool:
    """Whether the kernel has PR_SET_MDWE (6.3+), the same W^X rule as the unit's
    MemoryDenyWriteExecute=yes; probed in a child so this process is not restricted."""
    probe = (
        "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
        f"sys.exit(0 if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0 else 1)"
    )
    return subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0


def _daemon_command(site: Path, *, mdwe: bool) -> list[str]:
    run = [sys.executable, "-m", "cmlab.commands.cli", "run", os.fspath(site)]
    if not mdwe:
        return run
    # exec keeps the pid, so the daemon is still the "main process" for NotifyAccess=main.
    wrapper = (
        "import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
        f"assert libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0; "
        f"os.execv(sys.executable, {run!r})"
    )
    return [sys.executable, "-c", wrapper]


@pytest.mark.parametrize("mdwe", [False, True], ids=["plain", "memory-deny-write-execute"])
def test_daemon_sends_ready_watchdog_and_stopping(
    tmp_path: Path, listener: NotifyListener, mdwe: bool
) -> None:
    if mdwe and not _mdwe_supported():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+) to stand in for systemd's")
    lab = _make_site(tmp_path)
    site = lab.path
    env = dict(os.environ)
    env["NOTIFY_SOCKET"] = listener.path
    # 200 ms: the daemon pings every 100 ms, so two pings arrive quickly even on a slow machine.
    env["WATCHDOG_USEC"] = "200000"
    env.pop("WATCHDOG_PID", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.fspath(REPO / "daemon"), *filter(None, [env.get("PYTHONPATH")])]
    )
    # Started by hand, not by LabSite(mode="subprocess"): what is tested is the process as
    # systemd sees it (this NOTIFY_SOCKET and WATCHDOG_USEC, the MDWE wrapper's exec), which
    # LabSite's own notify socket would take over.
    out = (tmp_path / "daemon.out").open("wb")
    err = (tmp_path / "daemon.err").open("wb")
    proc = subprocess.Popen(
        _daemon_command(site, mdwe=mdwe), env=env, stdout=out, stderr=err, cwd=tmp_path
    )

    def wait_for(what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEADLINE
        while not done():
            if proc.poll() is not None:
                # What it sent just before exiting may still be queued on the socket.
                listener.drain()
                if done():
                    return
                pytest.fail(
                    f"daemon exited ({proc.returncode}) before {what}; stderr:\n"
                    + (tmp_path / "daemon.err").read_text(errors="replace")
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {what} within {DEADLINE}s; got {listener.messages}")
            listener.receive(min(remaining, 0.5))

    try:
        wait_for("READY=1", lambda: listener.count("READY=1", proc.pid) >= 1)
        wait_for("two WATCHDOG=1", lambda: listener.count("WATCHDOG=1", proc.pid) >= 2)
        assert listener.count("STOPPING=1", proc.pid) == 0
        first_ready = next(i for i, (_, m) in enumerate(listener.messages) if m == "READY=1")
        first_ping = next(i for i, (_, m) in enumerate(listener.messages) if m == "WATCHDOG=1")
        assert first_ready < first_ping

        # Real work while pinging: a synchronization downloads, verifies (cryptography) and
        # extracts (libmspack via ctypes) signed CABs, which is what MemoryDenyWriteExecute
        # could break, and the pings must keep coming while it runs.
        pings_before = listener.count("WATCHDOG=1", proc.pid)
        lab.sync()
        wait_for("a finished synchronization", lambda: _synchronized(site))
        assert not list((site / "inboxes").rglob("BAD/*")), "a file went to BAD during sync"
        wait_for(
            "pings after the synchronization",
            lambda: listener.count("WATCHDOG=1", proc.pid) > pings_before + 1,
        )

        proc.send_signal(signal.SIGTERM)
        wait_for("STOPPING=1", lambda: listener.count("STOPPING=1", proc.pid) >= 1)
        try:
            code = proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon still running {DEADLINE}s after SIGTERM")
        assert code == 0, (tmp_path / "daemon.err").read_text(errors="replace")
        # Every notification came from the main process itself, as NotifyAccess=main requires.
        assert {pid for pid, _ in listener.messages} == {proc.pid}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        err.close()


def test_a_vanished_notify_socket_does_not_stop_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cmlab.core import sd_notify

    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sd_notify.notify("STOPPING=1") is False
