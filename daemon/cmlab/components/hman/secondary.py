"""HMAN's Recover Secondary Site (docs/hierarchy.md, "Secondary sites").

Secondary sites are never updated automatically: after a primary site installs an update, the
administrator runs Recover Secondary Site (`cmlab recover-secondary PRIMARY_DIR SITECODE`,
`request_secondary_recovery` in cmlab.site.sitedb.recovery, which also holds this handler's
queries), which raises SecondarySiteRecovery.RequestNumber at the primary. SMSDBMon drops
`<SiteCode>.RSS` into hman.box; HMAN packs the primary's `bin/x64` files as
`SMSPKG/<SiteCode>.RCV.<n>` and adds a SiteRecovery job for the Scheduler and Sender, which
deliver it to the secondary's despooler (cmlab.components.despooler reinstalls the site).

The instruction carries the version the secondary is reinstalled at and the updates the
primary has installed (`Recovery`). The job row has no column for them, so HMAN writes them
beside the package as `SMSPKG/<SiteCode>.RCV.<n>.json` ({"Build", "Version", "FullVersion",
"InstalledUpdates"}), where the Scheduler reads them to build the instruction.

Replays converge: a request that already has its job is not packed again (the job's FileHash
must stay the package's), and the package, its sidecar, the job and the new state are written
so that a crash before the transaction leaves only files the next run rewrites.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cmlab.core.errors import BadInput, CmlabError
from cmlab.core.fs import make_tmp_dir, remove_path, write_atomic
from cmlab.core.hashing import folder_hash
from cmlab.site.cab import extract_cab
from cmlab.site.component import Component
from cmlab.site.file_replication import build_package_file
from cmlab.site.formats.ids import is_site_code
from cmlab.site.formats.replication import (
    Recovery,
    job_name,
    recovery_sidecar_path,
    render_recovery_sidecar,
)
from cmlab.site.inbox import Outcome
from cmlab.site.installation import INSTALL_DIR, installed_build
from cmlab.site.sitedb import recovery, scheduler_jobs


def rcv_name(site_code: str, number: int) -> str:
    """`SEC.RCV.1`: the package of a secondary site's recovery request, in SMSPKG."""
    return f"{site_code.upper()}.RCV.{number}"


@dataclass(frozen=True)
class _Packed:
    size: int
    sha256: str
    content_hash: str


def _pack(bin_dir: Path, rcv: Path) -> _Packed:
    """The CAB of `bin_dir`'s files at `rcv`. Its content hash is taken from the CAB itself
    (extracted to a temporary folder), not from `bin_dir`: what the secondary's despooler
    checks is what the package carries, even if a file changed while it was packed."""
    packed = build_package_file(bin_dir, rcv)
    work = make_tmp_dir(rcv, "verify")
    try:
        extract_cab(rcv, work / "content")
        digest = folder_hash(work / "content")
    finally:
        remove_path(work)
    return _Packed(packed.size, packed.sha256, digest)


class SecondarySiteHandlers:
    """HMAN's handler of `<SiteCode>.RSS`, and its sweep for requests whose notification was
    lost; HierarchyManager holds one."""

    def __init__(self, hman: Component) -> None:
        self.config = hman.config
        self.paths = hman.paths
        self.db = hman.db
        self.say = hman.say
        self.show = hman.show
        self.in_thread = hman.in_thread
        self.every = hman.every
        self.wake = hman.wake

    def start(self) -> None:
        """Start the sweep (on HMAN's task list, so HMAN's stop ends it)."""
        self.every(self.config.intervals.rescan, self._sweep_requests, "read the recovery requests")

    async def _sweep_requests(self) -> None:
        for code in await self.db.read(recovery.unnoticed_requests):
            await self.in_thread(
                self.wake,
                self.paths.hman_box / f"{code}.RSS",
                f"Recover secondary site {code}: request found without a notification.",
            )

    async def on_recover_secondary(self, path: Path) -> Outcome:
        code = path.name[: -len(".RSS")].upper()
        if not is_site_code(code):
            raise BadInput(f"{path.name}: the file name is not <SiteCode>.RSS")
        request = await self.db.read(recovery.recovery_request, code)
        if request is None:
            self.say(
                f"ERROR: Recover secondary site {code}: no recovery was requested for it "
                "(SecondarySiteRecovery has no row).",
                level="error",
            )
            return Outcome.DONE
        number = request.number
        problem = await self.db.read(recovery.secondary_problem, code)
        if problem is not None:
            return await self._refuse(code, number, problem)
        job = await self.db.read(scheduler_jobs.recovery_job, code, number)
        if job is not None:
            # A replayed notification: the request is packed and queued already.
            self.say(
                f"Recover secondary site {code}: request {number} is already queued as job "
                f"{job_name(job)}."
            )
            return Outcome.DONE
        local = await self.db.read(recovery.local_version)
        build = await self.in_thread(installed_build, self.paths.root)
        if build != local.build:
            return await self._refuse(
                code,
                number,
                f"this site's files are build {build} but its Sites row says build "
                f"{local.build} (an installation is in progress or was rolled back); run "
                "Recover Secondary Site again once the site is at one version",
            )
        self.say(
            f"Recover secondary site {code}: reinstalling it with this site's files "
            f"(Configuration Manager {local.full_version}, build {build})."
        )
        rcv = self.paths.smspkg / rcv_name(code, number)
        bin_dir = self.paths.root.joinpath(*INSTALL_DIR)
        sidecar = Recovery(build, local.version, local.full_version, local.installed_updates)
        try:
            rcv.parent.mkdir(parents=True, exist_ok=True)
            packed = await self.in_thread(_pack, bin_dir, rcv)
            # The sidecar before the job: the Scheduler reads it once the job row exists.
            await self.in_thread(
                write_atomic,
                recovery_sidecar_path(rcv),
                render_recovery_sidecar(sidecar),
            )
        except CmlabError as exc:
            return await self._refuse(code, number, f"cannot pack {self.show(bin_dir)}: {exc}")
        self.say(
            f"Created package {self.show(rcv)} ({packed.size} bytes) of the files in "
            f"{self.show(bin_dir)}; content hash {packed.content_hash}."
        )
        package_file = f"SMSPKG/{rcv.name}"
        job_id, new = await self.db.tx(
            partial(
                recovery.queue_recovery_job,
                site_code=code,
                number=number,
                package_file=package_file,
                file_size=packed.size,
                file_hash=packed.sha256,
                content_hash=packed.content_hash,
            )
        )
        if new:
            self.say(
                f"Created site recovery job {job_name(job_id)} to send {self.show(rcv)} to site "
                f"{code} (request {number}, {len(local.installed_updates)} installed updates)."
            )
        return Outcome.DONE

    async def _refuse(self, code: str, number: int, problem: str) -> Outcome:
        self.say(f"ERROR: Recover secondary site {code}: {problem}.", level="error")
        await self.db.tx(
            recovery.set_recovery_state, code, number, recovery.RecoveryState.FAILED, problem
        )
        return Outcome.DONE
