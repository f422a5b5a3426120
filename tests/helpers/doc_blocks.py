"""Run a Markdown file's command blocks as written, so a page of cmlab's documentation can never
walk a user into an error. tests/e2e/test_readme.py runs README.md with it; another page is
one more line in its list.

The convention, all of it
-------------------------
Blocks that run are fenced blocks whose info string starts with `sh`, `bash`, `shell`,
`console` or `python`; any other fence (none, `text`, `toml`, ...) is prose and never runs.

- `sh`, `bash`, `shell`: a bash script, run with `bash -euo pipefail`.
- `console`: a line starting `$ ` is a command and `> ` continues it; every other line is
  output shown to the reader and not compared: cmlab prints times, IDs and paths that change
  from run to run, so what is checked is that each command exits as it should.
- `python`: a script, run by the venv's python.

An annotation is an HTML comment (invisible once rendered) alone on the line right before the
opening fence. A `<!-- doc-test: ...` line that is not one of these is refused, so a typo
cannot quietly skip a block:

    <!-- doc-test: skip (the reason) -->  not run; the reason is required
    <!-- doc-test: background -->         one command that runs until stopped (`cmlab run
                                          SITE` in a terminal of its own): started, and the
                                          later blocks run while it serves; at the end of the
                                          file it gets SIGTERM and must exit 0
    <!-- doc-test: expect-exit N -->      the block must end with exit status N (the
                                          first command that fails ends it: bash -e)
    <!-- doc-test: pytest -->             a python block that is a test module: run by pytest

How the blocks of one file run
------------------------------
- In order, in one temporary working directory that stands for a checkout after `make demo`:
  a later block uses what an earlier one made, and `.venv` there is the venv under test.
- PATH starts with that venv's `bin`, so `cmlab` and `.venv/bin/cmlab` are the cmlab under
  test; HOME is an empty temporary folder; PYTHONPATH and CMLAB_* variables are removed.
- Each block has a deadline (120 s unless the caller says otherwise); a block past it is
  killed with its process group, and fails.
- A command a block starts with `&` keeps running while the later blocks run, as a daemon
  started from a terminal does; at the end of the file it gets SIGTERM and must exit 0.
  Before the next block, the runner waits until the caller's `ready` check says such a
  command serves (for cmlab: its daemon holds the site's lock).
- The first failing block stops the file. The failure names the file and line of the block,
  what went wrong, and the end of the block's stderr and stdout; bash's and Python's own
  messages give the page's line numbers too (the script is padded so that its lines are the
  page's lines).

Needs Linux (/proc) and bash 5.1 or later (`wait -n -p`). The runner notes the `&` commands
with bash's DEBUG trap, so a block must not set a DEBUG trap of its own.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "BackgroundJob",
    "Block",
    "BlockFailed",
    "DocBlockError",
    "DocSession",
    "Kind",
    "Mode",
    "Outcome",
    "ReadyCheck",
    "parse_markdown",
    "read_blocks",
    "run_markdown",
]

DEFAULT_TIMEOUT = 120.0
# How long a command left running may take to serve (the ready check), and to stop after
# SIGTERM. A cmlab daemon does either in well under a second on this 2-core VM.
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
POLL_SECONDS = 0.01
# What a failure shows of each stream: its end, where the error is, stderr first. A daemon
# left running writes to the same stdout (a JSON line per log line, some 300 characters).
SHOWN_LINES = 40
SHOWN_WIDTH = 240


class Kind(enum.StrEnum):
    SHELL = "shell"
    CONSOLE = "console"
    PYTHON = "python"


LANGS = {
    "sh": Kind.SHELL,
    "bash": Kind.SHELL,
    "shell": Kind.SHELL,
    "console": Kind.CONSOLE,
    "python": Kind.PYTHON,
}


class Mode(enum.StrEnum):
    RUN = "run"
    SKIP = "skip"
    BACKGROUND = "background"
    PYTEST = "pytest"


_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")
_ANNOTATION = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<body>.*?)\s*-->\s*$")
_ANNOTATION_START = re.compile(r"^\s*<!--\s*doc-test\b")


class DocBlockError(ValueError):
    """The page breaks the convention (an annotation misspelled or misplaced, a skip without a
    reason, a fence never closed); raised by the parser, before anything runs."""


@dataclass(frozen=True)
class Block:
    source: str  # the page's name as reports show it: README.md
    line: int  # the opening fence's line, 1-based
    kind: Kind
    body: str  # the lines between the fences
    mode: Mode = Mode.RUN
    reason: str = ""  # a skip's
    expect_exit: int = 0

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def lines(self) -> list[str]:
        """The lines to run (a console block's output lines blank), the page's line numbers
        kept: element i is the page's line `self.line + 1 + i`."""
        lines = self.body.split("\n")
        return [_command_of(s) for s in lines] if self.kind is Kind.CONSOLE else lines

    def script(self) -> str:
        """The text to run, padded so that its line N is the page's line N."""
        return "\n" * self.line + "\n".join(self.lines()) + "\n"


def _command_of(console_line: str) -> str:
    stripped = console_line.lstrip()
    for prompt in ("$ ", "> "):
        if stripped.startswith(prompt):
            return stripped[len(prompt) :]
    return ""  # a bare prompt, or output: shown to the reader, not run


def _commands(block: Block) -> list[str]:
    return [s for s in block.lines() if s.strip() and not s.lstrip().startswith("#")]


def _annotation(text: str, where: str) -> tuple[Mode, str, int]:
    verb, _, rest = text.partition(" ")
    rest = rest.strip()
    if verb == "skip":
        reason = rest[1:-1].strip() if rest.startswith("(") and rest.endswith(")") else ""
        if not reason:
            raise DocBlockError(f"{where}: `doc-test: skip` needs a reason: skip (why)")
        return Mode.SKIP, reason, 0
    if verb == "expect-exit" and rest.isdigit():
        return Mode.RUN, "", int(rest)
    if verb in (Mode.BACKGROUND, Mode.PYTEST) and not rest:
        return Mode(verb), "", 0
    raise DocBlockError(
        f"{where}: unknown annotation `doc-test: {text}` "
        "(skip (reason), background, expect-exit N, pytest)"
    )


def _closing(lines: list[str], start: int, fence: str) -> int | None:
    for j in range(start, len(lines)):
        text = lines[j].strip()
        if text.startswith(fence) and text.strip(fence[0]) == "":
            return j
    return None


def parse_markdown(text: str, source: str) -> list[Block]:
    """The runnable blocks of a page, skipped ones included, in order; DocBlockError if the
    page breaks the convention."""
    lines = text.split("\n")
    blocks: list[Block] = []
    note: re.Match[str] | None = None  # an annotation on the line before
    i = 0
    while i < len(lines):
        where = f"{source}:{i + 1}"
        opening = _FENCE.match(lines[i])
        if opening is None:
            if note is not None:
                raise DocBlockError(
                    f"{source}:{i}: a doc-test annotation must be right before a fence"
                )
            if _ANNOTATION_START.match(lines[i]):
                note = _ANNOTATION.match(lines[i])
                if note is None:
                    raise DocBlockError(
                        f"{where}: a doc-test annotation is one comment on one line"
                    )
            i += 1
            continue
        fence = opening["fence"]
        end = _closing(lines, i + 1, fence)
        if end is None:
            raise DocBlockError(f"{where}: the fence opened here is never closed")
        lang = (opening["info"].split() or [""])[0].lower()
        if lang in LANGS:
            mode, reason, expect = (
                _annotation(note["body"], f"{source}:{i}") if note else (Mode.RUN, "", 0)
            )
            body = "\n".join(lines[i + 1 : end])
            block = Block(source, i + 1, LANGS[lang], body, mode, reason, expect)
            _check(block)
            blocks.append(block)
        elif note is not None:
            raise DocBlockError(f"{where}: a doc-test annotation on a block that never runs")
        note = None
        i = end + 1
    if note is not None:
        raise DocBlockError(
            f"{source}:{len(lines)}: a doc-test annotation must be right before a fence"
        )
    return blocks


def _check(block: Block) -> None:
    if block.mode is Mode.PYTEST and block.kind is not Kind.PYTHON:
        raise DocBlockError(f"{block.where}: `doc-test: pytest` is for python blocks")
    if block.mode is Mode.BACKGROUND and (block.kind is Kind.PYTHON or len(_commands(block)) != 1):
        raise DocBlockError(
            f"{block.where}: a background block is one shell command, which runs until stopped"
        )


def read_blocks(path: Path, name: str | None = None) -> list[Block]:
    """The page's blocks; `name` is how reports call it (docs/testing.md), its file name if
    not given."""
    return parse_markdown(path.read_text(encoding="utf-8"), name or path.name)


class BlockFailed(AssertionError):
    """A block did not do what the page says; the message is the whole report."""


@dataclass(frozen=True)
class Outcome:
    block: Block
    ran: bool  # False: skipped
    seconds: float = 0.0

    def __str__(self) -> str:
        if not self.ran:
            return f"{self.block.where}: {self.block.kind} block skipped ({self.block.reason})"
        return f"{self.block.where}: {self.block.kind} block passed in {self.seconds:.2f} s"


@dataclass(frozen=True)
class BackgroundJob:
    """A command a block left running: `cmd &` in it, or a background block's command."""

    pid: int
    block: Block
    shell_argv: tuple[str, ...]  # the block's own command line: the job's until it execs

    def argv(self) -> list[str] | None:
        """Its command line now; None while it is still the shell's fork, or once it is gone."""
        try:
            raw = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return None
        argv = [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]
        return None if not argv or tuple(argv) == self.shell_argv else argv

    def cwd(self) -> Path:
        return Path(os.readlink(f"/proc/{self.pid}/cwd"))

    def alive(self) -> bool:
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # not a zombie


# Whether a command left running serves yet; called until it says so (or the deadline).
ReadyCheck = Callable[[BackgroundJob], bool]


@dataclass
class _Left:
    """A block whose commands outlive it: its bash, waiting for its `&` commands and writing
    each one's exit status to `exits`; or a background block's command itself (exits None)."""

    proc: subprocess.Popen[bytes]
    block: Block
    jobs: list[BackgroundJob]
    folder: Path
    exits: Path | None

    def statuses(self) -> dict[int, int]:
        """Exit statuses known so far, by pid, as a shell reports them (128+N: signal N)."""
        if self.exits is None:
            code = self.proc.poll()
            return {} if code is None else {self.proc.pid: 128 - code if code < 0 else code}
        if not self.exits.exists():
            return {}
        rows = (line.split() for line in self.exits.read_text().splitlines() if line.strip())
        return {int(pid): int(code) for pid, code in rows}


# Around a shell block, its page lines kept. The prologue (the script's first line, blank
# otherwise) notes the PID of each command the block starts with `&`, as it starts: `jobs -p`
# forgets one that ended while bash waited for another command. After the block, the trailer
# lists the commands still running in JOBS (the runner's sign that the block is over), then
# writes each one's exit status to EXITS as it ends: `wait -n` for those bash still lists,
# `wait PID` for the others, whose statuses bash keeps (127 there: the block's own `wait` took
# it already).
_PROLOGUE = (
    """__doc_test_all=@ALL@; : >> "$__doc_test_all"; trap '[[ ${!:-} == "${__doc_test_bg:-}" ]] """
    + """|| { __doc_test_bg=$!; echo "$!" >> "$__doc_test_all"; }' DEBUG"""
)
_TRAILER = """\
trap - DEBUG
set +e
printf '%s\\n' $(jobs -p) > @JOBS@.tmp && mv @JOBS@.tmp @JOBS@
declare -A __doc_test_seen=()
while wait -n -p __doc_test_pid; __doc_test_status=$?; [[ -n "${__doc_test_pid:-}" ]]; do
  echo "$__doc_test_pid $__doc_test_status" >> @EXITS@
  __doc_test_seen[$__doc_test_pid]=1
  unset __doc_test_pid
done
while read -r __doc_test_pid; do
  [[ -n "${__doc_test_seen[$__doc_test_pid]:-}" ]] && continue
  wait "$__doc_test_pid" 2>/dev/null
  __doc_test_status=$?
  [[ $__doc_test_status == 127 ]] || echo "$__doc_test_pid $__doc_test_status" >> @EXITS@
done < @ALL@
exit 0
"""


class DocSession:
    """Runs blocks in order in `root/work` (HOME is `root/home`; scripts and their output go
    to `root/runner/L<line>/`). Leaving it stops what the blocks left running: SIGTERM, and
    each must exit 0."""

    def __init__(
        self,
        root: Path,
        *,
        venv: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        ready: ReadyCheck | None = None,
    ) -> None:
        self.venv = venv if venv is not None else Path(sys.prefix)
        self.timeout = timeout
        self.ready = ready
        self.work, self.home, self.runner = root / "work", root / "home", root / "runner"
        for folder in (self.work, self.home, self.runner):
            folder.mkdir(parents=True, exist_ok=True)
        if not (self.work / ".venv").exists():
            (self.work / ".venv").symlink_to(self.venv)
        self._left: list[_Left] = []

    def __enter__(self) -> DocSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        problems = self.stop()
        if exc is None and problems:
            raise BlockFailed("\n\n".join(problems))

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("CMLAB_") and k not in ("PYTHONPATH", "PYTHONHOME")
        }
        env.update(HOME=str(self.home), VIRTUAL_ENV=str(self.venv))
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), os.environ.get("PATH", "")])
        return env

    def run(self, block: Block) -> Outcome:
        """Run one block; BlockFailed if it does not do what the page says."""
        if block.mode is Mode.SKIP:
            return Outcome(block, ran=False)
        started = time.monotonic()
        folder = self.runner / f"L{block.line}"
        folder.mkdir()
        argv = self._write_script(block, folder)
        with (folder / "stdout").open("wb") as out, (folder / "stderr").open("wb") as err:
            # Files, not pipes: a command left running keeps its stdout open as long as it
            # runs, and a pipe would never reach its end.
            proc = subprocess.Popen(
                argv,
                cwd=self.work,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, killed whole on a deadline
            )
        background = block.mode is Mode.BACKGROUND
        left = _Left(proc, block, [], folder, None if background else folder / "exits")
        deadline = started + self.timeout
        try:
            if background:
                left.jobs = [BackgroundJob(proc.pid, block, tuple(argv))]
            else:
                left.jobs = self._until_done(left, deadline, tuple(argv))
            if left.jobs:
                self._left.append(left)
                self._until_ready(left)
        except BaseException:
            _kill_group(proc)
            raise
        return Outcome(block, ran=True, seconds=time.monotonic() - started)

    def _write_script(self, block: Block, folder: Path) -> list[str]:
        if block.kind is Kind.PYTHON:
            stem = Path(block.source).stem
            name = (
                f"test_{stem}_L{block.line}.py"
                if block.mode is Mode.PYTEST
                else f"{stem}_L{block.line}.py"
            )
            script = folder / name
            script.write_text(block.script())
            python = str(self.venv / "bin" / "python")
            if block.mode is Mode.PYTEST:
                return [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)]
            return [python, str(script)]
        script = folder / Path(block.source).name  # bash says "README.md: line 37: ..."
        if block.mode is Mode.BACKGROUND:
            lines = block.lines()
            n = lines.index(_commands(block)[0])
            lines[n] = "exec " + lines[n].lstrip()  # so SIGTERM reaches the command itself
            text = "\n" * block.line + "\n".join(lines) + "\n"
        else:
            places = {"@ALL@": "all", "@JOBS@": "jobs", "@EXITS@": "exits"}
            wrap = [_PROLOGUE, _TRAILER]
            for mark, name in places.items():
                wrap = [w.replace(mark, shlex.quote(str(folder / name))) for w in wrap]
            text = wrap[0] + "\n" * block.line + "\n".join(block.lines()) + "\n" + wrap[1]
        script.write_text(text)
        return ["bash", "-euo", "pipefail", str(script)]

    def _until_done(
        self, left: _Left, deadline: float, shell_argv: tuple[str, ...]
    ) -> list[BackgroundJob]:
        """Wait for the block to end; return the commands it left running."""
        proc, block, jobs = left.proc, left.block, left.folder / "jobs"
        while proc.poll() is None and not jobs.exists():
            if time.monotonic() > deadline:
                raise BlockFailed(_report(left, f"did not finish within {self.timeout:g} s"))
            time.sleep(POLL_SECONDS)
        if not jobs.exists():  # it stopped before its end: an error (set -e), or `exit`
            if proc.returncode != block.expect_exit:
                raise BlockFailed(
                    _report(
                        left, f"exited {_status(proc.returncode)} (expected {block.expect_exit})"
                    )
                )
            return []
        if block.expect_exit != 0:
            raise BlockFailed(_report(left, f"exited 0 (expected {block.expect_exit})"))
        running = [BackgroundJob(int(pid), block, shell_argv) for pid in jobs.read_text().split()]
        if not running:  # its bash collects the statuses of any that ended already, and ends
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise BlockFailed(_report(left, f"did not end within {self.timeout:g} s")) from None
        failed = {pid: code for pid, code in left.statuses().items() if code != 0}
        if failed:
            raise BlockFailed(_report(left, f"started commands that failed: {_codes(failed)}"))
        return running

    def _until_ready(self, left: _Left) -> None:
        if self.ready is None:
            return
        deadline = time.monotonic() + READY_TIMEOUT
        for job in left.jobs:
            while not self._ready(job):
                if not job.alive():  # ended: well (a quick job, not a server) or badly
                    code = _status_when_known(left, job.pid, deadline)
                    if code == 0:
                        break
                    raise BlockFailed(
                        _report(left, f"started pid {job.pid}, which exited {_status(code)}")
                    )
                if time.monotonic() > deadline:
                    raise BlockFailed(
                        _report(
                            left,
                            f"started pid {job.pid} ({shlex.join(job.argv() or [])}), "
                            f"not serving after {READY_TIMEOUT:g} s",
                        )
                    )
                time.sleep(POLL_SECONDS)

    def _ready(self, job: BackgroundJob) -> bool:
        try:
            return self.ready is None or self.ready(job)
        except OSError:  # it went while the check read /proc: the next poll says so
            return False

    def stop(self) -> list[str]:
        """SIGTERM every command the blocks left running; each must exit 0. Returns a report
        per block whose commands did not; whatever is left of a block is killed."""
        for left in self._left:
            for job in left.jobs:
                if job.alive():
                    _signal(job.pid, signal.SIGTERM)
        problems = []
        deadline = time.monotonic() + STOP_TIMEOUT
        for left in self._left:
            try:
                left.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(left.proc)
                left.proc.wait()
                problems.append(
                    _report(left, f"left commands running {STOP_TIMEOUT:g} s after SIGTERM")
                )
                continue
            _kill_group(left.proc)  # anything they started in turn
            statuses = left.statuses()
            bad: dict[int, int | None] = {pid: c for pid, c in statuses.items() if c != 0}
            bad.update({j.pid: None for j in left.jobs if j.pid not in statuses})
            if bad:
                problems.append(_report(left, f"left commands that stopped badly: {_codes(bad)}"))
        self._left.clear()
        return problems


def run_markdown(
    path: Path,
    root: Path,
    *,
    venv: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    ready: ReadyCheck | None = None,
) -> list[Outcome]:
    """Run every block of the page at `path`, in order, in a DocSession at `root`; raise
    BlockFailed with the report of the first block that fails (or of the commands that did
    not stop well). Returns what ran and what was skipped."""
    blocks = read_blocks(path)
    with DocSession(root, venv=venv, timeout=timeout, ready=ready) as session:
        return [session.run(block) for block in blocks]


def _status_when_known(left: _Left, pid: int, deadline: float) -> int | None:
    """The exit status of a command the block left, once its bash has written it (it does as
    soon as the command ends); None if it does not by the deadline."""
    while (code := left.statuses().get(pid)) is None and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    return code


def _status(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        code = 128 - code  # Popen's -N: killed by signal N, as a shell reports it
    if code > 128 and code - 128 in signal.valid_signals():
        return f"{code} ({signal.Signals(code - 128).name})"
    return str(code)


def _codes(statuses: dict[int, int | None] | dict[int, int]) -> str:
    return ", ".join(f"pid {pid} exited {_status(code)}" for pid, code in statuses.items())


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the block's process group (its own session, made for it) and reap its leader."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    if not text.strip():
        return "(empty)"
    lines = [_clip(line) for line in text.rstrip("\n").split("\n")]
    if len(lines) > SHOWN_LINES:
        lines = [f"[{len(lines) - SHOWN_LINES} lines above]", *lines[-SHOWN_LINES:]]
    return "\n".join(lines)


def _clip(line: str) -> str:
    return line if len(line) <= SHOWN_WIDTH else line[: SHOWN_WIDTH - 1] + "…"


def _report(left: _Left, what: str) -> str:
    block = left.block
    numbered = "\n".join(
        f"{block.line + 1 + n:>5} | {line}" for n, line in enumerate(block.body.split("\n"))
    )
    return (
        f"{block.where}: the {block.kind} block {what}\n"
        f"--- the block ---\n{numbered}\n"
        f"--- stderr ---\n{_tail(left.folder / 'stderr')}\n"
        f"--- stdout ---\n{_tail(left.folder / 'stdout')}"
    )
