"""A CAS, two child primaries and a secondary, each its own site folder and daemon process:
one update from the CAS's InitiateUpgrade to INSTALL_SUCCESS at every primary, the Easy Setup
Package replicated by DistMgr's minijob, the Scheduler, the Sender and each child's
despooler, the sites' results replicated by the CMUpdates group, the children waiting for
their parent, and the secondary left alone until Recover Secondary Site (docs/hierarchy.md).

Run twice: with every site reaching the others through a second path, and (where the kernel
allows unprivileged user namespaces) through bind mounts that exist only inside each daemon's
own mount namespace, so nothing can use another site's real folder, process or database."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmlab.site.content_library import ContentLibrary
from cmlab.testing import (
    SAMPLE_UPDATE,
    HierarchySpec,
    LabHierarchy,
    LabSite,
    State,
    assert_in_order,
)
from tests.helpers.bind_mounts import bind_mount_prefix, bind_mounts_work

GUID = SAMPLE_UPDATE
OLD_VERSION, NEW_VERSION = "5.00.9135.1000", "5.00.9141.1000"
PRIMARIES = ("CAS", "PR1", "PR2")
CHILDREN = ("PR1", "PR2")
# Replication within a fraction of a second, so a test waits on the sites, not on a timer.
FAST = {"replication.cmupdates_interval": 0.2, "replication.sender_retry_delay": 0.3}
SPEC = HierarchySpec.from_dict(
    {
        "defaults": FAST,
        "site": [
            {"code": "CAS"},
            {"code": "PR1", "parent": "CAS"},
            {"code": "PR2", "parent": "CAS"},
            {"code": "SEC", "parent": "PR1"},
        ],
    }
)


def assert_subsequence(history: list[State | int], expected: list[State]) -> None:
    it = iter(history)
    missing = [s for s in expected if not any(h == s for h in it)]
    assert not missing, f"{[State.name_of(h) for h in history]} lacks {[s.name for s in missing]}"


def site_version(site: LabSite) -> str:
    """What fnCurrentSiteVersion() returns at `site`."""
    ((version,),) = site.query("SELECT dbo.fnCurrentSiteVersion()")
    return str(version)


@pytest.fixture(params=["second-path", "bind-mount"])
def hierarchy(
    request: pytest.FixtureRequest, downloaded_template: Path, tmp_path: Path
) -> Iterator[LabHierarchy]:
    """SPEC's sites in `tmp_path/sites`, each reaching the others through a second path,
    `tmp_path/net/<CODE>`: a symlink farm, or empty folders that only each daemon's own mount
    namespace binds to the real ones. Every daemon is `cmlab run` in a child process: the
    CAS's is SIGKILLed at a crash point, and with bind mounts each needs its own namespace."""
    bind = request.param == "bind-mount"
    if bind and not bind_mounts_work():
        pytest.skip("unprivileged bind mounts (user namespaces) are not allowed on this machine")
    real, net = tmp_path / "sites", tmp_path / "net"
    net.mkdir()
    codes = SPEC.codes()
    for code in codes:
        # `cmlab init` reads the parent's site.toml through the address, so a bind-mount
        # hierarchy is made through symlinks, then the links become empty mount points.
        os.symlink(real / code, net / code)

    def prefix(code: str) -> list[str]:
        return bind_mount_prefix((real / c, net / c) for c in codes if c != code) if bind else []

    h = LabHierarchy(
        real,
        SPEC,
        mode="subprocess",
        top_from=downloaded_template,
        address_of=lambda code: net / code,
        command_prefix=prefix,
    ).create()
    if bind:
        for code in codes:
            (net / code).unlink()
            (net / code).mkdir()
    yield h
    h.stop()


def test_an_update_goes_from_the_cas_to_every_primary_and_the_secondary_waits(
    hierarchy: LabHierarchy,
) -> None:
    h = hierarchy
    cas, pr1, pr2, sec = h["CAS"], h["PR1"], h["PR2"], h["SEC"]
    h.start("PR1", "PR2", "SEC")
    # The CAS is killed just before it reports INSTALL_SUCCESS: its children must wait.
    cas.start(CMLAB_CRASHPOINTS="cmupdate.before_installed_notification")
    cas.install(GUID)
    assert cas.wait_exit(180) == -signal.SIGKILL
    for code in CHILDREN:
        h[code].wait_for(
            lambda code=code: h[code].site_states(GUID).get(code) == State.INSTALL_WAITING_PARENT,
            timeout=120,
            what=f"{code} waiting for its parent",
        )
    # The hand-offs, as files and log lines.
    pck = cas.path / "SMSPKG"
    package_id = str(cas.query("SELECT PackageID FROM vEasySetupPackage")[0][0])
    assert [p.name for p in pck.iterdir() if ".PCK." in p.name] == [f"{package_id}.PCK.1"]
    distmgr = cas.log("distmgr.log")
    for code in CHILDREN:
        assert any(
            re.fullmatch(
                rf"Created minijob to send compressed copy of package {package_id} to site "
                rf"{code}\.  Transfer root = .*{package_id}\.PCK\.1",
                line,
            )
            for line in distmgr
        ), distmgr
        assert f"~Finished sending SWD package {package_id} version 1 to site {code}" in (
            cas.log("sender.log")
        )
        despool = h[code].log("despool.log")
        assert_in_order(
            despool,
            [
                re.compile(rf"Received package {package_id} version 1\. Compressed file - .*"),
                f"Extracting package {package_id}",
                f"Extracting content {package_id}.1",
                f"Writing package definition for {package_id}",
                re.compile(
                    rf"Package {package_id} \(version 0\) exists in the distribution source, "
                    r"save the newer version \(version 1\)\."
                ),
                f"Stored Package {package_id}. Stored Package Version = 1",
            ],
        )
        assert ContentLibrary(h[code].path / "SCCMContentLib").current_version(package_id) == 1
        assert f"Created notification file ({GUID}.CMI) for CONFIGURATION_MANAGER_UPDATE" in (
            h[code].log("hman.log")
        )
        assert any(
            "INSTALL_WAITING_PARENT (196611)" in line for line in h[code].log("CMUpdate.log")
        )
    assert "<JOB STATUS - COMPLETE>~" in cas.log("scheduler.log")
    # Never to a secondary site.
    assert not (sec.path / "Logs" / "despool.log").exists() or not any(
        line.startswith("Received package") for line in sec.log("despool.log")
    )
    assert ContentLibrary(sec.path / "SCCMContentLib").current_version(package_id) is None
    cas.start()
    # INSTALL_SUCCESS at the CAS and both primaries (each in its own database and rolled up at
    # the CAS), the CAS's package too, then every site's inboxes drained.
    h.wait_installed(GUID, PRIMARIES, timeout=240)
    cas.wait_state(GUID, State.INSTALL_SUCCESS)
    h.wait_idle(timeout=60)

    for code in PRIMARIES:
        assert site_version(h[code]) == NEW_VERSION
    for code in CHILDREN:
        # CONTENT_REPLICATING only shows when the run reaches the child before the package
        # does; the package may come first (the despooler stores it, then the run finds it).
        assert_subsequence(
            h[code].history(GUID),
            [
                State.ENABLED,
                State.CONTENT_REPLICATION_SUCCESS,
                State.PREREQ_IN_PROGRESS,
                State.PREREQ_SUCCESS,
                State.INSTALL_WAITING_PARENT,
                State.INSTALL_IN_PROGRESS,
                State.INSTALL_SUCCESS,
            ],
        )
        assert any(
            line.startswith(f"INFO: Parent site CAS has installed update {GUID}")
            for line in h[code].log("hman.log")
        )
    # Each child's results reached the CAS as CMUpdates replication group messages.
    rcm = cas.log("rcmctrl.log")
    for code in CHILDREN:
        assert any(
            re.fullmatch(
                rf"Received CMUpdates replication group message \d+ from site {code}: .*", x
            )
            for x in rcm
        )
    # The guide's monitoring query at the CAS shows every primary site.
    monitored = {
        str(r[0])
        for r in cas.query(
            "select ServerData.SiteCode, cmums.* from CM_UpdatePackage_MonitoringStatus "
            "cmums Left join serverdata on cmums.SiteNumber=ServerData.ID "
            "where PackageGUID=?",
            [GUID],
        )
    }
    assert set(PRIMARIES) <= monitored

    # The secondary is never updated by itself.
    assert site_version(sec) == OLD_VERSION
    assert _secondary_status(pr1) == 0
    pr1.recover_secondary("SEC")
    pr1.wait_for(lambda: _secondary_status(pr1) == 1, timeout=120, what="SEC recovered")
    assert site_version(sec) == NEW_VERSION
    assert site_version(pr2) == NEW_VERSION
    for site in (cas, pr1, pr2, sec):
        assert site.stop() == 0, site.daemon_stderr()


def _secondary_status(primary: LabSite) -> int | None:
    ((status,),) = primary.query("SELECT dbo.fnGetSecondarySiteCMUpdateStatus('SEC') AS s")
    return None if status is None else int(status)


# Every primary site checks itself; PR1 with a Warning rule.
@pytest.mark.cmlab_hierarchy(
    {
        "defaults": FAST,
        "site": [
            {"code": "CAS"},
            {"code": "PR1", "parent": "CAS", "settings": {"facts.antivirus_running": True}},
            {"code": "PR2", "parent": "CAS"},
        ],
    }
)
def test_the_cas_shows_the_worst_prerequisite_result_of_all_its_primary_sites(
    cmlab_hierarchy: LabHierarchy,
) -> None:
    """Run prerequisite check (Flag 1) at the CAS: every primary site checks itself, and the
    CAS's overall result is the worst of them; nothing is installed."""
    h = cmlab_hierarchy
    h.top.prereq(GUID)
    want = {"CAS": State.PREREQ_SUCCESS, "PR1": State.PREREQ_WARNING, "PR2": State.PREREQ_SUCCESS}
    h.top.wait_for(
        lambda: h.top.site_states(GUID) == want and h.top.state(GUID) == State.PREREQ_WARNING,
        timeout=180,
        what="every site's prerequisite result at the CAS",
        seen=lambda: f"{h.top.site_states(GUID)}, the CAS's package at {h.top.state(GUID)}",
    )
    h.wait_idle(timeout=60)
    rules = h.top.query(
        "select ServerData.SiteCode, p.RuleName, p.Status from CM_UpdatePackagePrereqStatus p "
        "Left join serverdata on p.SiteNumber=ServerData.ID where p.Status = 1",
    )
    assert [(r[0], r[2]) for r in rules] == [("PR1", 1)]
    h.stop()
    for code in PRIMARIES:
        assert site_version(h[code]) == OLD_VERSION
        assert State.INSTALL_IN_PROGRESS not in h[code].history(GUID)
