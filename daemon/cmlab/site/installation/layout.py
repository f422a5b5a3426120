"""Where the emulated site server's installation is on disk, and which build it is.

The installation folder (`SITE/bin/x64`), the Admin console (`SITE/AdminConsole/bin`), the
site control file (`SITE/inboxes/sitectrl.box/sitectrl.ct0`) and an update's backup folder
(`CMUStaging/<GUID>.backup`) are named here once: `cmlab init` lays them out
(admin/installation_layout.py), the install steps change them, the despooler reinstalls a
secondary site into them and HMAN reads the installed build from them.
"""

from __future__ import annotations

from pathlib import Path

from cmlab.core.errors import WorkFailed
from cmlab.site.formats.sample_binary import sample_build_number

__all__ = [
    "CONSOLE_COMPONENT",
    "CONSOLE_DIR",
    "CONSOLE_EXE",
    "CONSOLE_SIZE",
    "INSTALL_DIR",
    "SITE_CONTROL",
    "backup_dir_for",
    "installed_build",
]

INSTALL_DIR = ("bin", "x64")
CONSOLE_DIR = ("AdminConsole", "bin")
CONSOLE_EXE = "Microsoft.ConfigurationManagement.exe"
CONSOLE_SIZE = 8192
CONSOLE_COMPONENT = "ADMIN_CONSOLE"  # an update.map component that ships console files
SITE_CONTROL = ("inboxes", "sitectrl.box", "sitectrl.ct0")


def backup_dir_for(staging: Path) -> Path:
    """`CMUStaging/<GUID>.backup`: beside the staging folder, not in it, so the staging
    folder's hash is not changed by the backups."""
    staging = Path(staging)
    return staging.with_name(staging.name + ".backup")


def installed_build(site_root: Path) -> int:
    """The build of the site's installed binaries: the header of `bin/x64/smsexec.exe`. Not
    cmupdate.exe: CMUpdate upgrades itself before the install steps, and stays upgraded when
    they fail and are rolled back."""
    path = Path(site_root).joinpath(*INSTALL_DIR, "smsexec.exe")
    try:
        return sample_build_number(path)
    except OSError as exc:
        raise WorkFailed(f"cannot read the installed build from {path}: {exc}") from exc
