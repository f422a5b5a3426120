"""The Scheduler's sweep of its job source: a job whose SMSDBMon notification never came (it
was added or ended while the site's installation had the triggers removed, install steps 5 to
13) is still handled, from its row alone."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cmlab.testing import LabSite

JOB_COLUMNS = "JobType, PkgID, Version, DestSite, PackageFile, FileSize, FileHash, State"


def write(site: Path, sql: str, params: tuple[object, ...] = ()) -> None:
    conn = sqlite3.connect(site / "db" / "site.db", timeout=30)
    try:
        with conn:
            conn.execute(sql, params)
    finally:
        conn.close()


@pytest.mark.cmlab(stage="new")
def test_jobs_without_their_notification_are_found_in_the_job_source(
    cmlab_site: LabSite,
) -> None:
    # The site serves (its start returned once SMSDBMon had set its triggers), so the triggers
    # dropped below stay dropped.
    site = cmlab_site.path
    tosend = site / "inboxes" / "schedule.box" / "tosend"
    # What install step 5 does: SMSDBMon's triggers are gone.
    for trigger in ("SchedulerJobs_INS_SCHED", "SchedulerJobs_UPD_SCHED"):
        write(site, f"DROP TRIGGER {trigger}")
    # A job that ended while its instruction was still waiting...
    write(
        site,
        f"INSERT INTO SchedulerJobs (JobID, {JOB_COLUMNS}) VALUES "
        "(1, 'SWD', 'CAS10001', 1, 'PR1', 'SMSPKG/CAS10001.PCK.1', 1, ?, 'Complete')",
        ("0" * 64,),
    )
    tosend.mkdir(parents=True, exist_ok=True)
    (tosend / "00000001.Idb").write_text("{}")
    # ...and one added with no notification (its package is unknown here: it fails).
    write(
        site,
        f"INSERT INTO SchedulerJobs (JobID, {JOB_COLUMNS}) VALUES "
        "(2, 'SWD', 'CAS10002', 1, 'PR1', 'SMSPKG/CAS10002.PCK.1', 1, ?, 'Pending')",
        ("0" * 64,),
    )
    cmlab_site.wait_for(
        lambda: (
            not (tosend / "00000001.Idb").exists()
            and "<JOB STATUS - COMPLETE>~" in cmlab_site.log("scheduler.log")
            and any(
                line.startswith("Job 00000002 found in the job source")
                for line in cmlab_site.log("scheduler.log")
            )
        ),
        timeout=60,
        what="the sweep to hand both jobs to the Scheduler",
    )
    lines = cmlab_site.log("scheduler.log")
    assert "Job 00000001 found in the job source without a notification." in lines
    assert cmlab_site.stop() == 0
