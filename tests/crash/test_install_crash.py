"""SIGKILL during the Installation stage: CMUpdate's self-upgrade, between install steps (with
SMSDBMon's triggers deleted, too), inside INSTALL_FILES (its files staged, half of them renamed
into place, while backing them up), after the last step, before the notification to HMAN, in
HMAN's post-installation copy, and at random moments. A restart converges to exactly what a
clean run ends with: INSTALL_SUCCESS, the site at 5.00.9141.1000 and working, each step
recorded once, no backup, marker, temporary or drop file left, no failure ever reported.

Also a rollback killed half-way: the restart finishes it (INSTALL_FAILED, the site at its old
version and working), and the update then installs once the cause is fixed; and a failed
self-upgrade killed before its rollback, whose restart reports the same failure
(INSTALL_CMU_FAILED, recorded in the CMUStaging/<GUID>.failed marker)."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cmlab.admin.installation_layout import SITE_SERVER_BINARIES
from cmlab.core.hashing import sha256_file
from cmlab.site.formats.sample_binary import sample_build_number
from cmlab.site.installation import ACTIONS, CONSOLE_EXE
from cmlab.site.sitedb import servicing
from cmlab.site.sitedb.triggers import trigger_defs
from cmlab.testing import SAMPLE_UPDATE, LabSite, State
from tests.helpers.site_files import temporaries

G = SAMPLE_UPDATE
OLD_VERSION, NEW_VERSION = "5.00.9135.1000", "5.00.9141.1000"
OLD_BUILD, NEW_BUILD = 9135, 9141
BINARIES = tuple(name for name, _ in SITE_SERVER_BINARIES)
TRIGGERS = sorted(t.name for t in trigger_defs("CAS"))
INSTALLED_ESC = ("inboxes", "hman.box", "CFD", "196612.ESC")
# Not compared with the clean run: logs and the database file (compared by content below),
# and the content library (the Replication stage's, which a retried
# replication legitimately moves to a new version).
NOT_COMPARED = ("Logs", "db", "SCCMContentLib")

# The site database as the Installation stage leaves it, compared with the clean run's.
DB_FACTS = {
    "Sites": "SELECT SiteCode, Version, FullVersion, BuildNumber FROM Sites ORDER BY 1",
    "SiteServices": "SELECT ServiceName, State, Build FROM SiteServices ORDER BY 1",
    "SiteServerSettings": "SELECT Name, Value FROM SiteServerSettings ORDER BY 1",
    "SiteRegistry": "SELECT KeyPath, Name, Value FROM SiteRegistry ORDER BY 1, 2",
    "SiteInstallSteps": "SELECT PackageGuid, StepID, Action FROM SiteInstallSteps ORDER BY 1, 2",
    "SiteInstallScripts": (
        "SELECT PackageGuid, ScriptName, ScriptHash FROM SiteInstallScripts ORDER BY 1, 2"
    ),
    "CM_UpgradeHistory": (
        "SELECT upper(PackageGUID), FromBuild, ToBuild FROM CM_UpgradeHistory ORDER BY 1, 2"
    ),
    "schema": "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY 1, 2",
    "CM_UpdatePackages": "SELECT PackageGuid, State, Flag FROM CM_UpdatePackages ORDER BY 1",
    "CM_UpdatePackageSiteStatus": (
        "SELECT PackageGuid, SiteNumber, State, Flag FROM CM_UpdatePackageSiteStatus ORDER BY 1, 2"
    ),
    "CM_UpdatePackage_MonitoringStatus": (
        "SELECT PackageGuid, SiteNumber, SubStageID, IsComplete, Progress, Applicable "
        "FROM CM_UpdatePackage_MonitoringStatus ORDER BY 1, 2, 3"
    ),
}


@dataclass(frozen=True)
class Reference:
    """A clean installation: how long its install (INSTALL_IN_PROGRESS to INSTALL_SUCCESS)
    and its whole Installation stage (INSTALL_IN_PROGRESS to settled, HMAN's post-installation
    included) take, and what it leaves on disk and in the database."""

    install_seconds: float
    stage_seconds: float
    tree: dict[str, str]
    db: dict[str, list[tuple[Any, ...]]]
    history: list[int]


# Paths in what the run records (registry, logs) the same for every copy of the site.
DISPLAY_ROOT = "E:\\ConfigMgr"


@pytest.fixture
def site(cmlab_site_factory: Callable[..., LabSite]) -> LabSite:
    """A site with 2509 downloaded, its daemon a child process the test starts and kills."""
    return cmlab_site_factory(
        stage="downloaded",
        mode="subprocess",
        start=False,
        settings={"site.display_root": DISPLAY_ROOT},
    )


@pytest.fixture(scope="module")
def reference(downloaded_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """A clean installation, once: its timing places the random kills, its end state is what
    every converged run must end with. Its daemon is a child process, as the killed ones
    are, so the times compare."""
    path = tmp_path_factory.mktemp("install-ref") / "CAS"
    site = LabSite(path, template=downloaded_template, mode="subprocess")
    site.set("site", "display_root", DISPLAY_ROOT)
    with site:
        site.install(G)
        site.wait_for(lambda: installing(site), timeout=60, what="the reference's installation")
        started = time.monotonic()
        wait_settled(site, State.INSTALL_SUCCESS, "the reference run")
        stage_seconds = time.monotonic() - started
        assert site.stop() == 0
    assert_installed(site)
    # CMUpdate's own clock for the install, from the state history's times.
    ((install_seconds,),) = site.query(
        "SELECT (julianday(MAX(UpdateTime)) - julianday(MIN(UpdateTime))) * 86400 "
        "FROM CM_UpdatePackageSiteStatus_HIST WHERE PackageGuid = ? AND State >> 16 = 3",
        [G],
    )
    return Reference(
        install_seconds=float(install_seconds),
        stage_seconds=max(stage_seconds, float(install_seconds)),
        tree=tree(site),
        db=db_facts(site),
        history=site.history(G),
    )


# ---------------------------------------------------------------------------------------
# Reading the site


def site_state(site: LabSite) -> int | None:
    """This site's own state (CM_UpdatePackageSiteStatus), which CMUpdate sets; HMAN rolls it
    up into CM_UpdatePackages a moment later."""
    rows = site.query("SELECT State FROM CM_UpdatePackageSiteStatus WHERE PackageGuid = ?", [G])
    return int(rows[0][0]) if rows else None


def package_state(site: LabSite) -> int:
    return int(site.query("SELECT State FROM CM_UpdatePackages WHERE PackageGuid = ?", [G])[0][0])


def installing(site: LabSite) -> bool:
    state = site_state(site)
    return state is not None and state >> 16 == 3


def notifications(site: LabSite) -> int:
    return int(site.query("SELECT COUNT(*) FROM TableChangeNotifications")[0][0])


def settled_at(site: LabSite, state: int) -> bool:
    """`state` and nothing left to do: no drop file, and no change SMSDBMon has still to turn
    into one (HMAN can reach a state before the last CME is dropped), looking at the inboxes
    on both sides of that; this site's own row at `state` too."""
    return (
        site.state(G) == state
        and not site.waiting_files()
        and notifications(site) == 0
        and not site.waiting_files()
        and site_state(site) == state
    )


def wait_settled(site: LabSite, state: int, what: str, timeout: float = 60) -> None:
    site.wait_for(lambda: settled_at(site, state), timeout=timeout, what=what)


def site_version(site: LabSite) -> str:
    """What fnCurrentSiteVersion() returns."""
    ((version,),) = site.query("SELECT dbo.fnCurrentSiteVersion()")
    return str(version)


def builds(site: LabSite) -> dict[str, int]:
    return {name: sample_build_number(site.path / "bin" / "x64" / name) for name in BINARIES}


def smsdbmon_triggers(site: LabSite) -> list[str]:
    return sorted(
        str(r[0])
        for r in site.query("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        if str(r[0]) in TRIGGERS
    )


def steps_done(site: LabSite) -> list[int]:
    return [
        int(r[0])
        for r in site.query(
            "SELECT StepID FROM SiteInstallSteps WHERE PackageGuid = ? ORDER BY 1", [G]
        )
    ]


def files_of(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def tree(site: LabSite) -> dict[str, str]:
    """Every file, folder and link of the site (but NOT_COMPARED): its hash, or what it is.
    (The daemon's own output is beside the site folder, not in it.)"""
    out: dict[str, str] = {}
    for path in sorted(site.path.rglob("*")):
        rel = path.relative_to(site.path)
        if rel.parts[0] in NOT_COMPARED:
            continue
        if path.is_symlink():
            out[rel.as_posix()] = f"link to {os.readlink(path)}"
        elif path.is_dir():
            out[rel.as_posix()] = "folder"
        else:
            out[rel.as_posix()] = sha256_file(path)
    return out


def db_facts(site: LabSite) -> dict[str, list[tuple[Any, ...]]]:
    return {name: site.query(sql) for name, sql in DB_FACTS.items()}


def backup(site: LabSite) -> Path:
    return site.path / "CMUStaging" / f"{G}.backup"


def marker(site: LabSite) -> Path:
    return site.path / "CMUStaging" / f"{G}.failed"


# ---------------------------------------------------------------------------------------
# The end states


def assert_installed(site: LabSite, ref: Reference | None = None, since: int = 0) -> None:
    """INSTALL_SUCCESS and the site really at the new version, working and clean; with `ref`,
    exactly what the clean run left. `since`: where this installation's history starts."""
    assert site_state(site) == package_state(site) == State.INSTALL_SUCCESS
    assert site_version(site) == NEW_VERSION
    assert builds(site) == dict.fromkeys(BINARIES, NEW_BUILD)
    services = site.query("SELECT ServiceName, State, Build FROM SiteServices")
    assert services
    assert {(state, build) for _, state, build in services} == {("Running", NEW_BUILD)}, services
    settings = dict(site.query("SELECT Name, Value FROM SiteServerSettings"))
    assert (settings["ServiceBroker"], settings["WMIProviders"]) == ("ON", "Loaded")
    assert smsdbmon_triggers(site) == TRIGGERS
    assert len(TRIGGERS) == 14  # every SMSDBMon trigger is back, the hierarchy's four too

    staging = site.path / "CMUStaging" / G
    client = files_of(staging / "CMUClient")
    assert client
    assert files_of(site.path / "cd.latest") == files_of(staging)
    assert files_of(site.path / "CMUClient") == client
    assert files_of(site.path / "Client") == client
    assert files_of(site.path / "ClientUpgrade") == {"ccmsetup.exe": client["ccmsetup.exe"]}

    assert not backup(site).exists()
    assert not marker(site).exists()
    assert not site.path.joinpath(*INSTALLED_ESC).exists()
    assert temporaries(site.path) == []
    assert site.waiting_files() == []
    assert notifications(site) == 0

    assert site.query(
        "SELECT StepID, Action FROM SiteInstallSteps WHERE PackageGuid = ? ORDER BY 1", [G]
    ) == [(i, action) for i, action in enumerate(ACTIONS, 1)]
    assert site.query(
        "SELECT FromBuild, ToBuild FROM CM_UpgradeHistory WHERE upper(PackageGUID) = ?",
        [G],
    ) == [(OLD_BUILD, NEW_BUILD)]

    states = site.history(G)[since:]
    assert states[-1] == State.INSTALL_SUCCESS, states
    failed = [s for s in states if s in servicing.FAILED_STATES]
    assert not failed, f"a failure was reported: {[State.name_of(s) for s in failed]}"

    if ref is not None:
        expected = ref.history
        if since:
            # A new run after a failure: no download, and CMUpdate already runs the new
            # build, so no self-upgrade; every install step's state is reported again.
            cmu_done = len(expected) - expected[::-1].index(State.INSTALL_CMU_SUCCESS)
            expected = expected[cmu_done:]
        assert_subsequence(expected, states)
        assert db_facts(site) == ref.db
        got = tree(site)
        assert got.keys() == ref.tree.keys(), sorted(got.keys() ^ ref.tree.keys())
        assert got == ref.tree, [k for k in got if got[k] != ref.tree[k]]


def assert_subsequence(expected: list[int], got: list[int]) -> None:
    """Every state of the clean run was reported, in its order (a resumed run repeats some)."""
    rest = iter(got)
    for want in expected:
        assert any(s == want for s in rest), (
            f"{State.name_of(want)} missing or out of order: "
            f"{[State.name_of(s) for s in got]} "
            f"(clean run: {[State.name_of(s) for s in expected]})"
        )


def assert_old_site_working(site: LabSite) -> None:
    """A rolled-back installation: the old version, working, nothing left over. cmupdate.exe
    stays new: CMUpdate's self-upgrade is not part of the install steps a rollback undoes."""
    assert site_version(site) == OLD_VERSION
    assert builds(site) == {**dict.fromkeys(BINARIES, OLD_BUILD), "cmupdate.exe": NEW_BUILD}
    services = dict(site.query("SELECT ServiceName, State || ':' || Build FROM SiteServices"))
    assert services == {
        "SMS_EXECUTIVE": f"Running:{OLD_BUILD}",
        "SMS_SITE_COMPONENT_MANAGER": f"Running:{OLD_BUILD}",
        "CONFIGURATION_MANAGER_UPDATE": f"Running:{NEW_BUILD}",
    }
    settings = dict(site.query("SELECT Name, Value FROM SiteServerSettings"))
    assert (settings["ServiceBroker"], settings["WMIProviders"]) == ("ON", "Loaded")
    assert smsdbmon_triggers(site) == TRIGGERS
    assert "<Build Number><><9135><0>" in site.path.joinpath(
        "inboxes", "sitectrl.box", "sitectrl.ct0"
    ).read_text(encoding="utf-8")
    assert steps_done(site) == []
    assert site.query("SELECT 1 FROM CM_UpgradeHistory WHERE upper(PackageGUID) = ?", [G]) == []
    assert not backup(site).exists()
    assert not marker(site).exists()
    assert files_of(site.path / "cd.latest") == {}, "cd.latest is only written after the last step"
    assert temporaries(site.path) == []


# ---------------------------------------------------------------------------------------
# Crash points


def console(site: LabSite) -> Path:
    return site.path / "AdminConsole" / "bin" / CONSOLE_EXE


# What the site looks like at each kill, so each test proves the kill landed where it says.
def at_self_upgrade(site: LabSite) -> None:
    assert site_state(site) == State.INSTALL_CMU_INSTALLFILES
    assert builds(site)["cmupdate.exe"] == NEW_BUILD
    assert site.query(
        "SELECT Build FROM SiteServices WHERE ServiceName = 'CONFIGURATION_MANAGER_UPDATE'",
    ) == [(OLD_BUILD,)]
    assert steps_done(site) == []


def after_step(n: int) -> Callable[[Path], None]:
    def check(site: LabSite) -> None:
        assert steps_done(site) == list(range(1, n + 1))
        assert (backup(site) / "state.json").is_file()
        if 5 <= n < 13:
            assert smsdbmon_triggers(site) == [], "steps 5 to 12 run without SMSDBMon's triggers"

    return check


def in_install_files(renamed: int) -> Callable[[Path], None]:
    """Every file of the step copied beside its destination, `renamed` of them in place
    (cmupdate.exe is not among them: the self-upgrade installed it already)."""

    def check(site: LabSite) -> None:
        assert steps_done(site) == list(range(1, 10))
        assert site_state(site) == State.INSTALL_INSTALLFILES
        new = sorted(n for n, b in builds(site).items() if b == NEW_BUILD and n != "cmupdate.exe")
        assert len(new) == renamed, new
        assert any(t.startswith("bin/x64/.~cmlab-") for t in temporaries(site.path))

    return check


def in_backup(site: LabSite) -> None:
    """The first binary INSTALL_FILES replaces is backed up (the site control file was the
    first backup, at step 6); nothing is replaced yet."""
    assert steps_done(site) == list(range(1, 10))
    saved = [p.name for p in (backup(site) / "files" / "bin" / "x64").iterdir()]
    assert len(saved) == 1, saved
    assert builds(site) == {**dict.fromkeys(BINARIES, OLD_BUILD), "cmupdate.exe": NEW_BUILD}


def before_notification(site: LabSite) -> None:
    assert steps_done(site) == list(range(1, 17))
    assert not backup(site).exists()
    assert (site.path / "cd.latest").is_dir()
    assert not site.path.joinpath(*INSTALLED_ESC).exists()
    assert site_state(site) != State.INSTALL_SUCCESS


def in_client_copy(site: LabSite) -> None:
    assert site_state(site) == State.INSTALL_SUCCESS
    assert site.path.joinpath(*INSTALLED_ESC).exists()
    assert files_of(site.path / "Client") == files_of(site.path / "CMUClient")


CRASHPOINTS: dict[str, Callable[[Path], None]] = {
    "cmupdate.self_upgrade_installed": at_self_upgrade,
    "cmupdate.after_install_step:1": after_step(1),
    "cmupdate.after_install_step:5": after_step(5),
    "cmupdate.after_install_step:10": after_step(10),
    "cmupdate.after_install_step:16": after_step(16),
    "cmupdate.before_installed_notification": before_notification,
    "siteinstall.install_files_staged": in_install_files(renamed=0),
    "siteinstall.during_install_files:3": in_install_files(renamed=3),
    "siteinstall.during_backup:2": in_backup,
    "hman.postinstall.after_client_copy": in_client_copy,
}


@pytest.mark.parametrize("point", list(CRASHPOINTS))
def test_sigkill_during_the_installation_then_restart_converges(
    site: LabSite, reference: Reference, point: str
) -> None:
    site.start(CMLAB_CRASHPOINTS=point)
    site.install(G)
    rc = site.wait_exit(timeout=60)
    assert rc == -signal.SIGKILL, f"the daemon did not reach {point}: {site.daemon_stderr()}"
    CRASHPOINTS[point](site)

    site.start()
    wait_settled(site, State.INSTALL_SUCCESS, f"convergence after {point}")
    assert site.stop() == 0
    assert_installed(site, reference)


@pytest.mark.parametrize("after_steps", [False, True], ids=["install steps", "post-installation"])
def test_sigkill_at_a_random_moment_of_the_installation_then_restart_converges(
    site: LabSite, reference: Reference, after_steps: bool
) -> None:
    # One kill while CMUpdate runs the self-upgrade and the install steps, one after them
    # (cd.latest, the client files, HMAN's client packages), each at a random moment.
    low, high = (
        (reference.install_seconds, reference.stage_seconds)
        if after_steps
        else (0.0, reference.install_seconds)
    )
    delay = random.Random(20261132 + after_steps).uniform(low, high)
    site.start()
    site.install(G)
    site.wait_for(lambda: installing(site), timeout=60, what="the installation to start")
    # The delay is the test's input (when the kill lands), not a wait for a condition.
    time.sleep(delay)
    site.kill()
    at_kill = site_state(site)
    site.start()
    wait_settled(
        site,
        State.INSTALL_SUCCESS,
        f"convergence after a kill {delay:.3f} s into an installation stage of "
        f"{reference.stage_seconds:.3f} s "
        f"(state then {at_kill and State.name_of(at_kill)})",
    )
    assert site.stop() == 0
    assert_installed(site, reference)


def test_a_kill_restart_cycle_repeated_through_the_installation_converges(
    site: LabSite, reference: Reference
) -> None:
    """Three SIGKILLs in a row, each at a random moment after the previous restart: every
    restart resumes where the database and the disk say the run is, never reports a failure,
    and the last one ends exactly where a clean run does."""
    rng = random.Random(20261121)
    at_kills: list[str] = []
    site.start()
    site.install(G)
    site.wait_for(lambda: installing(site), timeout=60, what="the installation to start")
    for _ in range(3):
        # The delay is the test's input (when the kill lands), not a wait for a condition.
        time.sleep(rng.uniform(0.0, reference.install_seconds / 2))
        site.kill()
        state = site_state(site)
        at_kills.append(State.name_of(state or 0))
        assert state not in servicing.FAILED_STATES, at_kills
        site.start()
    wait_settled(site, State.INSTALL_SUCCESS, f"convergence after kills at {at_kills}")
    assert site.stop() == 0
    assert_installed(site, reference)


# ---------------------------------------------------------------------------------------
# A rollback killed half-way


@pytest.mark.parametrize(
    ("point", "retry"),
    [
        ("cmupdate.before_rollback", "install"),
        ("siteinstall.during_rollback:2", "retry-replication"),
    ],
)
def test_sigkill_during_a_rollback_then_restart_finishes_it(
    site: LabSite, reference: Reference, point: str, retry: str
) -> None:
    """Step 15 meets a link where the console binary should be (links are never followed),
    after steps 1-14 changed the site: the rollback that follows is killed; the restart
    finishes it. Fixed, the update installs, by the console's Install or by
    RetryContentReplication (which keeps the Install flag and runs the whole flow again).
    A damaged file in the payload would not do: the media check refuses it before step 1."""
    exe = console(site)
    original = exe.read_bytes()
    exe.unlink()
    exe.symlink_to(site.path / "site.toml")
    site.start(CMLAB_CRASHPOINTS=point)
    site.install(G)
    rc = site.wait_exit(timeout=60)
    assert rc == -signal.SIGKILL, f"the daemon did not reach {point}: {site.daemon_stderr()}"
    assert steps_done(site) == list(range(1, 15))
    assert marker(site).is_file()
    assert backup(site).is_dir()
    assert site_state(site) == State.INSTALL_UPDATEADMINCONSOLE
    if point.startswith("siteinstall."):
        # Half the files back, half still new: neither version.
        assert {OLD_BUILD, NEW_BUILD} <= set(builds(site).values())

    site.start()
    wait_settled(site, State.INSTALL_FAILED, f"the rollback's end after {point}")
    assert_old_site_working(site)
    failed = site.history(G)
    assert failed[-1] == State.INSTALL_FAILED
    assert State.INSTALL_CMU_FAILED not in failed

    exe.unlink()
    exe.write_bytes(original)
    if retry == "install":
        site.install(G)
    else:
        site.retry_replication(G)
    wait_settled(site, State.INSTALL_SUCCESS, f"the installation after {retry}")
    assert site.stop() == 0
    assert_installed(site, reference, since=len(failed))


def settled_failed(site: LabSite) -> bool:
    """A failure reported by this site and rolled up, nothing left to do."""
    return (
        not site.waiting_files()
        and notifications(site) == 0
        and site_state(site) in servicing.FAILED_STATES
        and package_state(site) == site_state(site)
        and not site.waiting_files()
    )


def test_a_failed_self_upgrade_killed_before_its_rollback_still_ends_install_cmu_failed(
    site: LabSite,
) -> None:
    """A clean run ends INSTALL_CMU_FAILED on a damaged cmupdate.exe (the e2e test); killed
    once the failure is marked, the restart must report the same failure."""
    exe = site.path / "EasySetupPayload" / G.lower() / "SMSSetup" / "bin" / "x64" / "cmupdate.exe"
    data = bytearray(exe.read_bytes())
    data[-1] ^= 0xFF
    exe.write_bytes(bytes(data))
    site.start(CMLAB_CRASHPOINTS="cmupdate.before_rollback")
    site.install(G)
    rc = site.wait_exit(timeout=60)
    assert rc == -signal.SIGKILL, f"the daemon did not reach the rollback: {site.daemon_stderr()}"
    assert marker(site).is_file()
    assert site_state(site) == State.INSTALL_CMU_VALIDATING

    site.start()
    site.wait_for(lambda: settled_failed(site), timeout=60, what="the rollback's end")
    assert site.stop() == 0
    assert not marker(site).exists()
    assert builds(site) == dict.fromkeys(BINARIES, OLD_BUILD), "nothing was installed"
    state = site_state(site)
    assert state is not None and State.name_of(state) == State.INSTALL_CMU_FAILED.name
