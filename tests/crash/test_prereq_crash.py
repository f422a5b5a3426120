"""SIGKILL during the Replication and Prerequisite check stages: HMAN on 2.ESC and on the CME,
DistMgr's snapshot into SCCMContentLib (between files, after the DataLib tree, after the
definition), CMUpdate's extraction to CMUStaging and its prerequisite run, and at random
moments. A restart converges to PREREQ_SUCCESS with the content library verified, the staging
folder hash-correct, each rule recorded once and no temporary, drop file or quarantine left.
Also the guide's case of a damaged staging folder, which CMUpdate replaces from the library."""

from __future__ import annotations

import random
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cmlab.core.hashing import folder_hash, staging_hash
from cmlab.site.content_library import ContentLibrary
from cmlab.site.state_codes import PackageState
from tests.helpers.sites import (
    GUID_2509,
    Daemon,
    cmlab,
    copy_site,
    inbox_files,
    log,
    query,
    states,
    temporaries,
    wait_serving,
)
from tests.helpers.waiting import wait_until

G = GUID_2509
g = G.lower()
PKG = "CAS10001"
HASH = r"[0-9A-F]{64}"


@dataclass(frozen=True)
class Reference:
    """A clean run of the same flow: how long it takes and which rules it records."""

    seconds: float
    rules: list[tuple[str, str]]


@pytest.fixture
def site(downloaded_template: Path, tmp_path: Path) -> Path:
    return copy_site(downloaded_template, tmp_path / "CAS").resolve()


@pytest.fixture(scope="module")
def reference(downloaded_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """A clean run, once: its time (from `cmlab prereq` to settled) bounds the random kills,
    its rules are what every converged run must have recorded."""
    site = copy_site(downloaded_template, tmp_path_factory.mktemp("prereq-ref") / "CAS")
    with Daemon(site) as daemon:
        daemon.start()
        wait_serving(site, daemon)
        cmlab("prereq", str(site), G)
        started = time.monotonic()
        wait_until(lambda: settled(site), timeout=60, what="the reference run")
        seconds = time.monotonic() - started
        assert daemon.stop() == 0
    assert_converged(site, None)
    return Reference(seconds=seconds, rules=rules(site))


def notifications(site: Path) -> int:
    """Table changes SMSDBMon has not turned into drop files yet."""
    return int(query(site, "SELECT COUNT(*) FROM TableChangeNotifications")[0][0])


def settled(site: Path) -> bool:
    """PREREQ_SUCCESS and nothing left to do: no drop file and no notification on its way to
    becoming one (SMSDBMon drops a last CME for the site state CMUpdate reported, which HMAN
    may find after it has already rolled the state up). Work is always in at least one of the
    two (a file is durable before its notification row goes, and a handler's database change
    is committed before its drop file is deleted), so the files are looked at on both sides
    of the rows."""
    return (
        not inbox_files(site)
        and notifications(site) == 0
        and states(site).get(G) == PackageState.PREREQ_SUCCESS
        and not inbox_files(site)
    )


def rules(site: Path) -> list[tuple[str, str]]:
    return sorted(
        (str(server), str(rule))
        for server, rule in query(
            site,
            "SELECT ServerName, RuleName FROM CM_UpdatePackagePrereqStatus WHERE PackageGuid = ?",
            [G],
        )
    )


def assert_converged(site: Path, ref: Reference | None) -> None:
    assert states(site)[G] == PackageState.PREREQ_SUCCESS
    assert query(site, "SELECT Flag FROM CM_UpdatePackages WHERE PackageGuid = ?", [G]) == [(1,)]
    assert query(
        site, "SELECT State FROM CM_UpdatePackageSiteStatus WHERE PackageGuid = ?", [G]
    ) == [(PackageState.PREREQ_SUCCESS,)]

    # One hash everywhere: the source, what HMAN and DistMgr recorded, the library, staging.
    (row,) = query(
        site,
        "SELECT PackageID, PackageHash, StoredPkgHash, StoredPkgVersion FROM vEasySetupPackage",
    )
    package_id, package_hash, stored_hash, version = row
    assert package_id == PKG
    source = folder_hash(site / "EasySetupPayload" / g)
    library = ContentLibrary(site / "SCCMContentLib")
    assert library.current_version(PKG) == version
    assert library.verify(PKG, version) == source == stored_hash == package_hash
    assert staging_hash(site / "CMUStaging" / G) == source

    # Clean: no temporaries, drop files, CME marker or quarantine.
    assert temporaries(site) == []
    assert inbox_files(site) == []
    assert notifications(site) == 0
    assert not (site / "inboxes" / "hman.box" / "CFD" / f"{G}.CME").exists()
    assert not list(site.rglob("BAD")), "nothing may be quarantined because of a crash"

    # Each rule once, all passed.
    got = rules(site)
    assert len(got) == len(set(got)), got
    if ref is not None:
        assert got == ref.rules
    assert got
    statuses = query(
        site, "SELECT DISTINCT Status FROM CM_UpdatePackagePrereqStatus WHERE PackageGuid = ?", [G]
    )
    assert statuses == [(0,)]
    mon = dict(
        query(
            site,
            "SELECT SubStageID, IsComplete FROM CM_UpdatePackage_MonitoringStatus "
            "WHERE PackageGuid = ?",
            [G],
        )
    )
    assert (mon[0xB0001], mon[0xB0002], mon[0xD0005]) == (2, 2, 2), mon


def assert_not_reported_early(site: Path) -> None:
    """A killed run never says PREREQ_SUCCESS: the kill landed before the end of the flow."""
    assert states(site)[G] != PackageState.PREREQ_SUCCESS


CRASHPOINTS = [
    "hman.after_source_hash",
    "hman.before_esc_delete",
    "contentlib.after_file:5",
    "contentlib.after_tree",
    "contentlib.after_content_ini",
    "distmgr.after_snapshot",
    "cmupdate.during_staging_extract:10",
    "cmupdate.during_prereq:5",
    "hman.before_cme_delete",
]


@pytest.mark.parametrize("point", CRASHPOINTS)
def test_sigkill_during_replication_or_prereq_then_restart_converges(
    site: Path, reference: Reference, point: str
) -> None:
    name = point.split(":")[0]
    staging = site / "CMUStaging" / G
    with Daemon(site) as daemon:
        daemon.start(CMLAB_CRASHPOINTS=point)
        cmlab("prereq", str(site), G)
        rc = daemon.wait_exit(timeout=60)
        assert rc == -signal.SIGKILL, f"the daemon did not reach {point}: {daemon.stderr()}"

        # The kill landed where the test says.
        if name == "hman.before_cme_delete":
            # The end state is in the database; only the marker is left.
            assert states(site)[G] == PackageState.PREREQ_SUCCESS
            assert (site / "inboxes" / "hman.box" / "CFD" / f"{G}.CME").exists()
        else:
            assert_not_reported_early(site)
        if name.startswith("hman.") and name != "hman.before_cme_delete":
            assert (site / "inboxes" / "hman.box" / "CFD" / "2.ESC").exists()
            assert not (site / "SCCMContentLib" / "DataLib" / f"{PKG}.1.INI").exists()
        elif name == "contentlib.after_file":
            assert any(".~cmlab-" in t and "DataLib" in t for t in temporaries(site))
            assert not (site / "SCCMContentLib" / "DataLib" / f"{PKG}.1.INI").exists()
        elif name == "contentlib.after_tree":
            assert (site / "SCCMContentLib" / "DataLib" / f"{PKG}.1").is_dir()
            assert not (site / "SCCMContentLib" / "DataLib" / f"{PKG}.1.INI").exists()
        elif name in ("contentlib.after_content_ini", "distmgr.after_snapshot"):
            assert (site / "SCCMContentLib" / "DataLib" / f"{PKG}.1.INI").exists()
            assert states(site)[G] == PackageState.CONTENT_REPLICATING
        elif name == "cmupdate.during_staging_extract":
            assert not staging.exists()
            assert any("CMUStaging" in t for t in temporaries(site))
        elif name == "cmupdate.during_prereq":
            assert states(site)[G] == PackageState.PREREQ_IN_PROGRESS
            assert staging_hash(staging) == folder_hash(site / "EasySetupPayload" / g)

        daemon.start()
        wait_until(lambda: settled(site), timeout=60, what=f"convergence after {point}")
        wait_serving(site, daemon)
        assert daemon.stop() == 0
    assert_converged(site, reference)


@pytest.mark.parametrize("fifth", range(5))
def test_sigkill_at_a_random_moment_then_restart_converges(
    site: Path, reference: Reference, fifth: int
) -> None:
    # One kill in each fifth of a clean run's time, at a random moment within it.
    fraction = random.Random(20261121 + fifth).uniform(fifth / 5, (fifth + 1) / 5)
    delay = fraction * reference.seconds
    with Daemon(site) as daemon:
        daemon.start()
        wait_serving(site, daemon)
        cmlab("prereq", str(site), G)
        # The delay is the test's input (when the kill lands), not a wait for a condition.
        time.sleep(delay)
        daemon.kill()
        at_kill = states(site)[G]
        daemon.start()
        wait_until(
            lambda: settled(site),
            timeout=60,
            what=f"convergence after a kill at {delay:.2f} s of {reference.seconds:.2f} s "
            f"(state then {at_kill})",
        )
        wait_serving(site, daemon)
        assert daemon.stop() == 0
    assert_converged(site, reference)


def test_a_damaged_staging_folder_is_replaced_from_the_content_library(
    site: Path, reference: Reference
) -> None:
    staging = site / "CMUStaging" / G
    with Daemon(site) as daemon:
        daemon.start()
        cmlab("prereq", str(site), G)
        wait_until(lambda: settled(site), timeout=60, what="the first PREREQ_SUCCESS")
        good = staging_hash(staging)
        # Damage the staging folder: one file changed, one file that is not in the package.
        dll = staging / "SMSSetup" / "bin" / "x64" / "setupcore.dll"
        dll.write_bytes(dll.read_bytes() + b"tampered")
        (staging / "SMSSetup" / "stray.txt").write_text("not part of the update")
        damaged = staging_hash(staging)
        assert damaged != good
        before = len(log(site, "CMUpdate.log"))

        cmlab("prereq", str(site), G)
        wait_until(
            lambda: (
                settled(site)
                and "Prerequisite check of "
                f"{G} completed: PREREQ_SUCCESS ({int(PackageState.PREREQ_SUCCESS)})."
                in log(site, "CMUpdate.log")[before:]
            ),
            timeout=60,
            what="the second PREREQ_SUCCESS",
        )
        assert daemon.stop() == 0

    second = "\n".join(log(site, "CMUpdate.log")[before:])
    mismatch = re.search(
        rf"Staging folder \((.+)\) has hash ({HASH}) which does not match hash from content "
        rf"library ({HASH})",
        second,
    )
    assert mismatch, second
    assert mismatch[1] == str(staging)
    assert mismatch[2] == damaged
    assert mismatch[3] == good
    assert (
        f"Delete folder {staging}/ returned 0. Extractring the content from content library..."
        in second
    )
    assert "Content is already found at the staging folder" not in second
    assert staging_hash(staging) == good
    assert not (staging / "SMSSetup" / "stray.txt").exists()
    assert_converged(site, reference)
