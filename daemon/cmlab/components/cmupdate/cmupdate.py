"""CMUpdate (CONFIGURATION_MANAGER_UPDATE): wakes on `cmupdate.box/<GUID>.CMI` or every
`intervals.cmupdate_poll` seconds (10 minutes by default), runs spCMUGetPendingUpdatePackage,
and for an update whose content replicated (CONTENT_REPLICATION_SUCCESS) extracts it from the
content library to `CMUStaging/<GUID>`, verifies and reads `update.map`, and runs the
prerequisite checker (the guide's "Investigate the Prerequisite check stage", steps 3-7).

A run interrupted by a crash is found again at start-up (this site is left at
PREREQ_IN_PROGRESS) and done again from the top: the staging folder is checked against the
content library's hash, so a half-extracted folder is replaced, never used."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from cmlab.components.cmupdate.install import InstallationHandlers, build_of, continues_to_install
from cmlab.core.errors import CmlabError, PrereqError, WorkFailed
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import remove_path
from cmlab.core.hashing import sha256_file, staging_hash
from cmlab.site.cab import extract_cab_into
from cmlab.site.component import Component, SiteContext
from cmlab.site.content_library import ContentLibrary
from cmlab.site.formats.payload_layout import MAP_ROOT, UPDATE_MAP_CAB
from cmlab.site.formats.update_map import UpdateMap, decode_update_map, parse_update_map
from cmlab.site.inbox import Outcome
from cmlab.site.prereq import PrereqContext, RuleResult, Status, run_prereq_checks
from cmlab.site.prereq.facts import DEFAULT_FACTS, validate_facts
from cmlab.site.sitedb import hierarchy, servicing
from cmlab.site.state_codes import IsComplete, PackageFlag, PackageState, SubStage

PREREQ_LOG = "ConfigMgrPrereq.log"
PREREQ_COMPONENT = "Configuration Manager Setup"
CMU_SECTION = "CONFIGURATION_MANAGER_UPDATE"
PREREQCORE = "prereqcore.dll"
SETUP_TYPE_UPGRADE = 8  # "INFO: Setting setup type to  8."
HASH_ALGORITHM_SHA256 = 32780  # CALG_SHA_256: "Creating hash for algorithm 32780"
PREREQ_RESULT_STATES = {
    Status.PASSED: PackageState.PREREQ_SUCCESS,
    Status.WARNING: PackageState.PREREQ_WARNING,
    Status.FAILED: PackageState.PREREQ_ERROR,
}


class StageFailed(WorkFailed):
    """The update cannot be checked: the reason goes to the log and the prerequisite table."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


class CMUpdate(Component):
    component = "CONFIGURATION_MANAGER_UPDATE"
    log_file = "CMUpdate.log"

    def __init__(self, ctx: SiteContext) -> None:
        super().__init__(ctx)
        self.installation = InstallationHandlers(
            self,
            stage_content=self.stage_content,
            read_update_map=self.read_update_map,
            process_pending=self.process_pending,
        )
        # One pass at a time, whether a CMI or the poll timer woke it.
        self._busy = asyncio.Lock()

    @property
    def library(self) -> ContentLibrary:
        return ContentLibrary(self.paths.content_lib)

    def long(self, path: Path, *, trailing_sep: bool = False) -> str:
        """CMUpdate prints staging paths with the `\\\\?\\` long-path prefix on Windows."""
        shown = self.show(path, trailing_sep=trailing_sep)
        return "\\\\?\\" + shown if self.config.display_root else shown

    # -- waking up -----------------------------------------------------------------------------

    async def start(self) -> None:
        # CMUpdate also polls (every 10 minutes by default): a safety net for a lost CMI.
        self.every(
            self.config.intervals.cmupdate_poll,
            self.process_pending,
            "process pending update packages",
        )

    async def stop(self) -> None:
        self.installation.stop()
        await super().stop()

    async def on_cmi(self, path: Path) -> Outcome:
        self.say(f'Detected a change to the "{self.show(self.paths.cmupdate_box)}" directory.')
        await self.process_pending()
        return Outcome.DONE

    async def process_pending(self) -> None:
        async with self._busy:
            pending = await self.db.read(servicing.spCMUGetPendingUpdatePackage)
            for found in pending:
                package: servicing.PendingPackage | None = found
                if found.state in (
                    PackageState.CONTENT_REPLICATION_SUCCESS,
                    PackageState.PREREQ_IN_PROGRESS,
                ):
                    await self.check_prerequisites(found)
                    # The check's result decides whether the same run goes on to install.
                    package = next(
                        (
                            p
                            for p in await self.db.read(servicing.spCMUGetPendingUpdatePackage)
                            if p.guid == found.guid
                        ),
                        None,
                    )
                if package is not None and continues_to_install(package.state, package.flag):
                    await self.installation.install(package)

    # -- the prerequisite check ----------------------------------------------------------------

    async def check_prerequisites(self, package: servicing.PendingPackage) -> None:
        site = await self.db.read(hierarchy.site_version, self.config.site_code)
        if site is None:
            raise WorkFailed(f"the site database has no Sites row for {self.config.site_code}")
        self.say(f"INFO: setup type: {SETUP_TYPE_UPGRADE}, top level: {int(site.top_level)}.")
        self.say(
            "Content replication succeeded. Start extracting the package to run prereq check..."
        )
        guid = package.guid
        extract = SubStage.EXTRACT_UPDATE_PACKAGE
        await self.report_status(guid, extract, IsComplete.IN_PROGRESS, 1)
        await self.report_status(guid, extract, IsComplete.IN_PROGRESS, 25)
        try:
            staging = await self.stage_content(package)
            await self.report_status(guid, extract, IsComplete.IN_PROGRESS, 50)
            update_map = await self.read_update_map(staging)
        except StageFailed as exc:
            self.say(f"ERROR: {exc}", level="error")
            await self.report_status(guid, extract, IsComplete.FAILURE, 100)
            await self.db.tx(self._fail, package, exc.rule, str(exc))
            return
        await self.report_status(guid, extract, IsComplete.SUCCESS, 100)
        await self.run_checker(package, site, staging, update_map)

    async def stage_content(self, package: servicing.PendingPackage) -> Path:
        """CMUStaging/<GUID> holding exactly the content library's version of the package."""
        staging = self.paths.cmu_staging / package.guid
        expected = package.stored_hash
        if not expected or package.stored_version <= 0:
            raise StageFailed(
                "Easy Setup Package content",
                f"the content library holds no content for update {package.guid} "
                f"(package {package.package_id}); retry the content replication",
            )
        self.say("Checking if the CMU Staging folder already has the content extracted.")
        if staging.exists():
            self.say(f"Creating hash for algorithm {HASH_ALGORITHM_SHA256}")
            try:
                found = await self.in_thread(staging_hash, staging)
            except (OSError, CmlabError) as exc:
                found = ""
                self.say(f"WARNING: Cannot hash the staging folder: {exc}", level="warning")
            self.say(f"Staging folder has hash = {found}")
            if found == expected:
                self.say("Content is already found at the staging folder")
                return staging
            self.say(
                f"Staging folder ({self.long(staging)}) has hash {found} which does not match "
                f"hash from content library {expected}"
            )
            await self.in_thread(remove_path, staging)
            self.say(
                f"Delete folder {self.long(staging, trailing_sep=True)} returned 0. "
                "Extractring the content from content library..."
            )
        else:
            self.say("Extractring the content from content library...")
        self.paths.cmu_staging.mkdir(parents=True, exist_ok=True)

        def progress(done: int, total: int) -> None:
            if done:
                crashpoint("cmupdate.during_staging_extract")

        try:
            got = await self.in_thread(
                lambda: self.library.extract(
                    package.package_id, package.stored_version, staging, progress=progress
                )
            )
        except (OSError, CmlabError) as exc:
            raise StageFailed(
                "Easy Setup Package content",
                f"failed to extract update {package.guid} from the content library: {exc}. "
                "Retry the content replication.",
            ) from exc
        if got != expected:
            await self.in_thread(remove_path, staging)
            raise StageFailed(
                "Easy Setup Package content",
                f"the content extracted for {package.guid} has hash {got}, not the content "
                f"library's {expected}. Retry the content replication.",
            )
        self.say(
            f"update package content {package.guid} has been expanded to foler "
            f"{self.long(staging, trailing_sep=True)}"
        )
        return staging

    async def read_update_map(self, staging: Path) -> UpdateMap:
        setup = staging / MAP_ROOT
        cab = staging / Path(*UPDATE_MAP_CAB.split("/"))
        shown = self.long(cab)
        if not cab.is_file() or cab.is_symlink():
            raise StageFailed("update.map", f"{shown} is missing from the update package")
        verdict = await self.verify(cab)
        if not verdict.trusted:
            self.say(f"Error in verifying the trust of file {shown}.", level="error")
            raise StageFailed(
                "update.map.cab signature",
                f"{shown} is not trusted ({verdict.reason}). Check that the payload and redist "
                "files in EasySetupPayload have valid signatures, run RetryContentReplication, "
                "then try again.",
            )
        self.trust_lines(shown, verdict)
        self.say(f"Extracting file {shown} to {self.long(setup, trailing_sep=True)}~")
        try:
            await self.in_thread(
                lambda: extract_cab_into(
                    cab,
                    setup,
                    on_file=lambda e: self.say(f"Extracted {self.long(setup / e.path)}~"),
                )
            )
        except CmlabError as exc:
            raise StageFailed("update.map", f"cannot extract {shown}: {exc}") from exc
        await self.report_status(
            staging.name, SubStage.EXTRACT_UPDATE_PACKAGE, IsComplete.IN_PROGRESS, 75
        )
        map_file = setup / "update.map"
        try:
            data = await self.in_thread(map_file.read_bytes)
            update_map = parse_update_map(decode_update_map(data))
        except (OSError, CmlabError) as exc:
            raise StageFailed("update.map", f"cannot read {self.long(map_file)}: {exc}") from exc
        self.say(f"Successfully read file {self.long(map_file)}")
        return update_map

    def _fail(
        self, conn: sqlite3.Connection, package: servicing.PendingPackage, rule: str, message: str
    ) -> None:
        servicing.clear_prereq_messages(conn, package.guid)
        servicing.spCMUAddPrereqMessage(
            conn, package.guid, self.config.fqdn, rule, int(Status.FAILED), message
        )
        servicing.spCMUSetSiteState(
            conn,
            package.guid,
            PackageState.PREREQ_ERROR,
            only_from=(PackageState.CONTENT_REPLICATION_SUCCESS, PackageState.PREREQ_IN_PROGRESS),
        )

    async def run_checker(
        self,
        package: servicing.PendingPackage,
        site: hierarchy.SiteVersion,
        staging: Path,
        update_map: UpdateMap,
    ) -> None:
        facts = {**DEFAULT_FACTS, **self.config.facts.values}
        fqdn = self.config.fqdn
        sql = str(facts.get("sql_server") or fqdn)
        sdk = str(facts.get("sdk_server") or fqdn)
        target_build = build_of(package.full_version)
        short = fqdn.split(".")[0].upper()
        for line in (
            f"~FQDN for server {short} is {fqdn}",
            "INFO: Target computer is a 64 bit operating system.",
            "INFO: Checking for existing setup information.",
            f"INFO: Setting setup type to  {SETUP_TYPE_UPGRADE}.",
            "INFO: Checking for existing SQL information.",
            f"INFO: '{sql}' is a valid FQDN.",
            "INFO: Verifying the registry entry for Asset Intelligence installation",
            "INFO: Setup detected an existing Configuration Manager installation. Currently "
            f"installed version is {site.build}~",
            "INFO: Phase is 1C7~",
            f"INFO: SDK Provider is on {sdk}.",
            f"Set working directory to the staging folder {self.show(staging / 'SMSSetup')}",
            "INFO: Setting the default CSV folder path",
            "INFO: Language: Mobile Device (INTL), LangPack: 0.",
            f"INFO: Configuration Manager Build Number = {target_build}",
            "INFO: Configuration Manager Version = 5.0",
            "INFO: Configuration Manager Minimum Build Number = 800",
            f"Preparing prereq check for site server [{fqdn}]...~",
        ):
            self.say(line)

        def begin(conn: sqlite3.Connection) -> None:
            servicing.clear_prereq_messages(conn, package.guid)
            servicing.set_package_state(conn, package.guid, PackageState.PREREQ_IN_PROGRESS)
            servicing.spCMUSetSiteState(
                conn,
                package.guid,
                PackageState.PREREQ_IN_PROGRESS,
                only_from=(PackageState.CONTENT_REPLICATION_SUCCESS,),
            )

        await self.db.tx(begin)
        try:
            await self.check_prereqcore(staging, update_map)
            validate_facts(facts)
        except (StageFailed, PrereqError) as exc:
            rule = exc.rule if isinstance(exc, StageFailed) else "Prerequisite facts (site.toml)"
            self.say(f"ERROR: {exc}", level="error")
            await self.db.tx(self._fail, package, rule, str(exc))
            return
        self.say(f"Running prereq checking against Server [{fqdn}] ...~")
        ctx = PrereqContext(
            site_code=self.config.site_code,
            role=self.config.role,
            server=fqdn,
            installed_build=site.build,
            installed_version=site.version,
            target_build=target_build,
            target_version=package.full_version,
            update_number=package.update_number,
            min_cm_version=package.min_cm_version,
            max_cm_version=package.max_cm_version,
            is_hotfix=package.package_type == 1,
            facts=facts,
            package_guid=package.guid,
        )
        prereq_log = self.ctx.logs.get(PREREQ_LOG, PREREQ_COMPONENT)
        results: list[RuleResult] = []

        def say_prereq(line: str) -> None:
            prereq_log.write(line, thread=self.thread_id)

        def record(result: RuleResult) -> None:
            results.append(result)
            crashpoint("cmupdate.during_prereq")

        outcome = await self.in_thread(run_prereq_checks, ctx, say_prereq, record)
        result_state = PREREQ_RESULT_STATES[outcome.overall]

        def finish(conn: sqlite3.Connection) -> None:
            servicing.clear_prereq_messages(conn, package.guid)
            for r in results:
                servicing.spCMUAddPrereqMessage(
                    conn, package.guid, r.server, r.rule, int(r.status), r.message
                )
            servicing.spCMUSetSiteState(
                conn, package.guid, result_state, only_from=(PackageState.PREREQ_IN_PROGRESS,)
            )

        await self.db.tx(finish)
        self.say("INFO: SQL Connection succeeded. Connection: SMS ACCESS, Type: Secure")
        self.say(f"INFO: setup type: {SETUP_TYPE_UPGRADE}, top level: {int(site.top_level)}.")
        self.say(
            f"Prerequisite check of {package.guid} completed: "
            f"{result_state.name} ({int(result_state)})."
        )
        if (
            result_state == PackageState.PREREQ_WARNING
            and package.flag == PackageFlag.IGNORE_WARNINGS
        ):
            self.say(
                "Continue configuration manager update as it is configured to ignore prereq "
                "warnings."
            )

    async def check_prereqcore(self, staging: Path, update_map: UpdateMap) -> None:
        """The update's prerequisite checker is used only if its hash is the one update.map
        gives; a hotfix without a CONFIGURATION_MANAGER_UPDATE section uses the installed one."""
        section = update_map.component(CMU_SECTION)
        entry = None
        folder = ""
        if section is not None:
            for d in section.directories:
                for f in d.files:
                    if f.name.lower() == PREREQCORE:
                        entry, folder = f, d.path
        if section is None or entry is None:
            self.say(f"update.map has no update for {CMU_SECTION}")
            return
        path = staging / MAP_ROOT / Path(*folder.split("\\")) / entry.name
        try:
            actual = await self.in_thread(sha256_file, path)
        except OSError as exc:
            raise StageFailed(
                "Prerequisite checker (prereqcore.dll)",
                f"{self.long(path)} cannot be read: {exc}. Retry the content replication.",
            ) from exc
        self.say(f"prereqcore has hash value SHA256:{actual}")
        if entry.algorithm != "SHA256" or actual != entry.hash.upper():
            raise StageFailed(
                "Prerequisite checker (prereqcore.dll)",
                f"{self.long(path)} has hash SHA256:{actual}, but update.map expects "
                f"{entry.algorithm}:{entry.hash.upper()}. The update package is damaged: retry "
                "the content replication.",
            )
