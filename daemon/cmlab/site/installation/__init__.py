"""The emulated site server's installation and the guide's 16 install steps ("Investigate the
Installation stage", process step 3), as a library CMUpdate calls once per install.map step.

Why it exists: the Installation stage is only worth learning from if the site really changes.
So the emulated site has an installation folder (`SITE/bin/x64`, `SITE/AdminConsole/bin`)
whose sample binaries carry their build number, a site control file
(`SITE/inboxes/sitectrl.box/sitectrl.ct0`), and, in the site database, the state a real
site server keeps elsewhere: SQL Server Service Broker and WMI (`SiteServerSettings`), the
Windows services (`SiteServices`) and the registry (`SiteRegistry`). Each install step makes
the change its title names, where a trainee can see it (docs/installation.md).

Why it is shaped like this:
- One step per call, each idempotent: CMUpdate reports an INSTALL_* state per step and, after
  a crash, simply runs the step it was in again. Nothing here keeps state in memory; every
  decision is taken from what is on disk and in the database.
- Backups before the first change, kept until `finish()`: `CMUStaging/<GUID>.backup/` holds
  the database state taken before step 1 (`state.json`) and a copy of every file a step
  replaces, made before that file changes (first copy wins, so a re-run never backs up a
  half-updated site). `rollback()` works from that folder alone, so it also works after a
  crash, and leaves the site at its old version and working.
- A file is installed by copying it next to its destination under a temporary name, hashing
  the bytes as they are copied, and renaming it into place only when every file of the step
  matches update.map: a tampered payload never changes the installation folder.

The modules, from the bottom up:
    context       InstallContext (what the caller gives), InstallStepError (what fails)
    layout        where the installation is on disk; installed_build
    files         folders and files never through a link; copies while hashing; backups
    server_state  what a working site's rows are; the snapshot and its restore
    session       InstallSession: the plumbing every step uses
    scripts       step 1, the pre-upgrade scripts
    server_steps  the steps that change the database (2-5, 7-9, 12-14, 16)
    file_steps    the steps that change files (6, 10, 11, 15)
    steps         the table: install.map action -> the function that runs it
    installer     SiteInstaller: run_step, completed_steps, rollback, finish
The SQL is in cmlab.site.sitedb.site_server, the site control file's format in
cmlab.site.formats.site_control; `cmlab init` lays the installation out from the lab's sample
builder, in the top layer (admin/installation_layout.py).
"""

from __future__ import annotations

from cmlab.site.installation.context import InstallContext, InstallStepError
from cmlab.site.installation.installer import SiteInstaller
from cmlab.site.installation.layout import (
    CONSOLE_EXE,
    INSTALL_DIR,
    SITE_CONTROL,
    backup_dir_for,
    installed_build,
)
from cmlab.site.installation.server_state import RCM_KEY, SETUP_KEY, SQL_KEY, seed_site_state
from cmlab.site.installation.steps import ACTIONS

__all__ = [
    "ACTIONS",
    "CONSOLE_EXE",
    "INSTALL_DIR",
    "RCM_KEY",
    "SETUP_KEY",
    "SITE_CONTROL",
    "SQL_KEY",
    "InstallContext",
    "InstallStepError",
    "SiteInstaller",
    "backup_dir_for",
    "installed_build",
    "seed_site_state",
]
