"""What cmlab leaves in a site folder that its own tests check: the temporaries of its atomic
writes (cmlab.core.fs), which a crash or a failure must never leave behind."""

from __future__ import annotations

from pathlib import Path

from cmlab.core.fs import TMP_PREFIX


def temporaries(root: Path) -> list[str]:
    """cmlab's temporary files and folders left anywhere under `root` (site-relative)."""
    return [str(p.relative_to(root)) for p in root.rglob(f"{TMP_PREFIX}*")]
