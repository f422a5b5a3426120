-- cmlab sample pre-upgrade script for Configuration Manager 2509 (build 9141).
-- SQLite dialect. Run by the first install step against the site database; harmless to
-- run again (it only creates a table that is not there yet).
CREATE TABLE IF NOT EXISTS CM_UpgradeHistory (
    PackageGUID TEXT NOT NULL,
    FromBuild INTEGER,
    ToBuild INTEGER NOT NULL,
    StartedAt TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
