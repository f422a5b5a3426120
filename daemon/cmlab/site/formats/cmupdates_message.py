"""The CMUpdates replication group's message (docs/hierarchy.md, "The CMUpdates replication
group"): `inboxes/rcm.box/receive/CMUpdates_<FROM>_<seq>.RPL`, UTF-8 JSON that one site's
SMS_REPLICATION_CONFIGURATION_MONITOR writes into a neighbour's inbox.

    {"group": "CMUpdates", "from": "PR1", "to": "CAS", "sites": [...],
     "site_status": [...], "monitoring": [...], "prereq": [...],
     "packages": [...], "easysetup": [...],   (only in a message sent down, from the parent)
     "seq": 7, "time": "2025-01-01T00:00:00"}

The writer (`message_content`, `render_message`) is beside the parser (`parse_message`). A
message crosses a site boundary, so the parser trusts nothing: every key is required, typed
and bounded (`MAX_TEXT`, 64-bit integers, site codes, GUIDs, versions), unknown and duplicate
keys are refused, and anything else raises BadInput (the file goes to BAD). What only the
receiving site's database can tell (the sender is a neighbour, the package columns exist) is
checked when the message is applied (`cmlab.site.sitedb.replication_group.apply_message`).

`content_hash` is the SHA-256 of a message's content without seq and time: a link sends a new
message only when it changes."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmlab.core.errors import BadInput
from cmlab.core.fs import read_regular_file
from cmlab.core.strict_json import strict_loads
from cmlab.site.formats.ids import is_site_code_either_case
from cmlab.site.formats.manifest import GUID_RE, VERSION_RE
from cmlab.site.state_codes import SiteType

__all__ = [
    "DOWN",
    "GROUP",
    "MAX_MESSAGE_BYTES",
    "MAX_TEXT",
    "UP",
    "EasySetupRow",
    "Message",
    "MonitoringRow",
    "PrereqRow",
    "SiteEntry",
    "StatusRow",
    "content_hash",
    "message_content",
    "message_file_name",
    "parse_message",
    "read_message_file",
    "render_message",
]

GROUP = "CMUpdates"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_TEXT = 65536  # any one string in a message (a prerequisite rule's message is the longest)
INT64 = (-(2**63), 2**63 - 1)
COLUMN_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
SITE_TYPES = (SiteType.CAS, SiteType.PRIMARY, SiteType.SECONDARY)
# The two directions of a link: up to the parent, down to a child (which alone gets the
# global rows, "packages" and "easysetup").
UP, DOWN = "up", "down"

# The keys of a message; "packages" and "easysetup" only in one from the parent.
_REQUIRED_KEYS = {"group", "from", "to", "seq", "time", "sites", "site_status", "monitoring"}
_REQUIRED_KEYS |= {"prereq"}
_DOWN_KEYS = {"packages", "easysetup"}


# -- what a message carries ---------------------------------------------------------------------


@dataclass(frozen=True)
class SiteEntry:
    """A site as a message lists it (its ServerData row and, when known, its Sites row)."""

    code: str
    parent: str | None
    site_type: int
    server: str
    version: str | None  # None: the sender knows the site but not its version
    full_version: str | None
    build: int | None


@dataclass(frozen=True)
class StatusRow:
    guid: str
    site: str
    state: int
    flag: int
    run: int


@dataclass(frozen=True)
class MonitoringRow:
    guid: str
    site: str
    substage: int
    is_complete: int
    progress: int
    applicable: int


@dataclass(frozen=True)
class PrereqRow:
    guid: str
    site: str
    server: str
    rule: str
    status: int
    message: str | None


@dataclass(frozen=True)
class EasySetupRow:
    package_id: str
    guid: str
    version: int
    package_hash: str | None


@dataclass(frozen=True)
class Message:
    sender: str
    to: str
    seq: int
    time: str
    sites: tuple[SiteEntry, ...]
    site_status: tuple[StatusRow, ...]
    monitoring: tuple[MonitoringRow, ...]
    prereq: tuple[PrereqRow, ...]
    packages: tuple[dict[str, str | int | None], ...] | None  # None: not a down message
    easysetup: tuple[EasySetupRow, ...] | None


def message_file_name(sender: str, seq: int) -> str:
    return f"{GROUP}_{sender.upper()}_{seq:08d}.RPL"


# -- writing ------------------------------------------------------------------------------------


def message_content(
    sender: str,
    to: str,
    *,
    sites: list[SiteEntry],
    site_status: list[StatusRow],
    monitoring: list[MonitoringRow],
    prereq: list[PrereqRow],
    packages: list[dict[str, Any]] | None = None,
    easysetup: list[EasySetupRow] | None = None,
) -> dict[str, Any]:
    """A message without seq and time (what `content_hash` covers). `packages` and
    `easysetup` are given for a message sent down, to a child, and only then."""
    content: dict[str, Any] = {
        "group": GROUP,
        "from": sender,
        "to": to,
        "sites": [
            {
                "code": s.code,
                "parent": s.parent,
                "type": s.site_type,
                "server": s.server,
                "version": s.version,
                "full_version": s.full_version,
                "build": s.build,
            }
            for s in sites
        ],
        "site_status": [
            {"guid": r.guid, "site": r.site, "state": r.state, "flag": r.flag, "run": r.run}
            for r in site_status
        ],
        "monitoring": [
            {
                "guid": r.guid,
                "site": r.site,
                "substage": r.substage,
                "is_complete": r.is_complete,
                "progress": r.progress,
                "applicable": r.applicable,
            }
            for r in monitoring
        ],
        "prereq": [
            {
                "guid": r.guid,
                "site": r.site,
                "server": r.server,
                "rule": r.rule,
                "status": r.status,
                "message": r.message,
            }
            for r in prereq
        ],
    }
    if packages is not None:
        content["packages"] = packages
        content["easysetup"] = [
            {
                "PackageID": r.package_id,
                "PackageGuid": r.guid,
                "PackageVersion": r.version,
                "PackageHash": r.package_hash,
            }
            for r in easysetup or ()
        ]
    return content


def content_hash(content: dict[str, Any]) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest().upper()


def render_message(content: dict[str, Any], seq: int, time: str) -> bytes:
    """The message file: the content with its seq and time."""
    message = {**content, "seq": seq, "time": time}
    return json.dumps(message, ensure_ascii=False, indent=1).encode("utf-8")


# -- reading ------------------------------------------------------------------------------------


def read_message_file(path: Path) -> bytes:
    try:
        return read_regular_file(path, MAX_MESSAGE_BYTES)
    except ValueError as exc:
        raise BadInput(f"the message cannot be read: {exc}") from None


def _obj(
    value: Any, where: str, keys: set[str], optional: frozenset[str] | set[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadInput(f"{where} is not an object")
    missing = keys - value.keys()
    if missing:
        raise BadInput(f"{where} has no {', '.join(sorted(missing))}")
    extra = value.keys() - keys - optional
    if extra:
        raise BadInput(f"{where} has unexpected keys {', '.join(sorted(extra))}")
    return value


def _int(obj: dict[str, Any], key: str, where: str, *, nullable: bool = False) -> Any:
    value = obj[key]
    if value is None and nullable:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadInput(f"{where}.{key} is not an integer: {value!r:.80}")
    if not INT64[0] <= value <= INT64[1]:
        raise BadInput(f"{where}.{key} is out of range")
    return value


def _str(obj: dict[str, Any], key: str, where: str, *, nullable: bool = False) -> Any:
    value = obj[key]
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise BadInput(f"{where}.{key} is not a string: {value!r:.80}")
    if len(value) > MAX_TEXT:
        raise BadInput(f"{where}.{key} is longer than {MAX_TEXT} characters")
    return value


def _code(obj: dict[str, Any], key: str, where: str, *, nullable: bool = False) -> Any:
    value = _str(obj, key, where, nullable=nullable)
    if value is None:
        return None
    if not is_site_code_either_case(value):
        raise BadInput(f"{where}.{key} is not a site code (three letters or digits): {value!r:.80}")
    return value.upper()


def _guid(obj: dict[str, Any], key: str, where: str) -> str:
    value = _str(obj, key, where)
    if not GUID_RE.match(value):
        raise BadInput(f"{where}.{key} is not a GUID: {value!r:.80}")
    return str(value).upper()


def _list(message: dict[str, Any], key: str) -> list[Any]:
    value = message[key]
    if not isinstance(value, list):
        raise BadInput(f"{key} is not a list")
    return value


def _site(value: Any, where: str) -> SiteEntry:
    keys = {"code", "parent", "type", "server", "version", "full_version", "build"}
    o = _obj(value, where, keys)
    site_type = _int(o, "type", where)
    if site_type not in SITE_TYPES:  # 4 CAS, 2 primary, 1 secondary
        raise BadInput(f"{where}.type is not a site type (4, 2 or 1): {site_type}")
    entry = SiteEntry(
        code=_code(o, "code", where),
        parent=_code(o, "parent", where, nullable=True),
        site_type=site_type,
        server=_str(o, "server", where),
        version=_str(o, "version", where, nullable=True),
        full_version=_str(o, "full_version", where, nullable=True),
        build=_int(o, "build", where, nullable=True),
    )
    versions = (entry.version, entry.full_version, entry.build)
    if any(v is None for v in versions) and any(v is not None for v in versions):
        raise BadInput(f"{where} has only part of a version")
    for v in (entry.version, entry.full_version):
        if v is not None and not VERSION_RE.match(v):
            raise BadInput(f"{where} has a version that is not n.n.n.n: {v!r:.80}")
    return entry


def _status(value: Any, where: str) -> StatusRow:
    o = _obj(value, where, {"guid", "site", "state", "flag", "run"})
    return StatusRow(
        guid=_guid(o, "guid", where),
        site=_code(o, "site", where),
        state=_int(o, "state", where),
        flag=_int(o, "flag", where),
        run=_int(o, "run", where),
    )


def _monitoring(value: Any, where: str) -> MonitoringRow:
    keys = {"guid", "site", "substage", "is_complete", "progress", "applicable"}
    o = _obj(value, where, keys)
    return MonitoringRow(
        guid=_guid(o, "guid", where),
        site=_code(o, "site", where),
        substage=_int(o, "substage", where),
        is_complete=_int(o, "is_complete", where),
        progress=_int(o, "progress", where),
        applicable=_int(o, "applicable", where),
    )


def _prereq(value: Any, where: str) -> PrereqRow:
    o = _obj(value, where, {"guid", "site", "server", "rule", "status", "message"})
    return PrereqRow(
        guid=_guid(o, "guid", where),
        site=_code(o, "site", where),
        server=_str(o, "server", where),
        rule=_str(o, "rule", where),
        status=_int(o, "status", where),
        message=_str(o, "message", where, nullable=True),
    )


def _package(value: Any, where: str) -> dict[str, str | int | None]:
    """A CM_UpdatePackages row by column name: strings, integers and nulls only (the column
    names and types are checked against this database's table when applied)."""
    if not isinstance(value, dict):
        raise BadInput(f"{where} is not an object")
    out: dict[str, str | int | None] = {}
    for key, item in value.items():
        if not COLUMN_RE.match(key):
            raise BadInput(f"{where} has a key that is not a column name: {key!r:.80}")
        if item is None:
            out[key] = None
        elif isinstance(item, int) and not isinstance(item, bool):
            out[key] = _int(value, key, where)
        else:
            out[key] = _str(value, key, where)
    if "PackageGuid" not in out or "Name" not in out:
        raise BadInput(f"{where} has no PackageGuid or Name")
    out["PackageGuid"] = _guid(out, "PackageGuid", where)
    _str(out, "Name", where)
    return out


def _easysetup(value: Any, where: str) -> EasySetupRow:
    keys = {"PackageID", "PackageGuid", "PackageVersion", "PackageHash"}
    o = _obj(value, where, keys)
    package_id = _str(o, "PackageID", where)
    if not re.fullmatch(r"[A-Za-z0-9]{1,16}", package_id):
        raise BadInput(f"{where}.PackageID is not a package ID: {package_id!r:.80}")
    return EasySetupRow(
        package_id=package_id.upper(),
        guid=_guid(o, "PackageGuid", where),
        version=_int(o, "PackageVersion", where),
        package_hash=_str(o, "PackageHash", where, nullable=True),
    )


def parse_message(data: bytes) -> Message:
    """A CMUpdates message, checked field by field; anything else raises BadInput (the file
    goes to BAD). What only the site database can tell (the sender is a neighbour, the
    package columns exist) `apply_message` checks."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"the message is not UTF-8: {exc}") from exc
    try:
        doc = strict_loads(text)
    except ValueError as exc:  # JSONDecodeError is one
        raise BadInput(f"the message is not JSON (truncated?): {exc}") from exc
    m = _obj(doc, "the message", _REQUIRED_KEYS, _DOWN_KEYS)
    if m["group"] != GROUP:
        raise BadInput(f"the message is not of the {GROUP} replication group: {m['group']!r:.80}")
    if (m.keys() & _DOWN_KEYS) and not (m.keys() >= _DOWN_KEYS):
        raise BadInput("the message has only one of packages and easysetup")
    seq = _int(m, "seq", "the message")
    if seq < 1:
        raise BadInput(f"the message's seq is not positive: {seq}")

    def each(key: str, parse: Any) -> tuple[Any, ...]:
        return tuple(parse(v, f"{key}[{i}]") for i, v in enumerate(_list(m, key)))

    down = "packages" in m
    return Message(
        sender=_code(m, "from", "the message"),
        to=_code(m, "to", "the message"),
        seq=seq,
        time=_str(m, "time", "the message"),
        sites=each("sites", _site),
        site_status=each("site_status", _status),
        monitoring=each("monitoring", _monitoring),
        prereq=each("prereq", _prereq),
        packages=each("packages", _package) if down else None,
        easysetup=each("easysetup", _easysetup) if down else None,
    )
