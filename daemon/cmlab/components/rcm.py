"""SMS_REPLICATION_CONFIGURATION_MONITOR (rcmctrl.log): the CMUpdates replication group
(docs/hierarchy.md, "The CMUpdates replication group").

Every `replication.cmupdates_interval` seconds, and right away at start, each site sends one
message per link (its parent, each direct child with an address) into the other site's
`inboxes/rcm.box/receive/` when the content for that link changed since the last message
sent on it:

- up (to the parent): the site rows of every site in this site's subtree;
- down (to a child): the site rows of every site outside the child's subtree, and the global
  rows (CM_UpdatePackages, EasySetupSettings).

A receiver applies a message in one transaction. It takes rows only about the sites the
sender is authoritative for (a child: its own subtree; the parent: everything outside this
site's subtree), so never rows about itself.

The sending and applying are plain functions on a sqlite3 connection (`prepare_message`,
`record_sent`, `parse_message`, `apply_message`); the component only schedules them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import sqlite3
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmlab.core.fs import read_regular_file, write_atomic
from cmlab.core.strictjson import strict_loads
from cmlab.site.component import Component, SiteContext, utc_now_iso
from cmlab.site.formats.manifest import GUID_RE, VERSION_RE
from cmlab.site.inbox import BadInput, Outcome
from cmlab.site.sitedb import hierarchy, servicing
from cmlab.site.statecodes import PackageState

S = PackageState

GROUP = "CMUpdates"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_TEXT = 65536  # any one string in a message (a prerequisite rule's message is the longest)
INT64 = (-(2**63), 2**63 - 1)
SITE_CODE_RE = re.compile(r"^[A-Za-z0-9]{3}$")
COLUMN_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
SITE_TYPES = (hierarchy.CAS, hierarchy.PRIMARY, hierarchy.SECONDARY)
UP, DOWN = "up", "down"

# The keys of a message; "packages" and "easysetup" only in one from the parent.
_REQUIRED_KEYS = {"group", "from", "to", "seq", "time", "sites", "site_status", "monitoring"}
_REQUIRED_KEYS |= {"prereq"}
_DOWN_KEYS = {"packages", "easysetup"}


# -- what a message carries ---------------------------------------------------------------------


@dataclass(frozen=True)
class SiteFacts:
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
    sites: tuple[SiteFacts, ...]
    site_status: tuple[StatusRow, ...]
    monitoring: tuple[MonitoringRow, ...]
    prereq: tuple[PrereqRow, ...]
    packages: tuple[dict[str, str | int | None], ...] | None  # None: not a down message
    easysetup: tuple[EasySetupRow, ...] | None


@dataclass(frozen=True)
class Link:
    code: str
    folder: str  # the other site's folder as this site reaches it (ServerData.SiteFolder)
    direction: str  # UP (the parent) or DOWN (a child)


@dataclass(frozen=True)
class Outgoing:
    link: str
    seq: int
    content_hash: str
    data: bytes
    status_rows: int


@dataclass(frozen=True)
class Applied:
    sender: str
    seq: int
    stale: bool
    last_seq: int  # LastReceivedSeq before this message
    changes: int
    progress: tuple[tuple[str, int], ...] = ()  # child_run_progress's (update, state) changes


def message_file_name(sender: str, seq: int) -> str:
    return f"{GROUP}_{sender.upper()}_{seq:08d}.RPL"


# -- sending ------------------------------------------------------------------------------------


def links(conn: sqlite3.Connection) -> list[Link]:
    """The parent and every direct child (primaries and secondaries) with an address."""
    out = []
    parent = hierarchy.parent_site(conn)
    if parent is not None and parent.folder:
        out.append(Link(parent.code, parent.folder, UP))
    for child in hierarchy.child_sites(conn):
        if child.folder:
            out.append(Link(child.code, child.folder, DOWN))
    return out


def _direction(conn: sqlite3.Connection, code: str) -> str:
    parent = hierarchy.parent_site(conn)
    if parent is not None and parent.code == code.upper():
        return UP
    if any(c.code == code.upper() for c in hierarchy.child_sites(conn)):
        return DOWN
    raise LookupError(f"site {code} is neither this site's parent nor one of its child sites")


def _link_sites(conn: sqlite3.Connection, code: str, direction: str) -> set[str]:
    local = hierarchy.local_site(conn)
    if direction == UP:
        return hierarchy.subtree_codes(conn, local.code)
    below = hierarchy.subtree_codes(conn, code)
    return {s.code for s in hierarchy.all_sites(conn)} - below


def build_content(conn: sqlite3.Connection, code: str) -> dict[str, Any]:
    """The message for the link to site `code`, without seq and time (what the hash covers)."""
    direction = _direction(conn, code)
    local = hierarchy.local_site(conn)
    wanted = _link_sites(conn, code, direction)
    sites = []
    for r in conn.execute(
        "SELECT sd.SiteCode, sd.ParentSiteCode, sd.SiteType, sd.SiteServerName, s.Version, "
        "s.FullVersion, s.BuildNumber FROM ServerData sd "
        "LEFT JOIN Sites s ON s.SiteCode = sd.SiteCode ORDER BY upper(sd.SiteCode)"
    ):
        if str(r[0]).upper() not in wanted:
            continue
        sites.append(
            {
                "code": str(r[0]).upper(),
                "parent": str(r[1]).upper() if r[1] else None,
                "type": int(r[2]),
                "server": str(r[3] or ""),
                "version": None if r[4] is None else str(r[4]),
                "full_version": None if r[5] is None else str(r[5]),
                "build": None if r[6] is None else int(r[6]),
            }
        )

    def rows(sql: str) -> Iterable[tuple[Any, ...]]:
        return (r for r in conn.execute(sql) if str(r[1]).upper() in wanted)

    site_status = [
        {"guid": str(g).upper(), "site": str(c).upper(), "state": st, "flag": f, "run": run}
        for g, c, st, f, run in rows(
            "SELECT ss.PackageGuid, sd.SiteCode, ss.State, ss.Flag, ss.RunNumber "
            "FROM CM_UpdatePackageSiteStatus ss JOIN ServerData sd ON sd.ID = ss.SiteNumber "
            "ORDER BY upper(ss.PackageGuid), upper(sd.SiteCode)"
        )
    ]
    monitoring = [
        {
            "guid": str(g).upper(),
            "site": str(c).upper(),
            "substage": sub,
            "is_complete": done,
            "progress": prog,
            "applicable": app,
        }
        for g, c, sub, done, prog, app in rows(
            "SELECT m.PackageGuid, sd.SiteCode, m.SubStageID, m.IsComplete, m.Progress, "
            "m.Applicable FROM CM_UpdatePackage_MonitoringStatus m "
            "JOIN ServerData sd ON sd.ID = m.SiteNumber "
            "ORDER BY upper(m.PackageGuid), upper(sd.SiteCode), m.SubStageID"
        )
    ]
    prereq = [
        {
            "guid": str(g).upper(),
            "site": str(c).upper(),
            "server": server,
            "rule": rule,
            "status": status,
            "message": message,
        }
        for g, c, server, rule, status, message in rows(
            "SELECT p.PackageGuid, sd.SiteCode, p.ServerName, p.RuleName, p.Status, p.Message "
            "FROM CM_UpdatePackagePrereqStatus p JOIN ServerData sd ON sd.ID = p.SiteNumber "
            "ORDER BY upper(p.PackageGuid), upper(sd.SiteCode), p.ServerName, p.RuleName"
        )
    ]
    content: dict[str, Any] = {
        "group": GROUP,
        "from": local.code,
        "to": code.upper(),
        "sites": sites,
        "site_status": site_status,
        "monitoring": monitoring,
        "prereq": prereq,
    }
    if direction == DOWN:
        cur = conn.execute("SELECT * FROM CM_UpdatePackages ORDER BY upper(PackageGuid)")
        names = [d[0] for d in cur.description]
        content["packages"] = [dict(zip(names, r, strict=True)) for r in cur]
        content["easysetup"] = [
            {"PackageID": pid, "PackageGuid": g, "PackageVersion": v, "PackageHash": h}
            for pid, g, v, h in conn.execute(
                "SELECT PackageID, PackageGuid, PackageVersion, PackageHash "
                "FROM EasySetupSettings ORDER BY upper(PackageID)"
            )
        ]
    return content


def content_hash(content: dict[str, Any]) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest().upper()


def prepare_message(conn: sqlite3.Connection, code: str, now: str) -> Outgoing | None:
    """The next message on the link to `code`, or None when its content is what was last sent.

    The seq is reserved here (LastSentSeq, in the caller's transaction) and the hash recorded
    only once the file is written (`record_sent`): a send interrupted in between is sent again
    with a new seq, never with one the receiver may have taken already for other content."""
    content = build_content(conn, code)
    digest = content_hash(content)
    row = conn.execute(
        "SELECT LastSentSeq, LastSentHash FROM ReplicationLinks WHERE SiteCode = ?", (code,)
    ).fetchone()
    last_seq, last_hash = (int(row[0]), row[1]) if row else (0, None)
    if last_hash == digest:
        return None
    seq = last_seq + 1
    conn.execute(
        "INSERT INTO ReplicationLinks (SiteCode, LastSentSeq) VALUES (?, ?) "
        "ON CONFLICT (SiteCode) DO UPDATE SET LastSentSeq = excluded.LastSentSeq",
        (code.upper(), seq),
    )
    message = {**content, "seq": seq, "time": now}
    data = json.dumps(message, ensure_ascii=False, indent=1).encode("utf-8")
    return Outgoing(code.upper(), seq, digest, data, len(content["site_status"]))


def record_sent(conn: sqlite3.Connection, code: str, seq: int, digest: str) -> None:
    conn.execute(
        "UPDATE ReplicationLinks SET LastSentHash = ?, "
        "LastSentTime = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE SiteCode = ? "
        "AND LastSentSeq = ?",
        (digest, code.upper(), seq),
    )


def receive_folder(site_folder: str, relative_to: Path) -> Path:
    """Another site's CMUpdates inbox; a relative address is taken from this site's folder."""
    root = Path(site_folder)
    if not root.is_absolute():
        root = relative_to / root
    return root / "inboxes" / "rcm.box" / "receive"


def write_message(folder: Path, name: str, data: bytes) -> Path:
    """Into the other site's inbox through a temporary name in that same folder. Never creates
    the other site's folders: a missing inbox means the site is not reachable (yet)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"the folder {folder} does not exist")
    path = folder / name
    write_atomic(path, data)
    return path


# -- receiving: parsing -------------------------------------------------------------------------


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
    if not SITE_CODE_RE.match(value):
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


def _site(value: Any, where: str) -> SiteFacts:
    keys = {"code", "parent", "type", "server", "version", "full_version", "build"}
    o = _obj(value, where, keys)
    site_type = _int(o, "type", where)
    if site_type not in SITE_TYPES:
        raise BadInput(f"{where}.type is not a site type (4, 2 or 1): {site_type}")
    facts = SiteFacts(
        code=_code(o, "code", where),
        parent=_code(o, "parent", where, nullable=True),
        site_type=site_type,
        server=_str(o, "server", where),
        version=_str(o, "version", where, nullable=True),
        full_version=_str(o, "full_version", where, nullable=True),
        build=_int(o, "build", where, nullable=True),
    )
    versions = (facts.version, facts.full_version, facts.build)
    if any(v is None for v in versions) and any(v is not None for v in versions):
        raise BadInput(f"{where} has only part of a version")
    for v in (facts.version, facts.full_version):
        if v is not None and not VERSION_RE.match(v):
            raise BadInput(f"{where} has a version that is not n.n.n.n: {v!r:.80}")
    return facts


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


# -- receiving: applying ------------------------------------------------------------------------


def _closure(root: str, parents: dict[str, str | None]) -> set[str]:
    found = {root}
    grew = True
    while grew:
        grew = False
        for code, parent in parents.items():
            if parent in found and code not in found:
                found.add(code)
                grew = True
    return found


def authoritative_sites(conn: sqlite3.Connection, msg: Message, direction: str) -> set[str]:
    """The listed sites the sender speaks for: a child, the sites of its subtree; the parent,
    every site outside this site's subtree. Never this site.

    Where a site is comes from this database, and for a site it does not know yet from the
    message: a sender cannot move a site this database already places elsewhere (a child
    claiming its parent or a sibling, the parent claiming one of this site's children)."""
    local = hierarchy.local_site(conn)
    known: dict[str, str | None] = {s.code: s.parent for s in hierarchy.all_sites(conn)}
    placed = dict(known)
    for s in msg.sites:
        if s.code not in known:
            placed[s.code] = s.parent
    listed = {s.code for s in msg.sites}
    if direction == UP:  # from a child, which sends up
        return (_closure(msg.sender, placed) & listed) - {local.code}
    return listed - _closure(local.code, placed)


def _site_number(conn: sqlite3.Connection, code: str) -> int:
    found = hierarchy.site_by_code(conn, code)
    if found is None:
        raise LookupError(f"ServerData has no site {code}")
    return found.number


def _apply_site(conn: sqlite3.Connection, s: SiteFacts) -> int:
    before = hierarchy.site_by_code(conn, s.code)
    hierarchy.ensure_site(conn, s.code, parent=s.parent, site_type=s.site_type, server=s.server)
    after = hierarchy.site_by_code(conn, s.code)
    changes = int(before != after)
    if s.version is not None and s.full_version is not None and s.build is not None:
        changes += hierarchy.set_site_version(
            conn,
            s.code,
            version=s.version,
            full_version=s.full_version,
            build=s.build,
            reporting_site=s.parent,
            server=s.server,
            site_type=s.site_type,
        )
    return changes


def _apply_status(conn: sqlite3.Connection, row: StatusRow, number: int) -> int:
    package_run = conn.execute(
        "SELECT RunNumber FROM CM_UpdatePackages WHERE PackageGuid = ?", (row.guid,)
    ).fetchone()
    if package_run is not None and row.run < int(package_run[0]):
        return 0  # a row of an earlier run than this database's: the site has not caught up
    current = conn.execute(
        "SELECT State, Flag, RunNumber FROM CM_UpdatePackageSiteStatus "
        "WHERE PackageGuid = ? AND SiteNumber = ?",
        (row.guid, number),
    ).fetchone()
    if current is not None:
        state, flag, run = (int(v) for v in current)
        if (state, flag, run) == (row.state, row.flag, row.run) or row.run < run:
            return 0
        # The Sender's verdict: this site gave up sending the Easy Setup Package to that child
        # and recorded CONTENT_REPLICATION_FAILED for it (spCMUSetSiteState with site_code).
        # The child itself only knows it is still waiting (ENABLED, CONTENT_REPLICATING), and
        # its report of the same run must not erase the verdict, or the roll-up would wait
        # forever. A later state (the package arrived after all) or a new run replaces it.
        if (
            state == S.CONTENT_REPLICATION_FAILED
            and row.run == run
            and row.state in (S.ENABLED, S.CONTENT_REPLICATING)
        ):
            return 0
    conn.execute(
        "INSERT INTO CM_UpdatePackageSiteStatus (PackageGuid, SiteNumber, State, Flag, RunNumber) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (PackageGuid, SiteNumber) DO UPDATE SET "
        "State = excluded.State, Flag = excluded.Flag, RunNumber = excluded.RunNumber, "
        "UpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now')",
        (row.guid, number, row.state, row.flag, row.run),
    )
    return 1


def _apply_monitoring(conn: sqlite3.Connection, row: MonitoringRow, number: int) -> int:
    cur = conn.execute(
        "INSERT INTO CM_UpdatePackage_MonitoringStatus (PackageGuid, SiteNumber, SubStageID, "
        "IsComplete, Progress, Applicable) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (PackageGuid, SiteNumber, SubStageID) DO UPDATE SET "
        "IsComplete = excluded.IsComplete, Progress = excluded.Progress, "
        "Applicable = excluded.Applicable, MessageTime = strftime('%Y-%m-%d %H:%M:%f', 'now') "
        "WHERE IsComplete <> excluded.IsComplete OR Progress <> excluded.Progress "
        "OR Applicable <> excluded.Applicable",
        (row.guid, number, row.substage, row.is_complete, row.progress, row.applicable),
    )
    return cur.rowcount


def _apply_prereq(conn: sqlite3.Connection, rows: list[PrereqRow], sites: dict[str, int]) -> int:
    """A site's prerequisite rows are the sender's whole set for it (CMUpdate clears them
    before each check): rows it no longer has go here too."""
    changes = 0
    keep: set[tuple[str, int, str, str]] = set()
    for row in rows:
        number = sites[row.site]
        keep.add((row.guid.upper(), number, row.server, row.rule))
        cur = conn.execute(
            "INSERT INTO CM_UpdatePackagePrereqStatus (PackageGuid, SiteNumber, ServerName, "
            "RuleName, Status, Message) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (PackageGuid, SiteNumber, ServerName, RuleName) DO UPDATE SET "
            "Status = excluded.Status, Message = excluded.Message, "
            "MessageTime = strftime('%Y-%m-%d %H:%M:%f', 'now') "
            "WHERE Status <> excluded.Status OR Message IS NOT excluded.Message",
            (row.guid, number, row.server, row.rule, row.status, row.message),
        )
        changes += cur.rowcount
    for number in sites.values():
        for guid, server, rule in conn.execute(
            "SELECT PackageGuid, ServerName, RuleName FROM CM_UpdatePackagePrereqStatus "
            "WHERE SiteNumber = ?",
            (number,),
        ).fetchall():
            if (str(guid).upper(), number, server, rule) not in keep:
                conn.execute(
                    "DELETE FROM CM_UpdatePackagePrereqStatus WHERE PackageGuid = ? "
                    "AND SiteNumber = ? AND ServerName = ? AND RuleName = ?",
                    (guid, number, server, rule),
                )
                changes += 1
    return changes


def _package_columns(conn: sqlite3.Connection) -> dict[str, tuple[str, bool]]:
    """CM_UpdatePackages' columns: name -> (declared type, NOT NULL)."""
    return {
        str(r[1]): (str(r[2]).upper(), bool(r[3]))
        for r in conn.execute("PRAGMA table_info(CM_UpdatePackages)")
    }


def _apply_package(
    conn: sqlite3.Connection, row: dict[str, str | int | None], columns: dict[str, tuple[str, bool]]
) -> int:
    for name, value in row.items():
        if name not in columns:
            raise BadInput(f"packages: CM_UpdatePackages has no column {name}")
        declared, not_null = columns[name]
        if value is None and not_null:
            raise BadInput(f"packages: {name} of {row['PackageGuid']} is null")
        if value is not None and declared == "INTEGER" and not isinstance(value, int):
            raise BadInput(f"packages: {name} of {row['PackageGuid']} is not an integer")
    names = list(row)
    current = conn.execute(
        f"SELECT {', '.join(names)} FROM CM_UpdatePackages WHERE PackageGuid = ?",
        (row["PackageGuid"],),
    ).fetchone()
    if current is None:
        conn.execute(
            f"INSERT INTO CM_UpdatePackages ({', '.join(names)}) "
            f"VALUES ({', '.join('?' for _ in names)})",
            [row[n] for n in names],
        )
        return 1
    # Only the columns that differ: an UPDATE naming State fires CM_UpdatePackages_UPD_HMAN
    # (SMSDBMon) even when the value is the same.
    changed = [
        n for n, old in zip(names, current, strict=True) if n != "PackageGuid" and old != row[n]
    ]
    if not changed:
        return 0
    conn.execute(
        f"UPDATE CM_UpdatePackages SET {', '.join(f'{n} = ?' for n in changed)} "
        "WHERE PackageGuid = ?",
        [*(row[n] for n in changed), row["PackageGuid"]],
    )
    return 1


def _apply_easysetup(conn: sqlite3.Connection, row: EasySetupRow) -> int:
    """This site's despooler writes the same row when the package arrives; the replicated
    PackageHash wins (it is what the content must match, servicing.mark_replicated_content)."""
    current = conn.execute(
        "SELECT PackageGuid, PackageVersion, PackageHash FROM EasySetupSettings "
        "WHERE PackageID = ?",
        (row.package_id,),
    ).fetchone()
    if current is None:
        conn.execute(
            "INSERT INTO EasySetupSettings (PackageID, PackageGuid, PackageVersion, PackageHash) "
            "VALUES (?, ?, ?, ?)",
            (row.package_id, row.guid, row.version, row.package_hash),
        )
        return 1
    wanted = {
        "PackageGuid": row.guid,
        "PackageVersion": row.version,
        "PackageHash": row.package_hash,
    }
    have = dict(zip(wanted, current, strict=True))
    have["PackageGuid"] = str(have["PackageGuid"] or "").upper() or None
    # Only the columns that differ: an UPDATE naming PackageHash drops HMAN's <GUID>.CME.
    changed = [n for n in wanted if have[n] != wanted[n]]
    if not changed:
        return 0
    conn.execute(
        f"UPDATE EasySetupSettings SET {', '.join(f'{n} = ?' for n in changed)}, "
        "LastUpdateTime = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE PackageID = ?",
        [*(wanted[n] for n in changed), row.package_id],
    )
    return 1


def apply_message(conn: sqlite3.Connection, msg: Message) -> Applied:
    """Apply a parsed message in the caller's transaction. Replaying it changes nothing: every
    write happens only where a value differs, and an old seq is not applied at all."""
    local = hierarchy.local_site(conn)
    if msg.to != local.code:
        raise BadInput(f"the message is for site {msg.to}, not this site ({local.code})")
    if msg.sender == local.code:
        raise BadInput(f"the message claims to come from this site ({local.code})")
    try:
        direction = _direction(conn, msg.sender)
    except LookupError as exc:
        raise BadInput(str(exc)) from exc
    from_parent = direction == UP  # the sender is this site's parent: it sent "down"
    if from_parent and msg.packages is None:
        raise BadInput(f"the message from the parent site {msg.sender} has no packages")
    if not from_parent and msg.packages is not None:
        raise BadInput(f"the child site {msg.sender} sent packages; only the parent does")
    listed = {s.code for s in msg.sites}
    for s in msg.sites:
        if not from_parent and s.code == msg.sender and s.parent != local.code:
            raise BadInput(f"the child site {msg.sender} says its parent is {s.parent}")
    for row in (*msg.site_status, *msg.monitoring, *msg.prereq):
        if row.site not in listed:
            raise BadInput(f"the message has rows of site {row.site} but does not list it")

    last = conn.execute(
        "SELECT LastReceivedSeq FROM ReplicationLinks WHERE SiteCode = ?", (msg.sender,)
    ).fetchone()
    last_seq = int(last[0]) if last else 0
    if msg.seq <= last_seq:
        return Applied(msg.sender, msg.seq, stale=True, last_seq=last_seq, changes=0)

    # From the parent it was sent down (the sites outside this one's subtree); from a child up.
    speaks_for = authoritative_sites(conn, msg, DOWN if from_parent else UP)
    # Nor may it hang a site it speaks for where it does not speak (below this site, say).
    below_local = hierarchy.subtree_codes(conn, local.code)
    for s in msg.sites:
        if s.code not in speaks_for:
            continue
        if from_parent and s.parent is not None and s.parent in below_local:
            raise BadInput(f"the parent site {msg.sender} places site {s.code} below this site")
        if not from_parent and s.code != msg.sender and s.parent not in speaks_for | {msg.sender}:
            raise BadInput(f"the child site {msg.sender} places site {s.code} outside its subtree")
    changes = 0
    for s in msg.sites:
        if s.code in speaks_for:
            changes += _apply_site(conn, s)
    numbers = {code: _site_number(conn, code) for code in speaks_for}
    if from_parent:
        # The packages first: a site status row is judged against their run numbers.
        columns = _package_columns(conn)
        for package in msg.packages or ():
            changes += _apply_package(conn, package, columns)
        for esp in msg.easysetup or ():
            changes += _apply_easysetup(conn, esp)
    for status in msg.site_status:
        if status.site in numbers:
            changes += _apply_status(conn, status, numbers[status.site])
    for mon in msg.monitoring:
        if mon.site in numbers:
            changes += _apply_monitoring(conn, mon, numbers[mon.site])
    changes += _apply_prereq(conn, [p for p in msg.prereq if p.site in numbers], numbers)
    progress: list[tuple[str, int]] = []
    if from_parent:
        progress = servicing.child_run_progress(conn)
    conn.execute(
        "INSERT INTO ReplicationLinks (SiteCode, LastReceivedSeq, LastReceivedTime) "
        "VALUES (?, ?, strftime('%Y-%m-%d %H:%M:%f', 'now')) ON CONFLICT (SiteCode) DO UPDATE "
        "SET LastReceivedSeq = excluded.LastReceivedSeq, "
        "LastReceivedTime = excluded.LastReceivedTime",
        (msg.sender, msg.seq),
    )
    return Applied(msg.sender, msg.seq, False, last_seq, changes, tuple(progress))


# -- the component ------------------------------------------------------------------------------


class ReplicationMonitor(Component):
    component = "SMS_REPLICATION_CONFIGURATION_MONITOR"
    log_file = "rcmctrl.log"

    def __init__(self, ctx: SiteContext) -> None:
        super().__init__(ctx)
        self._busy = asyncio.Lock()
        self._poked = asyncio.Event()

    async def start(self) -> None:
        self.spawn(self._loop(), "cmupdates")

    def poke(self) -> None:
        """Send what changed now rather than at the next interval."""
        self._poked.set()

    async def _loop(self) -> None:
        interval = self.config.replication.cmupdates_interval
        while True:
            self._poked.clear()
            try:
                await self.replicate()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The loop is the group's only sender: it must outlive any one bad pass.
                self.say(f"ERROR: Failed to replicate the {GROUP} group: {exc}", level="error")
                traceback.print_exc(file=sys.stderr)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), interval if interval > 0 else None)

    def _retry_text(self) -> str:
        interval = self.config.replication.cmupdates_interval
        if interval > 0:
            return f"Will retry in {interval:g} seconds."
        return "Will retry at the next replication pass."

    async def replicate(self) -> list[Outgoing]:
        """One pass over the links: the messages sent."""
        sent = []
        async with self._busy:
            for link in await self.db.read(links):
                out = await self._send(link)
                if out is not None:
                    sent.append(out)
        return sent

    async def _send(self, link: Link) -> Outgoing | None:
        folder = receive_folder(link.folder, self.paths.root)
        if not folder.is_dir():
            # Checked before a seq is reserved, so an unreachable site does not use one up
            # every pass; write_message checks again.
            self._cannot(link, f"the folder {folder} does not exist")
            return None
        out = await self.db.tx(prepare_message, link.code, utc_now_iso())
        if out is None:
            return None
        name = message_file_name(self.config.site_code, out.seq)
        try:
            await self.in_thread(write_message, folder, name, out.data)
        except OSError as exc:
            self._cannot(link, exc.strerror or str(exc) if not exc.filename else str(exc))
            return None
        await self.db.tx(record_sent, link.code, out.seq, out.content_hash)
        self.say(
            f"Sent {GROUP} replication group message {out.seq} to site {link.code} "
            f"({out.status_rows} site status rows)."
        )
        return out

    def _cannot(self, link: Link, reason: str) -> None:
        self.say(
            f"WARNING: Cannot replicate the {GROUP} group to site {link.code}: {reason}. "
            f"{self._retry_text()}",
            level="warning",
        )

    async def on_replication_message(self, path: Path) -> Outcome:
        data = await self.in_thread(read_message_file, path)
        msg = parse_message(data)
        applied = await self.db.tx(apply_message, msg)
        if applied.stale:
            self.say(
                f"Ignored {GROUP} replication group message {msg.seq} from site {msg.sender}: "
                f"message {applied.last_seq} was received already."
            )
            return Outcome.DONE
        self.say(
            f"Received {GROUP} replication group message {msg.seq} from site {msg.sender}: "
            f"applied {applied.changes} changes."
        )
        for guid, state in applied.progress:
            self.say(f"Update {guid} is now {PackageState.name_of(state)} ({state}) at this site.")
        if applied.changes or applied.progress:
            # What arrived may change what this site sends on its other links (a relay).
            self.poke()
        return Outcome.DONE
