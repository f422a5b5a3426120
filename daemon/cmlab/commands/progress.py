"""How `cmlab wait` and the commands' `--wait` show a wait: on a terminal, one line redrawn in
place with the seconds so far and the state; anywhere else (a pipe, a CI log), one line per
change of state and nothing in between, so a log holds the states in order and no `\\r`. Then
one last line with the outcome in the console's words: the package's name and state, or what
was seen before the deadline.

The writer takes its stream and whether it is a terminal, so tests drive both modes with a
StringIO; `ProgressLine.on(stream)` asks the stream itself."""

from __future__ import annotations

from typing import TextIO

from cmlab.admin.waiting import Progress, Verdict, WaitResult
from cmlab.site.state_codes import PackageState

__all__ = ["LOOK_IN", "ProgressLine", "outcome"]

# Carriage return, then ANSI "erase in line" (EL, CSI K): the next text replaces the line.
REDRAW = "\r\033[K"

# Where the guide sends an administrator for each state a run stops at badly.
LOOK_IN: dict[int, str] = {
    PackageState.DOWNLOAD_FAILED: "dmpdownloader.log",
    PackageState.APPLICABILITY_FAILED: "hman.log",
    PackageState.CONTENT_REPLICATION_FAILED: "hman.log and distmgr.log",
    PackageState.PREREQ_ERROR: "ConfigMgrPrereq.log",
    PackageState.PREREQ_WARNING: "ConfigMgrPrereq.log; `cmlab install --ignore-warnings` "
    "installs despite warnings",
    PackageState.INSTALL_FAILED: "CMUpdate.log",
    PackageState.INSTALL_CMU_FAILED: "CMUpdate.log",
}


class ProgressLine:
    """The `on_progress` of admin.waiting.wait: `update` at every poll, `finish` once after."""

    def __init__(self, stream: TextIO, is_tty: bool) -> None:
        self.stream = stream
        self.is_tty = is_tty
        self._shown: tuple[str, int] | None = None  # (line, tenths of a second) on screen
        self._last_line: str | None = None

    @classmethod
    def on(cls, stream: TextIO) -> ProgressLine:
        return cls(stream, stream.isatty())

    def update(self, progress: Progress, elapsed: float) -> None:
        if self.is_tty:
            # Polls come every few milliseconds: redraw when the state or the tenth changes.
            shown = (progress.line, int(elapsed * 10))
            if shown == self._shown:
                return
            self._shown = shown
            self.stream.write(f"{REDRAW}[{elapsed:6.1f} s] {progress.line}")
        else:
            if progress.line == self._last_line:
                return
            self._last_line = progress.line
            self.stream.write(f"[{elapsed:6.1f} s] {progress.line}\n")
        self.stream.flush()

    def finish(self) -> None:
        """Clear the redrawn line, so the outcome is printed in its place."""
        if self.is_tty and self._shown is not None:
            self.stream.write(REDRAW)
            self.stream.flush()
            self._shown = None


def outcome(label: str | None, result: WaitResult, what: str, timeout: float) -> str:
    """The last line of a wait. `label` names the package ("Configuration Manager 2509"); None
    when the progress lines name what they are about (a synchronization's)."""
    seconds = f"{result.seconds:.1f} s"
    if result.verdict is Verdict.TIMEOUT:
        last = "last state" if result.state is not None else "last seen:"
        said = (
            f"timed out after {timeout:g} s waiting for {what}; {last} {result.line}; "
            f"seen: {' -> '.join(result.seen)}."
        )
        return f"{label}: {said}" if label else said[0].upper() + said[1:]
    said = f"{result.line} after {seconds}"
    if result.verdict is Verdict.FAILED and label:
        said += f", instead of {what}"
    if result.verdict is Verdict.FAILED and result.state in LOOK_IN:
        said += f"; see {LOOK_IN[result.state]}"
    said += "."
    return f"{label}: {said}" if label else said[0].upper() + said[1:]
