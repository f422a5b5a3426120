"""File-based replication of the Easy Setup Package at the top-level site (docs/hierarchy.md,
steps 1-4 and 6): DistMgr's minijob, the Scheduler's instruction and send request, the
Sender's resumable delivery into a child primary's `despoolr.box/receive`, retries and
failure, and resend requests. The site runs in-process (a LabSite: real inboxes, real
SQLite, real files); the crash test runs the real daemon and kills it mid-copy. The child is
a bare site folder (its despooler is not part of these tests), which keeps what the Sender
delivered for the test to check."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cmlab.core.fs import write_atomic
from cmlab.core.hashing import folder_hash, sha256_file
from cmlab.site.cab import extract_cab
from cmlab.site.config import load_config
from cmlab.site.file_replication import build_package_file
from cmlab.site.formats.replication import parse_instruction, read_instruction
from cmlab.site.sitedb import connect, hierarchy, servicing
from cmlab.site.state_codes import PackageState
from cmlab.testing import LabSite, Mode, assert_in_order

GUID = "11111111-2222-3333-4444-555555555555"
PKG = "CAS10001"
JOB1 = "00000001"
RECEIVE = Path("inboxes/despoolr.box/receive")
DISTMGR = Path("inboxes/distmgr.box")
SCHEDULE = Path("inboxes/schedule.box")
LAN = SCHEDULE / "outboxes" / "LAN"


def make_payload(folder: Path) -> None:
    """Content of ~2.5 MiB that does not compress: the copy spans several 1 MiB chunks."""
    folder.mkdir(parents=True)
    (folder / "SMSSETUP" / "BIN" / "X64").mkdir(parents=True)
    (folder / "SMSSETUP" / "BIN" / "X64" / "setup.exe").write_bytes(os.urandom(2_500_000))
    (folder / "readme.txt").write_text("Easy Setup Package for the tests\n")


def make_hier(
    make: Callable[..., LabSite], tmp_path: Path, mode: Mode = "inprocess"
) -> tuple[LabSite, Path]:
    """(CAS, PR1): the CAS, not started, with an Easy Setup Package whose source is ready (its
    PKN is waiting for DistMgr), and a child primary PR1 whose folder the CAS reaches; a
    secondary SEC below the CAS too, which must never get the package."""
    cas = make(
        stage="new",
        mode=mode,
        start=False,
        settings={"replication.sender_retry_delay": 0.2, "replication.sender_retries": 2},
    )
    child = tmp_path / "PR1"
    (child / RECEIVE).mkdir(parents=True)
    config = load_config(cas.path)
    payload = config.paths.payload_folder(GUID)
    make_payload(payload)
    conn = connect(config.paths.db_file, "CAS")
    try:
        with conn:
            hierarchy.ensure_site(
                conn,
                "PR1",
                parent="CAS",
                site_type=hierarchy.PRIMARY,
                server="pr1.cmlab.local",
                folder=str(child),
            )
            hierarchy.ensure_site(
                conn,
                "SEC",
                parent="CAS",
                site_type=hierarchy.SECONDARY,
                server="sec.cmlab.local",
                folder=str(tmp_path / "SEC"),
            )
            conn.execute(
                "INSERT INTO CM_UpdatePackages (PackageGuid, Name, State, RunNumber) "
                "VALUES (?, 'Test update', ?, 1)",
                (GUID, int(PackageState.CONTENT_REPLICATING)),
            )
            for code in ("CAS", "PR1"):
                servicing.spCMUSetSiteState(
                    conn, GUID, PackageState.CONTENT_REPLICATING, site_code=code
                )
            servicing.sp_UpdateEasySetupSettings(
                conn,
                PKG,
                2,
                folder_hash(payload),
                guid=GUID,
                source=rf"\\{config.fqdn}\EasySetupPayLoad\{GUID}",
                source_site="CAS",
                source_size=2_500_000,
            )
    finally:
        conn.close()
    return cas, child


@pytest.fixture
def hier(cmlab_site_factory: Callable[..., LabSite], tmp_path: Path) -> tuple[LabSite, Path]:
    return make_hier(cmlab_site_factory, tmp_path)


def jobs(site: LabSite) -> list[tuple[int, str, str, int]]:
    return [
        (int(r[0]), str(r[1]), str(r[2]), int(r[3]))
        for r in site.query("SELECT JobID, DestSite, State, Attempts FROM SchedulerJobs")
    ]


def job_state(site: LabSite, job_id: int) -> str | None:
    rows = site.query("SELECT State FROM SchedulerJobs WHERE JobID = ?", [job_id])
    return str(rows[0][0]) if rows else None


def pck(site: LabSite) -> Path:
    return site.path / "SMSPKG" / f"{PKG}.PCK.1"


def delivered(child: Path, job: str) -> bool:
    return (child / RECEIVE / f"{job}.INS").exists()


def site_state(site: LabSite, code: str) -> int | None:
    return site.site_states(GUID).get(code)


def dist_state(site: LabSite, code: str) -> int | None:
    rows = site.query(
        "SELECT State FROM ObjectDistributionState WHERE ObjectID = ? AND SiteCode = ?",
        [PKG, code],
    )
    return int(rows[0][0]) if rows else None


def complete(site: LabSite, job_id: int) -> None:
    site.wait_for(
        lambda: (
            job_state(site, job_id) == "Complete"
            and "<JOB STATUS - COMPLETE>~" in site.log("scheduler.log")
            and not (site.path / SCHEDULE / "tosend" / f"{job_id:08X}.Idb").exists()
        ),
        timeout=30,
        what=f"job {job_id} complete",
    )


def expected_pck(site: LabSite, tmp_path: Path) -> bytes:
    """The PCK the CAS will build: builds are byte-identical for the same content."""
    out = tmp_path / "expected.PCK"
    build_package_file(site.config.paths.payload_folder(GUID), out)
    return out.read_bytes()


# -- the minijob, the Scheduler and the Sender ---------------------------------------------------


def test_minijob_sends_the_package_to_the_child_primary(
    hier: tuple[LabSite, Path], tmp_path: Path
) -> None:
    cas, child = hier
    with cas:
        cas.wait_for(lambda: delivered(child, JOB1), timeout=30, what="the INS at PR1")
        complete(cas, 1)

    assert jobs(cas) == [(1, "PR1", "Complete", 0)]  # PR1 only: never the secondary
    shown = str(pck(cas))
    assert_in_order(
        cas.log("distmgr.log"),
        [
            f"Successfully created/updated the package {PKG}",
            f"Setting CMiniJob transfer root to {shown}",
            f"Created minijob to send compressed copy of package {PKG} to site PR1.  "
            f"Transfer root = {shown}",
        ],
    )
    idb = str(cas.path / SCHEDULE / "tosend" / f"{JOB1}.Idb")
    assert_in_order(
        cas.log("scheduler.log"),
        [
            "1 jobs found in memory, 1 jobs found in job source.",
            f"~Instruction file = {idb}",
            f"<Updating JOB {JOB1}> [Software Distribution for Configuration Manager Easy "
            f"Setup Package, Package ID = {PKG}]~",
            "<JOB STATUS - COMPLETE>~",
        ],
    )
    assert_in_order(
        cas.log("sender.log"),
        [
            f"~Package file = {shown}",
            f"~Instruction file = {idb}",
            f"~Sending Started [{shown}]",
            f"~Finished sending SWD package {PKG} version 1 to site PR1",
            "~Sending completed successfully",
        ],
    )
    # The delivery: the package file byte for byte, then its instruction.
    pkg = child / RECEIVE / f"ds_{JOB1.lower()}.pkg"
    assert pkg.read_bytes() == pck(cas).read_bytes() == expected_pck(cas, tmp_path)
    instr = read_instruction(child / RECEIVE / f"{JOB1}.INS")
    assert (instr.job, instr.job_type, instr.source_site, instr.dest_site) == (
        JOB1,
        "SWD",
        "CAS",
        "PR1",
    )
    assert (instr.package_id, instr.version, instr.package_guid) == (PKG, 1, GUID)
    assert instr.package_file == shown
    assert (instr.file_size, instr.file_hash) == (pkg.stat().st_size, sha256_file(pkg))
    stored = cas.query("SELECT StoredPkgHash FROM SMSPackages WHERE PkgID = ?", [PKG])[0][0]
    assert instr.content_hash == stored
    extract_cab(pkg, tmp_path / "unpacked")
    assert folder_hash(tmp_path / "unpacked") == stored
    assert sorted(p.name for p in (child / RECEIVE).iterdir()) == [f"{JOB1}.INS", pkg.name]
    assert not list((cas.path / LAN).glob("*.SRQ"))
    assert dist_state(cas, "PR1") == 1  # INSTALL_PENDING until PR1 reports
    assert dist_state(cas, "SEC") is None


def test_replayed_notification_creates_no_second_job(hier: tuple[LabSite, Path]) -> None:
    cas, _child = hier
    with cas:
        complete(cas, 1)
        write_atomic(cas.path / DISTMGR / f"{PKG}.PKN", b"")
        cas.wait_for(
            lambda: not (cas.path / DISTMGR / f"{PKG}.PKN").exists(), what="the replayed PKN"
        )
        # A replayed JOB for the finished job only reports it again.
        write_atomic(cas.path / SCHEDULE / f"{JOB1}.JOB", b"")
        cas.wait_for(
            lambda: cas.log("scheduler.log").count("<JOB STATUS - COMPLETE>~") == 2,
            what="the replayed JOB",
        )
    assert jobs(cas) == [(1, "PR1", "Complete", 0)]
    created = [line for line in cas.log("distmgr.log") if line.startswith("Created minijob")]
    assert len(created) == 1


def test_unreachable_child_is_retried_then_the_job_fails(hier: tuple[LabSite, Path]) -> None:
    cas, child = hier
    shutil.rmtree(child)
    with cas:
        cas.wait_for(
            lambda: "<JOB STATUS - FAILED>~" in cas.log("scheduler.log"),
            timeout=30,
            what="the job failed",
        )
    assert jobs(cas) == [(1, "PR1", "Failed", 3)]
    lines = [line for line in cas.log("sender.log") if line.startswith("~Cannot send")]
    receive = child / RECEIVE
    assert lines == [
        f"~Cannot send to site PR1: {receive} does not exist. Will retry in 0.2 seconds "
        "(attempt 1 of 3)",
        f"~Cannot send to site PR1: {receive} does not exist. Will retry in 0.2 seconds "
        "(attempt 2 of 3)",
        f"~Cannot send to site PR1: {receive} does not exist. Giving up after 3 attempts.",
    ]
    assert any(
        line.startswith(f"ERROR: Job {JOB1} failed: Cannot send to site PR1")
        and "RetryContentReplication" in line
        for line in cas.log("sender.log")
    )
    assert site_state(cas, "PR1") == PackageState.CONTENT_REPLICATION_FAILED
    # The CAS's own row is its own: it went on (to its prerequisite check) regardless.
    assert site_state(cas, "CAS") != PackageState.CONTENT_REPLICATION_FAILED
    assert dist_state(cas, "PR1") == 3
    assert not child.exists()  # the Sender never makes a destination
    assert not (cas.path / SCHEDULE / "tosend" / f"{JOB1}.Idb").exists()
    assert not (cas.path / LAN / f"{JOB1}.SRQ").exists()


def test_child_that_comes_back_before_the_limit_gets_the_package(
    hier: tuple[LabSite, Path],
) -> None:
    cas, child = hier
    shutil.rmtree(child / RECEIVE)
    with cas:
        cas.wait_for(
            lambda: any(
                line.startswith("~Cannot send to site PR1") for line in cas.log("sender.log")
            ),
            what="a failed attempt",
        )
        (child / RECEIVE).mkdir()
        complete(cas, 1)
    assert delivered(child, JOB1)
    assert (child / RECEIVE / "ds_00000001.pkg").read_bytes() == pck(cas).read_bytes()
    assert site_state(cas, "PR1") == PackageState.CONTENT_REPLICATING


@pytest.mark.parametrize("damaged", [False, True])
def test_partial_copy_is_resumed_and_a_damaged_one_sent_again(
    hier: tuple[LabSite, Path], tmp_path: Path, damaged: bool
) -> None:
    cas, child = hier
    want = expected_pck(cas, tmp_path)
    half = len(want) // 2
    part = child / RECEIVE / "ds_00000001.pkg.part"
    part.write_bytes(os.urandom(half) if damaged else want[:half])
    with cas:
        complete(cas, 1)
    assert (child / RECEIVE / "ds_00000001.pkg").read_bytes() == want
    assert not part.exists()
    lines = cas.log("sender.log")
    assert f"~Resuming sending [{part}] from byte {half}" in lines
    damaged_line = (
        f"~The partly sent file {part} is damaged (its SHA-256 does not match); sending it "
        "again from the start."
    )
    assert (damaged_line in lines) is damaged


# -- resend requests -----------------------------------------------------------------------------


def rsq(cas: LabSite, name: str, body: bytes = b"the package hash does not match") -> Path:
    path = cas.path / DISTMGR / name
    write_atomic(path, body)
    return path


def test_resend_requests_then_giving_up(hier: tuple[LabSite, Path]) -> None:
    cas, child = hier
    with cas:
        complete(cas, 1)
        # Not the stored version: ignored.
        path = rsq(cas, f"PR1_{PKG}_7.RSQ")
        cas.wait_for(lambda: not path.exists(), what="the RSQ for version 7")
        assert jobs(cas) == [(1, "PR1", "Complete", 0)]
        # A damaged PCK is rebuilt (the same bytes) before it is sent again.
        good = pck(cas).read_bytes()
        pck(cas).write_bytes(b"damaged")
        for job_id in (2, 3):
            rsq(cas, f"PR1_{PKG}_1.RSQ")
            complete(cas, job_id)
            assert delivered(child, f"{job_id:08X}")
        assert pck(cas).read_bytes() == good
        assert (child / RECEIVE / "ds_00000003.pkg").read_bytes() == good
        # The third request after two resends: PR1 is given up on.
        path = rsq(cas, f"pr1_{PKG.lower()}_1.rsq", b"still damaged \x07\n")
        cas.wait_for(lambda: not path.exists(), what="the last RSQ")
    assert [j[:3] for j in jobs(cas)] == [(i, "PR1", "Complete") for i in (1, 2, 3)]
    lines = cas.log("distmgr.log")
    assert (
        f"Package {PKG} version 7 is not the stored version (1); the request from site PR1 "
        "is ignored." in lines
    )
    assert_in_order(
        lines,
        [
            f"Received a request from site PR1 to resend package {PKG} version 7: the package "
            "hash does not match",
            f"Received a request from site PR1 to resend package {PKG} version 1: the package "
            "hash does not match",
            f"Setting CMiniJob transfer root to {pck(cas)}",
            f"Created minijob to send compressed copy of package {PKG} to site PR1.  "
            f"Transfer root = {pck(cas)}",
            f"Received a request from site PR1 to resend package {PKG} version 1: still damaged",
        ],
    )
    assert any(
        line.startswith(
            f"ERROR: Package {PKG} version 1 arrived damaged at site PR1 after 2 resends: giving up"
        )
        and "RetryContentReplication" in line
        for line in lines
    )
    assert site_state(cas, "PR1") == PackageState.CONTENT_REPLICATION_FAILED
    assert dist_state(cas, "PR1") == 3


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "name", "body", "reason"),
    [
        (SCHEDULE, "NOTAJOB.JOB", b"", "the file name is not <JobID>.JOB"),
        (SCHEDULE, "00000000.JOB", b"", "job IDs start at 1"),
        (SCHEDULE, "0000001G.JOB", b"", "the file name is not <JobID>.JOB"),
        (LAN, "1.SRQ", b"", "the file name is not <JobID>.SRQ"),
        (LAN, "00000009.SRQ", b"Job=00000001\n", "the request names job '00000001'"),
        (LAN, "00000009.SRQ", b"\xff\xfe", "not UTF-8 text"),
        (LAN, "00000009.SRQ", b"x" * 5000, "larger than 1024 bytes"),
        (LAN, "00000009.SRQ", b"rm -rf /\n", "unexpected line"),
        (DISTMGR, "PR1_CAS10001.RSQ", b"", "the file name is not <ChildSite>_<PkgID>_<Version>"),
        (DISTMGR, "PR1_CAS10001_0.RSQ", b"", "the file name is not <ChildSite>_<PkgID>_"),
        (DISTMGR, "XX1_CAS10001_1.RSQ", b"", "site XX1 is not a child primary site of CAS"),
        (DISTMGR, "SEC_CAS10001_1.RSQ", b"", "site SEC is not a child primary site of CAS"),
        (DISTMGR, "PR1_CAS10009_1.RSQ", b"", "package CAS10009 is not an Easy Setup Package"),
        (DISTMGR, "PR1_CAS10001_1.RSQ", b"y" * 5000, "larger than 4096 bytes"),
        (DISTMGR, "PR1_CAS10001_1.RSQ", b"\xc3\x28", "the reason is not UTF-8 text"),
    ],
)
def test_hostile_drop_files_go_to_bad(
    hier: tuple[LabSite, Path], box: Path, name: str, body: bytes, reason: str
) -> None:
    cas, _child = hier
    with cas:
        complete(cas, 1)
        write_atomic(cas.path / box / name, body)
        cas.wait_for(
            lambda: (cas.path / box / "BAD" / f"{name}.reason").exists(), what=f"{name} in BAD"
        )
        text = (cas.path / box / "BAD" / f"{name}.reason").read_text()
        assert reason in text, text
        assert not (cas.path / box / name).exists()
        # Still serving: a good resend request is answered.
        rsq(cas, f"PR1_{PKG}_1.RSQ")
        complete(cas, 2)
    assert jobs(cas)[-1][:3] == (2, "PR1", "Complete")


def test_symlinked_package_part_is_not_written_through(
    hier: tuple[LabSite, Path], tmp_path: Path
) -> None:
    cas, child = hier
    victim = tmp_path / "victim.txt"
    victim.write_text("not the sender's\n")
    os.symlink(victim, child / RECEIVE / "ds_00000001.pkg.part")
    with cas:
        complete(cas, 1)
    assert victim.read_text() == "not the sender's\n"
    assert (child / RECEIVE / "ds_00000001.pkg").read_bytes() == pck(cas).read_bytes()


# -- a crash in the middle of the copy -------------------------------------------------------------


def test_sigkill_mid_copy_then_restart_converges(
    cmlab_site_factory: Callable[..., LabSite], tmp_path: Path
) -> None:
    # A crash point SIGKILLs the daemon's process: the CAS runs as `cmlab run`, a child process.
    cas, child = make_hier(cmlab_site_factory, tmp_path, mode="subprocess")
    part = child / RECEIVE / "ds_00000001.pkg.part"
    # Killed after the second 1 MiB chunk of the package was written.
    cas.start(CMLAB_CRASHPOINTS="sender.mid_copy:2")
    assert cas.wait_exit(60) == -9
    assert part.exists() and not delivered(child, JOB1)
    kept = part.stat().st_size
    assert kept > 0
    cas.start()
    cas.wait_for(lambda: job_state(cas, 1) == "Complete", timeout=60, what="job complete")
    cas.wait_for(
        lambda: not (cas.path / SCHEDULE / "tosend" / f"{JOB1}.Idb").exists(),
        timeout=30,
        what="the Idb removed",
    )
    assert cas.stop() == 0
    assert "Traceback" not in cas.daemon_stderr(), cas.daemon_stderr()
    assert delivered(child, JOB1)
    assert (child / RECEIVE / "ds_00000001.pkg").read_bytes() == pck(cas).read_bytes()
    assert f"~Resuming sending [{part}] from byte {kept}" in cas.log("sender.log")
    parse_instruction((child / RECEIVE / f"{JOB1}.INS").read_bytes())
    assert jobs(cas) == [(1, "PR1", "Complete", 0)]


def test_site_recovery_job_carries_the_sidecar(hier: tuple[LabSite, Path], tmp_path: Path) -> None:
    """A SiteRecovery job (HMAN's) goes the same way, with `Recovery` from the sidecar."""
    cas, _child = hier
    sec = tmp_path / "SEC"
    (sec / RECEIVE).mkdir(parents=True)
    rcv = cas.path / "SMSPKG" / "SEC.RCV.1"
    rcv.parent.mkdir(exist_ok=True)
    rcv.write_bytes(os.urandom(3000))
    recovery = {
        "Build": 9135,
        "Version": "5.00.9135.1000",
        "FullVersion": "5.00.9135.1006",
        "InstalledUpdates": [GUID],
    }
    write_atomic(rcv.with_name("SEC.RCV.1.json"), json.dumps(recovery))
    conn = connect(cas.path / "db" / "site.db", "CAS")
    try:
        with conn:
            conn.execute(
                "INSERT INTO SchedulerJobs (JobID, JobType, PkgID, Version, DestSite, "
                "PackageFile, FileSize, FileHash, ContentHash) "
                "VALUES (100, 'SiteRecovery', 'SEC', 1, 'SEC', 'SMSPKG/SEC.RCV.1', 3000, ?, ?)",
                (sha256_file(rcv), "C" * 64),
            )
    finally:
        conn.close()
    with cas:
        complete(cas, 100)
    instr = read_instruction(sec / RECEIVE / "00000064.INS")
    assert (instr.job_type, instr.package_id, instr.dest_site) == ("SiteRecovery", "SEC", "SEC")
    assert instr.recovery is not None and instr.recovery.installed_updates == (GUID,)
    assert (sec / RECEIVE / "ds_00000064.pkg").read_bytes() == rcv.read_bytes()
    assert "<Updating JOB 00000064> [Secondary Site Recovery, Site = SEC]~" in cas.log(
        "scheduler.log"
    )
