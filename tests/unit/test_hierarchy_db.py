"""The hierarchy in the site database: `cmlab init --parent` records it on both sides, runs
start at the top-level site and reach child sites by run number, a child's content check,
the roll-up only at the top, installed sites stay installed, and
fnGetSecondarySiteCMUpdateStatus (docs/hierarchy.md)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmlab.admin.init import InitOptions, init_site
from cmlab.core.errors import ConfigError
from cmlab.site.sitedb import connect, hierarchy, servicing, transaction
from cmlab.site.state_codes import PackageFlag, PackageState
from cmlab.testing import HierarchySpec, LabHierarchy

GUID = "420E3E18-73C5-4BE9-88B0-6F1E30A012CA"
HASH = "A" * 64
SPEC = HierarchySpec.from_dict(
    {"site": [{"code": "CAS"}, {"code": "PR1", "parent": "CAS"}, {"code": "SEC", "parent": "PR1"}]}
)


@pytest.fixture
def sites(template: Path, tmp_path: Path) -> LabHierarchy:
    """A CAS (the session's new site, copied), its child primary PR1 and PR1's secondary SEC,
    each made by `cmlab init --parent` in tmp_path/<CODE>; no daemon runs."""
    return LabHierarchy(tmp_path, SPEC, top_from=template).create()


@pytest.fixture
def dbs(sites: LabHierarchy) -> Iterator[dict[str, sqlite3.Connection]]:
    conns = {site.site_code: connect(site.config.paths.db_file, site.site_code) for site in sites}
    yield conns
    for c in conns.values():
        c.close()


def add_update(conn: sqlite3.Connection, state: int = PackageState.DOWNLOAD_SUCCESS) -> None:
    with transaction(conn):
        conn.execute(
            "INSERT INTO CM_UpdatePackages (PackageGuid, Name, FullVersion, State) "
            "VALUES (?, 'Configuration Manager 2509', '5.00.9141.1000', ?)",
            (GUID, int(state)),
        )


def own(conn: sqlite3.Connection) -> int | None:
    return servicing.site_state(conn, GUID, hierarchy.local_site(conn).code)


def test_init_records_the_hierarchy_in_both_databases_and_the_parents_site_toml(
    sites: LabHierarchy,
) -> None:
    # The address of each other site (a copied site keeps its template's own folder).
    rows = (
        "SELECT SiteCode, ParentSiteCode, SiteType, IsLocal, "
        "CASE IsLocal WHEN 1 THEN '' ELSE SiteFolder END FROM ServerData"
    )
    cas, pr1, sec = sites["CAS"], sites["PR1"], sites["SEC"]
    assert set(cas.query(rows)) == {
        ("CAS", None, 4, 1, ""),
        ("PR1", "CAS", 2, 0, str(pr1.path)),
    }
    assert set(pr1.query(rows)) == {
        ("PR1", "CAS", 2, 1, ""),
        ("CAS", None, 4, 0, str(cas.path)),
        ("SEC", "PR1", 1, 0, str(sec.path)),
    }
    assert set(sec.query(rows)) == {
        ("SEC", "PR1", 1, 1, ""),
        ("PR1", "CAS", 2, 0, str(pr1.path)),
    }
    assert cas.query("SELECT Version FROM Sites WHERE SiteCode = 'PR1'") == [("5.00.9135.1000",)]
    toml = (cas.path / "site.toml").read_text()
    assert '[[child_site]]\ncode = "PR1"\nrole = "primary"\n' in toml
    from cmlab.site.config import load_config

    assert load_config(cas.path).site_code == "CAS"  # the parent's site.toml still loads


@pytest.mark.parametrize(
    ("role", "parent", "why"),
    [
        ("secondary", "CAS", "a secondary site's parent must be a primary site"),
        ("primary", "PR1", "a primary site's parent must be a cas site"),
        ("primary", "CAS", "CAS already has a site PR1"),
    ],
)
def test_init_refuses_a_wrong_parent(
    sites: LabHierarchy, tmp_path: Path, role: str, parent: str, why: str
) -> None:
    code = "PR1" if why.startswith("CAS already") else "XX9"
    with pytest.raises(ConfigError, match=why):
        init_site(
            InitOptions(
                site_dir=tmp_path / "new",
                site_code=code,
                role=role,
                parent=sites[parent].path,
                ca_dir=sites["CAS"].path / "trust",
                content_source=sites["CAS"].path / "cloud",
            )
        )


def test_updates_start_only_at_the_top_level_site(dbs: dict[str, sqlite3.Connection]) -> None:
    add_update(dbs["PR1"])
    with pytest.raises(servicing.NotInitiable, match="child site of CAS"), transaction(dbs["PR1"]):
        servicing.InitiateUpgrade(dbs["PR1"], GUID, PackageFlag.NORMAL)


def test_a_run_gives_every_primary_a_row_and_installed_sites_stay_installed(
    dbs: dict[str, sqlite3.Connection],
) -> None:
    cas = dbs["CAS"]
    add_update(cas)
    with transaction(cas):
        servicing.InitiateUpgrade(cas, GUID, PackageFlag.NORMAL)
    assert query_states(cas) == {"PR1": (PackageState.ENABLED, 1)}
    with transaction(cas):
        assert servicing.spCMUSetSiteState(cas, GUID, PackageState.INSTALL_SUCCESS, site_code="PR1")
        assert not servicing.spCMUSetSiteState(
            cas, GUID, PackageState.PREREQ_ERROR, site_code="PR1"
        )
        servicing.spCMUSetSiteState(cas, GUID, PackageState.PREREQ_ERROR)
        cas.execute(
            "UPDATE CM_UpdatePackages SET State = ? WHERE PackageGuid = ?",
            (PackageState.PREREQ_ERROR, GUID),
        )
        servicing.InitiateUpgrade(cas, GUID, PackageFlag.NORMAL)
    assert query_states(cas) == {
        "CAS": (PackageState.ENABLED, 2),
        "PR1": (PackageState.INSTALL_SUCCESS, 2),
    }


def query_states(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    return {
        str(r[0]): (int(r[1]), int(r[2]))
        for r in conn.execute(
            "SELECT sd.SiteCode, ss.State, ss.RunNumber FROM CM_UpdatePackageSiteStatus ss "
            "JOIN ServerData sd ON sd.ID = ss.SiteNumber WHERE ss.PackageGuid = ?",
            (GUID,),
        )
    }


def test_a_child_starts_a_newer_run_and_waits_for_content_with_the_recorded_hash(
    dbs: dict[str, sqlite3.Connection],
) -> None:
    pr1 = dbs["PR1"]
    add_update(pr1, PackageState.CONTENT_REPLICATING)
    with transaction(pr1):
        pr1.execute("UPDATE CM_UpdatePackages SET RunNumber = 1, Flag = 2")
        assert servicing.child_run_progress(pr1) == [(GUID, PackageState.CONTENT_REPLICATING)]
    assert own(pr1) == PackageState.CONTENT_REPLICATING
    with transaction(pr1):
        pr1.execute(
            "INSERT INTO EasySetupSettings (PackageID, PackageGuid, PackageHash) "
            "VALUES ('CAS10001', ?, ?)",
            (GUID, HASH),
        )
        pr1.execute(
            "INSERT INTO SMSPackages (PkgID, Name, SourceSite, StoredPkgVersion, StoredPkgHash) "
            "VALUES ('CAS10001', 'x', 'CAS', 1, ?)",
            ("B" * 64,),
        )
        assert servicing.child_run_progress(pr1) == []  # another version is stored
        pr1.execute("UPDATE SMSPackages SET StoredPkgHash = ?", (HASH,))
        assert servicing.child_run_progress(pr1) == [
            (GUID, PackageState.CONTENT_REPLICATION_SUCCESS)
        ]
        assert servicing.child_run_progress(pr1) == []  # replayed: nothing more
    assert [p.guid for p in servicing.spCMUGetPendingUpdatePackage(pr1)] == [GUID]
    # SMSPackages rows from the parent never wake this site's DistMgr.
    assert not pr1.execute(
        "SELECT 1 FROM TableChangeNotifications WHERE FileName LIKE '%.PKN'"
    ).fetchall()


def test_a_child_without_its_own_row_has_nothing_pending_and_does_not_roll_up(
    dbs: dict[str, sqlite3.Connection],
) -> None:
    pr1 = dbs["PR1"]
    add_update(pr1, PackageState.CONTENT_REPLICATION_SUCCESS)
    with transaction(pr1):
        pr1.execute(
            "INSERT INTO EasySetupSettings (PackageID, PackageGuid, PackageHash) "
            "VALUES ('CAS10001', ?, ?)",
            (GUID, HASH),
        )
        assert servicing.spProcessCMUPackages(pr1) == {}
    assert servicing.spCMUGetPendingUpdatePackage(pr1) == []


def test_fn_get_secondary_site_cmupdate_status(dbs: dict[str, sqlite3.Connection]) -> None:
    pr1 = dbs["PR1"]
    add_update(pr1, PackageState.INSTALL_SUCCESS)
    fn = "SELECT fnGetSecondarySiteCMUpdateStatus(?)"
    assert pr1.execute(fn, ("SEC",)).fetchone() == (1,)  # nothing installed here yet
    with transaction(pr1):
        pr1.execute("UPDATE CM_UpdatePackages SET RunNumber = 1")
        servicing.spCMUSetSiteState(pr1, GUID, PackageState.INSTALL_SUCCESS)
    assert pr1.execute(fn, ("SEC",)).fetchone() == (0,)
    with transaction(pr1):
        servicing.spCMUSetSiteState(pr1, GUID, PackageState.INSTALL_SUCCESS, site_code="SEC")
    assert pr1.execute(fn, ("SEC",)).fetchone() == (1,)
    assert pr1.execute(fn, ("CAS",)).fetchone() == (None,)  # not a secondary of PR1
    assert pr1.execute(fn, ("ZZZ",)).fetchone() == (None,)


def test_the_roll_up_waits_for_a_child_the_run_has_not_reached(
    dbs: dict[str, sqlite3.Connection],
) -> None:
    cas = dbs["CAS"]
    add_update(cas)
    with transaction(cas):
        cas.execute(
            "INSERT INTO EasySetupSettings (PackageID, PackageGuid, PackageHash) "
            "VALUES ('CAS10001', ?, ?)",
            (GUID, HASH),
        )
        servicing.InitiateUpgrade(cas, GUID, PackageFlag.NORMAL)
        # Until HMAN takes 2.ESC, the package stays ENABLED whatever the sites' rows say.
        assert servicing.spProcessCMUPackages(cas) == {GUID: PackageState.ENABLED}
        servicing.set_package_state(cas, GUID, PackageState.CONTENT_REPLICATING)  # HMAN took it
        servicing.spCMUSetSiteState(cas, GUID, PackageState.INSTALL_SUCCESS)
        # PR1 has not even started: the update is still replicating to it, not installed.
        assert servicing.spProcessCMUPackages(cas) == {GUID: PackageState.CONTENT_REPLICATING}
        servicing.spCMUSetSiteState(cas, GUID, PackageState.INSTALL_SUCCESS, site_code="PR1")
        assert servicing.spProcessCMUPackages(cas) == {GUID: PackageState.INSTALL_SUCCESS}
    # Never back to ENABLED by the roll-up: SMSDBMon would drop 2.ESC again.
    assert not cas.execute(
        "SELECT 1 FROM TableChangeNotifications WHERE FileName = '2.ESC' AND ID > "
        "(SELECT MIN(ID) FROM TableChangeNotifications WHERE FileName = '2.ESC')"
    ).fetchall()
