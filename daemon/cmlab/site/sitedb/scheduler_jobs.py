"""SchedulerJobs: the jobs of file-based replication (docs/hierarchy.md). DistMgr adds a SWD
job per child primary site for a version of the Easy Setup Package, HMAN a SiteRecovery job
for Recover Secondary Site; the Scheduler turns a Pending job into an instruction and marks it
Sending; the Sender delivers it and ends it Complete or, after its retries, Failed. Every
change of State makes SMSDBMon drop `<JobID>.JOB` for the Scheduler.

Each function runs inside the caller's transaction and is safe to replay."""

from __future__ import annotations

import contextlib
import enum
import sqlite3
from dataclasses import dataclass

from cmlab.site.formats.replication import SITE_RECOVERY, SWD, job_name
from cmlab.site.sitedb import servicing
from cmlab.site.state_codes import PackageState

__all__ = [
    "ENDED_STATES",
    "OPEN_STATES",
    "JobState",
    "SchedulerJob",
    "SwdJob",
    "add_recovery_job",
    "add_swd_job",
    "complete_job",
    "count_attempt",
    "fail_job",
    "jobs_at_rest",
    "mark_sending",
    "open_job_count",
    "recovery_job",
    "scheduler_job",
    "swd_jobs",
    "versions_in_flight",
]


class JobState(enum.StrEnum):
    """SchedulerJobs.State."""

    PENDING = "Pending"
    SENDING = "Sending"
    COMPLETE = "Complete"
    FAILED = "Failed"


OPEN_STATES = (JobState.PENDING, JobState.SENDING)
ENDED_STATES = (JobState.COMPLETE, JobState.FAILED)


@dataclass(frozen=True)
class SchedulerJob:
    """A SchedulerJobs row."""

    job_id: int
    job_type: str
    pkg_id: str
    version: int
    dest_site: str
    package_file: str  # site-relative: SMSPKG/CAS10001.PCK.1
    file_size: int
    file_hash: str
    content_hash: str
    state: str
    attempts: int
    last_error: str

    @property
    def name(self) -> str:
        return job_name(self.job_id)


def scheduler_job(conn: sqlite3.Connection, job_id: int) -> SchedulerJob | None:
    r = conn.execute(
        "SELECT JobID, JobType, PkgID, Version, DestSite, PackageFile, FileSize, FileHash, "
        "ContentHash, State, Attempts, LastError FROM SchedulerJobs WHERE JobID = ?",
        (job_id,),
    ).fetchone()
    if r is None:
        return None
    return SchedulerJob(
        job_id=int(r[0]),
        job_type=str(r[1]),
        pkg_id=str(r[2]).upper(),
        version=int(r[3]),
        dest_site=str(r[4]).upper(),
        package_file=str(r[5]),
        file_size=int(r[6]),
        file_hash=str(r[7]).upper(),
        content_hash=str(r[8] or "").upper(),
        state=str(r[9]),
        attempts=int(r[10]),
        last_error=str(r[11] or ""),
    )


def open_job_count(conn: sqlite3.Connection) -> int:
    """Jobs neither Complete nor Failed: the Scheduler's "jobs found in job source"."""
    row = conn.execute(
        "SELECT count(*) FROM SchedulerJobs WHERE State NOT IN (?, ?)", ENDED_STATES
    ).fetchone()
    return int(row[0])


def jobs_at_rest(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    """(JobID, State) of the jobs Pending, Complete or Failed for a while (2 seconds): the
    Scheduler's sweep compares them with its files, and a fresh change's own notification is
    normally on its way."""
    return [
        (int(job_id), str(state))
        for job_id, state in conn.execute(
            "SELECT JobID, State FROM SchedulerJobs WHERE State IN (?, ?, ?) "
            "AND Updated < strftime('%Y-%m-%d %H:%M:%f', 'now', '-2 seconds')",
            (JobState.PENDING, JobState.COMPLETE, JobState.FAILED),
        )
    ]


def mark_sending(conn: sqlite3.Connection, job_id: int) -> None:
    """The Scheduler wrote the job's instruction: Pending -> Sending."""
    conn.execute(
        "UPDATE SchedulerJobs SET State = ?, "
        "Updated = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE JobID = ? AND State = ?",
        (JobState.SENDING, job_id, JobState.PENDING),
    )


def count_attempt(conn: sqlite3.Connection, job_id: int, error: str) -> int:
    """A delivery failed with `error`: returns the job's attempts so far."""
    conn.execute(
        "UPDATE SchedulerJobs SET Attempts = Attempts + 1, LastError = ?, "
        "Updated = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE JobID = ?",
        (error, job_id),
    )
    row = conn.execute("SELECT Attempts FROM SchedulerJobs WHERE JobID = ?", (job_id,)).fetchone()
    return int(row[0])


def complete_job(conn: sqlite3.Connection, job_id: int) -> None:
    conn.execute(
        "UPDATE SchedulerJobs SET State = ?, "
        "Updated = strftime('%Y-%m-%d %H:%M:%f', 'now') "
        "WHERE JobID = ? AND State NOT IN (?, ?)",
        (JobState.COMPLETE, job_id, *ENDED_STATES),
    )


def fail_job(conn: sqlite3.Connection, job: SchedulerJob, error: str) -> bool:
    """The job is Failed with `error` (SMSDBMon then drops its JOB for the Scheduler). For a
    SWD job the destination site's content replication failed too: CONTENT_REPLICATION_FAILED
    in its status row here and INSTALL_FAILED (3) in ObjectDistributionState. False when the
    job had ended already."""
    cur = conn.execute(
        "UPDATE SchedulerJobs SET State = ?, LastError = ?, "
        "Updated = strftime('%Y-%m-%d %H:%M:%f', 'now') "
        "WHERE JobID = ? AND State NOT IN (?, ?)",
        (JobState.FAILED, error, job.job_id, *ENDED_STATES),
    )
    if cur.rowcount == 0:
        return False
    if job.job_type == SWD:
        esp = servicing.easy_setup_package_by_id(conn, job.pkg_id)
        if esp is not None and esp.package_guid:
            with contextlib.suppress(LookupError):  # a site this database does not know
                servicing.spCMUSetSiteState(
                    conn,
                    esp.package_guid,
                    PackageState.CONTENT_REPLICATION_FAILED,
                    site_code=job.dest_site,
                )
        servicing.set_distribution_state(
            conn,
            job.pkg_id,
            job.dest_site,
            servicing.DistributionState.INSTALL_FAILED,
            job.version,
            error[:500],
        )
    return True


# -- SWD: the Easy Setup Package for a child primary site (DistMgr) ------------------------------


@dataclass(frozen=True)
class SwdJob:
    job_id: int
    dest: str
    state: str
    package_file: str
    file_size: int
    file_hash: str
    last_error: str


def swd_jobs(conn: sqlite3.Connection, pkg_id: str, version: int) -> list[SwdJob]:
    """Every SWD job of one package version, oldest first."""
    return [
        SwdJob(int(r[0]), str(r[1]).upper(), str(r[2]), str(r[3]), int(r[4]), str(r[5]), r[6] or "")
        for r in conn.execute(
            "SELECT JobID, DestSite, State, PackageFile, FileSize, FileHash, LastError "
            "FROM SchedulerJobs WHERE JobType = ? AND PkgID = ? AND Version = ? "
            "ORDER BY JobID",
            (SWD, pkg_id, version),
        )
    ]


def versions_in_flight(conn: sqlite3.Connection, pkg_id: str) -> set[int]:
    """The versions of a package that a SWD job still sends (Pending or Sending)."""
    return {
        int(r[0])
        for r in conn.execute(
            "SELECT DISTINCT Version FROM SchedulerJobs WHERE JobType = ? "
            "AND PkgID = ? AND State IN (?, ?)",
            (SWD, pkg_id, *OPEN_STATES),
        )
    }


def add_swd_job(
    conn: sqlite3.Connection,
    *,
    pkg_id: str,
    version: int,
    dest: str,
    package_file: str,
    file_size: int,
    file_hash: str,
    content_hash: str,
    request: str | None,
) -> int | None:
    """A SWD job sending `package_file` to the child site `dest`, and its INSTALL_PENDING
    distribution state; returns its JobID. None when the decision is already made: without a
    `request`, the child has a job of this version that did not fail; with one (a resend
    request's identity, kept as the new job's LastError), that very request was answered
    before a crash. Checked here, inside the transaction: the decision and the row are one
    step."""
    for job in swd_jobs(conn, pkg_id, version):
        if job.dest != dest:
            continue
        if request is None and job.state != JobState.FAILED:
            return None
        if request is not None and request in job.last_error:
            return None  # this very request was answered before a crash
    cur = conn.execute(
        "INSERT INTO SchedulerJobs (JobType, PkgID, Version, DestSite, PackageFile, "
        "FileSize, FileHash, ContentHash, LastError, State) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            SWD,
            pkg_id,
            version,
            dest,
            package_file,
            file_size,
            file_hash,
            content_hash,
            request,
            JobState.PENDING,
        ),
    )
    servicing.set_distribution_state(
        conn,
        pkg_id,
        dest,
        servicing.DistributionState.INSTALL_PENDING,
        version,
        f"Sending compressed copy to site {dest}",
    )
    return int(cur.lastrowid or 0)


# -- SiteRecovery: a secondary site's reinstallation (HMAN) --------------------------------------


def recovery_job(conn: sqlite3.Connection, site_code: str, number: int) -> int | None:
    """The SiteRecovery job of a secondary site's recovery request `number`, if it has one."""
    row = conn.execute(
        "SELECT JobID FROM SchedulerJobs WHERE JobType = ? AND PkgID = ? AND Version = ? "
        "ORDER BY JobID LIMIT 1",
        (SITE_RECOVERY, site_code, number),
    ).fetchone()
    return None if row is None else int(row[0])


def add_recovery_job(
    conn: sqlite3.Connection,
    site_code: str,
    number: int,
    *,
    package_file: str,
    file_size: int,
    file_hash: str,
    content_hash: str,
) -> int:
    """A SiteRecovery job sending `package_file` to the secondary site; returns its JobID."""
    cur = conn.execute(
        "INSERT INTO SchedulerJobs (JobType, PkgID, Version, DestSite, PackageFile, FileSize, "
        "FileHash, ContentHash, State) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            SITE_RECOVERY,
            site_code,
            number,
            site_code,
            package_file,
            file_size,
            file_hash,
            content_hash,
            JobState.PENDING,
        ),
    )
    return int(cur.lastrowid or 0)
