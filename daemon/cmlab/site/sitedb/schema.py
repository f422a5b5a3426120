"""The site database schema: the guide's table and view names, so its queries run as written."""

from __future__ import annotations

from cmlab.site.sitedb.procs import SyncReason
from cmlab.site.sitedb.recovery import RecoveryState
from cmlab.site.sitedb.scheduler_jobs import JobState

SCHEMA_VERSION = 7

# The guide: "This table's ObjectDistributionState_ins_updMon trigger saves the replication
# stages to the CM_UpdatePackage_MonitoringStatus table" (SubStageID 0xb0002 = 720898,
# cmlab's "content stored at the site"; IsComplete 1 in progress, 2 success, 4 failure).
# One body, on INSERT and on UPDATE.
_ODS_TRIGGER = """
CREATE TRIGGER IF NOT EXISTS ObjectDistributionState_{name}
AFTER {event} ON ObjectDistributionState
WHEN EXISTS (SELECT 1 FROM EasySetupSettings WHERE PackageID = NEW.ObjectID)
BEGIN
    INSERT INTO CM_UpdatePackage_MonitoringStatus
        (PackageGuid, SiteNumber, SubStageID, IsComplete, Progress, Applicable)
    SELECT e.PackageGuid, s.ID, 720898,
           CASE NEW.State WHEN 0 THEN 2 WHEN 3 THEN 4 ELSE 1 END,
           CASE NEW.State WHEN 0 THEN 100 ELSE 0 END, 1
    FROM EasySetupSettings e JOIN ServerData s ON s.SiteCode = NEW.SiteCode
    WHERE e.PackageID = NEW.ObjectID
    ON CONFLICT (PackageGuid, SiteNumber, SubStageID) DO UPDATE SET
        IsComplete = excluded.IsComplete, Progress = excluded.Progress,
        MessageTime = strftime('%Y-%m-%d %H:%M:%f', 'now');
END;
"""
_ODS_TRIGGERS = _ODS_TRIGGER.format(name="ins_updMon", event="INSERT") + _ODS_TRIGGER.format(
    name="upd_updMon", event="UPDATE"
)

# GUID columns compare case-insensitively, as uniqueidentifier does in SQL Server: the guide
# itself writes the same GUID in upper and lower case.
SCHEMA = """
CREATE TABLE IF NOT EXISTS SchemaInfo (
    Name TEXT PRIMARY KEY,
    Value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS ServerData (
    ID INTEGER PRIMARY KEY,
    SiteCode TEXT NOT NULL UNIQUE COLLATE NOCASE,
    ParentSiteCode TEXT COLLATE NOCASE,
    SiteServerName TEXT NOT NULL,
    SiteType INTEGER NOT NULL,          -- 4 CAS, 2 primary, 1 secondary (as in ConfigMgr)
    IsLocal INTEGER NOT NULL DEFAULT 0,
    SiteFolder TEXT
);

CREATE TABLE IF NOT EXISTS Sites (
    SiteCode TEXT PRIMARY KEY COLLATE NOCASE,
    SiteName TEXT,
    Version TEXT NOT NULL,              -- 5.00.nnnn.1000
    FullVersion TEXT NOT NULL,          -- 5.00.nnnn.10mm
    BuildNumber INTEGER NOT NULL,
    ReportingSiteCode TEXT COLLATE NOCASE,
    ServerName TEXT,
    Type INTEGER
);

CREATE TABLE IF NOT EXISTS CM_UpdatePackages (
    PackageGuid TEXT PRIMARY KEY COLLATE NOCASE,
    Name TEXT NOT NULL,
    Description TEXT,
    UpdateNumber TEXT,                  -- e.g. 2509 (the manifest's <Update>)
    PackageType INTEGER NOT NULL DEFAULT 0,  -- 0 update, 1 hotfix
    FullVersion TEXT,
    MinCMVersion TEXT,
    MaxCMVersion TEXT,
    MoreInfoLink TEXT,
    ContentUrl TEXT,
    ContentHash TEXT,
    PayloadHash TEXT,                   -- folder hash of the downloaded package (IsPayloadLocal)
    RedistManifestUrl TEXT,
    LanguagePackManifestUrl TEXT,
    ApplicabilityCheck TEXT,
    ApplicabilityHash TEXT,
    DateReleased TEXT,
    State INTEGER NOT NULL DEFAULT 0,
    Flag INTEGER NOT NULL DEFAULT 0,
    RunNumber INTEGER NOT NULL DEFAULT 0,  -- cmlab: InitiateUpgrade's count (docs/hierarchy.md)
    DateCreated TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    LastUpdateTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

CREATE TABLE IF NOT EXISTS CM_UpdatePackagesToDownload (
    PackageGuid TEXT PRIMARY KEY COLLATE NOCASE,
    RequestTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

CREATE TABLE IF NOT EXISTS CM_UpdatePackageSiteStatus (
    PackageGuid TEXT NOT NULL COLLATE NOCASE,
    SiteNumber INTEGER NOT NULL,
    State INTEGER NOT NULL,
    Flag INTEGER NOT NULL DEFAULT 0,
    RunNumber INTEGER NOT NULL DEFAULT 0,  -- the run (CM_UpdatePackages.RunNumber) it belongs to
    UpdateTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    PRIMARY KEY (PackageGuid, SiteNumber)
);

-- Every state a site's status row passes through, in order (what the console's "Updates and
-- Servicing Status" shows as the update's history). Kept by plain triggers, not SMSDBMon's:
-- install step 5 drops SMSDBMon's triggers, and the history must not have a hole there.
CREATE TABLE IF NOT EXISTS CM_UpdatePackageSiteStatus_HIST (
    ID INTEGER PRIMARY KEY AUTOINCREMENT,
    PackageGuid TEXT NOT NULL COLLATE NOCASE,
    SiteNumber INTEGER NOT NULL,
    State INTEGER NOT NULL,
    UpdateTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);
CREATE TRIGGER IF NOT EXISTS CM_UpdatePackageSiteStatus_ins_HIST
AFTER INSERT ON CM_UpdatePackageSiteStatus
BEGIN
    INSERT INTO CM_UpdatePackageSiteStatus_HIST (PackageGuid, SiteNumber, State)
    VALUES (new.PackageGuid, new.SiteNumber, new.State);
END;
CREATE TRIGGER IF NOT EXISTS CM_UpdatePackageSiteStatus_upd_HIST
AFTER UPDATE OF State ON CM_UpdatePackageSiteStatus
WHEN new.State <> old.State
BEGIN
    INSERT INTO CM_UpdatePackageSiteStatus_HIST (PackageGuid, SiteNumber, State)
    VALUES (new.PackageGuid, new.SiteNumber, new.State);
END;

CREATE TABLE IF NOT EXISTS CM_UpdatePackage_MonitoringStatus (
    PackageGuid TEXT NOT NULL COLLATE NOCASE,
    SiteNumber INTEGER NOT NULL,
    SubStageID INTEGER NOT NULL,
    IsComplete INTEGER NOT NULL,
    Progress INTEGER NOT NULL,
    Applicable INTEGER NOT NULL DEFAULT 1,
    MessageTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    PRIMARY KEY (PackageGuid, SiteNumber, SubStageID)
);

CREATE TABLE IF NOT EXISTS CM_UpdatePackagePrereqStatus (
    PackageGuid TEXT NOT NULL COLLATE NOCASE,
    SiteNumber INTEGER NOT NULL,
    ServerName TEXT NOT NULL,
    RuleName TEXT NOT NULL,
    Status INTEGER NOT NULL,            -- 0 Passed, 1 Warning, 2 Failed
    Message TEXT,
    MessageTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    PRIMARY KEY (PackageGuid, SiteNumber, ServerName, RuleName)
);

CREATE TABLE IF NOT EXISTS SMSPackages (
    PkgID TEXT PRIMARY KEY COLLATE NOCASE,
    Name TEXT NOT NULL,
    Source TEXT,
    SourceSite TEXT,
    SourceVersion INTEGER NOT NULL DEFAULT 0,
    SourceDate TEXT,
    SourceSize INTEGER NOT NULL DEFAULT 0,
    StoredPkgVersion INTEGER NOT NULL DEFAULT 0,
    StoredPkgHash TEXT,
    StorePkgFlag INTEGER NOT NULL DEFAULT 2,   -- 2: replicate to site servers only
    LastRefresh TEXT,
    Hash TEXT
);

CREATE TABLE IF NOT EXISTS EasySetupSettings (
    PackageID TEXT PRIMARY KEY COLLATE NOCASE,
    PackageGuid TEXT COLLATE NOCASE,
    PackageVersion INTEGER NOT NULL DEFAULT 0,
    PackageHash TEXT,
    LastUpdateTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

-- What each content distribution component did with a package at a site (DistMgr, and the
-- despooler of a child site): 1 INSTALL_PENDING, 2 INSTALL_RETRYING, 0 INSTALLED,
-- 3 INSTALL_FAILED, as in ConfigMgr. Its triggers feed CM_UpdatePackage_MonitoringStatus.
CREATE TABLE IF NOT EXISTS ObjectDistributionState (
    ObjectID TEXT NOT NULL COLLATE NOCASE,      -- the Easy Setup Package's PackageID
    SiteCode TEXT NOT NULL COLLATE NOCASE,
    State INTEGER NOT NULL,
    SourceVersion INTEGER NOT NULL DEFAULT 0,
    Description TEXT,
    LastUpdateDate TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    PRIMARY KEY (ObjectID, SiteCode)
);

-- ObjectDistributionState_ins_updMon and _upd_updMon (_ODS_TRIGGER above).
{ODS_TRIGGERS}
CREATE VIEW IF NOT EXISTS vEasySetupPackage AS
SELECT e.PackageID AS PackageID, e.PackageVersion AS PackageVersion, e.PackageHash AS PackageHash,
       e.PackageGuid AS PackageGUID, p.StoredPkgHash AS StoredPkgHash, p.Source AS Source,
       p.SourceSite AS SourceSite, p.LastRefresh AS LastRefresh,
       p.StoredPkgVersion AS StoredPkgVersion, p.StorePkgFlag AS StorePkgFlag,
       p.SourceDate AS SourceDate, p.SourceVersion AS SourceVersion, p.SourceSize AS SourceSize
FROM EasySetupSettings e LEFT JOIN SMSPackages p ON p.PkgID = e.PackageID;

CREATE VIEW IF NOT EXISTS v_LocalizedUpdatePackageMetaData_SiteLoc AS
SELECT PackageGuid, Name, Description, UpdateNumber, FullVersion, MoreInfoLink, DateReleased,
       State, 1033 AS LocaleID
FROM CM_UpdatePackages;

-- SMSDBMon's queue: triggers write here inside the writer's own transaction.
CREATE TABLE IF NOT EXISTS TableChangeNotifications (
    ID INTEGER PRIMARY KEY AUTOINCREMENT,
    TriggerName TEXT NOT NULL,
    TableName TEXT NOT NULL,
    Action TEXT NOT NULL,
    KeyValue TEXT,
    FileName TEXT NOT NULL,
    Directory TEXT NOT NULL,
    CreatedTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

-- What statesys recorded from the .SMX state messages (one row per message file).
CREATE TABLE IF NOT EXISTS StateMessages (
    ID INTEGER PRIMARY KEY AUTOINCREMENT,
    FileName TEXT NOT NULL UNIQUE,
    Component TEXT NOT NULL,
    MachineName TEXT,
    TopicID TEXT NOT NULL COLLATE NOCASE,
    StateID INTEGER NOT NULL,
    StateName TEXT,
    MessageTime TEXT,
    ReceivedTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

-- The emulated site server that the install steps change (cmlab.site.installation,
-- docs/installation.md). Name/Value settings: ServiceBroker ON|OFF, WMIProviders
-- Loaded|Unloaded, DatabaseVersion, ServiceBrokerConfiguredBuild, ServiceBrokerPort.
CREATE TABLE IF NOT EXISTS SiteServerSettings (
    Name TEXT PRIMARY KEY COLLATE NOCASE,
    Value TEXT NOT NULL,
    LastUpdateTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

-- The site server's Windows services: State Running|Stopped; Build: of the binaries in
-- bin/x64 the service was (re)installed from.
CREATE TABLE IF NOT EXISTS SiteServices (
    ServiceName TEXT PRIMARY KEY COLLATE NOCASE,
    State TEXT NOT NULL,
    Build INTEGER,
    LastUpdateTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

-- The site server's registry: KeyPath as written in Windows (HKLM\\SOFTWARE\\...), value
-- Name, Value; e.g. the SMS Setup key's 'Full Version'.
CREATE TABLE IF NOT EXISTS SiteRegistry (
    KeyPath TEXT NOT NULL COLLATE NOCASE,
    Name TEXT NOT NULL COLLATE NOCASE,
    Value TEXT NOT NULL,
    PRIMARY KEY (KeyPath, Name)
);

-- Pre-upgrade scripts (ConfigMgr.AutoUpgradeScripts.cab) applied for an update, committed
-- in the scripts' own transaction: the same scripts are not run twice.
CREATE TABLE IF NOT EXISTS SiteInstallScripts (
    PackageGuid TEXT NOT NULL COLLATE NOCASE,
    ScriptName TEXT NOT NULL,
    ScriptHash TEXT NOT NULL,
    AppliedTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    PRIMARY KEY (PackageGuid, ScriptName)
);

-- install.map steps an update's installation has completed (cleared by a rollback).
CREATE TABLE IF NOT EXISTS SiteInstallSteps (
    PackageGuid TEXT NOT NULL COLLATE NOCASE,
    StepID INTEGER NOT NULL,
    Action TEXT NOT NULL,
    CompletedTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    PRIMARY KEY (PackageGuid, StepID)
);

-- HMAN's client upgrade settings (read on 196612.ESC, docs/installation.md "Post-installation"):
-- the client packages and deployments of a site. One row per site, seeded by HMAN the first
-- time it needs it; ClientPilotingAdvertisementID is NULL unless site.toml [client] piloting.
CREATE TABLE IF NOT EXISTS ClientUpgradeSettings (
    SiteCode TEXT PRIMARY KEY COLLATE NOCASE,
    FullClientPackageID TEXT NOT NULL,
    StagingClientPackageID TEXT NOT NULL,
    ClientUpgradePackageID TEXT NOT NULL,
    PilotingUpgradePackageID TEXT NOT NULL,
    ClientUpgradeAdvertisementID TEXT,
    ClientPilotingAdvertisementID TEXT,
    LastUpdateTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

-- File-based replication (docs/hierarchy.md): DistMgr's minijobs and HMAN's secondary site
-- recoveries, each a package file under SMSPKG for one destination site. A new row (and a
-- job that ends) makes SMSDBMon drop `<JobID>.JOB` (8 hex digits) for the Scheduler.
CREATE TABLE IF NOT EXISTS SchedulerJobs (
    JobID INTEGER PRIMARY KEY AUTOINCREMENT,
    JobType TEXT NOT NULL,                  -- SWD (a package to a child primary), SiteRecovery
    PkgID TEXT NOT NULL COLLATE NOCASE,     -- the package, or the secondary site's code
    Version INTEGER NOT NULL,
    DestSite TEXT NOT NULL COLLATE NOCASE,
    PackageFile TEXT NOT NULL,              -- site-relative, e.g. SMSPKG/CAS10001.PCK.1
    FileSize INTEGER NOT NULL,
    FileHash TEXT NOT NULL,                 -- SHA-256 of the package file
    ContentHash TEXT,                       -- folder hash of the content it carries
    State TEXT NOT NULL DEFAULT '{JOB_PENDING}',  -- Pending, Sending, Complete, Failed
    Attempts INTEGER NOT NULL DEFAULT 0,
    LastError TEXT,
    Created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    Updated TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

-- The CMUpdates replication group's links: one row per neighbouring site (parent, children).
CREATE TABLE IF NOT EXISTS ReplicationLinks (
    SiteCode TEXT PRIMARY KEY COLLATE NOCASE,
    LastSentSeq INTEGER NOT NULL DEFAULT 0,
    LastSentHash TEXT,
    LastSentTime TEXT,
    LastReceivedSeq INTEGER NOT NULL DEFAULT 0,
    LastReceivedTime TEXT
);

-- "Recover Secondary Site" (`cmlab recover-secondary`): a new request number makes SMSDBMon
-- drop `<SiteCode>.RSS` for HMAN, which reinstalls the secondary with this site's files.
CREATE TABLE IF NOT EXISTS SecondarySiteRecovery (
    SiteCode TEXT PRIMARY KEY COLLATE NOCASE,
    RequestNumber INTEGER NOT NULL DEFAULT 1,
    State TEXT NOT NULL DEFAULT '{RECOVERY_REQUESTED}',  -- Requested, Sent, Installed, Failed
    Detail TEXT,
    RequestTime TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);

CREATE TABLE IF NOT EXISTS SyncHistory (
    ID INTEGER PRIMARY KEY AUTOINCREMENT,
    Requested TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    Reason TEXT NOT NULL DEFAULT '{SYNC_ADMIN}',  -- admin (`cmlab sync`) or interval
    Started TEXT,
    Finished TEXT,
    Result TEXT
);
""".replace("{ODS_TRIGGERS}", _ODS_TRIGGERS)
# The string states' defaults, from their StrEnums: the text stays the one SQL literal.
SCHEMA = (
    SCHEMA.replace("{JOB_PENDING}", JobState.PENDING)
    .replace("{RECOVERY_REQUESTED}", RecoveryState.REQUESTED)
    .replace("{SYNC_ADMIN}", SyncReason.ADMIN)
)

# Upgrades of an existing site database, by the version they bring it to.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE CM_UpdatePackages ADD COLUMN PayloadHash TEXT",),
    # ObjectDistributionState comes from SCHEMA (CREATE ... IF NOT EXISTS); the triggers from
    # sitedb.triggers, which migrate() reinstalls.
    3: (),
    # The installation tables (SiteServerSettings, SiteServices, SiteRegistry,
    # SiteInstallScripts, SiteInstallSteps) come from SCHEMA.
    4: (),
    # ClientUpgradeSettings comes from SCHEMA.
    5: (),
    # CM_UpdatePackageSiteStatus_HIST and its two triggers come from SCHEMA.
    6: (),
    # The hierarchy: run numbers; SchedulerJobs, ReplicationLinks and SecondarySiteRecovery
    # come from SCHEMA. DistMgr's SMSPackages triggers now fire only for this site's own
    # packages (a package replicated from the parent is not snapshotted here): dropped, and
    # reinstalled by migrate() with the new condition.
    7: (
        "ALTER TABLE CM_UpdatePackages ADD COLUMN RunNumber INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE CM_UpdatePackageSiteStatus ADD COLUMN RunNumber INTEGER NOT NULL DEFAULT 0",
        "DROP TRIGGER IF EXISTS SMSPackages_INS_DISTMGR",
        "DROP TRIGGER IF EXISTS SMSPackages_UPD_DISTMGR",
    ),
}
