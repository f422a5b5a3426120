"""HMAN's part in the Replication and Prerequisite check stages (the guide's "Investigate the
Replication stage", steps 1, 2 and 4, and "Prerequisite check", steps 2 and 7).

- `2.ESC` (SMSDBMon, an update was set to ENABLED): hash the update's source folder
  `\\\\<server>\\EasySetupPayLoad\\<GUID>`; if it changed, record the Easy Setup Package
  (sp_UpdateEasySetupSettings) so DistMgr refreshes it from its source; otherwise skip.
- `<GUID>.CME` (SMSDBMon, on every state a site reports for the update): "Check CMU status",
  roll the sites' states up into CM_UpdatePackages (spProcessCMUPackages), create
  `<GUID>.CMI` for CMUpdate once the content is replicated, and delete the CME when the run
  has ended. Until then the CME stays in CFD, as on a real site server.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

from cmlab.core.errors import BadInput, CmlabError
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import write_atomic
from cmlab.core.hashing import folder_hash
from cmlab.site.component import Component
from cmlab.site.formats.notifications import (
    ENABLED_ESC,
    INSTALLED_ESC,
    cme_package_guid,
    cmi_name,
)
from cmlab.site.inbox import Outcome
from cmlab.site.sitedb import hierarchy, procs, servicing
from cmlab.site.state_codes import IsComplete, PackageFlag, PackageState, SubStage

CMUPDATE = "CONFIGURATION_MANAGER_UPDATE"


def easy_setup_share(server: str, guid: str) -> str:
    """The share HMAN and DistMgr use as the Easy Setup Package's source, even on the SCP
    itself (the guide's note: "HMAN has to use a share path")."""
    return f"\\\\{server}\\EasySetupPayLoad\\{guid}"


def run_has_ended(state: int, flag: int) -> bool:
    """Whether an update's run (InitiateUpgrade with `flag`) is over at `state`, so HMAN drops
    its `<GUID>.CME`: a failure, a finished installation, or a prerequisite result that does not
    go on to installation (Flag 1 always stops; Flag 0 stops on a warning; Flag 2 goes on)."""
    if state in servicing.FAILED_STATES or state == PackageState.INSTALL_SUCCESS:
        return True
    if state in (PackageState.PREREQ_SUCCESS, PackageState.PREREQ_WARNING):
        if flag == PackageFlag.PREREQ_ONLY:
            return True
        return state == PackageState.PREREQ_WARNING and flag != PackageFlag.IGNORE_WARNINGS
    return state not in servicing.IN_PROGRESS_STATES


def _size_of(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class EasySetupHandlers:
    """HMAN's handlers of the CFD notifications of the servicing stages; HierarchyManager holds
    one. `196612.ESC` arrives in the same inbox and goes on to `on_installed`, the
    post-installation handler (cmlab.components.hman.postinstall)."""

    def __init__(self, hman: Component, on_installed: Callable[[Path], Awaitable[Outcome]]) -> None:
        self.ctx = hman.ctx
        self.config = hman.config
        self.paths = hman.paths
        self.db = hman.db
        self.say = hman.say
        self.show = hman.show
        self.in_thread = hman.in_thread
        self.report_status = hman.report_status
        self.status_line = hman.status_line
        self.on_installed = on_installed

    async def on_cfd_notification(self, path: Path) -> Outcome:
        upper = path.name.upper()
        if upper == ENABLED_ESC:
            return await self.on_enabled(path)
        if upper == INSTALLED_ESC:
            return await self.on_installed(path)
        if upper.endswith(".CME"):
            return await self.on_cme(path)
        raise BadInput(
            f"{path.name} is not a notification HMAN handles here (2.ESC, <PackageGuid>.CME) "
            "or after an installation (196612.ESC)"
        )

    def on_cfd_notification_deleted(self, path: Path) -> None:
        if path.name.upper().endswith(".CME") or path.name.upper() == INSTALLED_ESC:
            self.say(f"deleted notification file {self.show(path)}")

    # -- 2.ESC: update the Easy Setup Package ---------------------------------------------------

    async def on_enabled(self, path: Path) -> Outcome:
        self.say("INFO: 2.ESC file was found. Easy setup package needs to be updated.")
        guid = await self.db.read(servicing.enabled_package)
        if guid is None:
            self.say("INFO: No update package is in state 2 (ENABLED). Nothing to update.")
            return Outcome.DONE
        parent = await self.db.read(hierarchy.parent_site)
        if parent is not None:
            # The run was started at the top-level site and replicated here (CMUpdates).
            self.say(
                f"INFO: This site is a child site of {parent.code}: the Easy Setup Package of "
                f"{guid} is replicated from the parent site. Nothing to update here."
            )
            return Outcome.DONE
        share = easy_setup_share(self.config.fqdn, guid)
        self.say(f"Get  Update Pack {guid}, {share}")
        source = self.paths.payload_folder(guid)
        try:
            source_hash = await self.in_thread(folder_hash, source)
            size = await self.in_thread(_size_of, source)
        except (OSError, CmlabError) as exc:
            # The package stays ENABLED; re-dropping 2.ESC runs this again (the guide's fix).
            self.say("Failed to calculate hash", level="error")
            self.say(f"ERROR: {source}: {exc}", level="error")
            await self.report_status(
                guid, SubStage.EASY_SETUP_PACKAGE_UPDATED, IsComplete.FAILURE, 0
            )
            return Outcome.DONE
        crashpoint("hman.after_source_hash")
        current = await self.db.read(servicing.easy_setup_package, guid)
        if (
            current is not None
            and current.package_hash.upper() == source_hash
            and current.stored_pkg_hash.upper() == source_hash
        ):
            self.say("Easy setup source folder hash is not changed. Skip updating.")
            await self.db.tx(self._already_replicated, guid)
            self.say(self.status_line(SubStage.EASY_SETUP_PACKAGE_UPDATED, IsComplete.SUCCESS, 100))
            return Outcome.DONE
        package_id = await self.db.tx(self._request_update, guid, share, source_hash, size)
        self.say(
            f"INFO: Successfully requested package {package_id} to be updated from its source."
        )
        self.say(
            f"Info: Updated package {package_id} and SMS_DISTRIBUTION_MANAGER will replicate the "
            "content to all the site servers except the secondary sites. The content will be "
            "stored in the content library on the site servers. Check distmgr.log for "
            "replication status."
        )
        self.say(self.status_line(SubStage.EASY_SETUP_PACKAGE_UPDATED, IsComplete.SUCCESS, 100))
        self.say(
            "Updating easy setup settings with EXEC sp_UpdateEasySetupSettings "
            f"N'{package_id}','{servicing.EASY_SETUP_FLAG}',N'{source_hash}'"
        )
        crashpoint("hman.before_esc_delete")
        return Outcome.DONE

    def _request_update(
        self, conn: sqlite3.Connection, guid: str, share: str, digest: str, size: int
    ) -> str:
        package_id = servicing.easy_setup_package_id(conn, guid, self.config.site_code)
        servicing.sp_UpdateEasySetupSettings(
            conn,
            package_id,
            servicing.EASY_SETUP_FLAG,
            digest,
            guid=guid,
            source=share,
            source_site=self.config.site_code,
            source_size=size,
        )
        servicing.set_package_state(conn, guid, PackageState.CONTENT_REPLICATING)
        servicing.spCMUSetSiteState(conn, guid, PackageState.CONTENT_REPLICATING)
        procs.spCMUReportUpdateStatus(
            conn, guid, SubStage.EASY_SETUP_PACKAGE_UPDATED, IsComplete.SUCCESS, 100
        )
        return package_id

    @staticmethod
    def _already_replicated(conn: sqlite3.Connection, guid: str) -> None:
        # The content library already holds this very source: on to CMUpdate (the CME that
        # this site state causes makes HMAN create the CMI).
        servicing.set_package_state(conn, guid, PackageState.CONTENT_REPLICATION_SUCCESS)
        servicing.spCMUSetSiteState(conn, guid, PackageState.CONTENT_REPLICATION_SUCCESS)
        procs.spCMUReportUpdateStatus(
            conn, guid, SubStage.EASY_SETUP_PACKAGE_UPDATED, IsComplete.SUCCESS, 100
        )

    # -- <GUID>.CME: check CMU status -----------------------------------------------------------

    async def on_cme(self, path: Path) -> Outcome:
        guid = cme_package_guid(path.name)
        self.say("Check CMU status...")
        # Only the top-level site rolls up (an empty result below it).
        states = {
            k.upper(): v for k, v in (await self.db.tx(servicing.spProcessCMUPackages)).items()
        }
        row = await self.db.read(servicing.package_state_and_flag, guid)
        if row is None:
            return Outcome.DONE  # the update is gone (reset): nothing to watch
        parent = await self.db.read(hierarchy.parent_site)
        own = await self.db.read(servicing.site_state, guid, self.config.site_code)
        flag = row[1]
        if parent is None:
            state = states.get(guid.upper(), row[0])
            own = state if own is None else own
        else:
            # A child site watches its own run; the package row is the top-level site's.
            state = own if own is not None else PackageState.UNKNOWN
        if own == PackageState.CONTENT_REPLICATION_SUCCESS:
            await self.in_thread(self._notify_cmupdate, guid)
        elif own == PackageState.INSTALL_WAITING_PARENT and parent is not None:
            theirs = await self.db.read(servicing.site_state, guid, parent.code)
            if theirs == PackageState.INSTALL_SUCCESS:
                self.say(
                    f"INFO: Parent site {parent.code} has installed update {guid}: this site "
                    "can install it."
                )
                await self.in_thread(self._notify_cmupdate, guid)
        if run_has_ended(state, flag):
            crashpoint("hman.before_cme_delete")
            return Outcome.DONE
        return Outcome.KEEP

    def _notify_cmupdate(self, guid: str) -> None:
        self.say(f"INFO: Starting service {CMUPDATE}")
        # CMUpdate runs in this daemon when it watches its inbox here.
        box = self.paths.cmupdate_box
        if any(i.spec.folder == box for i in self.ctx.engine.inboxes):
            self.say(f"{CMUPDATE} is already running.")
        else:
            self.say(f"WARNING: {CMUPDATE} is not running; the notification waits in {box}.")
        self.say("Successfully checking Site server readiness for update.")
        box.mkdir(parents=True, exist_ok=True)
        name = cmi_name(guid)
        write_atomic(box / name, b"")
        self.say(f"Created notification file ({name}) for {CMUPDATE}")
        self.say("There are update package in progress. Cleanup will skip this time.")
