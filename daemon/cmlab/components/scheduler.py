"""SMS_SCHEDULER (docs/hierarchy.md, step 3 and 6): on `<JobID>.JOB` from SMSDBMon (a
SchedulerJobs row was added, or ended), writes the job's instruction `tosend/<JobID>.Idb`
and then the send request `outboxes/LAN/<JobID>.SRQ` for the Sender, and reports how a job
ended (`<JOB STATUS - COMPLETE>~`), removing its instruction.

Every write is atomic and the State change comes last, so a JOB replayed after a crash
writes the same files again and changes nothing else.

The Scheduler also reads its job source at start and every `intervals.rescan` seconds, and
drops `<JobID>.JOB` itself for a job SMSDBMon's notification never came for: one Pending
without its instruction, or one that ended with its instruction still in `tosend`. That
happens when a job is added or ends while the site's own installation has SMSDBMon's
triggers removed (install steps 5 to 13)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from cmlab.core.errors import BadInput
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import write_atomic
from cmlab.site.component import Component
from cmlab.site.file_replication import package_file_path
from cmlab.site.formats.replication import (
    SITE_RECOVERY,
    SWD,
    Instruction,
    build_instruction,
    idb_name,
    job_of_drop_file,
    read_recovery_sidecar,
    render_send_request,
    srq_name,
)
from cmlab.site.inbox import Outcome
from cmlab.site.sitedb import scheduler_jobs, servicing
from cmlab.site.sitedb.scheduler_jobs import (
    JobState,
    SchedulerJob,
)

RECOVERY_NAME = "Secondary Site Recovery"


class _JobFields(TypedDict):
    """The Instruction fields every job type fills from its SchedulerJobs row."""

    job: str
    job_type: str
    source_site: str
    dest_site: str
    package_id: str
    version: int
    package_file: str
    file_size: int
    file_hash: str


@dataclass(frozen=True)
class _JobView:
    job: SchedulerJob
    open_jobs: int
    esp: servicing.EasySetupPackage | None


def _view(conn: sqlite3.Connection, job_id: int) -> _JobView | None:
    job = scheduler_jobs.scheduler_job(conn, job_id)
    if job is None:
        return None
    esp = servicing.easy_setup_package_by_id(conn, job.pkg_id) if job.job_type == SWD else None
    return _JobView(job, scheduler_jobs.open_job_count(conn), esp)


def _unnoticed_jobs(conn: sqlite3.Connection, tosend: Path) -> list[str]:
    """Jobs whose state and files disagree: Pending with no instruction yet, or ended with
    its instruction still there. Only those left so for a while: a fresh change's own
    notification is normally on its way."""
    out = []
    for job_id, state in scheduler_jobs.jobs_at_rest(conn):
        name = f"{job_id:08X}"
        has_idb = (tosend / idb_name(name)).exists()
        if (state == JobState.PENDING) != has_idb:
            out.append(name)
    return out


def _write_into(path: Path, data: bytes | str) -> None:
    """`path` written durably, its folder made if need be (on a worker thread: two fsyncs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


class Scheduler(Component):
    component = "SMS_SCHEDULER"
    log_file = "scheduler.log"

    async def start(self) -> None:
        self.every(self.config.intervals.rescan, self._sweep, "read the job source")

    async def _sweep(self) -> None:
        for name in await self.db.read(_unnoticed_jobs, self.paths.schedule_tosend):
            await self.in_thread(
                self.wake,
                self.paths.schedule_box / f"{name}.JOB",
                f"Job {name} found in the job source without a notification.",
            )

    def idb_path(self, name: str) -> Path:
        return self.paths.schedule_tosend / idb_name(name)

    def srq_path(self, name: str) -> Path:
        return self.paths.sender_outbox / srq_name(name)

    async def on_job(self, path: Path) -> Outcome:
        job_id = job_of_drop_file(path.name, "JOB")
        if await self.in_thread(os.path.getsize, path) > 4096:
            raise BadInput(f"{path.name}: a job notification is empty or a line, not a file")
        view = await self.db.read(_view, job_id)
        name = f"{job_id:08X}"
        if view is None:
            self.say(f"Job {name} is not in the job source; nothing to do.")
            return Outcome.DONE
        job = view.job
        if job.state == JobState.COMPLETE:
            self.say("<JOB STATUS - COMPLETE>~")
            self._remove(self.idb_path(name))
            return Outcome.DONE
        if job.state == JobState.FAILED:
            self.say("<JOB STATUS - FAILED>~")
            self.say(
                f"ERROR: Job {name} ({self._describe(job)}) to site {job.dest_site} failed: "
                f"{job.last_error or 'no reason recorded'}",
                level="error",
            )
            self._remove(self.idb_path(name))
            self._remove(self.srq_path(name))
            return Outcome.DONE
        if job.state not in scheduler_jobs.OPEN_STATES:
            raise BadInput(f"{path.name}: job {name} has an unknown State {job.state[:40]!r}")
        self.say(f"1 jobs found in memory, {view.open_jobs} jobs found in job source.")
        try:
            # A SiteRecovery job's instruction reads the package's sidecar file.
            data = await self.in_thread(self._render_instruction, view)
        except ValueError as exc:
            # The job cannot be described (its package is gone, a column is damaged): it ends
            # here, and SMSDBMon's JOB for the Failed row reports it.
            await self.db.tx(
                scheduler_jobs.fail_job, job, f"Cannot write the instruction for job {name}: {exc}"
            )
            return Outcome.DONE
        idb = self.idb_path(name)
        self.say(f"~Instruction file = {self.show(idb)}")
        await self.in_thread(_write_into, idb, data)
        crashpoint("scheduler.after_idb")
        srq = self.srq_path(name)
        await self.in_thread(_write_into, srq, render_send_request(job_id))
        crashpoint("scheduler.after_srq")
        await self.db.tx(scheduler_jobs.mark_sending, job_id)
        self.say(f"<Updating JOB {name}> [{self._describe(job)}]~")
        return Outcome.DONE

    def _describe(self, job: SchedulerJob) -> str:
        if job.job_type == SITE_RECOVERY:
            return f"{RECOVERY_NAME}, Site = {job.pkg_id}"
        name = servicing.EASY_SETUP_PACKAGE_NAME
        return f"Software Distribution for {name}, Package ID = {job.pkg_id}"

    def _render_instruction(self, view: _JobView) -> bytes:
        return build_instruction(self._instruction(view))

    def _instruction(self, view: _JobView) -> Instruction:
        job = view.job
        package = package_file_path(self.paths.root, job.package_file)
        shown = self.show(package)
        common: _JobFields = {
            "job": job.name,
            "job_type": job.job_type,
            "source_site": self.config.site_code.upper(),
            "dest_site": job.dest_site,
            "package_id": job.pkg_id,
            "version": job.version,
            "package_file": shown,
            "file_size": job.file_size,
            "file_hash": job.file_hash,
        }
        if job.job_type == SWD:
            if view.esp is None:
                raise ValueError(f"package {job.pkg_id} is not an Easy Setup Package here")
            return Instruction(
                **common,
                package_guid=view.esp.package_guid.upper(),
                package_name=servicing.EASY_SETUP_PACKAGE_NAME,
                source=view.esp.source,
                content_hash=job.content_hash or view.esp.stored_pkg_hash.upper(),
            )
        if job.job_type == SITE_RECOVERY:
            return Instruction(
                **common,
                package_guid="",
                package_name=RECOVERY_NAME,
                source="",
                content_hash=job.content_hash or job.file_hash,
                recovery=read_recovery_sidecar(package),
            )
        raise ValueError(f"JobType {job.job_type[:40]!r} is not SWD or SiteRecovery")

    @staticmethod
    def _remove(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
