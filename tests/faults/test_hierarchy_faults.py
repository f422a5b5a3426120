"""Faults in a hierarchy of real sites (a CAS and child primaries, each its own daemon process,
reaching each other through a second path: docs/hierarchy.md): a child whose daemon is down
(the package waits in its inbox and is despooled when it returns), a broken link (the Sender
retries, CONTENT_REPLICATION_FAILED after `replication.sender_retries`, RetryContentReplication
recovers), a child that fails its prerequisites (the CAS shows PREREQ_ERROR for it and the
others still install), and SIGKILL of the CAS or of a child mid-replication (a restart
converges). Every test ends with every site at INSTALL_SUCCESS, rolled up at the CAS, and every
site's inboxes drained."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import pytest

from cmlab.site.state_codes import PackageState
from tests.helpers.hierarchy_sites import (
    Hierarchy,
    drained,
    installed_everywhere,
    make_hierarchy,
    own_history,
    own_state,
    site_states,
)
from tests.helpers.sites import (
    GUID_2509,
    cmlab,
    inbox_files,
    log,
    query,
    set_toml,
    site_version,
    states,
    temporaries,
    wait_for_line,
)
from tests.helpers.waiting import wait_until

GUID = GUID_2509
NEW_VERSION = "5.00.9141.1000"
RECEIVE = ("inboxes", "despoolr.box", "receive")


def job_to(cas: Path, dest: str) -> list[tuple[int, str, int]]:
    """(JobID, State, Attempts) of the CAS's SWD jobs to `dest`, oldest first."""
    return [
        (int(r[0]), str(r[1]), int(r[2]))
        for r in query(
            cas,
            "SELECT JobID, State, Attempts FROM SchedulerJobs "
            "WHERE JobType = 'SWD' AND DestSite = ? ORDER BY JobID",
            [dest],
        )
    ]


def package_id(cas: Path) -> str:
    return str(query(cas, "SELECT PackageID FROM vEasySetupPackage")[0][0])


def converge(h: Hierarchy, codes: tuple[str, ...]) -> None:
    """Every site in `codes` at INSTALL_SUCCESS, as itself and as the CAS knows it, the CAS's
    roll-up INSTALL_SUCCESS, then every inbox drained and nothing half-written left behind."""
    cas = h["CAS"]
    wait_until(
        lambda: (
            installed_everywhere(h, GUID, codes)
            and states(cas).get(GUID) == PackageState.INSTALL_SUCCESS
        ),
        timeout=240,
        what=f"INSTALL_SUCCESS at {', '.join(codes)}, rolled up at the CAS",
    )
    try:
        wait_until(lambda: drained(h), timeout=120, what="every site's inboxes to drain")
    except AssertionError as exc:
        left = {code: inbox_files(site) for code, site in h.sites.items()}
        raise AssertionError(f"{exc}: {left}") from exc
    # The Scheduler removed every instruction file when its job ended.
    assert not list((cas / "inboxes" / "schedule.box" / "tosend").glob("*.Idb"))
    for code in codes:
        site = h[code]
        assert site_version(site) == NEW_VERSION, code
        # The sites keep replicating while they run: a peer's message may be on its way in
        # under a temporary name for an instant. A leaked one stays.
        wait_until(lambda site=site: temporaries(site) == [], timeout=30, what=f"{code}'s temps")
        receive = site.joinpath(*RECEIVE)
        left = [p.name for p in receive.iterdir()] if receive.is_dir() else []
        assert left == [], f"{code}'s despoolr.box/receive holds {left}"
        assert not list((site / "SMSPKG").glob("*.temp")), code


def installed_once(h: Hierarchy, code: str) -> None:
    """The site installed the update once: one INSTALL_SUCCESS in its own status row's history,
    and nothing after it (a later run did not reinstall it)."""
    history = own_history(h[code], code)
    names = [PackageState.name_of(s) for s in history]
    assert history.count(PackageState.INSTALL_SUCCESS) == 1, names
    assert history[-1] == PackageState.INSTALL_SUCCESS, names


def test_a_package_waits_in_the_inbox_of_a_child_whose_daemon_is_down(
    downloaded_template: Path, tmp_path: Path
) -> None:
    h = make_hierarchy(tmp_path, downloaded_template, via="symlink", secondary=None)
    cas, pr1 = h["CAS"], h["PR1"]
    receive = pr1.joinpath(*RECEIVE)
    with h.running("CAS", "PR2"), h.daemons["PR1"] as pr1_daemon:
        cmlab("install", str(cas), GUID)
        jobs = wait_until(
            lambda: [j for j in job_to(cas, "PR1") if j[1] == "Complete"],
            timeout=120,
            what="the CAS's job to PR1 to complete",
        )
        job = jobs[0][0]
        pkg_id = package_id(cas)
        assert f"~Finished sending SWD package {pkg_id} version 1 to site PR1" in log(
            cas, "sender.log"
        )
        # The delivery waits in the stopped child's inbox: the package, then its instruction.
        assert sorted(p.name for p in receive.iterdir()) == [f"{job:08X}.INS", f"ds_{job:08x}.pkg"]
        # The rest of the hierarchy goes on without PR1.
        wait_until(
            lambda: (
                own_state(cas, "CAS") == PackageState.INSTALL_SUCCESS
                and site_states(cas, GUID).get("PR2") == PackageState.INSTALL_SUCCESS
                and own_state(h["PR2"], "PR2") == PackageState.INSTALL_SUCCESS
            ),
            timeout=240,
            what="the CAS and PR2 to install",
        )
        # The CAS has heard nothing from PR1: its row is where the run put it, and the roll-up
        # waits for it (content replication is not over until PR1's despooler has run).
        assert site_states(cas, GUID)["PR1"] == PackageState.ENABLED
        assert states(cas)[GUID] == PackageState.CONTENT_REPLICATING
        assert own_state(pr1, "PR1") != PackageState.INSTALL_SUCCESS
        assert sorted(p.name for p in receive.iterdir()) == [f"{job:08X}.INS", f"ds_{job:08x}.pkg"]

        pr1_daemon.start()
        converge(h, ("CAS", "PR1", "PR2"))
        assert any(
            re.fullmatch(rf"Received package {pkg_id} version 1\. Compressed file - .*", line)
            for line in log(pr1, "despool.log")
        )
        assert f"Stored Package {pkg_id}. Stored Package Version = 1" in log(pr1, "despool.log")
        for code in ("CAS", "PR1", "PR2"):
            installed_once(h, code)
        assert pr1_daemon.stop() == 0, pr1_daemon.stderr()


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
    downloaded_template: Path, tmp_path: Path
) -> None:
    h = make_hierarchy(
        tmp_path, downloaded_template, via="symlink", secondary=None, retry_delay=0.2
    )
    cas, pr1, pr2 = h["CAS"], h["PR1"], h["PR2"]
    set_toml(cas, "replication", "sender_retries", "1")
    # The CAS waits in a closed service window until the failure is reported, so what the
    # test reads happens in one order. Otherwise the job often fails while the CAS's own
    # installation has SMSDBMon's triggers removed (install steps 5 to 13): its JOB
    # notification is lost then, and the Scheduler's sweep of its job source reports it a
    # little later (test_scheduler_sweep).
    window = closed_service_window(cas)
    link = tmp_path / "net" / "PR2"
    target = link.readlink()
    link.unlink()  # the CAS can no longer reach PR2's folder
    with h.running():
        cmlab("install", str(cas), GUID)
        wait_until(
            lambda: (
                site_states(cas, GUID).get("PR2") == PackageState.CONTENT_REPLICATION_FAILED
                and own_state(cas, "CAS") == PackageState.INSTALL_WAITING_SERVICE_WINDOW
            ),
            timeout=120,
            what="CONTENT_REPLICATION_FAILED for PR2 at the CAS",
        )
        [(job, state, attempts)] = job_to(cas, "PR2")
        assert (state, attempts) == ("Failed", 2)
        name = f"{job:08X}"
        pkg_id = package_id(cas)
        sender = log(cas, "sender.log")
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
        wait_for_line(cas, "scheduler.log", "<JOB STATUS - FAILED>~", timeout=120)
        assert (
            f"ERROR: Job {name} (Software Distribution for Configuration Manager Easy Setup "
            f"Package, Package ID = {pkg_id}) to site PR2 failed: Cannot send to site PR2: "
            f"{missing}"
        ) in log(cas, "scheduler.log")
        assert not (cas / "inboxes" / "schedule.box" / "tosend" / f"{name}.Idb").exists()
        assert query(
            cas,
            "SELECT State FROM ObjectDistributionState WHERE ObjectID = ? AND SiteCode = 'PR2'",
            [pkg_id],
        ) == [(3,)]  # INSTALL_FAILED

        # The window opens (site.toml is read at a restart): the CAS and PR1 install all the
        # same, each on its own row.
        daemon = h.daemons["CAS"]
        assert daemon.stop() == 0, daemon.stderr()
        remove_text(cas, window)
        daemon.start()
        wait_until(
            lambda: (
                own_state(cas, "CAS") == PackageState.INSTALL_SUCCESS
                and own_state(pr1, "PR1") == PackageState.INSTALL_SUCCESS
                and site_states(cas, GUID).get("PR1") == PackageState.INSTALL_SUCCESS
            ),
            timeout=240,
            what="INSTALL_SUCCESS at the CAS and PR1",
        )
        assert site_states(cas, GUID)["PR2"] == PackageState.CONTENT_REPLICATION_FAILED
        assert (
            states(cas)[GUID] == PackageState.CONTENT_REPLICATION_FAILED
        )  # a failure anywhere wins
        assert own_state(pr2, "PR2") != PackageState.INSTALL_SUCCESS

        link.symlink_to(target)
        cmlab("retry-replication", str(cas), GUID)
        converge(h, ("CAS", "PR1", "PR2"))
        assert [j[1] for j in job_to(cas, "PR2")][-1] == "Complete"
        for code in ("CAS", "PR1", "PR2"):
            installed_once(h, code)


def test_a_child_failing_its_prerequisites_does_not_stop_the_others(
    downloaded_template: Path, tmp_path: Path
) -> None:
    h = make_hierarchy(tmp_path, downloaded_template, via="symlink", secondary=None)
    cas, pr1, pr2 = h["CAS"], h["PR1"], h["PR2"]
    set_toml(pr2, "facts", "pending_restart", "true")
    with h.running():
        cmlab("install", str(cas), GUID)
        wait_until(
            lambda: (
                site_states(cas, GUID).get("PR2") == PackageState.PREREQ_ERROR
                and own_state(cas, "CAS") == PackageState.INSTALL_SUCCESS
                and own_state(pr1, "PR1") == PackageState.INSTALL_SUCCESS
                and site_states(cas, GUID).get("PR1") == PackageState.INSTALL_SUCCESS
            ),
            timeout=240,
            what="PREREQ_ERROR for PR2 and INSTALL_SUCCESS for the CAS and PR1, at the CAS",
        )
        assert own_state(pr2, "PR2") == PackageState.PREREQ_ERROR
        assert states(cas)[GUID] == PackageState.PREREQ_ERROR  # the worst of all sites
        assert any(
            re.fullmatch(r"\S+;    Pending system restart;    Error;    A system restart .*", x)
            for x in log(pr2, "ConfigMgrPrereq.log")
        )
        # PR2's failed rule reached the CAS (CMUpdates).
        failed = query(
            cas,
            "SELECT p.RuleName FROM CM_UpdatePackagePrereqStatus p "
            "JOIN ServerData s ON s.ID = p.SiteNumber "
            "WHERE p.PackageGuid = ? AND s.SiteCode = 'PR2' AND p.Status = 2",
            [GUID],
        )
        assert failed == [("Pending system restart",)]

        # The fix: the restart done, the daemon restarted, the update installed again.
        daemon = h.daemons["PR2"]
        assert daemon.stop() == 0, daemon.stderr()
        set_toml(pr2, "facts", "pending_restart", "false")
        daemon.start()
        cmlab("install", str(cas), GUID)
        converge(h, ("CAS", "PR1", "PR2"))
        for code in ("CAS", "PR1", "PR2"):
            installed_once(h, code)


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
    downloaded_template: Path, tmp_path: Path, code: str, point: str
) -> None:
    h = make_hierarchy(
        tmp_path, downloaded_template, via="symlink", primaries=("PR1",), secondary=None
    )
    cas, pr1 = h["CAS"], h["PR1"]
    other = "PR1" if code == "CAS" else "CAS"
    with h.running(other), h.daemons[code] as victim:
        victim.start(CMLAB_CRASHPOINTS=point)
        cmlab("install", str(cas), GUID)
        wait_until(lambda: not victim.alive(), timeout=120, what=f"{code}'s kill at {point}")
        assert victim.wait_exit() == -9, victim.stderr()
        pkg_id = package_id(cas)
        receive = pr1.joinpath(*RECEIVE)
        if point == "distmgr.after_pck":
            assert (cas / "SMSPKG" / f"{pkg_id}.PCK.1").is_file()
            assert job_to(cas, "PR1") == []
        elif point == "scheduler.after_idb":
            [(job, state, _)] = job_to(cas, "PR1")
            assert state == "Pending"
            assert (cas / "inboxes" / "schedule.box" / "tosend" / f"{job:08X}.Idb").is_file()
        elif point == "sender.mid_copy":
            [(job, state, _)] = job_to(cas, "PR1")
            assert state == "Sending"
            assert [p.name for p in receive.iterdir()] == [f"ds_{job:08x}.pkg.part"]
        else:
            assert own_state(pr1, "PR1") != PackageState.CONTENT_REPLICATION_SUCCESS
            assert not any(
                line.startswith(f"Stored Package {pkg_id}") for line in log(pr1, "despool.log")
            )

        victim.start()
        converge(h, ("CAS", "PR1"))
        if point == "sender.mid_copy":
            assert any(
                re.fullmatch(r"~Resuming sending \[.*\.pkg\.part\] from byte [1-9]\d*", line)
                for line in log(cas, "sender.log")
            )
        assert [j[1] for j in job_to(cas, "PR1")] == ["Complete"]
        assert (
            log(pr1, "despool.log").count(f"Stored Package {pkg_id}. Stored Package Version = 1")
            == 1
        )
        installed_once(h, "CAS")
        installed_once(h, "PR1")
        assert victim.stop() == 0, victim.stderr()
