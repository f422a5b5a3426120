"""The command line as a user runs it: `python -m cmlab ...` in a child process, for the tests
of what a command prints and the exit code it ends with."""

from __future__ import annotations

import subprocess
import sys


def cmlab(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `cmlab ARGS`; with check, fail the test on a non-zero exit, showing its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "cmlab", *args], capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"cmlab {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc
