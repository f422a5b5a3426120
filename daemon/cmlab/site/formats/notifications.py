"""The empty notification files of the servicing stages: their names are the whole message.

- `hman.box/CFD/2.ESC`: an update was set to ENABLED (2); SMSDBMon drops it (the trigger
  CM_UpdatePackages_UPD_HMAN writes `NEW.State || '.ESC'`, cmlab.site.sitedb.triggers).
- `hman.box/CFD/<GUID>.CME`: a site reported a state for the update's Easy Setup Package;
  SMSDBMon drops it (`upper(NEW.PackageGuid) || '.CME'`). HMAN's "Check CMU status".
- `cmupdate.box/<GUID>.CMI`: HMAN tells CMUpdate the content is replicated here.
- `hman.box/CFD/196612.ESC`: CMUpdate tells HMAN an update is installed (INSTALL_SUCCESS,
  196612), so HMAN updates the client packages.

Names are matched case-insensitively on read (the guide writes `2.esc` and `2.ESC`) and
written as spelled here.

Interface: `ENABLED_ESC`, `INSTALLED_ESC`, `cme_name(guid)`, `cmi_name(guid)`,
`cme_package_guid(name)` (NotificationError when the name is not `<PackageGuid>.CME`).
"""

from __future__ import annotations

from cmlab.core.errors import BadInput
from cmlab.site.formats.ids import is_guid

__all__ = [
    "ENABLED_ESC",
    "INSTALLED_ESC",
    "NotificationError",
    "cme_name",
    "cme_package_guid",
    "cmi_name",
]

ENABLED_ESC = "2.ESC"
INSTALLED_ESC = "196612.ESC"


class NotificationError(BadInput):
    """A notification whose name is not the one its extension promises."""


def cme_name(guid: str) -> str:
    return f"{guid}.CME"


def cmi_name(guid: str) -> str:
    return f"{guid}.CMI"


def cme_package_guid(name: str) -> str:
    """The update package GUID `<GUID>.CME` names, as written."""
    guid = name[: -len(".CME")]
    if not name.upper().endswith(".CME") or not is_guid(guid):
        raise NotificationError(f"{name}: the file name is not <PackageGuid>.CME")
    return guid
