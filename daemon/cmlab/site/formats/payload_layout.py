"""Where things are in an update's payload tree (`EasySetupPayload\\<GUID>`, extracted to
`CMUStaging\\<GUID>`) and its redist folder: the names the sample builder writes and the
download, install and media stages read (docs/formats.md, payloads/README.md).

- `SMSSetup\\` (MAP_ROOT): the folder update.map's directory paths are relative to;
- `SMSSetup\\update.map.cab` (UPDATE_MAP_CAB): the signed CAB holding update.map;
- `SMSSetup\\install.map` (INSTALL_MAP): the install steps (cmlab.site.formats.install_map);
- `redist\\ConfigMgr.AutoUpgradeScripts.cab` (AUTO_UPGRADE_SCRIPTS_CAB): the pre-upgrade SQL
  scripts, listed in the redist manifest in the group AUTO_UPGRADE_SCRIPTS_GROUP.

Paths are written with `/`, relative to the payload folder (or the redist folder).
"""

from __future__ import annotations

__all__ = [
    "AUTO_UPGRADE_SCRIPTS_CAB",
    "AUTO_UPGRADE_SCRIPTS_GROUP",
    "INSTALL_MAP",
    "MAP_ROOT",
    "UPDATE_MAP_CAB",
]

MAP_ROOT = "SMSSetup"  # update.map directory paths are relative to this folder
UPDATE_MAP_CAB = f"{MAP_ROOT}/update.map.cab"
INSTALL_MAP = f"{MAP_ROOT}/install.map"
AUTO_UPGRADE_SCRIPTS_CAB = "ConfigMgr.AutoUpgradeScripts.cab"
AUTO_UPGRADE_SCRIPTS_GROUP = "ConfigMgr_AutoUpgradeScripts"
