"""HMAN's post-installation tasks (the guide's "Process step 6: Post installation tasks"):
on `196612.ESC`, dropped by CMUpdate once an update is installed, update the client packages
from the new client files in `SITE/CMUClient`:

- `SITE/Client` (the full client package's source) becomes a copy of `CMUClient`;
- `SITE/ClientUpgrade/ccmsetup.exe` (the client upgrade package) is the new ccmsetup;
- `SITE/PilotingUpgrade/ccmsetup.exe` too when client piloting is on (site.toml
  `[client] piloting = true`).

The update the notification is about is the one whose installation changed state last (the
newest CM_UpdatePackages row in an installation state or INSTALL_SUCCESS). Until it is
INSTALL_SUCCESS the file stays and is offered again (`Will retry in next cycle.`); with no
such update the notification is stray and is deleted. Each folder or file is built under a
temporary name and renamed into place, so a crash leaves the old or the new copy; the
notification is deleted only after the last copy, so a restart does the whole task again and
ends the same.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cmlab.core.errors import BadInput, WorkFailed
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import copy_file_durable, copy_tree_durable
from cmlab.site.component import Component
from cmlab.site.formats.notifications import INSTALLED_ESC
from cmlab.site.inbox import Outcome
from cmlab.site.sitedb import servicing, site_server
from cmlab.site.state_codes import IsComplete, PackageState, SubStage

INTEROP_MODE = 0
CCMSETUP = "ccmsetup.exe"


class ClientFilesError(WorkFailed):
    """`SITE/CMUClient` cannot be used as the source of the client packages."""


def find_ccmsetup(source: Path) -> Path:
    """`CMUClient/ccmsetup.exe` (any case, as on Windows); raises ClientFilesError naming what
    is wrong with the source folder. Links are never followed."""
    try:
        st = os.lstat(source)
    except FileNotFoundError:
        raise ClientFilesError(f"{source} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ClientFilesError(f"{source} is not a folder (links are never followed)")
    found: Path | None = None
    for dirpath, dirs, files in os.walk(source):
        for name in dirs + files:
            path = Path(dirpath, name)
            mode = os.lstat(path).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise ClientFilesError(f"{path} is not a regular file or folder")
        if Path(dirpath) == source:
            found = next((source / n for n in files if n.lower() == CCMSETUP), None)
    if found is None:
        raise ClientFilesError(f"{source} has no {CCMSETUP}")
    return found


class PostInstallHandlers:
    """HMAN's handler of `196612.ESC`, the client packages after an installation;
    HierarchyManager holds one."""

    def __init__(self, hman: Component) -> None:
        self.config = hman.config
        self.paths = hman.paths
        self.db = hman.db
        self.say = hman.say
        self.show = hman.show
        self.in_thread = hman.in_thread
        self.report_status = hman.report_status
        # The state last warned about per notification: a retry while the state has not moved
        # is not written to hman.log again (the engine offers the file every `retry_after`).
        self._postinstall_warned: dict[str, int] = {}

    async def on_installed(self, path: Path) -> Outcome:
        found = await self.db.read(servicing.current_install)
        if found is not None and found[1] != PackageState.INSTALL_SUCCESS:
            if self._postinstall_warned.get(path.name) == found[1]:
                return Outcome.RETRY
            self._postinstall_warned[path.name] = found[1]
        self.say(
            f"INFO: {INSTALLED_ESC} file was found. Updating client packages. "
            f"InteropMode = {INTEROP_MODE}"
        )
        if found is None:
            self.say(
                "INFO: No update package is being installed or installed. "
                "Nothing to update; the notification is removed."
            )
            return Outcome.DONE
        guid, state = found
        if state != PackageState.INSTALL_SUCCESS:
            self.say(
                f"WARN: The current update package's state ({state}) is not set to installed "
                "yet. Will retry in next cycle.",
                level="warning",
            )
            return Outcome.RETRY
        self._postinstall_warned.pop(path.name, None)
        await self.update_client_packages(guid)
        return Outcome.DONE

    async def update_client_packages(self, guid: str) -> None:
        code = self.config.site_code
        piloting = self.config.client_piloting
        settings = await self.db.tx(site_server.load_client_upgrade_settings, code, piloting)
        self.say(
            "Loaded client upgrade settings from DB successfully. "
            + ", ".join(f"{k}={v if v is not None else '(null)'}" for k, v in settings.items())
        )
        self.say("Client piloting is enabled." if piloting else "Client piloting is not enabled.")
        root = self.paths.root
        source = root / "CMUClient"
        try:
            ccmsetup = await self.in_thread(find_ccmsetup, source)
        except ClientFilesError as exc:
            self.say(
                f"ERROR: Failed to update client packages from {self.show(source)}: {exc}. "
                "The client packages are unchanged.",
                level="error",
            )
            await self.report_status(guid, SubStage.UPDATE_CLIENT_PACKAGE, IsComplete.FAILURE, 0)
            raise BadInput(
                f"the client files to update the client packages from are missing: {exc}"
            ) from None

        await self.report_status(guid, SubStage.UPDATE_CLIENT_PACKAGE, IsComplete.IN_PROGRESS, 1)
        if piloting:
            await self._copy_ccmsetup(ccmsetup, root / "PilotingUpgrade" / ccmsetup.name)
        await self.report_status(guid, SubStage.UPDATE_CLIENT_PACKAGE, IsComplete.SUCCESS, 100)

        await self.report_status(
            guid, SubStage.UPDATE_CLIENT_PILOTING_PACKAGE, IsComplete.IN_PROGRESS, 1
        )
        await self.report_status(
            guid, SubStage.UPDATE_CLIENT_UPGRADE_PACKAGE, IsComplete.IN_PROGRESS, 1
        )
        client = root / "Client"
        self.say(f"Copying client binaries from '{self.show(source)}' to '{self.show(client)}'...")
        await self.in_thread(copy_tree_durable, source, client)
        crashpoint("hman.postinstall.after_client_copy")
        await self._copy_ccmsetup(ccmsetup, root / "ClientUpgrade" / ccmsetup.name)
        await self.report_status(
            guid, SubStage.UPDATE_CLIENT_PILOTING_PACKAGE, IsComplete.SUCCESS, 100
        )
        await self.report_status(
            guid, SubStage.UPDATE_CLIENT_UPGRADE_PACKAGE, IsComplete.SUCCESS, 100
        )

    async def _copy_ccmsetup(self, source: Path, dest: Path) -> None:
        self.say(f"Copying ccmsetup from '{self.show(source)}' to '{self.show(dest)}'...")
        await self.in_thread(copy_file_durable, source, dest)
