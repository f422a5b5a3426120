"""The CMUpdates replication group in the site database (docs/hierarchy.md, "The CMUpdates
replication group"): what a site sends on each link and how it applies what it receives.
ReplicationLinks holds each link's sequence numbers and the hash of what was last sent.

- up (to the parent) a message carries the site rows of every site in this site's subtree;
- down (to a child) the site rows of every site outside the child's subtree, and the global
  rows (CM_UpdatePackages, EasySetupSettings).

A receiver applies a message in one transaction (`apply_message`). It takes rows only about
the sites the sender is authoritative for (a child: its own subtree; the parent: everything
outside this site's subtree), so never rows about itself. Replaying a message changes
nothing: every write happens only where a value differs, and an old seq is not applied.

Each function runs inside the caller's transaction; the message's format is
`cmlab.site.formats.cmupdates_message`, the component that schedules these is
`cmlab.components.rcm`."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from cmlab.core.errors import BadInput
from cmlab.site.formats.cmupdates_message import (
    DOWN,
    UP,
    EasySetupRow,
    Message,
    MonitoringRow,
    PrereqRow,
    SiteEntry,
    StatusRow,
    content_hash,
    message_content,
    render_message,
)
from cmlab.site.sitedb import hierarchy, servicing
from cmlab.site.state_codes import PackageState

__all__ = [
    "Applied",
    "Link",
    "Outgoing",
    "apply_message",
    "authoritative_sites",
    "build_content",
    "links",
    "prepare_message",
    "record_sent",
]


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


def _site_entries(conn: sqlite3.Connection, wanted: set[str]) -> list[SiteEntry]:
    return [
        SiteEntry(
            code=str(r[0]).upper(),
            parent=str(r[1]).upper() if r[1] else None,
            site_type=int(r[2]),
            server=str(r[3] or ""),
            version=None if r[4] is None else str(r[4]),
            full_version=None if r[5] is None else str(r[5]),
            build=None if r[6] is None else int(r[6]),
        )
        for r in conn.execute(
            "SELECT sd.SiteCode, sd.ParentSiteCode, sd.SiteType, sd.SiteServerName, s.Version, "
            "s.FullVersion, s.BuildNumber FROM ServerData sd "
            "LEFT JOIN Sites s ON s.SiteCode = sd.SiteCode ORDER BY upper(sd.SiteCode)"
        )
        if str(r[0]).upper() in wanted
    ]


def _status_rows(conn: sqlite3.Connection, wanted: set[str]) -> list[StatusRow]:
    return [
        StatusRow(str(g).upper(), str(c).upper(), st, f, run)
        for g, c, st, f, run in conn.execute(
            "SELECT ss.PackageGuid, sd.SiteCode, ss.State, ss.Flag, ss.RunNumber "
            "FROM CM_UpdatePackageSiteStatus ss JOIN ServerData sd ON sd.ID = ss.SiteNumber "
            "ORDER BY upper(ss.PackageGuid), upper(sd.SiteCode)"
        )
        if str(c).upper() in wanted
    ]


def _monitoring_rows(conn: sqlite3.Connection, wanted: set[str]) -> list[MonitoringRow]:
    return [
        MonitoringRow(str(g).upper(), str(c).upper(), sub, done, prog, app)
        for g, c, sub, done, prog, app in conn.execute(
            "SELECT m.PackageGuid, sd.SiteCode, m.SubStageID, m.IsComplete, m.Progress, "
            "m.Applicable FROM CM_UpdatePackage_MonitoringStatus m "
            "JOIN ServerData sd ON sd.ID = m.SiteNumber "
            "ORDER BY upper(m.PackageGuid), upper(sd.SiteCode), m.SubStageID"
        )
        if str(c).upper() in wanted
    ]


def _prereq_rows(conn: sqlite3.Connection, wanted: set[str]) -> list[PrereqRow]:
    return [
        PrereqRow(str(g).upper(), str(c).upper(), server, rule, status, message)
        for g, c, server, rule, status, message in conn.execute(
            "SELECT p.PackageGuid, sd.SiteCode, p.ServerName, p.RuleName, p.Status, p.Message "
            "FROM CM_UpdatePackagePrereqStatus p JOIN ServerData sd ON sd.ID = p.SiteNumber "
            "ORDER BY upper(p.PackageGuid), upper(sd.SiteCode), p.ServerName, p.RuleName"
        )
        if str(c).upper() in wanted
    ]


def _package_rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every CM_UpdatePackages row, whole (by column name)."""
    cur = conn.execute("SELECT * FROM CM_UpdatePackages ORDER BY upper(PackageGuid)")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur]


def _easysetup_rows(conn: sqlite3.Connection) -> list[EasySetupRow]:
    return [
        EasySetupRow(pid, g, v, h)
        for pid, g, v, h in conn.execute(
            "SELECT PackageID, PackageGuid, PackageVersion, PackageHash "
            "FROM EasySetupSettings ORDER BY upper(PackageID)"
        )
    ]


def build_content(conn: sqlite3.Connection, code: str) -> dict[str, Any]:
    """The message for the link to site `code`, without seq and time (what the hash covers)."""
    direction = _direction(conn, code)
    local = hierarchy.local_site(conn)
    wanted = _link_sites(conn, code, direction)
    down = direction == DOWN
    return message_content(
        local.code,
        code.upper(),
        sites=_site_entries(conn, wanted),
        site_status=_status_rows(conn, wanted),
        monitoring=_monitoring_rows(conn, wanted),
        prereq=_prereq_rows(conn, wanted),
        packages=_package_rows(conn) if down else None,
        easysetup=_easysetup_rows(conn) if down else None,
    )


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
    data = render_message(content, seq, now)
    return Outgoing(code.upper(), seq, digest, data, len(content["site_status"]))


def record_sent(conn: sqlite3.Connection, code: str, seq: int, digest: str) -> None:
    conn.execute(
        "UPDATE ReplicationLinks SET LastSentHash = ?, "
        "LastSentTime = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE SiteCode = ? "
        "AND LastSentSeq = ?",
        (digest, code.upper(), seq),
    )


# -- receiving ----------------------------------------------------------------------------------


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


def _apply_site(conn: sqlite3.Connection, s: SiteEntry) -> int:
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
            state == PackageState.CONTENT_REPLICATION_FAILED
            and row.run == run
            and row.state in (PackageState.ENABLED, PackageState.CONTENT_REPLICATING)
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
    rows: tuple[StatusRow | MonitoringRow | PrereqRow, ...] = (
        *msg.site_status,
        *msg.monitoring,
        *msg.prereq,
    )
    for row in rows:
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
