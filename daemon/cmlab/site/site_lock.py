"""One daemon per site: `db/cmlab.lock`, held with flock(2) while `cmlab run` serves.

The daemon holds it exclusively; a command asks whether a daemon serves the site by trying a
shared lock for an instant (`daemon_running`). Two daemons would claim the same drop files, so
the second one refuses; a command's probe holds the lock for microseconds, so a daemon that
starts during a probe tries again for a moment before it refuses."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from cmlab.core.errors import ConfigError

LOCK_NAME = "cmlab.lock"
# A probe holds the lock for one flock and one close (microseconds); a daemon holds it until
# it stops. Half a second tells the two apart with room to spare on a loaded machine.
PROBE_GRACE_SECONDS = 0.5


def lock_path(db_dir: Path) -> Path:
    return db_dir / LOCK_NAME


@contextlib.contextmanager
def hold(db_dir: Path, root: Path) -> Iterator[None]:
    """Hold the site's lock (the daemon), or raise ConfigError if another daemon holds it."""
    db_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(db_dir), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + PROBE_GRACE_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as exc:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"another cmlab daemon is already running for {root}"
                    ) from exc
                time.sleep(0.01)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def daemon_running(db_dir: Path) -> bool:
    """Whether a daemon serves the site now (it holds the lock)."""
    try:
        fd = os.open(lock_path(db_dir), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
