"""CMUpdate's Installation stage (the guide's "Investigate the Installation stage", process
steps 1-6, CMUpdate's half), held by CMUpdate: after a prerequisite check that lets the
run go on (Flag 0 on PREREQ_SUCCESS, Flag 2 also on PREREQ_WARNING), or at start-up for an
installation a crash interrupted.

1. Readiness: 0xd0007, `Waiting for CONFIGURATION_MANAGER_SERVICE ...`, CMUpdate's
   self-upgrade (INSTALL_CMU_VALIDATING .. INSTALL_CMU_SUCCESS: the package's cmupdate.exe,
   verified against update.map, becomes `bin/x64/cmupdate.exe` and the service restarts from
   it), then the service windows of site.toml (INSTALL_WAITING_SERVICE_WINDOW until one opens).
2. Content: the staging folder checked against the content library (0xd0005), update.map,
   the redists (0xd0006).
3. The media check (placeholders replaced from `redist`) and install.map's steps through
   `cmlab.site.installation`, each step's INSTALL_* state reported before it runs.
4. OSD packages (0xd001a), 5. cd.latest, the client files to `CMUClient`, `196612.ESC` to
   HMAN, 6. CMUpdate's post-installation checks, INSTALL_SUCCESS.

Why it is safe to kill anywhere: every phase is idempotent and every decision is read back
from the database and the disk. The site's state says which phase a run reached, the
installer's `SiteInstallSteps` rows which steps are done, and a failed installation is
marked (`CMUStaging/<GUID>.failed`) before its rollback starts, so a restart finishes the
rollback instead of resuming the install.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any

from cmlab.components.cmupdate.redist_media import MediaError, check_media, process_redists
from cmlab.core.errors import BadInput, CmlabError, WorkFailed
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import (
    atomic_output,
    copy_tree_durable,
    make_tmp_dir,
    remove_path,
    write_atomic,
)
from cmlab.core.hashing import sha256_bytes, sha256_file
from cmlab.site.component import Component
from cmlab.site.formats.install_map import InstallStep, parse_install_map
from cmlab.site.formats.notifications import INSTALLED_ESC
from cmlab.site.formats.payload_layout import INSTALL_MAP, MAP_ROOT
from cmlab.site.formats.sample_binary import sample_build_number
from cmlab.site.formats.update_map import MapFile, UpdateMap, decode_update_map, parse_update_map
from cmlab.site.installation import (
    RCM_KEY,
    SETUP_KEY,
    InstallContext,
    InstallStepError,
    SiteInstaller,
)
from cmlab.site.service_windows import is_open, next_opening
from cmlab.site.sitedb import hierarchy, servicing, site_server
from cmlab.site.state_codes import IsComplete, PackageFlag, PackageState, SubStage

CMU_SERVICE = "CONFIGURATION_MANAGER_UPDATE"
CMU_EXE = "cmupdate.exe"
CD_LATEST = "cd.latest"
CLIENT_FOLDER = "CMUClient"
EXTERNAL_FILES = "CD.Latest External Files"  # SiteRegistry value under the Setup key
USMT_PATH = (
    r"C:\Program Files (x86)\Windows Kits\10\Assessment and Deployment Kit"
    r"\User State Migration Tool"
)

# The site states of an installation under way at this site (resumed after a restart).
INSTALLING = frozenset(
    s
    for s in PackageState
    if s >> 16 == 3
    and s
    not in (
        PackageState.INSTALL_SUCCESS,
        PackageState.INSTALL_WAITING_PARENT,
        PackageState.INSTALL_PENDING_REBOOT,
    )
    and s not in servicing.FAILED_STATES
)


class InstallFailed(WorkFailed):
    """The installation cannot go on; `state` is INSTALL_FAILED or INSTALL_CMU_FAILED."""

    def __init__(self, message: str, state: PackageState = PackageState.INSTALL_FAILED) -> None:
        super().__init__(message)
        self.state = state


def continues_to_install(state: int, flag: int) -> bool:
    """Whether this site's run goes on to the installation at `state` (the prerequisite
    result with the InitiateUpgrade flag, or an installation already under way)."""
    if state == PackageState.PREREQ_SUCCESS:
        return flag in (PackageFlag.NORMAL, PackageFlag.IGNORE_WARNINGS)
    if state == PackageState.PREREQ_WARNING:
        return flag == PackageFlag.IGNORE_WARNINGS
    return state in INSTALLING or state == PackageState.INSTALL_WAITING_PARENT


def failed_marker(staging: Path) -> Path:
    """`CMUStaging/<GUID>.failed`: the failure state's code on the first line, the error after."""
    return staging.with_name(staging.name + ".failed")


def parse_failed_marker(text: str) -> tuple[PackageState, str]:
    """The state and reason a failed run recorded; a marker that is not one of ours (edited
    by hand, or written by an older cmlab) still ends the run failed."""
    first, _, rest = text.partition("\n")
    if first.strip().isdigit() and int(first) in (
        PackageState.INSTALL_FAILED,
        PackageState.INSTALL_CMU_FAILED,
    ):
        return PackageState(int(first)), rest.strip()
    return PackageState.INSTALL_FAILED, text.strip()


def map_file(update_map: UpdateMap, component: str, name: str) -> tuple[str, MapFile] | None:
    """(folder, entry) of `name` in one update.map component, or None."""
    section = update_map.component(component)
    if section is None:
        return None
    for d in section.directories:
        for f in d.files:
            if f.name.lower() == name.lower():
                return d.path, f
    return None


class InstallationHandlers:
    """CMUpdate's Installation stage (see the module docstring); CMUpdate holds one and hands
    it the three steps of its prerequisite half that an installation runs again."""

    def __init__(
        self,
        cmupdate: Component,
        *,
        stage_content: Callable[[servicing.PendingPackage], Awaitable[Path]],
        read_update_map: Callable[[Path], Awaitable[UpdateMap]],
        process_pending: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self.ctx = cmupdate.ctx
        self.config = cmupdate.config
        self.paths = cmupdate.paths
        self.db = cmupdate.db
        self.say = cmupdate.say
        self.show = cmupdate.show
        self.in_thread = cmupdate.in_thread
        self.spawn = cmupdate.spawn
        self.report_status = cmupdate.report_status
        self.stage_content = stage_content
        self.read_update_map = read_update_map
        self.process_pending = process_pending
        self._window_timer: asyncio.TimerHandle | None = None

    # -- the run -------------------------------------------------------------------------------

    async def install(self, package: servicing.PendingPackage) -> None:
        guid = package.guid
        staging = self.paths.cmu_staging / guid
        marker = failed_marker(staging)
        starting = (
            PackageState.PREREQ_SUCCESS,
            PackageState.PREREQ_WARNING,
            PackageState.INSTALL_WAITING_PARENT,
        )
        if package.state in starting and not await self.parent_has_installed(package):
            return
        if package.state in starting:
            # A new installation: a marker left by an earlier failed run is history.
            await self.in_thread(remove_path, marker)
            await self.set_state(guid, PackageState.INSTALL_IN_PROGRESS)
        elif marker.exists():
            # Killed during (or just after) a rollback: finish it, then report the failure.
            text = await self.in_thread(marker.read_text, "utf-8")
            state, reason = parse_failed_marker(text)
            await self.roll_back(package, staging, reason, state)
            return
        try:
            await self.run_installation(package, staging)
        except InstallFailed as exc:
            self.say(f"ERROR: {exc}", level="error")
            await self.roll_back(package, staging, str(exc), exc.state)

    async def parent_has_installed(self, package: servicing.PendingPackage) -> bool:
        """A child primary site installs after its parent: until the parent's row (replicated
        by the CMUpdates group) is INSTALL_SUCCESS, it waits at INSTALL_WAITING_PARENT, and
        HMAN wakes it when the parent's success arrives."""
        parent = await self.db.read(hierarchy.parent_site)
        if parent is None or self.config.role != "primary":
            return True
        state = await self.db.read(servicing.site_state, package.guid, parent.code)
        if state == PackageState.INSTALL_SUCCESS:
            if package.state == PackageState.INSTALL_WAITING_PARENT:
                self.say(
                    f"INFO: Parent site {parent.code} has installed update {package.guid}. "
                    "This site installs it now."
                )
            return True
        if package.state != PackageState.INSTALL_WAITING_PARENT:
            await self.set_state(package.guid, PackageState.INSTALL_WAITING_PARENT)
            shown = (
                "not reported yet" if state is None else f"{PackageState.name_of(state)} ({state})"
            )
            self.say(
                f"INFO: Waiting for parent site {parent.code} to install update "
                f"{package.guid} first (its state: {shown}). This site installs it after "
                "its parent: INSTALL_WAITING_PARENT (196611)."
            )
        return False

    async def run_installation(self, package: servicing.PendingPackage, staging: Path) -> None:
        guid = package.guid
        target_build = build_of(package.full_version)
        done = await self.in_thread(
            self.site_installer(package, staging, UpdateMap(components=())).completed_steps
        )

        # Process step 1: readiness, self-upgrade, service window.
        await self.report_status(guid, SubStage.CHECK_SERVICE_READINESS, IsComplete.IN_PROGRESS, 1)
        self.say(
            f"INFO: Waiting for CONFIGURATION_MANAGER_SERVICE to be ready to apply update: {guid}"
        )
        restarted = await self.self_upgrade(guid, staging, target_build)
        if restarted:
            # The service restarted from the new binary: a new pass picks the update up from
            # the database, as the restarted service would.
            self.spawn(self.process_pending(), "restart")
            return
        await self.report_status(guid, SubStage.CHECK_SERVICE_READINESS, IsComplete.SUCCESS, 100)
        if not done and not await self.in_service_window(guid):
            return
        if not done:
            # Back from the self-upgrade or the service window (a no-op when already there);
            # a run whose steps have begun keeps its step's state.
            await self.set_state(guid, PackageState.INSTALL_IN_PROGRESS)

        # Process step 2: the content and the redists.
        extract = SubStage.EXTRACT_UPDATE_PACKAGE
        try:
            await self.stage_content(package)
            update_map = await self.read_update_map(staging)
        except CmlabError as exc:
            await self.report_status(guid, extract, IsComplete.FAILURE, 100)
            raise InstallFailed(
                f"The update content in {self.show(staging)} cannot be used: {exc}"
            ) from exc
        await self.report_status(guid, extract, IsComplete.SUCCESS, 100)
        steps = await self.read_install_map(staging)
        await self.process_media(guid, staging, update_map)

        # Process step 3: the install steps.
        installer = self.site_installer(package, staging, update_map)
        for step in steps:
            if step.id in done:
                continue
            await self.set_state(guid, PackageState[step.state])
            try:
                await self.in_thread(installer.run_step, step)
            except InstallStepError as exc:
                raise InstallFailed(str(exc)) from exc
            crashpoint("cmupdate.after_install_step")

        # Process step 4: OSD packages, then the backup goes.
        await self.update_osd_packages(guid)
        try:
            await self.in_thread(installer.finish)
        except InstallStepError as exc:
            raise InstallFailed(str(exc)) from exc
        self.say("~   Starting ConfigMgr Update post installation monitor thread...")

        # Process step 5: cd.latest, the client files, HMAN's notification.
        await self.update_cd_latest(staging)
        await self.copy_client_files(staging)
        crashpoint("cmupdate.before_installed_notification")
        await self.in_thread(write_atomic, self.paths.hman_cfd / INSTALLED_ESC, b"")
        self.say("INFO: Successfully dropped update pack installed notification to HMAN CFD box.")

        # Process step 6: CMUpdate's post-installation tasks, then Installed.
        await self.post_install_checks(target_build)
        await self.set_state(guid, PackageState.INSTALL_SUCCESS)
        self.say(
            f"INFO: Update package {guid} ({package.name}) is installed: site "
            f"{self.config.site_code} is at version {package.full_version}."
        )

    def site_installer(
        self, package: servicing.PendingPackage, staging: Path, update_map: UpdateMap
    ) -> SiteInstaller:
        """The install steps' library on this site, for `package` staged in `staging`."""
        return SiteInstaller(
            InstallContext(
                site_root=self.paths.root,
                staging=staging,
                db_file=self.paths.db_file,
                site_code=self.config.site_code,
                guid=package.guid,
                target_build=build_of(package.full_version),
                target_version=package.full_version,
                update_map=update_map,
                trust=self.ctx.trust,
                say=self.say,
                show=self.show,
            )
        )

    async def set_state(self, guid: str, state: PackageState) -> None:
        await self.db.tx(servicing.spCMUSetSiteState, guid, state)

    # -- process step 1 ------------------------------------------------------------------------

    async def self_upgrade(self, guid: str, staging: Path, target_build: int) -> bool:
        """CMUpdate replaces its own binary with the package's and restarts. True when it did
        (the caller ends the pass); False when it already runs the package's build."""
        running = await self.db.read(site_server.service_build, CMU_SERVICE)
        if running == target_build:
            self.say(f"{CMU_SERVICE} is already running build {target_build}.")
            return False
        await self.set_state(guid, PackageState.INSTALL_CMU_VALIDATING)
        new = await self.in_thread(self._new_cmupdate, staging)
        if new is None:
            # A hotfix that does not update CMUpdate: it installs with the running one.
            self.say(f"update.map has no update for {CMU_SERVICE}")
            return False
        source, entry = new
        dest = self.paths.root / "bin" / "x64" / CMU_EXE
        await self.set_state(guid, PackageState.INSTALL_CMU_STOPPED)
        self.say(f"{CMU_SERVICE} service is stopping...")
        await self.set_state(guid, PackageState.INSTALL_CMU_INSTALLFILES)
        try:
            await self.in_thread(_install_verified, source, dest, entry.hash.upper())
        except (OSError, CmlabError) as exc:
            raise InstallFailed(
                f"Failed to install {self.show(dest)} from {self.show(source)}: {exc}",
                PackageState.INSTALL_CMU_FAILED,
            ) from exc
        crashpoint("cmupdate.self_upgrade_installed")
        build = await self.in_thread(sample_build_number, dest)
        await self.set_state(guid, PackageState.INSTALL_CMU_STARTED)
        self.say(f"{CMU_SERVICE} service is starting...")
        self.say(f"Microsoft Microsoft Configuration Manager v5.00 (Build {build})")
        await self.db.tx(site_server.set_service_build, CMU_SERVICE, build)
        await self.set_state(guid, PackageState.INSTALL_CMU_SUCCESS)
        return True

    def _new_cmupdate(self, staging: Path) -> tuple[Path, MapFile] | None:
        """The package's cmupdate.exe, if its hash is the one update.map gives for it; None
        when update.map's CONFIGURATION_MANAGER_UPDATE section has none (a hotfix)."""
        setup = staging / MAP_ROOT
        try:
            update_map = parse_update_map(decode_update_map((setup / "update.map").read_bytes()))
        except (OSError, CmlabError) as exc:
            raise InstallFailed(
                f"Cannot read {self.show(setup / 'update.map')} to validate the new {CMU_EXE}: "
                f"{exc}. Run the installation again (it extracts the content again).",
                PackageState.INSTALL_CMU_FAILED,
            ) from exc
        found = map_file(update_map, CMU_SERVICE, CMU_EXE)
        if found is None:
            return None
        folder, entry = found
        source = setup.joinpath(*folder.split("\\")) / entry.name
        try:
            actual = sha256_file(source)
        except OSError as exc:
            raise InstallFailed(
                f"Cannot read {self.show(source)}: {exc}. Retry the content replication, then "
                "install again.",
                PackageState.INSTALL_CMU_FAILED,
            ) from exc
        if actual != entry.hash.upper():
            self.say(f"INFO: Verifying hash for file '{self.show(source)}'")
            self.say(f"Expected hash:{entry.hash.upper()}, Actual hash:{actual}")
            raise InstallFailed(
                f"The new {CMU_EXE} ({self.show(source)}) does not match update.map: the update "
                "package is damaged. Check the payload in EasySetupPayload, run "
                "RetryContentReplication, then install again.",
                PackageState.INSTALL_CMU_FAILED,
            )
        return source, entry

    async def in_service_window(self, guid: str) -> bool:
        windows = self.config.service_windows
        if not windows:
            self.say(
                "There is no service window defined for the site server to apply the CM "
                "server updates."
            )
            return True
        now = datetime.now()
        if is_open(windows, now):
            self.say(
                "The site server is in its service window ("
                + "; ".join(w.describe() for w in windows)
                + "): the CM server updates can be applied now."
            )
            return True
        opens = next_opening(windows, now)
        await self.set_state(guid, PackageState.INSTALL_WAITING_SERVICE_WINDOW)
        self.say(
            "The site server is outside its service window ("
            + "; ".join(w.describe() for w in windows)
            + f"). Waiting for the service window to apply update {guid}; it opens at "
            + (opens.strftime("%Y-%m-%d %H:%M:%S") if opens else "an unknown time")
            + "."
        )
        if opens is not None:
            self._wake_at(opens)
        return False

    def _wake_at(self, when: datetime) -> None:
        """Run a pass when the window opens (the poll and a restart find the update too)."""
        if self._window_timer is not None:
            self._window_timer.cancel()
        delay = max(0.0, (when - datetime.now()).total_seconds()) + 0.5
        loop = asyncio.get_running_loop()
        self._window_timer = loop.call_later(
            delay, lambda: self.spawn(self.process_pending(), "service-window")
        )

    def stop(self) -> None:
        """Cancel the wake-up at the opening of a service window (CMUpdate is stopping)."""
        if self._window_timer is not None:
            self._window_timer.cancel()

    # -- process steps 2 and 3 -----------------------------------------------------------------

    async def read_install_map(self, staging: Path) -> tuple[InstallStep, ...]:
        path = staging / Path(*INSTALL_MAP.split("/"))
        try:
            text = await self.in_thread(path.read_text, "utf-8")
            steps = parse_install_map(text)
        except (OSError, UnicodeDecodeError, CmlabError) as exc:
            raise InstallFailed(f"Cannot read {self.show(path)}: {exc}") from exc
        self.say(f"Successfully read file {self.show(path)} ({len(steps)} install steps)")
        return steps

    async def process_media(self, guid: str, staging: Path, update_map: UpdateMap) -> None:
        redist = SubStage.PROCESS_REDIST
        await self.report_status(guid, redist, IsComplete.IN_PROGRESS, 1)
        tmp = await self.in_thread(make_tmp_dir, staging, "redist")
        try:
            plan = await self.in_thread(
                lambda: process_redists(staging, self.ctx.trust, self.say, self.show, tmp_dir=tmp)
            )
            await self.report_status(guid, redist, IsComplete.SUCCESS, 100)
            await self.in_thread(
                lambda: check_media(staging, update_map, plan, self.paths.root, self.say, self.show)
            )
        except MediaError as exc:
            await self.report_status(guid, redist, IsComplete.FAILURE, 100)
            raise InstallFailed(f"{exc}") from exc
        finally:
            await self.in_thread(remove_path, tmp)

    # -- process steps 4 to 6 ------------------------------------------------------------------

    async def update_osd_packages(self, guid: str) -> None:
        self.say("INFO: Adding default USMT package ...")
        self.say(f"INFO: USMT package path is {USMT_PATH}")
        self.say("INFO: Adding Boot Image Packages, this may take some time...")
        for arch in ("x86", "x64", "arm64"):
            self.say(f"INFO: Attempting to export {arch} boot image from ADK installation source")
        # As in the guide's example, IsComplete=3: the lab has no ADK to export boot images
        # from, so the step completes with a warning and the boot images are left as they are.
        self.say(
            "WARNING: The lab site has no Windows ADK installation source: the default boot "
            "images are not regenerated."
        )
        await self.report_status(guid, SubStage.UPDATE_OSD_PACKAGES, IsComplete.WARNING, 100)

    async def update_cd_latest(self, staging: Path) -> None:
        dest = self.paths.root / CD_LATEST
        self.say(f"Creating cd backup location at {self.show(dest)}")
        self.say(
            f"Copying contents of update package from {self.show(staging)} to {self.show(dest)}"
        )
        await self.in_thread(copy_tree_durable, staging, dest)
        await self.db.tx(
            site_server.set_registry_value, SETUP_KEY, EXTERNAL_FILES, self.show(dest / "redist")
        )
        self.say(
            "successfully updated setup registry to have new external files stored at "
            f"{self.show(dest / 'redist')}"
        )

    async def copy_client_files(self, staging: Path) -> None:
        source = staging / CLIENT_FOLDER
        dest = self.paths.root / CLIENT_FOLDER
        if not source.is_dir():
            self.say(
                f"WARNING: The update package has no client files ({self.show(source)}); "
                f"{self.show(dest)} is unchanged.",
                level="warning",
            )
            return
        self.say(f"Copying client files from {self.show(source)} to {self.show(dest)}")
        await self.in_thread(copy_tree_durable, source, dest)

    async def post_install_checks(self, target_build: int) -> None:
        facts = await self.db.read(site_server.post_install_facts, self.config.site_code, RCM_KEY)
        services = facts["services"]
        x64 = self.paths.root / "bin" / "x64"

        def binary_build(name: str) -> int | None:
            try:
                return sample_build_number(x64 / name)
            except (OSError, CmlabError):
                return None

        checks = (
            (
                "SMS_Executive service",
                services.get("SMS_EXECUTIVE")
                == f"{site_server.ServiceState.RUNNING}:{target_build}",
            ),
            (
                "SMSDBMon component",
                await self.in_thread(binary_build, "smsdbmon.dll") == target_build
                and bool(facts["hman_triggers"]),
            ),
            ("HMAN component", await self.in_thread(binary_build, "hman.dll") == target_build),
            ("RCM component", facts["rcm_build"] == str(target_build)),
        )
        for what, ok in checks:
            if ok:
                self.say(f"INFO: Verified that the {what} is installed (build {target_build}).")
            else:
                self.say(
                    f"WARNING: The {what} is not installed at build {target_build}; check "
                    "SiteComp.log and SMSExec.log.",
                    level="warning",
                )
        children = facts["children"]
        if children:
            self.say(f"INFO: Monitoring the start of replication to {', '.join(children)}.")
        else:
            self.say("INFO: No child site to monitor replication to.")
        if self.config.client_piloting:
            self.say("INFO: Client piloting is enabled: HMAN updates the pre-production package.")
        else:
            self.say("INFO: Client piloting is not enabled: no pre-production package to update.")
        self.say(
            f"INFO: The client folder {self.show(self.paths.root / CLIENT_FOLDER)} is updated."
        )

    # -- failure -------------------------------------------------------------------------------

    async def roll_back(
        self,
        package: servicing.PendingPackage,
        staging: Path,
        reason: str,
        state: PackageState,
    ) -> None:
        guid = package.guid
        marker = failed_marker(staging)
        await self.in_thread(write_atomic, marker, f"{int(state)}\n{reason}\n")
        crashpoint("cmupdate.before_rollback")
        installer = self.site_installer(package, staging, UpdateMap(components=()))
        if await self.in_thread(installer.completed_steps) or installer.backup.exists():
            try:
                await self.in_thread(installer.rollback)
            except InstallStepError as exc:
                self.say(f"ERROR: {exc}", level="error")
        await self.set_state(guid, state)
        self.say(
            f"ERROR: Failed to install update package {guid}: {state.name} ({int(state)}). "
            "Fix the cause above, then install the update again.",
            level="error",
        )
        await self.in_thread(remove_path, marker)


def build_of(full_version: str) -> int:
    """5.00.9141.1000 -> 9141."""
    parts = full_version.split(".")
    return int(parts[2]) if len(parts) >= 3 and parts[2].isdigit() else 0


def _install_verified(source: Path, dest: Path, expected: str) -> None:
    """Copy `source` over `dest` atomically, only if the copy has the `expected` hash."""
    data = source.read_bytes()
    actual = sha256_bytes(data)
    if actual != expected:
        raise BadInput(f"{source} has hash {actual}, not {expected}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(dest) as out:
        out.write(data)
