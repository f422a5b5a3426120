"""The despooler at a child primary (docs/hierarchy.md, step 5): real sites made by `cmlab
init` (a CAS and its child primary PR1), real CABs, the real inbox engine. The package and its
instruction are dropped as the parent's Sender delivers them (`ds_<jobid>.pkg` first,
`<JobID>.INS` last)."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from cmlab.components.despooler import Despooler
from cmlab.core.fs import write_atomic
from cmlab.core.hashing import folder_hash, sha256_bytes
from cmlab.site.cab import create_cab
from cmlab.site.component import Component, SiteContext
from cmlab.site.config import load_config
from cmlab.site.content_library import ContentLibrary
from cmlab.site.formats.replication import Instruction, Recovery, build_instruction
from cmlab.site.inbox import InboxEngine
from cmlab.site.sitedb import SiteDB, connect, servicing, transaction
from cmlab.site.sms_log import LogRegistry, LogSink
from cmlab.site.state_codes import PackageState
from cmlab.testing import SAMPLE_UPDATE, HierarchySpec, LabHierarchy, LabSite, Mode, assert_in_order
from tests.helpers.site_files import temporaries
from tests.helpers.waiting import await_until
from tests.unit.test_cabfiles import raw_cab

ROOT = r"C:\Program Files\Microsoft Configuration Manager"
PKG = "CAS10001"
JOB = "00000001"
SENT_FROM = r"E:\ConfigMgr\SMSPKG\CAS10001.PCK.{v}"
SOURCE = rf"\\cas.cmlab.local\EasySetupPayLoad\{SAMPLE_UPDATE}"
CONTENT_V1 = {
    "SMSSetup/update.map.cab": b"the update map\n" * 50,
    "SMSSetup/bin/x64/cmupdate.exe": os.urandom(40_000),
    "CMUClient/ccmsetup.exe": b"ccmsetup" * 1000,
    "readme.txt": b"Configuration Manager Easy Setup Package\n",
}
CONTENT_V2 = {**CONTENT_V1, "readme.txt": b"version two\n", "new.txt": b"new file\n"}


# -- sites ----------------------------------------------------------------------------------


def make_hierarchy(
    root: Path, cas: Path, *, secondary: bool = False, mode: Mode = "inprocess"
) -> LabHierarchy:
    """A CAS (a copy of `cas`, a new site) with its child primary PR1 (and PR1's secondary
    SEC), each its own folder and database, made by `cmlab init --role ... --parent ...`; no
    daemon started (the caller stops any it starts)."""
    children: list[dict[str, object]] = [
        {"code": "PR1", "parent": "CAS", "settings": {"site.display_root": ROOT}}
    ]
    if secondary:
        children.append({"code": "SEC", "parent": "PR1", "settings": {"site.display_root": ROOT}})
    spec = HierarchySpec.from_dict({"site": [{"code": "CAS"}, *children]})
    return LabHierarchy(root, spec, mode=mode, top_from=cas).create()


@pytest.fixture
def hier(template: Path, tmp_path: Path) -> Iterator[LabHierarchy]:
    h = make_hierarchy(tmp_path / "sites", template)
    yield h
    h.stop()


def receive(site: LabSite) -> Path:
    return site.inbox("despoolr.box/receive")


def bad(site: LabSite) -> Path:
    return receive(site) / "BAD"


@asynccontextmanager
async def running(
    site: LabSite, component: type[Component] = Despooler, handlers: tuple[str, ...] = ()
) -> AsyncIterator[Component]:
    """One component of `site` on the real inbox engine, in this process (its inboxes only,
    or only those of `handlers`): the handler runs exactly as in the daemon, and no other
    component acts on what it leaves (a whole daemon, LabSite.start, would take the run on)."""
    config = load_config(site.path)
    db = SiteDB(config.paths.db_file, config.site_code)
    logs = LogRegistry(LogSink(folder=config.paths.logs, site_code=config.site_code))
    engine = InboxEngine(rescan=0.2, settle=0.05)
    comp = component(SiteContext(config=config, db=db, logs=logs, engine=engine))
    for spec in comp.inboxes():
        if not handlers or spec.handler.__name__ in handlers:
            engine.add(spec)
    await engine.start()
    try:
        yield comp
    finally:
        await engine.stop()
        db.close()
        logs.close()


async def handled(site: LabSite, job: str = JOB) -> None:
    """The INS is gone: the handler returned (DONE: the engine deleted it) or moved it (BAD)."""
    ins = receive(site) / f"{job}.INS"
    await await_until(lambda: not ins.exists(), timeout=30, what=f"{ins.name} handled")


# -- packages -------------------------------------------------------------------------------


def write_tree(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def pck(cas: LabSite, files: dict[str, bytes], version: int, tmp: Path) -> tuple[Path, str]:
    """The parent's `SMSPKG/CAS10001.PCK.<v>` of `files`, and the content's folder hash."""
    source = write_tree(tmp / f"content{version}", files)
    dst = cas.path / "SMSPKG" / f"{PKG}.PCK.{version}"
    create_cab(files, dst)
    return dst, folder_hash(source)


def swd(
    job: str,
    version: int,
    data: bytes,
    content_hash: str,
    *,
    dest: str = "PR1",
    **override: object,
) -> bytes:
    fields: dict[str, object] = {
        "job": job,
        "job_type": "SWD",
        "source_site": "CAS",
        "dest_site": dest,
        "package_id": PKG,
        "version": version,
        "package_guid": SAMPLE_UPDATE,
        "package_name": servicing.EASY_SETUP_PACKAGE_NAME,
        "source": SOURCE,
        "package_file": SENT_FROM.format(v=version),
        "file_size": len(data),
        "file_hash": sha256_bytes(data),
        "content_hash": content_hash,
    }
    fields.update(override)
    return build_instruction(Instruction(**fields))  # type: ignore[arg-type]


def deliver(site: LabSite, job: str, pkg_bytes: bytes | None, instruction: bytes) -> None:
    """As the Sender: the package first, the instruction last (each renamed into place)."""
    receive(site).mkdir(parents=True, exist_ok=True)
    if pkg_bytes is not None:
        write_atomic(receive(site) / f"ds_{job.lower()}.pkg", pkg_bytes)
    write_atomic(receive(site) / f"{job}.INS", instruction)


def received_lines(version: int, old: int, job: str = JOB) -> list[str]:
    """The guide's despool.log lines, with PR1's paths."""
    return [
        f"Received package {PKG} version {version}. Compressed file -  "
        f"{SENT_FROM.format(v=version)} as {ROOT}\\inboxes\\despoolr.box\\receive\\"
        f"ds_{job.lower()}.pkg",
        f"Content Library: {ROOT}\\SCCMContentLib",
        f"Extracting from {ROOT}\\SMSPKG\\{PKG}.PCK.temp",
        f"Extracting package {PKG}",
        f"Extracting content {PKG}.{version}",
        f"Writing package definition for {PKG}",
        f"Package {PKG} (version {old}) exists in the distribution source, save the newer "
        f"version (version {version}).",
        f"Stored Package {PKG}. Stored Package Version = {version}",
    ]


def library(site: LabSite) -> ContentLibrary:
    return ContentLibrary(site.path / "SCCMContentLib")


def stored_files(site: LabSite, version: int, dest: Path) -> dict[str, bytes]:
    library(site).extract(PKG, version, dest)
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}


def seed_replicated_run(site: LabSite, package_hash: str | None) -> None:
    """What CMUpdates replication brings a child before its package: the update with run 1,
    this site's row at CONTENT_REPLICATING, and EasySetupSettings with the top-level site's
    PackageHash."""
    conn = connect(site.path / "db" / "site.db", "PR1")
    try:
        with transaction(conn):
            conn.execute(
                "INSERT INTO CM_UpdatePackages (PackageGuid, Name, State, RunNumber) "
                "VALUES (?, 'Configuration Manager 2509', ?, 1)",
                (SAMPLE_UPDATE, int(PackageState.CONTENT_REPLICATING)),
            )
            conn.execute(
                "INSERT INTO CM_UpdatePackageSiteStatus (PackageGuid, SiteNumber, State, "
                "RunNumber) VALUES (?, 1, ?, 1)",
                (SAMPLE_UPDATE, int(PackageState.CONTENT_REPLICATING)),
            )
            conn.execute(
                "INSERT INTO EasySetupSettings (PackageID, PackageGuid, PackageVersion, "
                "PackageHash) VALUES (?, ?, 1, ?)",
                (PKG, SAMPLE_UPDATE, package_hash),
            )
    finally:
        conn.close()


def leftovers(site: LabSite) -> list[str]:
    """Working files the despooler must not leave: the PCK.temp and cmlab temporaries."""
    found = [p.name for p in (site.path / "SMSPKG").glob("*.temp")]
    return found + temporaries(site.path)


# -- a good package -------------------------------------------------------------------------


async def test_good_package_is_stored_recorded_and_moves_the_run_on(
    hier: LabHierarchy, tmp_path: Path
) -> None:
    cas, pr1 = hier["CAS"], hier["PR1"]
    pck_file, content_hash = pck(cas, CONTENT_V1, 1, tmp_path)
    data = pck_file.read_bytes()
    seed_replicated_run(pr1, content_hash)
    async with running(pr1):
        deliver(pr1, JOB, data, swd(JOB, 1, data, content_hash))
        await handled(pr1)

    assert pr1.log("despool.log") == received_lines(1, 0)
    assert library(pr1).current_version(PKG) == 1
    assert stored_files(pr1, 1, tmp_path / "out") == CONTENT_V1
    assert pr1.query(
        "SELECT Name, Source, SourceSite, SourceVersion, StoredPkgVersion, StoredPkgHash, "
        "StorePkgFlag FROM SMSPackages WHERE PkgID = ?",
        [PKG],
    ) == [(servicing.EASY_SETUP_PACKAGE_NAME, SOURCE, "CAS", 1, 1, content_hash, 2)]
    # The replicated PackageHash is the top-level site's: kept.
    assert pr1.query(
        "SELECT PackageGuid, PackageHash FROM EasySetupSettings WHERE PackageID = ?", [PKG]
    ) == [(SAMPLE_UPDATE, content_hash)]
    assert pr1.query("SELECT SiteCode, State, SourceVersion FROM ObjectDistributionState") == [
        ("PR1", 0, 1)
    ]
    assert pr1.query(
        "SELECT IsComplete, Progress FROM CM_UpdatePackage_MonitoringStatus "
        "WHERE PackageGuid = ? AND SiteNumber = 1 AND SubStageID = 720898",
        [SAMPLE_UPDATE],
    ) == [(2, 100)]
    # The stored hash is the one the top-level site recorded: this site's run goes on.
    assert pr1.query("SELECT State FROM CM_UpdatePackageSiteStatus WHERE SiteNumber = 1") == [
        (PackageState.CONTENT_REPLICATION_SUCCESS,)
    ]
    assert sorted(os.listdir(receive(pr1))) == []
    assert leftovers(pr1) == []
    # No notification for DistMgr here: a replicated package is not snapshotted again.
    assert not pr1.query("SELECT 1 FROM TableChangeNotifications WHERE FileName LIKE '%.PKN'")


async def test_new_package_row_has_no_package_hash_until_replication_brings_it(
    hier: LabHierarchy, tmp_path: Path
) -> None:
    cas, pr1 = hier["CAS"], hier["PR1"]
    pck_file, content_hash = pck(cas, CONTENT_V1, 1, tmp_path)
    data = pck_file.read_bytes()
    async with running(pr1):
        deliver(pr1, JOB, data, swd(JOB, 1, data, content_hash))
        await handled(pr1)
    assert pr1.query(
        "SELECT PackageGuid, PackageHash FROM EasySetupSettings WHERE PackageID = ?", [PKG]
    ) == [(SAMPLE_UPDATE, None)]
    assert library(pr1).current_version(PKG) == 1


async def test_replay_and_newer_version(hier: LabHierarchy, tmp_path: Path) -> None:
    """The same INS twice changes nothing; a newer version replaces the stored one and the
    library keeps only it; an older one is refused as stored already."""
    cas, pr1 = hier["CAS"], hier["PR1"]
    v1, h1 = pck(cas, CONTENT_V1, 1, tmp_path)
    v2, h2 = pck(cas, CONTENT_V2, 2, tmp_path)
    d1, d2 = v1.read_bytes(), v2.read_bytes()
    async with running(pr1):
        deliver(pr1, JOB, d1, swd(JOB, 1, d1, h1))
        await handled(pr1)
        rows = pr1.query("SELECT * FROM SMSPackages")
        ods = pr1.query(
            "SELECT ObjectID, SiteCode, State, SourceVersion FROM ObjectDistributionState"
        )
        # Replayed: the Sender sent it again (package and all).
        deliver(pr1, JOB, d1, swd(JOB, 1, d1, h1))
        await handled(pr1)
        assert pr1.query("SELECT * FROM SMSPackages") == rows
        assert (
            pr1.query(
                "SELECT ObjectID, SiteCode, State, SourceVersion FROM ObjectDistributionState"
            )
            == ods
        )
        # Only the instruction again (the package was consumed the first time).
        deliver(pr1, JOB, None, swd(JOB, 1, d1, h1))
        await handled(pr1)
        deliver(pr1, "00000002", d2, swd("00000002", 2, d2, h2))
        await handled(pr1, "00000002")
        deliver(pr1, "00000003", d1, swd("00000003", 1, d1, h1))
        await handled(pr1, "00000003")

    already = (
        "Package CAS10001 version 1 is already stored (Stored Package Version = {}); nothing to do."
    )
    assert pr1.log("despool.log") == [
        *received_lines(1, 0),
        already.format(1),
        already.format(1),
        *received_lines(2, 1, "00000002"),
        already.format(2),
    ]
    lib = library(pr1)
    assert lib.current_version(PKG) == 2
    assert lib.snapshot_info(PKG, 1) is None  # remove_old_versions
    assert stored_files(pr1, 2, tmp_path / "out") == CONTENT_V2
    assert pr1.query("SELECT StoredPkgVersion, StoredPkgHash FROM SMSPackages") == [(2, h2)]
    assert os.listdir(receive(pr1)) == []
    assert leftovers(pr1) == []


# -- damaged packages -----------------------------------------------------------------------


def _truncated(data: bytes, h: str) -> tuple[bytes, bytes]:
    # The Sender was cut off: the instruction describes the whole file.
    return data[: len(data) // 2], swd(JOB, 1, data, h)


def _wrong_hash(data: bytes, h: str) -> tuple[bytes, bytes]:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    return bytes(flipped), swd(JOB, 1, data, h)


def _garbage(data: bytes, h: str) -> tuple[bytes, bytes]:
    junk = b"this is not a cabinet" * 100
    return junk, swd(JOB, 1, junk, h)


def _dotdot_member(data: bytes, h: str) -> tuple[bytes, bytes]:
    hostile = raw_cab([(b"readme.txt", b"fine"), (b"..\\..\\..\\evil.txt", b"pwned")])
    return hostile, swd(JOB, 1, hostile, h)


def _wrong_content_hash(data: bytes, h: str) -> tuple[bytes, bytes]:
    return data, swd(JOB, 1, data, "0" * 64)


DAMAGES = {
    "truncated": (_truncated, r".*: \d+ bytes, the instruction says \d+"),
    "wrong hash": (_wrong_hash, r".*: SHA-256 [0-9A-F]{64}, the instruction says [0-9A-F]{64}"),
    "garbage": (_garbage, r".*: not a usable CAB: .*"),
    "dotdot member": (_dotdot_member, r".*: not a usable CAB: .*'\.\.'.*"),
    "wrong content hash": (
        _wrong_content_hash,
        r".*: its content has hash [0-9A-F]{64}, the instruction says 0{64}",
    ),
}


def assert_quarantined_and_rerequested(
    cas: LabSite, pr1: LabSite, reason: str, *, pkg_delivered: bool = True
) -> None:
    assert sorted(p for p in os.listdir(bad(pr1)) if not p.endswith(".reason")) == sorted(
        [f"{JOB}.INS", *([f"ds_{JOB.lower()}.pkg"] if pkg_delivered else [])]
    )
    assert (bad(pr1) / f"{JOB}.INS.reason").read_text().splitlines()[1] == reason
    assert [p for p in os.listdir(receive(pr1)) if p != "BAD"] == []
    # Kept out of the content library.
    assert library(pr1).current_version(PKG) is None
    assert not list((pr1.path / "SCCMContentLib" / "FileLib").rglob("*"))
    assert pr1.query("SELECT COUNT(*) FROM SMSPackages") == [(0,)]
    assert pr1.query(
        "SELECT ObjectID, SiteCode, State, SourceVersion FROM ObjectDistributionState"
    ) == [(PKG, "PR1", 2, 1)]
    rsq = cas.path / "inboxes" / "distmgr.box" / "PR1_CAS10001_1.RSQ"
    assert rsq.read_text() == reason + "\n"
    assert leftovers(pr1) == [] and temporaries(cas.path) == []


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
async def test_damaged_package_goes_to_bad_and_is_rerequested(
    hier: LabHierarchy, tmp_path: Path, damage: str
) -> None:
    cas, pr1 = hier["CAS"], hier["PR1"]
    pck_file, content_hash = pck(cas, CONTENT_V1, 1, tmp_path)
    make, pattern = DAMAGES[damage]
    pkg_bytes, instruction = make(pck_file.read_bytes(), content_hash)
    async with running(pr1):
        deliver(pr1, JOB, pkg_bytes, instruction)
        await handled(pr1)

    lines = pr1.log("despool.log")
    errors = [line for line in lines if line.startswith("ERROR: Package")]
    assert len(errors) == 1, lines
    m = re.fullmatch(
        r"ERROR: Package CAS10001 version 1 from site CAS is damaged: (.*)\. It is not stored; "
        r"it is re-requested from site CAS\.",
        errors[0],
    )
    assert m is not None and re.fullmatch(pattern, m[1]), errors[0]
    assert_in_order(
        lines,
        [
            received_lines(1, 0)[0],
            f"Extracting from {ROOT}\\SMSPKG\\{PKG}.PCK.temp",
            errors[0],
            re.compile(r"Requested site CAS to send package CAS10001 version 1 again \(.*\)\."),
        ],
    )
    assert not any(line.startswith("Stored Package") for line in lines)
    assert_quarantined_and_rerequested(cas, pr1, m[1])


async def test_missing_package_is_rerequested(hier: LabHierarchy, tmp_path: Path) -> None:
    cas, pr1 = hier["CAS"], hier["PR1"]
    pck_file, content_hash = pck(cas, CONTENT_V1, 1, tmp_path)
    data = pck_file.read_bytes()
    async with running(pr1):
        deliver(pr1, JOB, None, swd(JOB, 1, data, content_hash))
        await handled(pr1)
    reason = f"ds_{JOB.lower()}.pkg: the package file is missing"
    assert (
        "ERROR: Package CAS10001 version 1 from site CAS is damaged: "
        f"{reason}. It is not stored; it is re-requested from site CAS."
    ) in pr1.log("despool.log")
    assert_quarantined_and_rerequested(cas, pr1, reason, pkg_delivered=False)


async def test_unreachable_parent_is_logged_and_the_package_still_quarantined(
    hier: LabHierarchy, tmp_path: Path
) -> None:
    cas, pr1 = hier["CAS"], hier["PR1"]
    pck_file, content_hash = pck(cas, CONTENT_V1, 1, tmp_path)
    data = pck_file.read_bytes()
    gone = tmp_path / "unmounted-share"
    conn = connect(pr1.path / "db" / "site.db", "PR1")
    with transaction(conn):
        conn.execute("UPDATE ServerData SET SiteFolder = ? WHERE SiteCode = 'CAS'", (str(gone),))
    conn.close()
    async with running(pr1):
        deliver(pr1, JOB, data[:-1], swd(JOB, 1, data, content_hash))
        await handled(pr1)
    lines = pr1.log("despool.log")
    assert any(
        re.fullmatch(
            rf"ERROR: Cannot reach parent site CAS at {re.escape(str(gone))} to re-request "
            r"package CAS10001 version 1: .*",
            line,
        )
        for line in lines
    ), lines
    assert sorted(os.listdir(bad(pr1))) == [
        f"{JOB}.INS",
        f"{JOB}.INS.reason",
        f"ds_{JOB.lower()}.pkg",
        f"ds_{JOB.lower()}.pkg.reason",
    ]
    assert not gone.exists()
    assert not list((cas.path / "inboxes" / "distmgr.box").glob("*.RSQ"))
    assert pr1.query("SELECT State FROM ObjectDistributionState") == [(2,)]


@pytest.mark.parametrize(
    ("instruction", "reason"),
    [
        (b"{not json", r"00000001\.INS: not valid JSON: .*"),
        (b"{}", r"00000001\.INS: JobType .* is not SWD or SiteRecovery"),
        (b"x" * (64 * 1024 + 1), r"00000001\.INS: larger than 65536 bytes"),
        (None, r"00000001\.INS: job 00000001 is for site PR2, not PR1"),
        ("wrong job", r"00000001\.INS: the file name is not its job 00000009"),
        ("recovery", r"00000001\.INS: PR1 is a primary site; only a secondary site is .*"),
    ],
    ids=["not-json", "no-keys", "too-big", "other-site", "wrong-job", "recovery-at-primary"],
)
async def test_instruction_that_cannot_be_used_goes_to_bad_with_its_package(
    hier: LabHierarchy, tmp_path: Path, instruction: bytes | str | None, reason: str
) -> None:
    cas, pr1 = hier["CAS"], hier["PR1"]
    pck_file, content_hash = pck(cas, CONTENT_V1, 1, tmp_path)
    data = pck_file.read_bytes()
    if instruction is None:
        instruction = swd(JOB, 1, data, content_hash, dest="PR2")
    elif instruction == "wrong job":
        instruction = swd("00000009", 1, data, content_hash)
    elif instruction == "recovery":
        instruction = swd(
            JOB,
            1,
            data,
            content_hash,
            job_type="SiteRecovery",
            package_id="PR1",
            package_guid="",
            source="",
            recovery=Recovery(9135, "5.00.9135.1000", "5.00.9135.1000", ()),
        )
    assert isinstance(instruction, bytes)
    async with running(pr1):
        deliver(pr1, JOB, data, instruction)
        await handled(pr1)
    assert sorted(os.listdir(bad(pr1))) == [
        f"{JOB}.INS",
        f"{JOB}.INS.reason",
        f"ds_{JOB.lower()}.pkg",
        f"ds_{JOB.lower()}.pkg.reason",
    ]
    assert re.fullmatch(reason, (bad(pr1) / f"{JOB}.INS.reason").read_text().splitlines()[1])
    assert library(pr1).current_version(PKG) is None
    assert pr1.query("SELECT COUNT(*) FROM ObjectDistributionState") == [(0,)]
    # Not damaged in transit: nothing is re-requested.
    assert not list((cas.path / "inboxes" / "distmgr.box").glob("*.RSQ"))


# -- the real daemon ------------------------------------------------------------------------


def _stored_and_idle(pr1: LabSite, version: int = 1) -> bool:
    return not (receive(pr1) / f"{JOB}.INS").exists() and pr1.query(
        "SELECT StoredPkgVersion FROM SMSPackages"
    ) == [(version,)]


def test_files_wait_while_the_despooler_is_down(hier: LabHierarchy, tmp_path: Path) -> None:
    """Delivered while the site's daemon is stopped: handled at its start (the backlog)."""
    cas, pr1 = hier["CAS"], hier["PR1"]
    pck_file, content_hash = pck(cas, CONTENT_V1, 1, tmp_path)
    data = pck_file.read_bytes()
    deliver(pr1, JOB, data, swd(JOB, 1, data, content_hash))
    pr1.start()
    pr1.wait_for(lambda: _stored_and_idle(pr1), timeout=60, what="the backlog despooled")
    assert pr1.stop() == 0
    assert pr1.log("despool.log") == received_lines(1, 0)
    assert library(pr1).current_version(PKG) == 1
    assert os.listdir(receive(pr1)) == []


@pytest.mark.parametrize(
    "point", ["despooler.after_move", "despooler.after_store", "despooler.after_record"]
)
def test_a_crash_anywhere_converges_on_restart(template: Path, tmp_path: Path, point: str) -> None:
    # A crash point SIGKILLs the daemon's process: PR1 runs as `cmlab run` in a child process.
    hier = make_hierarchy(tmp_path / "sites", template, mode="subprocess")
    cas, pr1 = hier["CAS"], hier["PR1"]
    pck_file, content_hash = pck(cas, CONTENT_V1, 1, tmp_path)
    data = pck_file.read_bytes()
    deliver(pr1, JOB, data, swd(JOB, 1, data, content_hash))
    try:
        pr1.start(CMLAB_CRASHPOINTS=point)
        assert pr1.wait_exit(60) != 0  # killed itself at the point
        assert (receive(pr1) / f"{JOB}.INS").exists()
        pr1.start()
        pr1.wait_for(lambda: _stored_and_idle(pr1), timeout=60, what="the replay converged")
        assert pr1.stop() == 0
    finally:
        hier.stop()
    # The first run's lines up to the crash, then the replay's: all of them, or (the rows
    # were committed) that the version is stored already.
    full = received_lines(1, 0)
    already = (
        "Package CAS10001 version 1 is already stored (Stored Package Version = 1); nothing to do."
    )
    expected = {
        "despooler.after_move": [*full[:2], *full],
        "despooler.after_store": [*full[:5], *full],
        "despooler.after_record": [*full[:6], already],
    }
    assert pr1.log("despool.log") == expected[point]
    assert library(pr1).current_version(PKG) == 1
    assert stored_files(pr1, 1, tmp_path / "out") == CONTENT_V1
    assert pr1.query("SELECT State, SourceVersion FROM ObjectDistributionState") == [(0, 1)]
    assert os.listdir(receive(pr1)) == []
    assert leftovers(pr1) == []
