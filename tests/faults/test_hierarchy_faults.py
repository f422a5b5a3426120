"""Faults in a hierarchy of real sites (a CAS and child primaries, each its own daemon process,
reaching each other through a second path: docs/hierarchy.md): a child whose daemon is down
(the package waits in its inbox and is despooled when it returns), a broken link (the Sender
retries, CONTENT_REPLICATION_FAILED after `replication.sender_retries`, RetryContentReplication
recovers), a child that fails its prerequisites (the CAS shows PREREQ_ERROR for it and the
others still install), and SIGKILL of the CAS or of a child mid-replication (a restart
converges). Every test ends with every site at INSTALL_SUCCESS, rolled up at the CAS, and every
site's inboxes drained."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import pytest

from cmlab.testing import SAMPLE_UPDATE, HierarchySpec, LabHierarchy, LabSite, State
from tests.helpers.site_files import temporaries

GUID = SAMPLE_UPDATE
NEW_VERSION = "5.00.9141.1000"
RECEIVE = "despoolr.box/receive"


@pytest.fixture
def hierarchy(downloaded_template: Path, tmp_path: Path) -> Iterator[Callable[..., LabHierarchy]]:
    """`make(primaries=("PR1", "PR2"), retry_delay=0.3, settings={code: {...}})`: a CAS
    copied from the downloaded template and child primaries, made (not started). Every site
    reaches the others through a second path, `tmp_path/net/<CODE>`, a symlink farm; their
    daemons run in this process. Every daemon still running is stopped after the test."""
    made: list[LabHierarchy] = []

    def make(
        primaries: tuple[str, ...] = ("PR1", "PR2"),
        retry_delay: float = 0.3,
        settings: dict[str, dict[str, object]] | None = None,
    ) -> LabHierarchy:
        settings = settings or {}
        spec = HierarchySpec.from_dict(
            {
                "defaults": {
                    "replication.cmupdates_interval": 0.2,
                    "replication.sender_retry_delay": retry_delay,
                },
                "site": [
                    {"code": "CAS", "settings": settings.get("CAS", {})},
                    *(
                        {"code": code, "parent": "CAS", "settings": settings.get(code, {})}
                        for code in primaries
                    ),
                ],
            }
        )
        root, net = tmp_path / "sites", tmp_path / "net"
        net.mkdir()
        # `cmlab init` reads the parent's site.toml through its address: the links first.
        for code in spec.codes():
            os.symlink(root / code, net / code)
        h = LabHierarchy(
            root, spec, top_from=downloaded_template, address_of=lambda code: net / code
        )
        made.append(h)
        return h.create()

    yield make
    for h in made:
        h.stop()


def stop_all(h: LabHierarchy) -> None:
    """Stop every running daemon, leaves first; each must stop cleanly."""
    for site in reversed(list(h)):
        if site.running:
            assert site.stop() == 0, site.site_code


def job_to(cas: LabSite, dest: str) -> list[tuple[int, str, int]]:
    """(JobID, State, Attempts) of the CAS's SWD jobs to `dest`, oldest first."""
    return [
        (int(r[0]), str(r[1]), int(r[2]))
        for r in cas.query(
            "SELECT JobID, State, Attempts FROM SchedulerJobs "
            "WHERE JobType = 'SWD' AND DestSite = ? ORDER BY JobID",
            [dest],
        )
    ]


def package_id(cas: LabSite) -> str:
    return str(cas.query("SELECT PackageID FROM vEasySetupPackage")[0][0])


def own_state(site: LabSite) -> int | None:
    """The site's own state for the update, as its own database knows it."""
    return site.site_states(GUID).get(site.site_code)


def site_version(site: LabSite) -> str:
    """What fnCurrentSiteVersion() returns."""
    ((version,),) = site.query("SELECT dbo.fnCurrentSiteVersion()")
    return str(version)


def installed_everywhere(h: LabHierarchy, codes: tuple[str, ...]) -> bool:
    at_cas = h.top.site_states(GUID)
    return all(at_cas.get(c) == State.INSTALL_SUCCESS for c in codes) and all(
        own_state(h[c]) == State.INSTALL_SUCCESS for c in codes
    )


def converge(h: LabHierarchy, codes: tuple[str, ...]) -> None:
    """Every site in `codes` at INSTALL_SUCCESS, as itself and as the CAS knows it, the CAS's
    roll-up INSTALL_SUCCESS, then every inbox drained and nothing half-written left behind."""
    cas = h.top
    cas.wait_for(
        lambda: installed_everywhere(h, codes) and cas.state(GUID) == State.INSTALL_SUCCESS,
        timeout=240,
        what=f"INSTALL_SUCCESS at {', '.join(codes)}, rolled up at the CAS",
    )
    # Its timeout names the drop files left in each site's inboxes.
    h.wait_idle(timeout=120)
    # The Scheduler removed every instruction file when its job ended.
    assert not list((cas.inbox("schedule.box") / "tosend").glob("*.Idb"))
    for code in codes:
        site = h[code]
        assert site_version(site) == NEW_VERSION, code
        # The sites keep replicating while they run: a peer's message may be on its way in
        # under a temporary name for an instant. A leaked one stays.
        site.wait_for(
            lambda site=site: temporaries(site.path) == [],
            timeout=30,
            what=f"{code}'s temps",
            seen=lambda site=site: ", ".join(temporaries(site.path)),
        )
        receive = site.inbox(RECEIVE)
        left = [p.name for p in receive.iterdir()] if receive.is_dir() else []
        assert left == [], f"{code}'s despoolr.box/receive holds {left}"
        assert not list((site.path / "SMSPKG").glob("*.temp")), code


def installed_once(site: LabSite) -> None:
    """The site installed the update once: one INSTALL_SUCCESS in its own status row's history,
    and nothing after it (a later run did not reinstall it)."""
    history = site.history(GUID)
    names = [State.name_of(s) for s in history]
    assert history.count(State.INSTALL_SUCCESS) == 1, names
    assert history[-1] == State.INSTALL_SUCCESS, names


def test_a_package_waits_in_the_inbox_of_a_child_whose_daemon_is_down(
    hierarchy: Callable[..., LabHierarchy],
) -> None:
    h = hierarchy()
    cas, pr1 = h["CAS"], h["PR1"]
    receive = pr1.inbox(RECEIVE)
    h.start("CAS", "PR2")
    cas.install(GUID)
    jobs = cas.wait_for(
        lambda: [j for j in job_to(cas, "PR1") if j[1] == "Complete"],
        timeout=120,
        what="the CAS's job to PR1 to complete",
    )
    job = jobs[0][0]
    pkg_id = package_id(cas)
    assert f"~Finished sending SWD package {pkg_id} version 1 to site PR1" in cas.log("sender.log")
    # The delivery waits in the stopped child's inbox: the package, then its instruction.
    assert sorted(p.name for p in receive.iterdir()) == [f"{job:08X}.INS", f"ds_{job:08x}.pkg"]
    # The rest of the hierarchy goes on without PR1.
    cas.wait_for(
        lambda: (
            own_state(cas) == State.INSTALL_SUCCESS
            and cas.site_states(GUID).get("PR2") == State.INSTALL_SUCCESS
            and own_state(h["PR2"]) == State.INSTALL_SUCCESS
        ),
        timeout=240,
        what="the CAS and PR2 to install",
    )
    # The CAS has heard nothing from PR1: its row is where the run put it, and the roll-up
    # waits for it (content replication is not over until PR1's despooler has run).
    assert cas.site_states(GUID)["PR1"] == State.ENABLED
    assert cas.states()[GUID] == State.CONTENT_REPLICATING
    assert own_state(pr1) != State.INSTALL_SUCCESS
    assert sorted(p.name for p in receive.iterdir()) == [f"{job:08X}.INS", f"ds_{job:08x}.pkg"]

    pr1.start()
    converge(h, ("CAS", "PR1", "PR2"))
    assert any(
        re.fullmatch(rf"Received package {pkg_id} version 1\. Compressed file - .*", line)
        for line in pr1.log("despool.log")
    )
    assert f"Stored Package {pkg_id}. Stored Package Version = 1" in pr1.log("despool.log")
    for code in ("CAS", "PR1", "PR2"):
        installed_once(h[code])
    stop_all(h)


def closed_service_window(site: Path) -> str:
    """Append a service window that is closed today and tomorrow (in any time zone) to the
    site's site.toml: CMUpdate holds the site's own installation at
    INSTALL_WAITING_SERVICE_WINDOW. Returns the text, for `remove_text`."""
    day = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[(date.today().weekday() + 3) % 7]
    text = f'\n[[service_window]]\ndays = ["{day}"]\nstart = "12:00"\nduration = 60\n'
    path = site / "site.toml"
    path.write_text(path.read_text() + text)
    return text


def remove_text(site: Path, text: str) -> None:
    path = site / "site.toml"
    assert text in path.read_text()
    path.write_text(path.read_text().replace(text, ""))


def test_a_broken_link_fails_content_replication_and_retry_recovers(
    hierarchy: Callable[..., LabHierarchy], tmp_path: Path
) -> None:
    h = hierarchy(retry_delay=0.2, settings={"CAS": {"replication.sender_retries": 1}})
    cas, pr1, pr2 = h["CAS"], h["PR1"], h["PR2"]
    # The CAS waits in a closed service window until the failure is reported, so what the
    # test reads happens in one order. Otherwise the job often fails while the CAS's own
    # installation has SMSDBMon's triggers removed (install steps 5 to 13): its JOB
    # notification is lost then, and the Scheduler's sweep of its job source reports it a
    # little later (test_scheduler_sweep).
    window = closed_service_window(cas.path)
    link = tmp_path / "net" / "PR2"
    target = link.readlink()
    link.unlink()  # the CAS can no longer reach PR2's folder
    h.start()
    cas.install(GUID)
    cas.wait_for(
        lambda: (
            cas.site_states(GUID).get("PR2") == State.CONTENT_REPLICATION_FAILED
            and own_state(cas) == State.INSTALL_WAITING_SERVICE_WINDOW
        ),
        timeout=120,
        what="CONTENT_REPLICATION_FAILED for PR2 at the CAS",
    )
    [(job, state, attempts)] = job_to(cas, "PR2")
    assert (state, attempts) == ("Failed", 2)
    name = f"{job:08X}"
    pkg_id = package_id(cas)
    sender = cas.log("sender.log")
    missing = f"{link / 'inboxes' / 'despoolr.box' / 'receive'} does not exist"
    assert (
        f"~Cannot send to site PR2: {missing}. Will retry in 0.2 seconds (attempt 1 of 2)"
    ) in sender
    assert f"~Cannot send to site PR2: {missing}. Giving up after 2 attempts." in sender
    assert (
        f"ERROR: Job {name} failed: Cannot send to site PR2: {missing}. Content replication "
        f"of package {pkg_id} version 1 to site PR2 failed (CONTENT_REPLICATION_FAILED). Fix "
        "the cause, then run RetryContentReplication (`cmlab retry-replication`)."
    ) in sender
    # SMSDBMon drops the Failed job's JOB again: the Scheduler reports it and tidies up.
    cas.wait_log("scheduler.log", "<JOB STATUS - FAILED>~", timeout=120)
    assert (
        f"ERROR: Job {name} (Software Distribution for Configuration Manager Easy Setup "
        f"Package, Package ID = {pkg_id}) to site PR2 failed: Cannot send to site PR2: "
        f"{missing}"
    ) in cas.log("scheduler.log")
    assert not (cas.inbox("schedule.box") / "tosend" / f"{name}.Idb").exists()
    assert cas.query(
        "SELECT State FROM ObjectDistributionState WHERE ObjectID = ? AND SiteCode = 'PR2'",
        [pkg_id],
    ) == [(3,)]  # INSTALL_FAILED

    # The window opens (site.toml is read at a restart): the CAS and PR1 install all the
    # same, each on its own row.
    assert cas.stop() == 0
    remove_text(cas.path, window)
    cas.start()
    cas.wait_for(
        lambda: (
            own_state(cas) == State.INSTALL_SUCCESS
            and own_state(pr1) == State.INSTALL_SUCCESS
            and cas.site_states(GUID).get("PR1") == State.INSTALL_SUCCESS
        ),
        timeout=240,
        what="INSTALL_SUCCESS at the CAS and PR1",
    )
    assert cas.site_states(GUID)["PR2"] == State.CONTENT_REPLICATION_FAILED
    assert cas.states()[GUID] == State.CONTENT_REPLICATION_FAILED  # a failure anywhere wins
    assert own_state(pr2) != State.INSTALL_SUCCESS

    link.symlink_to(target)
    cas.retry_replication(GUID)
    converge(h, ("CAS", "PR1", "PR2"))
    assert [j[1] for j in job_to(cas, "PR2")][-1] == "Complete"
    for code in ("CAS", "PR1", "PR2"):
        installed_once(h[code])
    stop_all(h)


def test_a_child_failing_its_prerequisites_does_not_stop_the_others(
    hierarchy: Callable[..., LabHierarchy],
) -> None:
    h = hierarchy(settings={"PR2": {"facts.pending_restart": True}})
    cas, pr1, pr2 = h["CAS"], h["PR1"], h["PR2"]
    h.start()
    cas.install(GUID)
    cas.wait_for(
        lambda: (
            cas.site_states(GUID).get("PR2") == State.PREREQ_ERROR
            and own_state(cas) == State.INSTALL_SUCCESS
            and own_state(pr1) == State.INSTALL_SUCCESS
            and cas.site_states(GUID).get("PR1") == State.INSTALL_SUCCESS
        ),
        timeout=240,
        what="PREREQ_ERROR for PR2 and INSTALL_SUCCESS for the CAS and PR1, at the CAS",
    )
    assert own_state(pr2) == State.PREREQ_ERROR
    assert cas.states()[GUID] == State.PREREQ_ERROR  # the worst of all sites
    assert any(
        re.fullmatch(r"\S+;    Pending system restart;    Error;    A system restart .*", x)
        for x in pr2.log("ConfigMgrPrereq.log")
    )
    # PR2's failed rule reached the CAS (CMUpdates).
    failed = cas.query(
        "SELECT p.RuleName FROM CM_UpdatePackagePrereqStatus p "
        "JOIN ServerData s ON s.ID = p.SiteNumber "
        "WHERE p.PackageGuid = ? AND s.SiteCode = 'PR2' AND p.Status = 2",
        [GUID],
    )
    assert failed == [("Pending system restart",)]

    # The fix: the restart done, the daemon restarted, the update installed again.
    assert pr2.stop() == 0
    pr2.set("facts", "pending_restart", False)
    pr2.start()
    cas.install(GUID)
    converge(h, ("CAS", "PR1", "PR2"))
    for code in ("CAS", "PR1", "PR2"):
        installed_once(h[code])
    stop_all(h)


@pytest.mark.parametrize(
    ("code", "point"),
    [
        ("CAS", "distmgr.after_pck"),
        ("CAS", "scheduler.after_idb"),
        ("CAS", "sender.mid_copy"),
        ("PR1", "despooler.after_move"),
        ("PR1", "despooler.after_store"),
    ],
)
def test_a_site_killed_mid_replication_converges_after_a_restart(
    hierarchy: Callable[..., LabHierarchy],
    request: pytest.FixtureRequest,
    code: str,
    point: str,
) -> None:
    h = hierarchy(primaries=("PR1",))
    cas, pr1 = h["CAS"], h["PR1"]
    other = "PR1" if code == "CAS" else "CAS"
    # The site killed at a crash point runs as a child process (CMLAB_CRASHPOINTS is read
    # when the daemon starts; SIGKILL needs a process of its own); the other, in this one.
    victim = LabSite(h[code].path, site_code=code, mode="subprocess")
    request.addfinalizer(victim.kill)
    h.start(other)
    victim.start(CMLAB_CRASHPOINTS=point)
    cas.install(GUID)
    assert victim.wait_exit(timeout=120) == -signal.SIGKILL, victim.daemon_stderr()
    pkg_id = package_id(cas)
    receive = pr1.inbox(RECEIVE)
    if point == "distmgr.after_pck":
        assert (cas.path / "SMSPKG" / f"{pkg_id}.PCK.1").is_file()
        assert job_to(cas, "PR1") == []
    elif point == "scheduler.after_idb":
        [(job, state, _)] = job_to(cas, "PR1")
        assert state == "Pending"
        assert (cas.inbox("schedule.box") / "tosend" / f"{job:08X}.Idb").is_file()
    elif point == "sender.mid_copy":
        [(job, state, _)] = job_to(cas, "PR1")
        assert state == "Sending"
        assert [p.name for p in receive.iterdir()] == [f"ds_{job:08x}.pkg.part"]
    else:
        assert own_state(pr1) != State.CONTENT_REPLICATION_SUCCESS
        assert not any(
            line.startswith(f"Stored Package {pkg_id}") for line in pr1.log("despool.log")
        )

    victim.start()
    converge(h, ("CAS", "PR1"))
    if point == "sender.mid_copy":
        assert any(
            re.fullmatch(r"~Resuming sending \[.*\.pkg\.part\] from byte [1-9]\d*", line)
            for line in cas.log("sender.log")
        )
    assert [j[1] for j in job_to(cas, "PR1")] == ["Complete"]
    assert pr1.log("despool.log").count(f"Stored Package {pkg_id}. Stored Package Version = 1") == 1
    installed_once(cas)
    installed_once(pr1)
    assert victim.stop() == 0, victim.daemon_stderr()
    stop_all(h)
