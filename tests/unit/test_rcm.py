"""The CMUpdates replication group (cmlab.components.rcm, docs/hierarchy.md): what each link
carries, what
a receiver takes and refuses, and two real daemons exchanging messages.

Most tests work on real site databases (no daemon): a message is built with `prepare_message`
at one site and applied with `parse_message` + `apply_message` at the other, each in its own
transaction, exactly as the component does."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cmlab.components import rcm
from cmlab.site.formats import cmupdates_message
from cmlab.site.inbox import BadInput
from cmlab.site.sitedb import connect, create_site_db, hierarchy, replication_group, transaction
from cmlab.site.state_codes import PackageState
from cmlab.testing import HierarchySpec, LabHierarchy, LabSite

GUID = "420E3E18-73C5-4BE9-88B0-6F1E30A012CA"
OTHER_GUID = "6B0783D9-B8A2-4848-82F6-8EFE956F4988"
BUILD = 9135
ROLES = {"cas": hierarchy.CAS, "primary": hierarchy.PRIMARY, "secondary": hierarchy.SECONDARY}


# -- a hierarchy of site databases ---------------------------------------------------------------


class Site:
    def __init__(self, root: Path, code: str, role: str, parent: Site | None) -> None:
        self.root, self.code, self.role = root, code, role
        (root / "inboxes" / "rcm.box" / "receive").mkdir(parents=True)
        db = root / "db" / "site.db"
        create_site_db(
            db,
            site_code=code,
            role=role,
            server=self.server,
            build=BUILD,
            minor_build=0,
            parent_code=parent.code if parent else None,
            site_folder=str(root),
        )
        self.conn = connect(db, code)
        if parent is not None:
            _know(parent.conn, self, folder=str(root))
            _know(self.conn, parent, folder=str(parent.root))

    @property
    def server(self) -> str:
        return f"{self.code.lower()}.cmlab.local"

    @property
    def receive(self) -> Path:
        return self.root / "inboxes" / "rcm.box" / "receive"

    def number(self, code: str) -> int:
        found = hierarchy.site_by_code(self.conn, code)
        assert found is not None, code
        return found.number

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        with transaction(self.conn):
            return self.conn.execute(statement, params).fetchall()


def _know(conn: sqlite3.Connection, site: Site, folder: str = "") -> None:
    """What `cmlab init --parent` records of the other site (ServerData and Sites)."""
    local = hierarchy.local_site(conn)
    parent_row = site.conn.execute(
        "SELECT ParentSiteCode FROM ServerData WHERE IsLocal = 1"
    ).fetchone()
    with transaction(conn):
        hierarchy.ensure_site(
            conn,
            site.code,
            parent=parent_row[0],
            site_type=ROLES[site.role],
            server=site.server,
            folder=folder,
        )
        hierarchy.set_site_version(
            conn,
            site.code,
            version=f"5.00.{BUILD}.1000",
            full_version=f"5.00.{BUILD}.1000",
            build=BUILD,
            reporting_site=parent_row[0],
            server=site.server,
            site_type=ROLES[site.role],
        )
    assert local.code != site.code


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[dict[str, Site]]:
    """CAS with the child primaries PR1 and PR2; PR1 with the secondary SEC."""
    cas = Site(tmp_path / "CAS", "CAS", "cas", None)
    pr1 = Site(tmp_path / "PR1", "PR1", "primary", cas)
    pr2 = Site(tmp_path / "PR2", "PR2", "primary", cas)
    sec = Site(tmp_path / "SEC", "SEC", "secondary", pr1)
    sites = {"CAS": cas, "PR1": pr1, "PR2": pr2, "SEC": sec}
    yield sites
    for s in sites.values():
        s.conn.close()


def send(sender: Site, to: Site) -> bytes | None:
    """One send on the link, as the component does it (the file written in between)."""
    with transaction(sender.conn):
        out = replication_group.prepare_message(sender.conn, to.code, "2025-01-01T00:00:00")
    if out is None:
        return None
    with transaction(sender.conn):
        replication_group.record_sent(sender.conn, to.code, out.seq, out.content_hash)
    return out.data


def deliver(receiver: Site, data: bytes) -> replication_group.Applied:
    msg = cmupdates_message.parse_message(data)
    with transaction(receiver.conn):
        return replication_group.apply_message(receiver.conn, msg)


def edit(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(data)
    change(doc)
    return json.dumps(doc).encode()


def add_package(
    site: Site, guid: str = GUID, *, run: int = 1, state: int = PackageState.ENABLED
) -> None:
    site.sql(
        "INSERT INTO CM_UpdatePackages (PackageGuid, Name, State, Flag, RunNumber) "
        "VALUES (?, 'Configuration Manager 2509', ?, 0, ?)",
        guid,
        int(state),
        run,
    )


def set_status(site: Site, about: str, state: int, run: int, guid: str = GUID) -> None:
    site.sql(
        "INSERT INTO CM_UpdatePackageSiteStatus (PackageGuid, SiteNumber, State, Flag, RunNumber) "
        "VALUES (?, ?, ?, 0, ?) ON CONFLICT (PackageGuid, SiteNumber) DO UPDATE SET "
        "State = excluded.State, RunNumber = excluded.RunNumber",
        guid,
        site.number(about),
        int(state),
        run,
    )


def status(site: Site, about: str, guid: str = GUID) -> tuple[int, int] | None:
    rows = site.sql(
        "SELECT State, RunNumber FROM CM_UpdatePackageSiteStatus "
        "WHERE PackageGuid = ? AND SiteNumber = ?",
        guid,
        site.number(about),
    )
    return (int(rows[0][0]), int(rows[0][1])) if rows else None


def snapshot(site: Site) -> dict[str, list[tuple[Any, ...]]]:
    tables = (
        "ServerData",
        "Sites",
        "CM_UpdatePackages",
        "CM_UpdatePackageSiteStatus",
        "CM_UpdatePackageSiteStatus_HIST",
        "CM_UpdatePackage_MonitoringStatus",
        "CM_UpdatePackagePrereqStatus",
        "EasySetupSettings",
        "TableChangeNotifications",
    )
    return {t: site.sql(f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables}


def seed_site_rows(
    site: Site, about: str, state: int = PackageState.PREREQ_SUCCESS, run: int = 1
) -> None:
    number = site.number(about)
    set_status(site, about, state, run)
    site.sql(
        "INSERT INTO CM_UpdatePackage_MonitoringStatus (PackageGuid, SiteNumber, SubStageID, "
        "IsComplete, Progress) VALUES (?, ?, 720898, 2, 100)",
        GUID,
        number,
    )
    site.sql(
        "INSERT INTO CM_UpdatePackagePrereqStatus (PackageGuid, SiteNumber, ServerName, "
        "RuleName, Status, Message) VALUES (?, ?, ?, 'Free disk space', 1, 'low')",
        GUID,
        number,
        f"{about.lower()}.cmlab.local",
    )


# -- what each link carries ----------------------------------------------------------------------


def test_links_are_the_parent_and_children_with_an_address(tree: dict[str, Site]) -> None:
    cas, pr1 = tree["CAS"], tree["PR1"]
    assert [(link.code, link.direction) for link in replication_group.links(cas.conn)] == [
        ("PR1", cmupdates_message.DOWN),
        ("PR2", cmupdates_message.DOWN),
    ]
    assert [(link.code, link.direction) for link in replication_group.links(pr1.conn)] == [
        ("CAS", cmupdates_message.UP),
        ("SEC", cmupdates_message.DOWN),
    ]
    # A site known only through replication has no address: it is no link.
    pr1.sql("UPDATE ServerData SET SiteFolder = '' WHERE SiteCode = 'SEC'")
    assert [link.code for link in replication_group.links(pr1.conn)] == ["CAS"]


def test_up_carries_the_subtree_and_down_the_rest(tree: dict[str, Site]) -> None:
    cas, pr1, sec = tree["CAS"], tree["PR1"], tree["SEC"]
    add_package(cas)
    # PR1 knows PR2 (replicated down from the CAS before) and has rows of every site.
    _know(pr1.conn, tree["PR2"])
    for about in ("CAS", "PR1", "PR2", "SEC"):
        seed_site_rows(pr1, about)
    for about in ("CAS", "PR1", "PR2"):
        seed_site_rows(cas, about)
    cas.sql(
        "INSERT INTO EasySetupSettings (PackageID, PackageGuid, PackageVersion, PackageHash) "
        "VALUES ('CAS10001', ?, 1, 'ABC')",
        GUID,
    )

    up = replication_group.build_content(pr1.conn, "CAS")
    assert (up["from"], up["to"]) == ("PR1", "CAS")
    assert [s["code"] for s in up["sites"]] == ["PR1", "SEC"]
    for key in ("site_status", "monitoring", "prereq"):
        assert sorted({r["site"] for r in up[key]}) == ["PR1", "SEC"], key
    assert "packages" not in up and "easysetup" not in up
    sec_site = next(s for s in up["sites"] if s["code"] == "SEC")
    assert sec_site == {
        "code": "SEC",
        "parent": "PR1",
        "type": hierarchy.SECONDARY,
        "server": "sec.cmlab.local",
        "version": f"5.00.{BUILD}.1000",
        "full_version": f"5.00.{BUILD}.1000",
        "build": BUILD,
    }

    down = replication_group.build_content(pr1.conn, "SEC")
    assert [s["code"] for s in down["sites"]] == ["CAS", "PR1", "PR2"]
    assert sorted({r["site"] for r in down["site_status"]}) == ["CAS", "PR1", "PR2"]

    to_pr1 = replication_group.build_content(cas.conn, "PR1")
    assert [s["code"] for s in to_pr1["sites"]] == ["CAS", "PR2"]
    assert sorted({r["site"] for r in to_pr1["site_status"]}) == ["CAS", "PR2"]
    assert [p["PackageGuid"] for p in to_pr1["packages"]] == [GUID]
    assert to_pr1["packages"][0]["RunNumber"] == 1  # every column, by name
    assert to_pr1["easysetup"] == [
        {"PackageID": "CAS10001", "PackageGuid": GUID, "PackageVersion": 1, "PackageHash": "ABC"}
    ]
    assert sec.code not in {s["code"] for s in to_pr1["sites"]}  # SEC is below PR1


def test_unchanged_content_is_not_sent_again(tree: dict[str, Site]) -> None:
    cas, pr1 = tree["CAS"], tree["PR1"]
    add_package(cas)
    first = send(cas, pr1)
    assert first is not None and json.loads(first)["seq"] == 1
    assert send(cas, pr1) is None
    cas.sql("UPDATE CM_UpdatePackages SET RunNumber = 2")
    second = send(cas, pr1)
    assert second is not None and json.loads(second)["seq"] == 2
    assert send(cas, pr1) is None
    row = cas.sql("SELECT LastSentSeq, LastSentHash FROM ReplicationLinks WHERE SiteCode = 'PR1'")
    assert row[0][0] == 2 and row[0][1]


def test_a_send_interrupted_before_it_was_recorded_goes_again_with_a_new_seq(
    tree: dict[str, Site],
) -> None:
    cas, pr1 = tree["CAS"], tree["PR1"]
    add_package(cas)
    with transaction(cas.conn):
        lost = replication_group.prepare_message(cas.conn, "PR1", "now")
    assert lost is not None and lost.seq == 1
    # Killed after writing the file, before record_sent: the content goes again, seq 2.
    again = send(cas, pr1)
    assert again is not None and json.loads(again)["seq"] == 2
    assert deliver(pr1, lost.data).changes > 0
    assert deliver(pr1, again).changes == 0


# -- what a receiver takes -----------------------------------------------------------------------


def test_stale_and_replayed_messages_change_nothing(tree: dict[str, Site]) -> None:
    cas, pr1 = tree["CAS"], tree["PR1"]
    add_package(cas)
    seed_site_rows(cas, "CAS", PackageState.INSTALL_SUCCESS)
    one = send(cas, pr1)
    cas.sql("UPDATE CM_UpdatePackages SET Description = 'second'")
    two = send(cas, pr1)
    assert one is not None and two is not None

    applied = deliver(pr1, two)
    assert not applied.stale and applied.changes > 0
    before = snapshot(pr1)
    assert deliver(pr1, two).stale  # the same file received twice
    assert deliver(pr1, one).stale  # an older one, late
    assert snapshot(pr1) == before
    assert pr1.sql("SELECT Description FROM CM_UpdatePackages") == [("second",)]

    # Applying the same content again (a new seq) writes nothing: no trigger fires either.
    pr1.sql("UPDATE ReplicationLinks SET LastReceivedSeq = 0")
    again = deliver(pr1, two)
    assert (again.stale, again.changes, again.progress) == (False, 0, ())
    assert snapshot(pr1) == before


def test_a_site_never_takes_rows_about_itself(tree: dict[str, Site]) -> None:
    cas, pr1 = tree["CAS"], tree["PR1"]
    add_package(cas)
    add_package(pr1)
    set_status(pr1, "PR1", PackageState.PREREQ_ERROR, 1)
    set_status(cas, "PR1", PackageState.ENABLED, 1)
    set_status(cas, "CAS", PackageState.INSTALL_SUCCESS, 1)
    data = send(cas, pr1)
    assert data is not None
    assert "PR1" not in {r["site"] for r in json.loads(data)["site_status"]}

    def claim_pr1(doc: dict[str, Any]) -> None:
        doc["sites"].append({**doc["sites"][0], "code": "PR1", "parent": "CAS", "type": 2})
        doc["site_status"].append(
            {
                "guid": GUID,
                "site": "PR1",
                "state": int(PackageState.INSTALL_SUCCESS),
                "flag": 0,
                "run": 1,
            }
        )

    deliver(pr1, edit(data, claim_pr1))
    assert status(pr1, "PR1") == (PackageState.PREREQ_ERROR, 1)
    assert status(pr1, "CAS") == (PackageState.INSTALL_SUCCESS, 1)

    # Up: PR1 cannot speak for the CAS (nor for PR2, its sibling).
    up = send(pr1, cas)
    assert up is not None

    def claim_others(doc: dict[str, Any]) -> None:
        for code, parent in (("CAS", None), ("PR2", "CAS")):
            doc["sites"].append({**doc["sites"][0], "code": code, "parent": parent, "type": 2})
            doc["site_status"].append(
                {
                    "guid": GUID,
                    "site": code,
                    "state": int(PackageState.INSTALL_FAILED),
                    "flag": 0,
                    "run": 1,
                }
            )

    deliver(cas, edit(up, claim_others))
    assert status(cas, "CAS") == (PackageState.INSTALL_SUCCESS, 1)
    assert status(cas, "PR2") is None
    assert status(cas, "PR1") == (PackageState.PREREQ_ERROR, 1)  # what PR1 says of itself is taken
    assert hierarchy.local_site(cas.conn).parent is None


def test_rows_of_an_older_run_are_ignored(tree: dict[str, Site]) -> None:
    cas, pr1 = tree["CAS"], tree["PR1"]
    add_package(cas, run=2)  # the CAS started run 2 ...
    set_status(cas, "PR1", PackageState.ENABLED, 2)  # ... and waits for PR1
    set_status(pr1, "PR1", PackageState.INSTALL_FAILED, 1)  # PR1 has not heard of run 2 yet
    data = send(pr1, cas)
    assert data is not None
    deliver(cas, data)
    assert status(cas, "PR1") == (PackageState.ENABLED, 2)
    set_status(pr1, "PR1", PackageState.CONTENT_REPLICATING, 2)
    data = send(pr1, cas)
    assert data is not None
    assert deliver(cas, data).changes == 1
    assert status(cas, "PR1") == (PackageState.CONTENT_REPLICATING, 2)


def test_the_senders_content_replication_failed_verdict_stays(tree: dict[str, Site]) -> None:
    cas, pr1 = tree["CAS"], tree["PR1"]
    add_package(cas, run=2)
    # The CAS's Sender gave up on PR1 in run 2.
    set_status(cas, "PR1", PackageState.CONTENT_REPLICATION_FAILED, 2)
    for waiting in (PackageState.ENABLED, PackageState.CONTENT_REPLICATING):
        set_status(pr1, "PR1", waiting, 2)
        data = send(pr1, cas)
        assert data is not None
        deliver(cas, data)
        assert status(cas, "PR1") == (PackageState.CONTENT_REPLICATION_FAILED, 2)
    # The package arrived after all: a later state replaces the verdict.
    set_status(pr1, "PR1", PackageState.CONTENT_REPLICATION_SUCCESS, 2)
    data = send(pr1, cas)
    assert data is not None
    deliver(cas, data)
    assert status(cas, "PR1") == (PackageState.CONTENT_REPLICATION_SUCCESS, 2)
    # And a new run (RetryContentReplication) starts over from the child's report.
    set_status(cas, "PR1", PackageState.CONTENT_REPLICATION_FAILED, 2)
    cas.sql("UPDATE CM_UpdatePackages SET RunNumber = 3")
    set_status(pr1, "PR1", PackageState.ENABLED, 3)
    data = send(pr1, cas)
    assert data is not None
    deliver(cas, data)
    assert status(cas, "PR1") == (PackageState.ENABLED, 3)


def test_a_new_run_from_the_parent_starts_the_childs_run(tree: dict[str, Site]) -> None:
    cas, pr1, sec = tree["CAS"], tree["PR1"], tree["SEC"]
    add_package(cas, run=1)
    set_status(cas, "CAS", PackageState.CONTENT_REPLICATION_SUCCESS, 1)
    cas.sql(
        "INSERT INTO EasySetupSettings (PackageID, PackageGuid, PackageVersion, PackageHash) "
        "VALUES ('CAS10001', ?, 1, 'HASH1')",
        GUID,
    )
    data = send(cas, pr1)
    assert data is not None
    applied = deliver(pr1, data)
    assert applied.progress == ((GUID, int(PackageState.CONTENT_REPLICATING)),)
    assert status(pr1, "PR1") == (PackageState.CONTENT_REPLICATING, 1)
    assert status(pr1, "CAS") == (PackageState.CONTENT_REPLICATION_SUCCESS, 1)
    hist = pr1.sql(
        "SELECT State FROM CM_UpdatePackageSiteStatus_HIST WHERE SiteNumber = ? ORDER BY ID",
        pr1.number("PR1"),
    )
    assert [r[0] for r in hist] == [PackageState.ENABLED, PackageState.CONTENT_REPLICATING]
    assert pr1.sql("SELECT PackageID, PackageHash FROM EasySetupSettings") == [
        ("CAS10001", "HASH1")
    ]
    # The despooler wrote its own hash meanwhile; the replicated one wins, and only a changed
    # value is written.
    pr1.sql("UPDATE EasySetupSettings SET PackageHash = 'LOCAL'")
    cas.sql("UPDATE CM_UpdatePackages SET Description = 'x'")
    data = send(cas, pr1)
    assert data is not None
    deliver(pr1, data)
    assert pr1.sql("SELECT PackageHash FROM EasySetupSettings") == [("HASH1",)]

    # PR1's new state goes up; the CAS takes it.
    up = send(pr1, cas)
    assert up is not None
    deliver(cas, up)
    assert status(cas, "PR1") == (PackageState.CONTENT_REPLICATING, 1)
    # And down to SEC, which learns the CAS and PR2 through PR1 (no address: no link).
    down = send(pr1, sec)
    assert down is not None
    deliver(sec, down)
    assert status(sec, "PR1") == (PackageState.CONTENT_REPLICATING, 1)
    assert status(sec, "CAS") == (PackageState.CONTENT_REPLICATION_SUCCESS, 1)
    assert sec.sql("SELECT RunNumber FROM CM_UpdatePackages") == [(1,)]


def test_prerequisite_rows_follow_the_senders_set(tree: dict[str, Site]) -> None:
    cas, pr1 = tree["CAS"], tree["PR1"]
    add_package(cas)
    seed_site_rows(pr1, "PR1")
    data = send(pr1, cas)
    assert data is not None
    deliver(cas, data)
    rules = "SELECT RuleName, Status FROM CM_UpdatePackagePrereqStatus WHERE SiteNumber = ?"
    assert cas.sql(rules, cas.number("PR1")) == [("Free disk space", 1)]
    # PR1's next check cleared the rows and found another rule.
    pr1.sql("DELETE FROM CM_UpdatePackagePrereqStatus")
    pr1.sql(
        "INSERT INTO CM_UpdatePackagePrereqStatus (PackageGuid, SiteNumber, ServerName, "
        "RuleName, Status) VALUES (?, ?, 'pr1.cmlab.local', 'SQL Server version', 2)",
        GUID,
        pr1.number("PR1"),
    )
    data = send(pr1, cas)
    assert data is not None
    deliver(cas, data)
    assert cas.sql(rules, cas.number("PR1")) == [("SQL Server version", 2)]


def test_a_grandchild_is_learned_through_its_parent(tree: dict[str, Site]) -> None:
    cas, pr1 = tree["CAS"], tree["PR1"]
    add_package(cas)
    seed_site_rows(pr1, "SEC", PackageState.INSTALL_SUCCESS)
    data = send(pr1, cas)
    assert data is not None
    deliver(cas, data)
    found = hierarchy.site_by_code(cas.conn, "SEC")
    assert found is not None and (found.parent, found.folder) == ("PR1", "")
    assert status(cas, "SEC") == (PackageState.INSTALL_SUCCESS, 1)
    assert cas.sql("SELECT Version FROM Sites WHERE SiteCode = 'SEC'") == [(f"5.00.{BUILD}.1000",)]


def test_a_site_the_parent_places_below_this_one_is_not_taken(tree: dict[str, Site]) -> None:
    cas, pr1 = tree["CAS"], tree["PR1"]
    data = send(cas, pr1)
    assert data is not None

    def place_below(doc: dict[str, Any]) -> None:
        doc["sites"].append({**doc["sites"][0], "code": "PR9", "parent": "PR1", "type": 1})
        doc["site_status"].append(
            {
                "guid": GUID,
                "site": "PR9",
                "state": int(PackageState.INSTALL_SUCCESS),
                "flag": 0,
                "run": 0,
            }
        )

    deliver(pr1, edit(data, place_below))
    # Only PR1's own children speak for the sites below it.
    assert hierarchy.site_by_code(pr1.conn, "PR9") is None
    assert [link.code for link in replication_group.links(pr1.conn)] == ["CAS", "SEC"]


# -- what a receiver refuses ---------------------------------------------------------------------


def _bad_types(doc: dict[str, Any]) -> None:
    doc["site_status"][0]["state"] = "2"


def _bool_state(doc: dict[str, Any]) -> None:
    doc["site_status"][0]["state"] = True


def _bad_guid(doc: dict[str, Any]) -> None:
    doc["site_status"][0]["guid"] = "not-a-guid"


def _bad_code(doc: dict[str, Any]) -> None:
    doc["sites"][0]["code"] = "CA$"


def _unknown_sender(doc: dict[str, Any]) -> None:
    doc["from"] = "XYZ"


def _wrong_group(doc: dict[str, Any]) -> None:
    doc["group"] = "Configuration Data"


def _wrong_to(doc: dict[str, Any]) -> None:
    doc["to"] = "PR2"


def _unknown_column(doc: dict[str, Any]) -> None:
    doc["packages"][0]["State; DROP TABLE Sites"] = 1


def _missing_column_table(doc: dict[str, Any]) -> None:
    doc["packages"][0]["NoSuchColumn"] = 1


def _unlisted_site(doc: dict[str, Any]) -> None:
    doc["site_status"][0]["site"] = "ZZZ"


def _extra_key(doc: dict[str, Any]) -> None:
    doc["extra"] = 1


def _not_a_list(doc: dict[str, Any]) -> None:
    doc["monitoring"] = {}


def _float_seq(doc: dict[str, Any]) -> None:
    doc["seq"] = 1.5


def _huge_int(doc: dict[str, Any]) -> None:
    doc["site_status"][0]["run"] = 2**70


def _places_below(doc: dict[str, Any]) -> None:
    cas = next(s for s in doc["sites"] if s["code"] == "CAS")
    cas["parent"] = "PR1"


def _missing_key(doc: dict[str, Any]) -> None:
    del doc["site_status"][0]["flag"]


def _long_text(doc: dict[str, Any]) -> None:
    doc["sites"][0]["server"] = "x" * (cmupdates_message.MAX_TEXT + 1)


def _site_type(doc: dict[str, Any]) -> None:
    doc["sites"][0]["type"] = 3


def _part_version(doc: dict[str, Any]) -> None:
    doc["sites"][0]["build"] = None


def _bad_version(doc: dict[str, Any]) -> None:
    doc["sites"][0]["version"] = "5.00"


def _bad_package_id(doc: dict[str, Any]) -> None:
    doc["easysetup"] = [
        {"PackageID": "../x", "PackageGuid": GUID, "PackageVersion": 1, "PackageHash": None}
    ]


def _half_down(doc: dict[str, Any]) -> None:
    del doc["easysetup"]


def _no_down(doc: dict[str, Any]) -> None:
    del doc["easysetup"], doc["packages"]


def _seq_zero(doc: dict[str, Any]) -> None:
    doc["seq"] = 0


def _from_itself(doc: dict[str, Any]) -> None:
    doc["from"] = "PR1"


def _package_state_text(doc: dict[str, Any]) -> None:
    doc["packages"][0]["State"] = "2"


def _package_state_null(doc: dict[str, Any]) -> None:
    doc["packages"][0]["State"] = None


def _package_not_object(doc: dict[str, Any]) -> None:
    doc["packages"][0] = [GUID]


def _package_without_name(doc: dict[str, Any]) -> None:
    del doc["packages"][0]["Name"]


BAD_EDITS = [
    (_missing_key, "has no flag"),
    (_long_text, "longer than"),
    (_site_type, "not a site type"),
    (_part_version, "only part of a version"),
    (_bad_version, "not n.n.n.n"),
    (_bad_package_id, "not a package ID"),
    (_half_down, "only one of packages and easysetup"),
    (_no_down, "has no packages"),
    (_seq_zero, "not positive"),
    (_from_itself, "claims to come from this site"),
    (_package_state_text, "State of .* is not an integer"),
    (_package_state_null, "State of .* is null"),
    (_package_not_object, "packages\\[0\\] is not an object"),
    (_package_without_name, "has no PackageGuid or Name"),
    (_bad_types, "state is not an integer"),
    (_bool_state, "state is not an integer"),
    (_bad_guid, "is not a GUID"),
    (_bad_code, "is not a site code"),
    (_unknown_sender, "neither this site's parent nor one of its child sites"),
    (_wrong_group, "not of the CMUpdates replication group"),
    (_wrong_to, "is for site PR2"),
    (_unknown_column, "not a column name"),
    (_missing_column_table, "has no column NoSuchColumn"),
    (_unlisted_site, "does not list it"),
    (_extra_key, "unexpected keys extra"),
    (_not_a_list, "monitoring is not a list"),
    (_float_seq, "seq is not an integer"),
    (_huge_int, "out of range"),
    (_places_below, "places site CAS below this site"),
]


@pytest.mark.parametrize(("change", "reason"), BAD_EDITS, ids=[c.__name__ for c, _ in BAD_EDITS])
def test_bad_messages_are_refused_whole(
    tree: dict[str, Site], change: Callable[[dict[str, Any]], None], reason: str
) -> None:
    cas, pr1 = tree["CAS"], tree["PR1"]
    add_package(cas)
    set_status(cas, "CAS", PackageState.ENABLED, 1)
    data = send(cas, pr1)
    assert data is not None
    before = snapshot(pr1)
    with pytest.raises(BadInput, match=reason):
        deliver(pr1, edit(data, change))
    assert snapshot(pr1) == before
    assert pr1.sql("SELECT * FROM ReplicationLinks") == []


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not JSON"),
        (b'{"group": "CMUpdates", "from": "CAS"', "not JSON"),
        (b"[1, 2]", "not an object"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"seq": NaN}', "not a JSON number"),
        (b'{"group": "CMUpdates", "group": "CMUpdates"}', "given twice"),
        (b"[" * 100_000, "nested too deeply|not JSON"),
    ],
    ids=["empty", "truncated", "array", "binary", "nan", "duplicate-key", "deep"],
)
def test_what_is_not_a_message_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(BadInput, match=reason):
        cmupdates_message.parse_message(data)


def test_a_child_cannot_send_packages_or_move_itself(tree: dict[str, Site]) -> None:
    cas, pr1 = tree["CAS"], tree["PR1"]
    data = send(pr1, cas)
    assert data is not None

    def packages(doc: dict[str, Any]) -> None:
        doc["packages"], doc["easysetup"] = [], []

    def move(doc: dict[str, Any]) -> None:
        doc["sites"][0]["parent"] = None

    with pytest.raises(BadInput, match="only the parent does"):
        deliver(cas, edit(data, packages))

    def outside(doc: dict[str, Any]) -> None:
        sec = next(s for s in doc["sites"] if s["code"] == "SEC")
        sec["parent"] = "PR2"  # PR2 is PR1's sibling, not below it
        doc["seq"] += 1

    with pytest.raises(BadInput, match="says its parent is None"):
        deliver(cas, edit(data, move))
    deliver(cas, data)  # the CAS knows SEC below PR1 now
    with pytest.raises(BadInput, match="places site SEC outside its subtree"):
        deliver(cas, edit(data, outside))


def test_a_huge_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.RPL"
    with open(path, "wb") as f:
        f.truncate(cmupdates_message.MAX_MESSAGE_BYTES + 1)
    with pytest.raises(BadInput, match="larger than"):
        cmupdates_message.read_message_file(path)


def test_the_other_sites_folders_are_never_created(tmp_path: Path) -> None:
    missing = rcm.rcm_receive_folder(str(tmp_path / "PR1"), tmp_path)
    with pytest.raises(FileNotFoundError):
        rcm.write_message(missing, "x.RPL", b"{}")
    assert not (tmp_path / "PR1").exists()


# -- two real daemons ----------------------------------------------------------------------------


def _rcm_errors(site: LabSite) -> list[str]:
    return [line for line in site.log("rcmctrl.log") if line.startswith("ERROR:")]


def test_two_daemons_exchange_the_group(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    spec = HierarchySpec.from_dict(
        {
            "defaults": {"replication.cmupdates_interval": 0.2},
            "site": [{"code": "CAS"}, {"code": "PR1", "parent": "CAS"}],
        }
    )
    h = LabHierarchy(tmp_path, spec).create()
    request.addfinalizer(h.stop)
    cas, pr1 = h["CAS"], h["PR1"]
    receive = pr1.inbox("rcm.box/receive")
    away = receive.with_name("receive.away")
    receive.rename(away)  # PR1 is not reachable yet

    cas.start()
    unreachable = (
        f"WARNING: Cannot replicate the CMUpdates group to site PR1: the folder {receive} "
        "does not exist. Will retry in 0.2 seconds."
    )
    cas.wait_for(
        lambda: cas.log("rcmctrl.log").count(unreachable) >= 2,
        what="the CAS retrying the unreachable PR1",
    )
    assert not receive.exists()  # the CAS never made PR1's folder
    away.rename(receive)
    pr1.start()

    # A run at the CAS (a package row with its RunNumber), written by hand: PR1 starts its
    # part of it and reports back up.
    with sqlite3.connect(cas.config.paths.db_file, timeout=30) as conn:
        conn.execute(
            "INSERT INTO CM_UpdatePackages (PackageGuid, Name, State, Flag, RunNumber) "
            "VALUES (?, 'Configuration Manager 2509', 2, 0, 1)",
            (GUID,),
        )
    conn.close()

    def pr1_row_at(site: LabSite) -> list[tuple[Any, ...]]:
        return site.query(
            "SELECT ss.State, ss.RunNumber FROM CM_UpdatePackageSiteStatus ss "
            "JOIN ServerData sd ON sd.ID = ss.SiteNumber WHERE sd.SiteCode = 'PR1'",
        )

    pr1.wait_for(
        lambda: pr1_row_at(pr1) == [(PackageState.CONTENT_REPLICATING, 1)],
        what="PR1 starting run 1",
    )
    cas.wait_for(
        lambda: pr1_row_at(cas) == [(PackageState.CONTENT_REPLICATING, 1)],
        what="PR1's state replicated up to the CAS",
    )
    sent = [m for m in cas.log("rcmctrl.log") if m.startswith("Sent CMUpdates")]
    assert sent and all(m.endswith("site status rows).") for m in sent)
    received = re.compile(
        r"Received CMUpdates replication group message \d+ from site CAS: "
        r"applied \d+ changes\."
    )
    assert any(received.fullmatch(m) for m in pr1.log("rcmctrl.log"))
    assert f"Update {GUID} is now CONTENT_REPLICATING (65537) at this site." in pr1.log(
        "rcmctrl.log"
    )

    # Bad files: each goes to BAD with its reason; PR1 keeps serving.
    good: dict[str, Any] = {
        "group": "CMUpdates",
        "from": "CAS",
        "to": "PR1",
        "seq": 10**9,
        "time": "now",
        "sites": [],
        "site_status": [],
        "monitoring": [],
        "prereq": [],
        "packages": [],
        "easysetup": [],
    }
    bad = {
        "notjson.RPL": b"this is not json",
        "truncated.RPL": json.dumps(good).encode()[:40],
        "group.RPL": json.dumps({**good, "group": "Other"}).encode(),
        "sender.RPL": json.dumps({**good, "from": "XYZ"}).encode(),
        "types.RPL": json.dumps({**good, "seq": "1"}).encode(),
        "guid.RPL": json.dumps(
            {**good, "packages": [{"PackageGuid": "nope", "Name": "x"}]}
        ).encode(),
    }
    for name, data in bad.items():
        pr1.drop("rcm.box/receive", name, data)
    huge = receive / ".huge.tmp"
    with open(huge, "wb") as f:
        f.truncate(cmupdates_message.MAX_MESSAGE_BYTES + 1)
    os.replace(huge, receive / "huge.RPL")
    expected = [*bad, "huge.RPL"]
    pr1.wait_for(
        lambda: all((receive / "BAD" / n).exists() for n in expected),
        what="every bad file in BAD",
    )
    # The file is moved before its ERROR line is written: wait for the line too.
    pr1.wait_for(
        lambda: len(_rcm_errors(pr1)) == len(expected),
        what=f"{len(expected)} ERROR lines in rcmctrl.log",
    )
    assert "larger than" in (receive / "BAD" / "huge.RPL.reason").read_text()
    assert pr1.running

    # ... and still takes what comes next.
    with sqlite3.connect(cas.config.paths.db_file, timeout=30) as conn:
        conn.execute("UPDATE CM_UpdatePackages SET Description = 'after the bad files'")
    conn.close()
    pr1.wait_for(
        lambda: (
            pr1.query("SELECT Description FROM CM_UpdatePackages") == [("after the bad files",)]
        ),
        what="the next change reaching PR1",
    )
    assert cas.stop() == 0
    assert pr1.stop() == 0
    assert not _rcm_errors(cas)
    assert not [n for n in pr1.waiting_files() if "rcm.box" in n]
