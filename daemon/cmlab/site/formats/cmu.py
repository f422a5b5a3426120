"""The CMU notification and the forwarding messages (`.MCM`) that carry DMPDownloader's news
to HMAN.

DMPDownloader writes into its connector's outbox (`hman.box/ForwardingMsg`, or
`MP/OUTBOXES/MCM.box` when the service connection point is remote, from where MPFDM moves it):

- `___CABConfigMgr.Update.Manifest.mcm`: the verified manifest CAB, which HMAN forwards to
  `hman.box/CFD/ConfigMgr.Update.Manifest.CAB`;
- `___CMU<GUID>.MCM`: a package's download state, which HMAN forwards to
  `hman.box/CFD/<GUID>.CMU` for its CMUHandler. Its body is one element:

      <ConfigurationManagerUpdateContent Guid="<GUID>" State="262146"
          ReportTime="2026-11-21T13:15:08" />

  with State one of the download states DOWNLOAD_IN_PROGRESS (262145), DOWNLOAD_SUCCESS
  (262146), DOWNLOAD_FAILED (327679).

Interface: `cmu_mcm_name(guid)`, `cmu_name(guid)`, `MANIFEST_MCM`, `is_manifest_mcm(name)`,
`forwarded_name(mcm_name)` (the CFD name HMAN forwards a message to), `render_cmu(note) -> str`
and `parse_cmu(name, data) -> CmuNotification` (the file name must name the GUID the body
carries; at most MAX_CMU_BYTES). Errors are CmuError, saying what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from cmlab.core.errors import BadInput
from cmlab.core.safe_xml import parse_xml
from cmlab.site.formats.ids import is_guid
from cmlab.site.state_codes import PackageState

__all__ = [
    "CMU_STATES",
    "MANIFEST_MCM",
    "MAX_CMU_BYTES",
    "CmuError",
    "CmuNotification",
    "cmu_mcm_name",
    "cmu_name",
    "forwarded_name",
    "is_manifest_mcm",
    "parse_cmu",
    "render_cmu",
]

MAX_CMU_BYTES = 64 * 1024
MANIFEST_MCM = "___CABConfigMgr.Update.Manifest.mcm"
CMU_STATES = frozenset(
    {PackageState.DOWNLOAD_IN_PROGRESS, PackageState.DOWNLOAD_SUCCESS, PackageState.DOWNLOAD_FAILED}
)
_CAB_PREFIX, _CMU_PREFIX, _MCM = "___CAB", "___CMU", ".MCM"


class CmuError(BadInput):
    """A CMU notification or forwarding message that is not one (its name or its body)."""


@dataclass(frozen=True)
class CmuNotification:
    guid: str  # as written
    state: int  # one of CMU_STATES
    report_time: str


def cmu_mcm_name(guid: str) -> str:
    """`___CMU<GUID>.MCM`, the forwarding message DMPDownloader writes."""
    return f"{_CMU_PREFIX}{guid}{_MCM}"


def cmu_name(guid: str) -> str:
    """`<GUID>.CMU`, the name HMAN forwards a `___CMU<GUID>.MCM` to."""
    return f"{guid}.CMU"


def is_manifest_mcm(name: str) -> bool:
    """`___CAB*.mcm` (either case): a forwarding message that carries a CAB."""
    upper = name.upper()
    return upper.startswith(_CAB_PREFIX) and upper.endswith(_MCM)


def forwarded_name(mcm_name: str) -> str:
    """The name in `hman.box/CFD` a forwarding message goes to: `___CAB<name>.mcm` ->
    `<name>.CAB`, `___CMU<GUID>.MCM` -> `<GUID>.CMU`. CmuError for any other name."""
    upper = mcm_name.upper()
    if is_manifest_mcm(mcm_name):
        stem = mcm_name[len(_CAB_PREFIX) : -len(_MCM)]
        if not stem or "/" in stem or stem.startswith("."):
            raise CmuError(f"{mcm_name} does not name a CAB to forward")
        return f"{stem}.CAB"
    if upper.startswith(_CMU_PREFIX) and upper.endswith(_MCM):
        guid = mcm_name[len(_CMU_PREFIX) : -len(_MCM)]
        if not is_guid(guid):
            raise CmuError(f"{mcm_name} does not carry an update package GUID")
        return cmu_name(guid)
    raise CmuError(f"{mcm_name} is not a forwarding message HMAN knows (___CAB*.mcm, ___CMU*.MCM)")


def render_cmu(note: CmuNotification) -> str:
    """The body, as DMPDownloader also logs it (`outerxml is ...`)."""
    return (
        f'<ConfigurationManagerUpdateContent Guid="{note.guid}" State="{int(note.state)}" '
        f'ReportTime="{note.report_time}" />'
    )


def parse_cmu(name: str, data: bytes) -> CmuNotification:
    """The notification in `<GUID>.CMU` named `name`: its GUID (as written), its state and
    report time."""
    stem = name[: -len(".CMU")] if name.upper().endswith(".CMU") else name
    if not is_guid(stem):
        raise CmuError(f"{name}: the file name is not <PackageGuid>.CMU")
    root = parse_xml(
        data,
        what=f"CMU file {name}",
        root="ConfigurationManagerUpdateContent",
        error=CmuError,
        max_bytes=MAX_CMU_BYTES,
    )
    guid = root.get("Guid", "")
    if not is_guid(guid):
        raise CmuError(f"{name}: Guid {guid!r} is not a GUID")
    if guid.upper() != stem.upper():
        raise CmuError(f"{name}: the file names package {stem} but its Guid is {guid}")
    raw = root.get("State", "")
    if not raw.isdigit() or int(raw) not in CMU_STATES:
        allowed = ", ".join(f"{int(s)} ({s.name})" for s in sorted(CMU_STATES))
        raise CmuError(f"{name}: State {raw!r} is not a download state ({allowed})")
    return CmuNotification(guid=guid, state=int(raw), report_time=root.get("ReportTime", ""))
