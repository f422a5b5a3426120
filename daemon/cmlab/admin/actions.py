"""The administrator's actions on a site, as the SMS Provider makes them: one change in the
site database in one transaction; SMSDBMon's triggers wake the components that do the work.

The command line, the console, the training lab and the testing API all call these, so an
action means the same thing whichever of them asks."""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from pathlib import Path

from cmlab.site.config import load_config
from cmlab.site.sitedb import one_transaction, procs, recovery, servicing
from cmlab.site.state_codes import PackageFlag


def _transaction(site_dir: Path) -> AbstractContextManager[sqlite3.Connection]:
    config = load_config(site_dir)
    return one_transaction(config.paths.db_file, config.site_code)


def request_sync(site_dir: Path) -> int:
    """ "Check for updates": spRequestSync; returns the SyncHistory ID."""
    with _transaction(site_dir) as conn:
        return procs.spRequestSync(conn, procs.SyncReason.ADMIN)


def download(site_dir: Path, guid: str) -> bool:
    """The console's Download: spAddPackageToDownload; False if it was already queued."""
    with _transaction(site_dir) as conn:
        return procs.spAddPackageToDownload(conn, guid)


def initiate_upgrade(site_dir: Path, guid: str, flag: PackageFlag) -> int:
    """Install (Flag 0, or 2 to ignore warnings) or Run prerequisite check (Flag 1):
    InitiateUpgrade; returns the state the package was in."""
    with _transaction(site_dir) as conn:
        return servicing.InitiateUpgrade(conn, guid, flag)


def retry_replication(site_dir: Path, guid: str) -> str:
    """RetryContentReplication; returns the Easy Setup Package's ID."""
    with _transaction(site_dir) as conn:
        return servicing.RetryContentReplication(conn, guid)


def recover_secondary(primary_dir: Path, site_code: str) -> int:
    """Recover Secondary Site, at the secondary's parent primary; returns the request number."""
    with _transaction(primary_dir) as conn:
        return recovery.request_secondary_recovery(conn, site_code.upper())
