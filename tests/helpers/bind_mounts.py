"""Sites that reach each other through bind mounts only their own daemons see: each daemon runs
in a user and mount namespace of its own (`unshare -rm`), where the other sites' addresses are
bound to their real folders. Nothing else (another daemon, the test) can use those paths, so
a site that works must be using the addresses it was given. Linux only, and only where
unprivileged user namespaces are allowed."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path


def bind_mounts_work() -> bool:
    """Unprivileged bind mounts (a user and mount namespace): Linux with user namespaces on."""
    try:
        proc = subprocess.run(
            ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$0"', "/tmp"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def bind_mount_prefix(mounts: Iterable[tuple[Path, Path]]) -> list[str]:
    """A command prefix that runs the daemon in its own mount namespace where each `mnt` shows
    `real` (a bind mount nobody else sees): the daemon can reach those sites only through
    `mnt`. It execs the daemon, so the process signalled is the daemon itself."""
    script = " && ".join(f'mount --bind "{real}" "{mnt}"' for real, mnt in mounts)
    return ["unshare", "-rm", "sh", "-c", f'{script} && exec "$@"', "sh"]
