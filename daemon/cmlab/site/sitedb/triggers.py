"""SMSDBMon's table triggers: each writes a row to TableChangeNotifications inside the writer's
own transaction, naming the drop file SMSDBMon must create. So an administrator's UPDATE, from
the CLI or from `sqlite3` by hand, wakes the owning component exactly as in the guide."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from cmlab.site.sitedb.scheduler_jobs import ENDED_STATES


@dataclass(frozen=True)
class TriggerDef:
    name: str
    table: str
    action: str  # INSERT | UPDATE | DELETE
    columns: tuple[str, ...]  # for UPDATE OF ...; shown in SMSDBMon's "Modified trigger" line
    when: str  # SQL condition on NEW/OLD
    key_expr: str  # what RCV: shows in brackets
    file_expr: str  # SQL expression giving the drop file name
    extension: str  # shown in SMSDBMon's "Modified trigger" line: "file ESC in dir ..."
    directory: str  # inbox, relative to SITE_DIR/inboxes
    component: str  # friendly owner, e.g. "Hierarchy Manager"


# Replication (65537..131071), prerequisite check (131073..196607) and installation
# (196609..196629, 262142, 262143) states; not the download or applicability states.
_CME_WHEN = (
    "NEW.State BETWEEN 65537 AND 262143 AND "
    "EXISTS (SELECT 1 FROM EasySetupSettings e WHERE e.PackageGuid = NEW.PackageGuid)"
)
# A trigger's SQL takes no parameters: JobState's ended states as literals, written once.
_ENDED_JOB_STATES = ", ".join(f"'{s}'" for s in ENDED_STATES)


def trigger_defs(site_code: str) -> tuple[TriggerDef, ...]:
    code = site_code.upper()
    return (
        TriggerDef(
            name="CM_UpdatePackages_UPD_HMAN",
            table="CM_UpdatePackages",
            action="UPDATE",
            columns=("State",),
            when="NEW.State = 2",
            key_expr="NEW.State",
            file_expr="NEW.State || '.ESC'",
            extension="ESC",
            directory="hman.box/CFD",
            component="Hierarchy Manager",
        ),
        TriggerDef(
            name="EasySetupSettings_INS_HMAN",
            table="EasySetupSettings",
            action="INSERT",
            columns=("PackageHash",),
            when="NEW.PackageGuid IS NOT NULL",
            key_expr="NEW.PackageID",
            file_expr="upper(NEW.PackageGuid) || '.CME'",
            extension="CME",
            directory="hman.box/CFD",
            component="Hierarchy Manager",
        ),
        TriggerDef(
            name="EasySetupSettings_UPD_HMAN",
            table="EasySetupSettings",
            action="UPDATE",
            columns=("PackageHash",),
            when="NEW.PackageGuid IS NOT NULL",
            key_expr="NEW.PackageID",
            file_expr="upper(NEW.PackageGuid) || '.CME'",
            extension="CME",
            directory="hman.box/CFD",
            component="Hierarchy Manager",
        ),
        TriggerDef(
            # A site's status for an update in replication, prerequisite check or installation
            # changed (DistMgr, CMUpdate): HMAN's <GUID>.CME is dropped again, and HMAN checks
            # CMU status (spProcessCMUPackages).
            name="CM_UpdatePackageSiteStatus_INS_HMAN",
            table="CM_UpdatePackageSiteStatus",
            action="INSERT",
            columns=(),
            when=_CME_WHEN,
            key_expr="NEW.State",
            file_expr="upper(NEW.PackageGuid) || '.CME'",
            extension="CME",
            directory="hman.box/CFD",
            component="Hierarchy Manager",
        ),
        TriggerDef(
            name="CM_UpdatePackageSiteStatus_UPD_HMAN",
            table="CM_UpdatePackageSiteStatus",
            action="UPDATE",
            columns=("State",),
            when=_CME_WHEN,
            key_expr="NEW.State",
            file_expr="upper(NEW.PackageGuid) || '.CME'",
            extension="CME",
            directory="hman.box/CFD",
            component="Hierarchy Manager",
        ),
        TriggerDef(
            # HMAN requested the Easy Setup Package be updated from its source: DistMgr's
            # "package properties updated notification".
            name="SMSPackages_INS_DISTMGR",
            table="SMSPackages",
            action="INSERT",
            columns=(),
            # Only this site's own packages: one replicated from the parent site reaches the
            # content library through the despooler.
            when=f"upper(NEW.SourceSite) = '{code}'",
            key_expr="NEW.PkgID",
            file_expr="upper(NEW.PkgID) || '.PKN'",
            extension="PKN",
            directory="distmgr.box",
            component="Distribution Manager",
        ),
        TriggerDef(
            name="SMSPackages_UPD_DISTMGR",
            table="SMSPackages",
            action="UPDATE",
            columns=("SourceVersion",),
            when=f"NEW.SourceVersion <> OLD.SourceVersion AND upper(NEW.SourceSite) = '{code}'",
            key_expr="NEW.PkgID",
            file_expr="upper(NEW.PkgID) || '.PKN'",
            extension="PKN",
            directory="distmgr.box",
            component="Distribution Manager",
        ),
        TriggerDef(
            # The manifest has reached the site (state message 4): the site control update
            # file wakes HMAN to process it.
            name="StateMessages_INS_HMAN",
            table="StateMessages",
            action="INSERT",
            columns=(),
            when="NEW.StateID = 4 AND NEW.Component = 'SMS_DMP_DOWNLOADER'",
            key_expr="NEW.StateID",
            file_expr=f"'{code}.SCU'",
            extension="SCU",
            directory="hman.box",
            component="Hierarchy Manager",
        ),
        TriggerDef(
            # DistMgr created a minijob (or HMAN a secondary site recovery): the Scheduler
            # writes its instruction file and send request.
            name="SchedulerJobs_INS_SCHED",
            table="SchedulerJobs",
            action="INSERT",
            columns=(),
            when="1",
            key_expr="NEW.JobID",
            file_expr="printf('%08X', NEW.JobID) || '.JOB'",
            extension="JOB",
            directory="schedule.box",
            component="Scheduler",
        ),
        TriggerDef(
            # The Sender finished the job (or gave up): the Scheduler reports the job status.
            name="SchedulerJobs_UPD_SCHED",
            table="SchedulerJobs",
            action="UPDATE",
            columns=("State",),
            when=f"NEW.State <> OLD.State AND NEW.State IN ({_ENDED_JOB_STATES})",
            key_expr="NEW.JobID",
            file_expr="printf('%08X', NEW.JobID) || '.JOB'",
            extension="JOB",
            directory="schedule.box",
            component="Scheduler",
        ),
        TriggerDef(
            name="SecondarySiteRecovery_INS_HMAN",
            table="SecondarySiteRecovery",
            action="INSERT",
            columns=(),
            when="1",
            key_expr="NEW.SiteCode",
            file_expr="upper(NEW.SiteCode) || '.RSS'",
            extension="RSS",
            directory="hman.box",
            component="Hierarchy Manager",
        ),
        TriggerDef(
            name="SecondarySiteRecovery_UPD_HMAN",
            table="SecondarySiteRecovery",
            action="UPDATE",
            columns=("RequestNumber",),
            when="NEW.RequestNumber <> OLD.RequestNumber",
            key_expr="NEW.SiteCode",
            file_expr="upper(NEW.SiteCode) || '.RSS'",
            extension="RSS",
            directory="hman.box",
            component="Hierarchy Manager",
        ),
        TriggerDef(
            name="SyncHistory_INS_DMP",
            table="SyncHistory",
            action="INSERT",
            columns=(),
            when="1",
            key_expr="NEW.ID",
            file_expr="'SYNC.DMP'",
            extension="DMP",
            directory="dmpdownloader.box",
            component="DMP Downloader",
        ),
        TriggerDef(
            name="CM_UpdatePackagesToDownload_INS_DMP",
            table="CM_UpdatePackagesToDownload",
            action="INSERT",
            columns=(),
            when="1",
            key_expr="NEW.PackageGuid",
            file_expr="upper(NEW.PackageGuid) || '.DMP'",
            extension="DMP",
            directory="dmpdownloader.box",
            component="DMP Downloader",
        ),
    )


def _create_sql(t: TriggerDef) -> str:
    event = t.action
    if t.action == "UPDATE" and t.columns:
        event = f"UPDATE OF {', '.join(t.columns)}"
    return (
        f"CREATE TRIGGER IF NOT EXISTS {t.name} AFTER {event} ON {t.table} "
        f"WHEN {t.when} BEGIN "
        "INSERT INTO TableChangeNotifications "
        "(TriggerName, TableName, Action, KeyValue, FileName, Directory) VALUES "
        f"('{t.name}', '{t.table}', '{t.action}', {t.key_expr}, {t.file_expr}, '{t.directory}'); "
        "END"
    )


def install_triggers(conn: sqlite3.Connection, site_code: str) -> tuple[TriggerDef, ...]:
    defs = trigger_defs(site_code)
    for t in defs:
        conn.execute(_create_sql(t))
    return defs


# -- what SMSDBMon drains -----------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    """A TableChangeNotifications row: the drop file one trigger asks SMSDBMon for."""

    id: int
    trigger: str
    table: str
    action: str
    key: str
    file_name: str
    directory: str


def pending_notifications(conn: sqlite3.Connection, limit: int) -> list[Notification]:
    """The oldest `limit` notifications, in the order the triggers wrote them."""
    rows = conn.execute(
        "SELECT ID, TriggerName, TableName, Action, KeyValue, FileName, Directory "
        "FROM TableChangeNotifications ORDER BY ID LIMIT ?",
        (limit,),
    ).fetchall()
    return [
        Notification(r[0], r[1], r[2], r[3], "" if r[4] is None else str(r[4]), r[5], r[6])
        for r in rows
    ]


def delete_notifications(conn: sqlite3.Connection, ids: list[int]) -> None:
    """The notifications whose files are durable."""
    conn.executemany("DELETE FROM TableChangeNotifications WHERE ID = ?", [(i,) for i in ids])
