"""The two ways a lab site's daemon runs under a test: in this process, on a thread of its own
with its own event loop (starts in milliseconds), or as `python -m cmlab run SITE` in a child
process (what an operator runs; the only way to kill it for real)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

from cmlab.daemon import serve
from cmlab.testing.modes import Mode


class LabError(RuntimeError):
    """A lab site could not do what the test asked (start, stop, kill): not a failed
    assertion about the site, a problem of the test's set-up."""


class InProcessDaemon:
    """`serve(site)` on a thread of its own: every component, the inbox engine and the
    database writer, exactly as `cmlab run` starts them, without the process around them (no
    signal handlers, no JSON lines on stdout)."""

    mode: Mode = "inprocess"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float, env: Mapping[str, str] | None = None) -> None:
        if env:
            raise LabError(
                "environment variables (a crash point, say) need mode='subprocess': an "
                "in-process daemon shares the test's environment"
            )
        ready = threading.Event()
        self._error = None

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.root, json_stdout=False, stop=self._stop, ready=ready.set)

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # reported to the thread that started it
                self._error = exc
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name=f"cmlab {self.root.name}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise LabError(f"the daemon of {self.root} did not start in {timeout} s")
        error = self._take_error()
        if error is not None:
            self._thread.join()
            self._thread = None
            raise LabError(f"the daemon of {self.root} did not start: {error}") from error

    def _take_error(self) -> BaseException | None:
        """The exception the daemon's thread ended with, once."""
        error, self._error = self._error, None
        return error

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def failure(self) -> BaseException | None:
        """The exception the daemon's thread ended with while nobody stopped it: a wait that
        goes on after that would only time out, so it stops at once with this."""
        if self._thread is not None and not self._thread.is_alive():
            return self._error
        return None

    def stop(self, timeout: float) -> int:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return 0
        if thread.is_alive() and loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            frame = sys._current_frames().get(thread.ident or 0)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
            raise LabError(f"the daemon of {self.root} did not stop in {timeout} s:\n{stack}")
        self._thread = None
        error = self._take_error()
        if error is not None:
            raise LabError(f"the daemon of {self.root} failed: {error!r}") from error
        return 0

    def kill(self) -> None:
        raise LabError(
            "kill() needs mode='subprocess': a daemon in this process cannot be killed without "
            "killing the test"
        )

    def output(self) -> str:
        return ""


class SubprocessDaemon:
    """`python -m cmlab run SITE` in a child process. Its stdout (the JSON log lines) and
    stderr go to files beside the site folder (`.<SITE>-daemon/`), never into it, so a tool
    watching the site sees only what cmlab itself writes there. Ready is sd_notify's READY=1,
    read from a socket of the test's own (the protocol systemd uses)."""

    mode: Mode = "subprocess"

    def __init__(self, root: Path, prefix: Sequence[str] = ()) -> None:
        self.root = root
        # A command the daemon runs under (`unshare` with a bind mount): it must exec the
        # daemon, so the process signalled is the daemon itself.
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.out_dir = root.parent / f".{root.name}-daemon"

    def stdout_path(self, run: int | None = None) -> Path:
        return self.out_dir / f"stdout-{run or self.runs}.jsonl"

    def stderr_path(self, run: int | None = None) -> Path:
        return self.out_dir / f"stderr-{run or self.runs}.txt"

    def start(self, timeout: float, env: Mapping[str, str] | None = None) -> None:
        self.out_dir.mkdir(exist_ok=True)
        self.runs += 1
        full_env = dict(os.environ)
        full_env.pop("CMLAB_CRASHPOINTS", None)
        full_env.pop("WATCHDOG_USEC", None)
        full_env.update(env or {})
        # A socket path must fit sockaddr_un (108 bytes): a short folder of its own in /tmp.
        sock_dir = tempfile.mkdtemp(prefix="cmlab-")
        sock_path = os.path.join(sock_dir, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(sock_path)
            full_env["NOTIFY_SOCKET"] = sock_path
            with (
                open(self.stdout_path(), "wb") as out,
                open(self.stderr_path(), "wb") as err,
            ):
                self.proc = subprocess.Popen(
                    [*self.prefix, sys.executable, "-m", "cmlab", "run", str(self.root)],
                    stdout=out,
                    stderr=err,
                    env=full_env,
                )
            self._await_ready(sock, timeout)
        finally:
            sock.close()
            shutil.rmtree(sock_dir, ignore_errors=True)

    def _await_ready(self, sock: socket.socket, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise LabError(
                    f"the daemon of {self.root} did not say READY=1 in {timeout} s:\n"
                    + self.stderr()
                )
            sock.settimeout(min(remaining, 0.1))
            try:
                message = sock.recv(4096).decode("utf-8", "replace")
            except TimeoutError:
                if self.proc.poll() is not None:
                    rc = self.proc.returncode
                    self.proc = None
                    raise LabError(
                        f"the daemon of {self.root} exited ({rc}) before it was ready:\n"
                        + self.stderr()
                    ) from None
                continue
            if "READY=1" in message.split("\n"):
                return

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def failure(self) -> BaseException | None:
        # A child process may end by itself on purpose (a crash point): wait_exit() is how a
        # test awaits that, so a wait does not treat it as a failure.
        return None

    def stop(self, timeout: float) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            # The daemon dumps every thread's stack to stderr when a stop is slow.
            raise LabError(
                f"the daemon of {self.root} did not stop in {timeout} s:\n{self.stderr()}"
            ) from exc
        self.proc = None
        return rc

    def kill(self) -> None:
        """SIGKILL, as a crash or `kill -9` would: nothing of the daemon runs after it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def wait_exit(self, timeout: float) -> int:
        """Wait for the daemon to end by itself (a crash point that kills it)."""
        if self.proc is None:
            return 0
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def stderr(self) -> str:
        try:
            return self.stderr_path().read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def output(self) -> str:
        try:
            return self.stdout_path().read_text(errors="replace")
        except FileNotFoundError:
            return ""


Runner = InProcessDaemon | SubprocessDaemon
