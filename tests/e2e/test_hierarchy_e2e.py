"""A CAS, two child primaries and a secondary, each its own site folder and daemon process:
one update from the CAS's InitiateUpgrade to INSTALL_SUCCESS at every primary, the Easy Setup
Package replicated by DistMgr's minijob, the Scheduler, the Sender and each child's
despooler, the sites' results replicated by the CMUpdates group, the children waiting for
their parent, and the secondary left alone until Recover Secondary Site (docs/hierarchy.md).

Run twice: with every site reaching the others through a second path, and (where the kernel
allows unprivileged user namespaces) through bind mounts that exist only inside each daemon's
own mount namespace, so nothing can use another site's real folder, process or database."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from cmlab.site.content_library import ContentLibrary
from cmlab.site.state_codes import PackageState
from tests.helpers.hierarchy_sites import (
    Hierarchy,
    bind_mounts_work,
    drained,
    make_hierarchy,
    own_history,
    own_state,
    site_states,
)
from tests.helpers.sites import (
    GUID_2509,
    assert_in_order,
    cmlab,
    inbox_files,
    log,
    query,
    set_toml,
    site_version,
    states,
)
from tests.helpers.waiting import wait_until

GUID = GUID_2509
OLD_VERSION, NEW_VERSION = "5.00.9135.1000", "5.00.9141.1000"
PRIMARIES = ("CAS", "PR1", "PR2")
CHILDREN = ("PR1", "PR2")


def assert_subsequence(history: list[int], expected: list[PackageState]) -> None:
    it = iter(history)
    missing = [s for s in expected if not any(h == s for h in it)]
    assert not missing, (
        f"{[PackageState.name_of(h) for h in history]} lacks {[s.name for s in missing]}"
    )


@pytest.fixture(params=["second-path", "bind-mount"])
def hierarchy(
    request: pytest.FixtureRequest, downloaded_template: Path, tmp_path: Path
) -> Hierarchy:
    via = "symlink" if request.param == "second-path" else "bind"
    if via == "bind" and not bind_mounts_work():
        pytest.skip("unprivileged bind mounts (user namespaces) are not allowed on this machine")
    return make_hierarchy(tmp_path, downloaded_template, via=via)


def test_an_update_goes_from_the_cas_to_every_primary_and_the_secondary_waits(
    hierarchy: Hierarchy,
) -> None:
    h = hierarchy
    cas, pr1, pr2, sec = h["CAS"], h["PR1"], h["PR2"], h["SEC"]
    with h.running("PR1", "PR2", "SEC"), h.daemons["CAS"]:
        # The CAS is killed just before it reports INSTALL_SUCCESS: its children must wait.
        h.daemons["CAS"].start(CMLAB_CRASHPOINTS="cmupdate.before_installed_notification")
        cmlab("install", str(cas), GUID)
        wait_until(lambda: not h.daemons["CAS"].alive(), timeout=180, what="the CAS's kill")
        assert h.daemons["CAS"].wait_exit() == -signal.SIGKILL
        for code in CHILDREN:
            wait_until(
                lambda code=code: own_state(h[code], code) == PackageState.INSTALL_WAITING_PARENT,
                timeout=120,
                what=f"{code} waiting for its parent",
            )
        # The hand-offs, as files and log lines.
        pck = cas / "SMSPKG"
        package_id = str(query(cas, "SELECT PackageID FROM vEasySetupPackage")[0][0])
        assert [p.name for p in pck.iterdir() if ".PCK." in p.name] == [f"{package_id}.PCK.1"]
        distmgr = log(cas, "distmgr.log")
        for code in CHILDREN:
            assert any(
                re.fullmatch(
                    rf"Created minijob to send compressed copy of package {package_id} to site "
                    rf"{code}\.  Transfer root = .*{package_id}\.PCK\.1",
                    line,
                )
                for line in distmgr
            ), distmgr
            assert f"~Finished sending SWD package {package_id} version 1 to site {code}" in log(
                cas, "sender.log"
            )
            despool = log(h[code], "despool.log")
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
            assert ContentLibrary(h[code] / "SCCMContentLib").current_version(package_id) == 1
            assert f"Created notification file ({GUID}.CMI) for CONFIGURATION_MANAGER_UPDATE" in (
                log(h[code], "hman.log")
            )
            assert any(
                "INSTALL_WAITING_PARENT (196611)" in line for line in log(h[code], "CMUpdate.log")
            )
        assert "<JOB STATUS - COMPLETE>~" in log(cas, "scheduler.log")
        # Never to a secondary site.
        assert not (sec / "Logs" / "despool.log").exists() or not any(
            line.startswith("Received package") for line in log(sec, "despool.log")
        )
        assert ContentLibrary(sec / "SCCMContentLib").current_version(package_id) is None
        h.daemons["CAS"].start()
        wait_until(
            lambda: (
                states(cas).get(GUID) == PackageState.INSTALL_SUCCESS
                and all(own_state(h[c], c) == PackageState.INSTALL_SUCCESS for c in PRIMARIES)
                and all(
                    site_states(cas, GUID).get(c) == PackageState.INSTALL_SUCCESS for c in PRIMARIES
                )
            ),
            timeout=240,
            what="INSTALL_SUCCESS at the CAS and both primaries, rolled up at the CAS",
        )
        try:
            wait_until(lambda: drained(h), timeout=60, what="every site's inboxes to drain")
        except AssertionError as exc:
            left = {code: inbox_files(site) for code, site in h.sites.items()}
            raise AssertionError(f"{exc}: {left}") from exc

        for code in PRIMARIES:
            assert site_version(h[code]) == NEW_VERSION
        for code in CHILDREN:
            # CONTENT_REPLICATING only shows when the run reaches the child before the package
            # does; the package may come first (the despooler stores it, then the run finds it).
            assert_subsequence(
                own_history(h[code], code),
                [
                    PackageState.ENABLED,
                    PackageState.CONTENT_REPLICATION_SUCCESS,
                    PackageState.PREREQ_IN_PROGRESS,
                    PackageState.PREREQ_SUCCESS,
                    PackageState.INSTALL_WAITING_PARENT,
                    PackageState.INSTALL_IN_PROGRESS,
                    PackageState.INSTALL_SUCCESS,
                ],
            )
            assert any(
                line.startswith(f"INFO: Parent site CAS has installed update {GUID}")
                for line in log(h[code], "hman.log")
            )
        # Each child's results reached the CAS as CMUpdates replication group messages.
        rcm = log(cas, "rcmctrl.log")
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
            for r in query(
                cas,
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
        cmlab("recover-secondary", str(pr1), "SEC")
        wait_until(lambda: _secondary_status(pr1) == 1, timeout=120, what="SEC recovered")
        assert site_version(sec) == NEW_VERSION
        assert site_version(pr2) == NEW_VERSION
        assert h.daemons["CAS"].stop() == 0


def _secondary_status(primary: Path) -> int | None:
    out = cmlab(
        "sql", str(primary), "SELECT dbo.fnGetSecondarySiteCMUpdateStatus('SEC') AS s", "--json"
    ).stdout
    found = re.findall(r'"s":\s*(\w+)', out)
    assert found, out
    return None if found[0] == "null" else int(found[0])


def test_the_cas_shows_the_worst_prerequisite_result_of_all_its_primary_sites(
    downloaded_template: Path, tmp_path: Path
) -> None:
    """Run prerequisite check (Flag 1) at the CAS: every primary site checks itself, and the
    CAS's overall result is the worst of them; nothing is installed."""
    h = make_hierarchy(tmp_path, downloaded_template, secondary=None)
    set_toml(h["PR1"], "facts", "antivirus_running", "true")  # a Warning rule
    with h.running():
        cmlab("prereq", str(h["CAS"]), GUID)
        wait_until(
            lambda: (
                site_states(h["CAS"], GUID)
                == {
                    "CAS": PackageState.PREREQ_SUCCESS,
                    "PR1": PackageState.PREREQ_WARNING,
                    "PR2": PackageState.PREREQ_SUCCESS,
                }
                and states(h["CAS"]).get(GUID) == PackageState.PREREQ_WARNING
            ),
            timeout=180,
            what="every site's prerequisite result at the CAS",
        )
        wait_until(lambda: drained(h), timeout=60, what="every site's inboxes to drain")
        rules = query(
            h["CAS"],
            "select ServerData.SiteCode, p.RuleName, p.Status from CM_UpdatePackagePrereqStatus p "
            "Left join serverdata on p.SiteNumber=ServerData.ID where p.Status = 1",
        )
        assert [(r[0], r[2]) for r in rules] == [("PR1", 1)]
    for code in PRIMARIES:
        assert site_version(h[code]) == OLD_VERSION
        assert PackageState.INSTALL_IN_PROGRESS not in own_history(h[code], code)
