"""SiteInstaller: runs install.map's steps on the emulated site, one call per step, then
either finish() (drop the backups) or rollback() (put the site back from them).

What it promises (the package docstring says why): a step run again after a crash anywhere
inside it ends where one uninterrupted run ends; the database state is saved before the
first change (the backup's state.json, whose rename into place is the commit point); a
rollback works from the backup folder and the database alone, so it also works after a
crash, and is itself safe to run again; every failure is an InstallStepError that says what
to do.
"""

from __future__ import annotations

import json
import os
import sqlite3

from cmlab.core.errors import CmlabError
from cmlab.core.fs import remove_stale_tmp, write_atomic
from cmlab.site.formats.install_map import InstallStep
from cmlab.site.installation import files, server_state
from cmlab.site.installation.context import InstallStepError
from cmlab.site.installation.layout import installed_build
from cmlab.site.installation.session import InstallSession
from cmlab.site.installation.steps import ACTIONS, STEPS
from cmlab.site.sitedb import site_server, transaction

__all__ = ["SiteInstaller"]


class SiteInstaller(InstallSession):
    """Runs install.map's steps on the emulated site; see the package docstring."""

    def run_step(self, step: InstallStep) -> None:
        """Run one install.map step. Idempotent: after a crash anywhere inside it, running it
        again ends where one uninterrupted run ends. InstallStepError on failure, with the
        site left so that rollback() (or fixing the cause and running the step again) works.
        """
        handler = STEPS.get(step.action)
        if handler is None:
            raise InstallStepError(
                f"unknown action {step.action} in install.map; this cmlab knows "
                f"{', '.join(ACTIONS)}. The update package does not match this lab's version.",
                step=step,
            )
        self.say(f"INFO: Running install step {step.id} ({step.action}): {step.title}")
        try:
            self._begin()
            handler(self, step)
            with self.db() as conn, transaction(conn):
                site_server.record_step(conn, self.ctx.guid, step.id, step.action)
        except InstallStepError as exc:
            if exc.step is None:
                raise InstallStepError(str(exc), step=step) from exc
            raise
        except (OSError, sqlite3.Error, CmlabError) as exc:
            raise InstallStepError(
                f"{exc}. Fix the cause, then run the step again or roll back.", step=step
            ) from exc
        self.say(f"INFO: Install step {step.id} ({step.action}) completed.")

    def completed_steps(self) -> frozenset[int]:
        """The ids of the steps this update's installation has completed (SiteInstallSteps)."""
        with self.db() as conn:
            return site_server.completed_steps(conn, self.ctx.guid)

    def _begin(self) -> None:
        """Before the first change: the database state rollback() restores, in state.json.
        Its rename into place is the commit point; once there it is never taken again."""
        files.sweep(self.staging.parent)
        state = self.backup / "state.json"
        if os.path.lexists(state):
            remove_stale_tmp(self.backup, recursive=True)
            return
        with self.db() as conn, transaction(conn):
            server_state.seed_site_state(conn, self.code)
            snap = server_state.snapshot(conn, self.code)
        try:
            snap["installed_build"] = installed_build(self.root)
        except CmlabError:
            snap["installed_build"] = None
        snap["package"] = self.ctx.guid
        files.safe_dir(self.backup.parent, [self.backup.name], self.show)
        write_atomic(state, json.dumps(snap, indent=2, sort_keys=True) + "\n")
        self.say(
            f"INFO: Saved the site's state before installing update {self.ctx.guid} "
            f"to {self.show(self.backup)}"
        )

    def rollback(self) -> None:
        """After a failed step (or a crash, at any point): put the site back at its old
        version and working, from the backup folder and the database alone. Idempotent; the
        backup is dropped last. Pre-upgrade scripts are not undone (they must be harmless to
        run again, as ConfigMgr's are); the update's CM_UpgradeHistory row is removed."""
        self.say(
            f"WARNING: Rolling back the installation of update {self.ctx.guid} from "
            f"{self.show(self.backup)}"
        )
        try:
            files.sweep(self.staging.parent)
            if os.path.lexists(self.backup):
                remove_stale_tmp(self.backup, recursive=True)
            state = self.saved_state()
            restored, removed = files.restore_files(self.root, self.backup, self.say, self.show)
            with self.db() as conn, transaction(conn):
                in_place, version = server_state.restore_site_state(
                    conn, self.code, self.ctx.guid, state
                )
            self.say(
                f"INFO: Restored {restored} file(s), removed {removed} added file(s); site "
                f"database restored: Service Broker ON, WMI providers loaded, services running, "
                f"{in_place} SMSDBMON triggers in place."
            )
            if files.drop_tree(self.backup):
                self.say(f"INFO: Removed the installation backup {self.show(self.backup)}")
        except InstallStepError:
            raise
        except (OSError, sqlite3.Error, CmlabError) as exc:
            raise InstallStepError(
                f"rollback of update {self.ctx.guid} failed: {exc}. Fix the cause and roll back "
                "again; the backup is kept until a rollback completes."
            ) from exc
        self.say(f"INFO: Rollback of update {self.ctx.guid} completed; site at version {version}.")

    def finish(self) -> None:
        """After the last step: the site must be at the target build; drop the backups."""
        try:
            with self.db() as conn:
                build = server_state.local_site(conn, self.code).build
            if build != self.ctx.target_build:
                raise InstallStepError(
                    f"the installation of update {self.ctx.guid} is not complete: site "
                    f"{self.code} is at build {build}, not {self.ctx.target_build}. Run the "
                    "remaining install steps, or roll back; the backup is kept."
                )
            files.sweep(self.staging.parent)
            if files.drop_tree(self.backup):
                self.say(f"INFO: Removed the installation backup {self.show(self.backup)}")
        except InstallStepError:
            raise
        except (OSError, sqlite3.Error, CmlabError) as exc:
            raise InstallStepError(f"finishing update {self.ctx.guid} failed: {exc}") from exc
