"""cmlab.testing's LabSite and LabHierarchy, beyond the plugin: what a test author calls
directly, and each way a call can be wrong (one clear error, nothing written outside the
site)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cmlab.testing import (
    SAMPLE_UPDATE,
    HierarchySpec,
    LabError,
    LabHierarchy,
    LabSite,
    State,
    WaitTimeout,
)
from cmlab.testing.plugin import Templates


def test_a_site_from_nothing_runs_a_whole_update(tmp_path: Path) -> None:
    with LabSite(tmp_path / "CAS") as site:
        site.sync(wait=True)
        site.download(SAMPLE_UPDATE, wait=True)
        site.install(SAMPLE_UPDATE, wait=True)
        assert site.state(SAMPLE_UPDATE) == State.INSTALL_SUCCESS
        history = site.history(SAMPLE_UPDATE)
        assert history[:2] == [State.DOWNLOAD_IN_PROGRESS, State.DOWNLOAD_SUCCESS]
        assert history[-1] == State.INSTALL_SUCCESS
        assert site.site_states(SAMPLE_UPDATE) == {"CAS": State.INSTALL_SUCCESS}
        assert site.query(
            "SELECT TOP 1 State FROM dbo.CM_UpdatePackages WHERE PackageGuid = ?",
            [SAMPLE_UPDATE],
        ) == [(State.INSTALL_SUCCESS,)]
    assert not site.running


def test_drop_and_bad_files(cmlab_site: LabSite, tmp_path: Path) -> None:
    path = cmlab_site.drop("hman.box", "XYZ.SCU", b"\x00not a site code notification")
    assert path == cmlab_site.path / "inboxes" / "hman.box" / "XYZ.SCU"
    cmlab_site.wait_gone(path)
    cmlab_site.wait_idle()
    before = sorted(p.name for p in tmp_path.iterdir())
    for name in ("../escape.SCU", "a/b.SCU", "", "..", "a\\b.SCU"):
        with pytest.raises(ValueError, match="one path component"):
            cmlab_site.drop("hman.box", name, "x")
    with pytest.raises(LookupError, match=r"no inbox 'nowhere.box'; the inboxes are .*hman\.box"):
        cmlab_site.drop("nowhere.box", "x.SCU")
    with pytest.raises(LookupError, match="no inbox"):
        cmlab_site.inbox("../../etc")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_calls_are_clear(cmlab_site: LabSite) -> None:
    with pytest.raises(ValueError, match="no state named 'INSTALLED'"):
        cmlab_site.wait_state(SAMPLE_UPDATE, "INSTALLED")
    with pytest.raises(LabError, match="kill\\(\\) needs mode='subprocess'"):
        cmlab_site.kill()
    with pytest.raises(LabError, match="already running"):
        cmlab_site.start()
    with pytest.raises(LookupError, match="no update package"):
        cmlab_site.download("00000000-0000-0000-0000-00000000ABCD")
    with pytest.raises(ValueError, match="mode must be one of"):
        LabSite(cmlab_site.path, mode="docker")  # type: ignore[arg-type]
    cmlab_site.stop()
    with pytest.raises(LabError, match="need mode='subprocess'"):
        cmlab_site.start(CMLAB_CRASHPOINTS="x")


def test_a_timeout_shows_what_was_seen(cmlab_site: LabSite) -> None:
    with pytest.raises(WaitTimeout) as err:
        cmlab_site.wait_state(SAMPLE_UPDATE, State.DOWNLOAD_SUCCESS, timeout=0.1)
    assert "seen: APPLICABILITY_SUCCESS (327682)" in str(err.value)
    with pytest.raises(WaitTimeout, match=r"in hman\.log\n  seen: \d+ lines; last: "):
        cmlab_site.wait_log("hman.log", re.compile("never"), timeout=0.1)


def test_settings_apply_on_restart(cmlab_templates: Templates, tmp_path: Path) -> None:
    site = LabSite(tmp_path / "CAS", template=cmlab_templates.get("downloaded"))
    with site:
        site.set("facts", "pending_restart", True)
        site.restart()
        site.prereq(SAMPLE_UPDATE)
        site.wait_state(SAMPLE_UPDATE, "PREREQ_ERROR", fail_on=())
    # A folder that holds a site is used as it is.
    with LabSite(tmp_path / "CAS") as again:
        assert again.state(SAMPLE_UPDATE) == State.PREREQ_ERROR


def test_a_daemon_that_cannot_start_says_why(cmlab_templates: Templates, tmp_path: Path) -> None:
    for mode in ("inprocess", "subprocess"):
        site = LabSite(tmp_path / mode, template=cmlab_templates.get("new"), mode=mode)
        site.create()
        (site.path / "site.toml").write_text("[site]\ncode = 'CAS'\nrole = 'moon'\n")
        with pytest.raises(LabError, match=r"site\.role must be one of"):
            site.start()
        assert not site.running


def test_a_hierarchy_installs_everywhere(cmlab_templates: Templates, tmp_path: Path) -> None:
    spec = HierarchySpec.from_dict(
        {
            "defaults": {
                "replication.cmupdates_interval": 0.2,
                "replication.sender_retry_delay": 0.3,
            },
            "site": [{"code": "CAS"}, {"code": "PR1", "parent": "CAS"}],
        }
    )
    with LabHierarchy(tmp_path / "lab", spec, top_from=cmlab_templates.get("downloaded")) as h:
        h.top.install(SAMPLE_UPDATE)
        h.wait_installed(SAMPLE_UPDATE)
        h.wait_idle()
        assert h["PR1"].history(SAMPLE_UPDATE)[-1] == State.INSTALL_SUCCESS


def test_a_daemon_that_dies_ends_a_wait_at_once(
    cmlab_site: LabSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An in-process daemon that ends with an error mid-test: the next wait says so at once
    instead of timing out (a wait on a dead site could only time out)."""
    from cmlab.daemon import SiteDaemon

    real_stop = SiteDaemon.stop

    async def broken_stop(self: SiteDaemon) -> None:
        await real_stop(self)  # every component stops; then serve() fails
        raise RuntimeError("the database thread is gone")

    monkeypatch.setattr(SiteDaemon, "stop", broken_stop)
    runner = cmlab_site._runner
    assert runner._loop is not None and runner._stop is not None  # type: ignore[union-attr]
    runner._loop.call_soon_threadsafe(runner._stop.set)  # type: ignore[union-attr]
    with pytest.raises(LabError, match="the daemon stopped with an error while waiting for"):
        cmlab_site.wait_state(SAMPLE_UPDATE, State.INSTALL_SUCCESS, timeout=600)
    with pytest.raises(LabError, match="the database thread is gone"):
        cmlab_site.stop()
    monkeypatch.undo()


def test_a_timeout_without_seen_shows_the_site(cmlab_site: LabSite) -> None:
    with pytest.raises(WaitTimeout) as err:
        cmlab_site.wait_for(lambda: False, timeout=0.05, what="nothing")
    assert "\n  seen: states: " in str(err.value)
    assert f"{SAMPLE_UPDATE}=APPLICABILITY_SUCCESS (327682)" in str(err.value)
    assert "waiting drop files: none" in str(err.value)
