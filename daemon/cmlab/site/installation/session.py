"""One update's installation on one site, as every install step sees it: the context, the
folders derived from it, the log, a database connection, the backups and the saved state.

Why it exists: the 16 steps are plain functions of an InstallSession and the install.map
step (cmlab.site.installation.steps), so SiteInstaller (the public API) and the steps share
this plumbing without a cycle and without mixins. It keeps no state in memory beyond the
context: every decision is taken from what is on disk and in the database, so a step run
again after a crash sees what the crash left.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cmlab.site.installation import files, server_state
from cmlab.site.installation.context import InstallContext, InstallStepError
from cmlab.site.installation.layout import backup_dir_for
from cmlab.site.sitedb import connect, migrate

__all__ = ["InstallSession"]


class InstallSession:
    """The installation of update `ctx.guid` on the site at `ctx.site_root`."""

    def __init__(self, ctx: InstallContext) -> None:
        self.ctx = ctx
        self.code = ctx.site_code.upper()
        self.root = Path(ctx.site_root)
        self.staging = Path(ctx.staging)
        self.backup = backup_dir_for(self.staging)

    def say(self, line: str) -> None:
        self.ctx.say(line)

    def show(self, path: Path) -> str:
        return self.ctx.show(path)

    @contextlib.contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        conn = connect(self.ctx.db_file, self.code)
        try:
            migrate(conn)  # a site database older than these tables gets them
            yield conn
        finally:
            conn.close()

    def record_backup(self, parts: Sequence[str]) -> bool:
        """Back up the site file `parts` (below the site root) before its first change;
        True when a record was made now (files.record_backup)."""
        return files.record_backup(self.root, self.backup, parts, self.show)

    def saved_state(self) -> dict[str, Any] | None:
        """The database state saved before the first step (the backup's state.json); None
        when there is none."""
        try:
            data = json.loads((self.backup / "state.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise InstallStepError(
                f"the installation backup {self.show(self.backup / 'state.json')} is unreadable "
                f"({exc})"
            ) from exc
        if not server_state.is_snapshot(data):
            raise InstallStepError(
                f"the installation backup {self.show(self.backup / 'state.json')} is not one "
                "cmlab wrote; restore it (or the site) by hand"
            )
        return dict(data)
