"""The exit codes every `cmlab` command follows, defined once.

A shell harness tells "done" from "failed" from "try again later" by the exit code alone, so
each code means one thing whatever the command: the `--help` epilog and the README's table are
made from (or checked against) `MEANINGS`, and `exit_code_of` is the one place that decides
which error means which code. Bad usage is argparse's own 2 (it exits with it before a command
runs); a command that finds bad usage itself returns the same code."""

from __future__ import annotations

import enum
import textwrap

from cmlab.admin.reset import BadGuid
from cmlab.core.errors import CmlabError, ConfigError
from cmlab.site.config import SiteNotFound
from cmlab.site.sitedb import procs, recovery, servicing

__all__ = ["HANDLED", "MEANINGS", "ExitCode", "epilog", "exit_code_of"]


class ExitCode(enum.IntEnum):
    DONE = 0
    FAILED = 1
    USAGE = 2
    TIMEOUT = 3
    REFUSED = 4
    NOT_FOUND = 5
    INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it


MEANINGS: dict[ExitCode, str] = {
    ExitCode.DONE: "done: the action is recorded, or the state waited for is reached",
    ExitCode.FAILED: "failed: a failure state is reached (DOWNLOAD_FAILED, PREREQ_ERROR, "
    "INSTALL_FAILED, ...; with --wait or `cmlab wait`), or the work failed",
    ExitCode.USAGE: "bad usage: an unknown command or option, a GUID that is not a GUID, "
    "an unknown state name, a negative timeout",
    ExitCode.TIMEOUT: "timed out: --timeout passed before the goal was reached",
    ExitCode.REFUSED: "refused: the site refuses the action (a state it cannot start from, "
    "another update in progress, a child site, an invalid site.toml, a daemon already running)",
    ExitCode.NOT_FOUND: "not found: no site.toml in the folder, no such update package, "
    "no such secondary site",
    ExitCode.INTERRUPTED: "interrupted: Ctrl-C",
}

# Which error means which code: the first class that matches wins, so a "not found" subclass
# comes before the refusal it derives from (procs.UnknownPackage's subclasses are also
# NotDownloadable or NotInitiable; SiteNotFound is a ConfigError).
_BY_ERROR: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (SiteNotFound, ExitCode.NOT_FOUND),
    (procs.UnknownPackage, ExitCode.NOT_FOUND),
    (recovery.UnknownSecondary, ExitCode.NOT_FOUND),
    (BadGuid, ExitCode.USAGE),
    (procs.NotDownloadable, ExitCode.REFUSED),
    (servicing.NotInitiable, ExitCode.REFUSED),
    (recovery.NotRecoverable, ExitCode.REFUSED),
    (ConfigError, ExitCode.REFUSED),
    (CmlabError, ExitCode.FAILED),
    (LookupError, ExitCode.FAILED),
)

# The errors a command reports in one line instead of a traceback.
HANDLED: tuple[type[BaseException], ...] = (CmlabError, LookupError)


def exit_code_of(exc: BaseException) -> ExitCode:
    for cls, code in _BY_ERROR:
        if isinstance(exc, cls):
            return code
    return ExitCode.FAILED


def epilog(width: int = 88) -> str:
    """The table for `cmlab --help` (argparse's RawDescriptionHelpFormatter keeps it as is)."""
    rows = [
        textwrap.fill(
            MEANINGS[code],
            width,
            initial_indent=f"  {int(code):>3}  ",
            subsequent_indent=" " * 7,
        )
        for code in ExitCode
    ]
    return "exit codes (every command):\n" + "\n".join(rows)
