"""DistMgr (SMS_DISTRIBUTION_MANAGER): on `<PkgID>.PKN` ("package properties updated
notification"), takes a snapshot of the Easy Setup Package from its source share
(`\\\\<server>\\EasySetupPayLoad\\<GUID>`) into this site's content library, and reports the
outcome through ObjectDistributionState and this site's state for the update
(CONTENT_REPLICATION_SUCCESS or CONTENT_REPLICATION_FAILED).

The guide's "Process step 3" and "Process step 4" of the Replication stage. Once a version is
stored, DistMgr creates the minijob that sends a compressed copy (`SMSPKG/<PkgID>.PCK.<V>`) to
each direct child primary site (a SchedulerJobs row; docs/hierarchy.md), and answers a child's
resend request (`<ChildSite>_<PkgID>_<Version>.RSQ`) with a new job, or gives up on that child
after `replication.sender_retries` resends."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from functools import partial
from pathlib import Path, PureWindowsPath

from cmlab.core.errors import BadInput, CmlabError
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import read_regular_file_stat
from cmlab.site.component import Component, SiteContext
from cmlab.site.content_library import ContentLibrary, Snapshot
from cmlab.site.file_replication import PackageFile, build_pck, old_pck_versions, package_file_ok
from cmlab.site.formats.ids import is_guid, is_package_id
from cmlab.site.formats.replication import (
    RSQ_MAX,
    parse_resend_reason,
    parse_resend_request_name,
    pck_name,
)
from cmlab.site.inbox import Outcome
from cmlab.site.sitedb import hierarchy, scheduler_jobs, servicing
from cmlab.site.sitedb.scheduler_jobs import JobState, SwdJob
from cmlab.site.sitedb.servicing import DistributionState
from cmlab.site.state_codes import PackageState

REPLICATING = (PackageState.CONTENT_REPLICATING,)


def _remove_files(paths: list[Path]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


class DistributionManager(Component):
    component = "SMS_DISTRIBUTION_MANAGER"
    log_file = "distmgr.log"

    @property
    def library(self) -> ContentLibrary:
        return ContentLibrary(self.paths.content_lib)

    def __init__(self, ctx: SiteContext) -> None:
        super().__init__(ctx)
        # The PKN and RSQ inboxes run side by side: one PCK build at a time.
        self.pck_lock = asyncio.Lock()

    def local_source(self, share: str) -> Path:
        """The folder behind `\\\\<server>\\EasySetupPayLoad\\<GUID>`: this site server's own
        share. Any other server's is refused (DistMgr here cannot reach it)."""
        parts = PureWindowsPath(share).parts
        # ('\\\\server\\EasySetupPayLoad\\', 'GUID')
        if len(parts) != 2 or not is_guid(parts[1]):
            raise BadInput(f"{share} is not an EasySetupPayLoad share path")
        anchor = parts[0].strip("\\").split("\\")
        if len(anchor) != 2 or anchor[1].lower() != "easysetuppayload":
            raise BadInput(f"{share} is not an EasySetupPayLoad share path")
        if anchor[0].lower() != self.config.fqdn.lower():
            raise BadInput(f"{share} is not on this site server ({self.config.fqdn})")
        return self.paths.payload_folder(parts[1])

    async def on_pkn(self, path: Path) -> Outcome:
        pkg_id = path.name[: -len(".PKN")].upper()
        if not is_package_id(pkg_id):
            raise BadInput(f"{path.name}: the file name is not <PackageID>.PKN")
        self.say(f"Found package properties updated notification for package '{pkg_id}'")
        esp = await self.db.read(servicing.easy_setup_package_by_id, pkg_id)
        if esp is None:
            raise BadInput(f"{path.name}: package {pkg_id} is not an Easy Setup Package here")
        version = esp.source_version
        if esp.stored_pkg_version == version and esp.stored_pkg_hash:
            # A replayed notification: this version is stored already; make sure it was said.
            await self.db.tx(self._stored, esp, version, esp.stored_pkg_hash)
            await self._minijobs(esp, version, esp.stored_pkg_hash)
            return Outcome.DONE
        self.say(f"Info: package '{pkg_id}' is set to replicate to site servers only.")
        self.say(f"Taking package snapshot for package {pkg_id} from source {esp.source}")
        await self.db.tx(
            servicing.set_distribution_state,
            pkg_id,
            self.config.site_code,
            DistributionState.INSTALL_PENDING,
            version,
            "Taking package snapshot",
        )
        try:
            source = self.local_source(esp.source)
            snap: Snapshot = await self.in_thread(
                self.library.store_snapshot, pkg_id, version, source
            )
        except (OSError, CmlabError) as exc:
            await self._failed(esp, version, f"Failed to take snapshot of package {pkg_id}: {exc}")
            return Outcome.DONE
        crashpoint("distmgr.after_snapshot")
        if snap.hash != esp.package_hash.upper():
            await self._failed(
                esp,
                version,
                f"The snapshot of package {pkg_id} has hash {snap.hash}, not the source hash "
                f"{esp.package_hash} HMAN recorded: the source changed while it was replicated. "
                "Retry the content replication.",
            )
            return Outcome.DONE
        self.say(f"Adding package '{pkg_id}' to package processing queue.")
        self.say(f"Started package processing thread for package '{pkg_id}',")
        self.say(f"Start updating the package {pkg_id}...")
        await self.db.tx(self._stored, esp, version, snap.hash)
        self.say(f"Successfully created/updated the package {pkg_id}")
        await self.in_thread(self.library.remove_old_versions, pkg_id, version)
        await self._minijobs(esp, version, snap.hash)
        return Outcome.DONE

    def _stored(
        self, conn: sqlite3.Connection, esp: servicing.EasySetupPackage, version: int, digest: str
    ) -> None:
        servicing.record_stored_package(conn, esp.package_id, version, digest)
        servicing.set_distribution_state(
            conn,
            esp.package_id,
            self.config.site_code,
            DistributionState.INSTALLED,
            version,
            "Package stored",
        )
        servicing.spCMUSetSiteState(
            conn, esp.package_guid, PackageState.CONTENT_REPLICATION_SUCCESS, only_from=REPLICATING
        )

    async def _failed(self, esp: servicing.EasySetupPackage, version: int, reason: str) -> None:
        self.say(f"ERROR: {reason}", level="error")

        def record(conn: sqlite3.Connection) -> None:
            servicing.set_distribution_state(
                conn,
                esp.package_id,
                self.config.site_code,
                DistributionState.INSTALL_FAILED,
                version,
                reason,
            )
            servicing.spCMUSetSiteState(
                conn,
                esp.package_guid,
                PackageState.CONTENT_REPLICATION_FAILED,
                only_from=REPLICATING,
            )

        await self.db.tx(record)
        self.say(
            f"Failed to process package {esp.package_id}: content replication of update "
            f"{esp.package_guid} failed (CONTENT_REPLICATION_FAILED). Fix the cause, then run "
            "RetryContentReplication (`cmlab retry-replication`).",
            level="error",
        )

    # -- the minijob: a compressed copy for each child primary site -----------------------------

    async def _minijobs(self, esp: servicing.EasySetupPackage, version: int, digest: str) -> None:
        """A SWD job per direct child primary that has none in progress or done for this
        version (a replayed notification adds nothing). Secondary sites never get one."""
        children = await self.db.read(hierarchy.child_sites, (hierarchy.PRIMARY,))
        if not children:
            return
        pkg_id = esp.package_id
        async with self.pck_lock:
            jobs = await self.db.read(scheduler_jobs.swd_jobs, pkg_id, version)
            have = {j.dest for j in jobs if j.state != JobState.FAILED}
            todo = [c.code for c in children if c.code not in have]
            if not todo:
                return
            pck = await self._ensure_pck(pkg_id, version, jobs)
            for child in todo:
                await self._create_job(esp, version, digest, child, pck, request=None)

    async def _ensure_pck(self, pkg_id: str, version: int, jobs: list[SwdJob]) -> PackageFile:
        """`SMSPKG/<PkgID>.PCK.<V>`, whole: kept when it still matches the last job's size and
        hash, else (missing, damaged, or no job yet to compare with) built again from the
        content library. Builds are byte-identical, so a rebuild keeps the FileHash."""
        path = self.paths.smspkg / pck_name(pkg_id, version)
        if jobs:
            last = jobs[-1]
            if await self.in_thread(package_file_ok, path, last.file_size, last.file_hash):
                return PackageFile(path, last.file_size, last.file_hash.upper())
            if await self.in_thread(os.path.lexists, path):
                self.say(
                    f"The compressed copy {self.show(path)} of package {pkg_id} is damaged "
                    "(its size or hash changed); building it again.",
                    level="warning",
                )
        pck = await self.in_thread(build_pck, self.library, pkg_id, version, self.paths.smspkg)
        crashpoint("distmgr.after_pck")
        await self._remove_old_pcks(pkg_id, version)
        return pck

    async def _remove_old_pcks(self, pkg_id: str, version: int) -> None:
        """Older compressed copies go once no job still sends them."""

        found = await self.in_thread(old_pck_versions, self.paths.smspkg, pkg_id)
        old = [(n, p) for n, p in found if n < version]
        if not old:
            return
        sending = await self.db.read(scheduler_jobs.versions_in_flight, pkg_id)
        await self.in_thread(_remove_files, [p for n, p in old if n not in sending])

    async def _create_job(
        self,
        esp: servicing.EasySetupPackage,
        version: int,
        digest: str,
        child: str,
        pck: PackageFile,
        *,
        request: str | None,
    ) -> int | None:
        shown = self.show(pck.path)
        rel = f"SMSPKG/{pck.path.name}"
        self.say(f"Setting CMiniJob transfer root to {shown}")

        job_id = await self.db.tx(
            partial(
                scheduler_jobs.add_swd_job,
                pkg_id=esp.package_id,
                version=version,
                dest=child,
                package_file=rel,
                file_size=pck.size,
                file_hash=pck.sha256,
                content_hash=digest,
                request=request,
            )
        )
        if job_id is not None:
            self.say(
                f"Created minijob to send compressed copy of package {esp.package_id} to site "
                f"{child}.  Transfer root = {shown}"
            )
        return job_id

    # -- a child's resend request ---------------------------------------------------------------

    async def on_resend_request(self, path: Path) -> Outcome:
        child, pkg_id, version = parse_resend_request_name(path.name)
        reason, request = await self.in_thread(self._read_request, path)
        self.say(
            f"Received a request from site {child} to resend package {pkg_id} version {version}"
            + (f": {reason}" if reason else "")
        )
        site = await self.db.read(hierarchy.site_by_code, child)
        local = await self.db.read(hierarchy.local_site)
        if site is None or site.parent != local.code or site.site_type != hierarchy.PRIMARY:
            raise BadInput(f"{path.name}: site {child} is not a child primary site of {local.code}")
        esp = await self.db.read(servicing.easy_setup_package_by_id, pkg_id)
        if esp is None:
            raise BadInput(f"{path.name}: package {pkg_id} is not an Easy Setup Package here")
        if esp.stored_pkg_version != version or not esp.stored_pkg_hash:
            self.say(
                f"Package {pkg_id} version {version} is not the stored version "
                f"({esp.stored_pkg_version}); the request from site {child} is ignored."
            )
            return Outcome.DONE
        async with self.pck_lock:
            jobs = [
                j
                for j in await self.db.read(scheduler_jobs.swd_jobs, pkg_id, version)
                if j.dest == child
            ]
            if any(request in j.last_error for j in jobs):
                return Outcome.DONE  # answered before a crash: the new job exists
            if any(j.state in scheduler_jobs.OPEN_STATES for j in jobs):
                # The damaged delivery can report before its job is marked Complete; a send
                # in progress may also deliver a good copy. Answer once it is over.
                return Outcome.RETRY
            retries = self.config.replication.sender_retries
            if len(jobs) > retries:
                await self._give_up(esp, version, child, len(jobs) - 1)
                return Outcome.DONE
            all_jobs = await self.db.read(scheduler_jobs.swd_jobs, pkg_id, version)
            pck = await self._ensure_pck(pkg_id, version, all_jobs)
            await self._create_job(esp, version, esp.stored_pkg_hash, child, pck, request=request)
        return Outcome.DONE

    def _read_request(self, path: Path) -> tuple[str, str]:
        """The reason a child gives (one line, printable) and the request's identity (device,
        inode, change time): it is recorded with the new job so that a request replayed after
        a crash is answered once. A child writes each request anew (atomically), so a second
        request is a new inode."""
        try:
            data, st = read_regular_file_stat(path, RSQ_MAX)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        reason = parse_resend_reason(path.name, data)
        request = f"resend request {path.name} ({st.st_dev}:{st.st_ino}:{st.st_mtime_ns})"
        return reason, request

    async def _give_up(
        self, esp: servicing.EasySetupPackage, version: int, child: str, resends: int
    ) -> None:
        reason = (
            f"Package {esp.package_id} version {version} arrived damaged at site {child} after "
            f"{resends} resends"
        )

        def record(conn: sqlite3.Connection) -> None:
            servicing.spCMUSetSiteState(
                conn, esp.package_guid, PackageState.CONTENT_REPLICATION_FAILED, site_code=child
            )
            servicing.set_distribution_state(
                conn, esp.package_id, child, DistributionState.INSTALL_FAILED, version, reason
            )

        await self.db.tx(record)
        self.say(
            f"ERROR: {reason}: giving up (replication.sender_retries = "
            f"{self.config.replication.sender_retries}). Content replication of update "
            f"{esp.package_guid} to site {child} failed (CONTENT_REPLICATION_FAILED). Fix the "
            "cause, then run RetryContentReplication (`cmlab retry-replication`).",
            level="error",
        )
