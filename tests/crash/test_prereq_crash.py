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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cmlab.core.hashing import folder_hash, staging_hash
from cmlab.site.content_library import ContentLibrary
from cmlab.testing import SAMPLE_UPDATE, LabSite, State
from tests.helpers.site_files import temporaries

G = SAMPLE_UPDATE
g = G.lower()
PKG = "CAS10001"
HASH = r"[0-9A-F]{64}"


@dataclass(frozen=True)
class Reference:
    """A clean run of the same flow: how long it takes and which rules it records."""

    seconds: float
    rules: list[tuple[str, str]]


@pytest.fixture
def site(cmlab_site_factory: Callable[..., LabSite]) -> LabSite:
    """A site with 2509 downloaded, its daemon a child process the test starts and kills."""
    return cmlab_site_factory(stage="downloaded", mode="subprocess", start=False)


@pytest.fixture(scope="module")
def reference(downloaded_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """A clean run, once: its time (from the prerequisite check's request to settled) bounds
    the random kills, its rules are what every converged run must have recorded. Its daemon
    is a child process, as the killed ones are, so the times compare."""
    path = tmp_path_factory.mktemp("prereq-ref") / "CAS"
    with LabSite(path, template=downloaded_template, mode="subprocess") as site:
        site.prereq(G)
        started = time.monotonic()
        site.wait_for(lambda: settled(site), timeout=60, what="the reference run")
        seconds = time.monotonic() - started
        assert site.stop() == 0
    assert_converged(site, None)
    return Reference(seconds=seconds, rules=rules(site))


def notifications(site: LabSite) -> int:
    """Table changes SMSDBMon has not turned into drop files yet."""
    return int(site.query("SELECT COUNT(*) FROM TableChangeNotifications")[0][0])


def settled(site: LabSite) -> bool:
    """PREREQ_SUCCESS and nothing left to do: no drop file and no notification on its way to
    becoming one (SMSDBMon drops a last CME for the site state CMUpdate reported, which HMAN
    may find after it has already rolled the state up). Work is always in at least one of the
    two (a file is durable before its notification row goes, and a handler's database change
    is committed before its drop file is deleted), so the files are looked at on both sides
    of the rows."""
    return (
        not site.waiting_files()
        and notifications(site) == 0
        and site.state(G) == State.PREREQ_SUCCESS
        and not site.waiting_files()
    )


def rules(site: LabSite) -> list[tuple[str, str]]:
    return sorted(
        (str(server), str(rule))
        for server, rule in site.query(
            "SELECT ServerName, RuleName FROM CM_UpdatePackagePrereqStatus WHERE PackageGuid = ?",
            [G],
        )
    )


def assert_converged(site: LabSite, ref: Reference | None) -> None:
    assert site.states()[G] == State.PREREQ_SUCCESS
    assert site.query("SELECT Flag FROM CM_UpdatePackages WHERE PackageGuid = ?", [G]) == [(1,)]
    assert site.query(
        "SELECT State FROM CM_UpdatePackageSiteStatus WHERE PackageGuid = ?", [G]
    ) == [(State.PREREQ_SUCCESS,)]

    # One hash everywhere: the source, what HMAN and DistMgr recorded, the library, staging.
    (row,) = site.query(
        "SELECT PackageID, PackageHash, StoredPkgHash, StoredPkgVersion FROM vEasySetupPackage",
    )
    package_id, package_hash, stored_hash, version = row
    assert package_id == PKG
    source = folder_hash(site.path / "EasySetupPayload" / g)
    library = ContentLibrary(site.path / "SCCMContentLib")
    assert library.current_version(PKG) == version
    assert library.verify(PKG, version) == source == stored_hash == package_hash
    assert staging_hash(site.path / "CMUStaging" / G) == source

    # Clean: no temporaries, drop files, CME marker or quarantine.
    assert temporaries(site.path) == []
    assert site.waiting_files() == []
    assert notifications(site) == 0
    assert not (site.inbox("hman.box/CFD") / f"{G}.CME").exists()
    assert not list(site.path.rglob("BAD")), "nothing may be quarantined because of a crash"

    # Each rule once, all passed.
    got = rules(site)
    assert len(got) == len(set(got)), got
    if ref is not None:
        assert got == ref.rules
    assert got
    statuses = site.query(
        "SELECT DISTINCT Status FROM CM_UpdatePackagePrereqStatus WHERE PackageGuid = ?", [G]
    )
    assert statuses == [(0,)]
    mon = dict(
        site.query(
            "SELECT SubStageID, IsComplete FROM CM_UpdatePackage_MonitoringStatus "
            "WHERE PackageGuid = ?",
            [G],
        )
    )
    assert (mon[0xB0001], mon[0xB0002], mon[0xD0005]) == (2, 2, 2), mon


def assert_not_reported_early(site: LabSite) -> None:
    """A killed run never says PREREQ_SUCCESS: the kill landed before the end of the flow."""
    assert site.states()[G] != State.PREREQ_SUCCESS


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
    site: LabSite, reference: Reference, point: str
) -> None:
    name = point.split(":")[0]
    staging = site.path / "CMUStaging" / G
    cfd = site.inbox("hman.box/CFD")
    datalib = site.path / "SCCMContentLib" / "DataLib"
    site.start(CMLAB_CRASHPOINTS=point)
    site.prereq(G)
    rc = site.wait_exit(timeout=60)
    assert rc == -signal.SIGKILL, f"the daemon did not reach {point}: {site.daemon_stderr()}"

    # The kill landed where the test says.
    if name == "hman.before_cme_delete":
        # The end state is in the database; only the marker is left.
        assert site.states()[G] == State.PREREQ_SUCCESS
        assert (cfd / f"{G}.CME").exists()
    else:
        assert_not_reported_early(site)
    if name.startswith("hman.") and name != "hman.before_cme_delete":
        assert (cfd / "2.ESC").exists()
        assert not (datalib / f"{PKG}.1.INI").exists()
    elif name == "contentlib.after_file":
        assert any(".~cmlab-" in t and "DataLib" in t for t in temporaries(site.path))
        assert not (datalib / f"{PKG}.1.INI").exists()
    elif name == "contentlib.after_tree":
        assert (datalib / f"{PKG}.1").is_dir()
        assert not (datalib / f"{PKG}.1.INI").exists()
    elif name in ("contentlib.after_content_ini", "distmgr.after_snapshot"):
        assert (datalib / f"{PKG}.1.INI").exists()
        assert site.states()[G] == State.CONTENT_REPLICATING
    elif name == "cmupdate.during_staging_extract":
        assert not staging.exists()
        assert any("CMUStaging" in t for t in temporaries(site.path))
    elif name == "cmupdate.during_prereq":
        assert site.states()[G] == State.PREREQ_IN_PROGRESS
        assert staging_hash(staging) == folder_hash(site.path / "EasySetupPayload" / g)

    site.start()
    site.wait_for(lambda: settled(site), timeout=60, what=f"convergence after {point}")
    assert site.stop() == 0
    assert_converged(site, reference)


@pytest.mark.parametrize("fifth", range(5))
def test_sigkill_at_a_random_moment_then_restart_converges(
    site: LabSite, reference: Reference, fifth: int
) -> None:
    # One kill in each fifth of a clean run's time, at a random moment within it.
    fraction = random.Random(20261121 + fifth).uniform(fifth / 5, (fifth + 1) / 5)
    delay = fraction * reference.seconds
    site.start()
    site.prereq(G)
    # The delay is the test's input (when the kill lands), not a wait for a condition.
    time.sleep(delay)
    site.kill()
    at_kill = site.states()[G]
    site.start()
    site.wait_for(
        lambda: settled(site),
        timeout=60,
        what=f"convergence after a kill at {delay:.2f} s of {reference.seconds:.2f} s "
        f"(state then {at_kill})",
    )
    assert site.stop() == 0
    assert_converged(site, reference)


def test_a_damaged_staging_folder_is_replaced_from_the_content_library(
    cmlab_site_factory: Callable[..., LabSite], reference: Reference
) -> None:
    # Nothing is killed here: the daemon runs in this process.
    site = cmlab_site_factory(stage="downloaded")
    staging = site.path / "CMUStaging" / G
    site.prereq(G)
    site.wait_for(lambda: settled(site), timeout=60, what="the first PREREQ_SUCCESS")
    good = staging_hash(staging)
    # Damage the staging folder: one file changed, one file that is not in the package.
    dll = staging / "SMSSetup" / "bin" / "x64" / "setupcore.dll"
    dll.write_bytes(dll.read_bytes() + b"tampered")
    (staging / "SMSSetup" / "stray.txt").write_text("not part of the update")
    damaged = staging_hash(staging)
    assert damaged != good
    before = len(site.log("CMUpdate.log"))

    site.prereq(G)
    site.wait_for(
        lambda: (
            settled(site)
            and "Prerequisite check of "
            f"{G} completed: PREREQ_SUCCESS ({int(State.PREREQ_SUCCESS)})."
            in site.log("CMUpdate.log")[before:]
        ),
        timeout=60,
        what="the second PREREQ_SUCCESS",
    )
    assert site.stop() == 0

    second = "\n".join(site.log("CMUpdate.log")[before:])
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
