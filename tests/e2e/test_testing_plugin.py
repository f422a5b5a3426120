"""cmlab's pytest plugin, run the way its users run it: pytest's own `pytester` writes a test
file that uses the fixtures and runs pytest on it (the plugin loads through its `pytest11`
entry point, as in any project that installed cmlab)."""

from __future__ import annotations

import pytest

# Imported here, in the outer run, before any pytester run: an in-process pytester run puts
# sys.modules back as it found it, so a module first imported inside one is imported again by
# the next, and cryptography's Python modules then no longer match its Rust bindings, which
# cannot be imported twice ("Algorithm must be a registered hash algorithm" when this file ran
# alone). LabSite imports the daemon and, with it, cryptography.
import cmlab.testing.site  # noqa: F401

pytest_plugins = ("pytester",)


@pytest.fixture(autouse=True)
def ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")


def run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(source)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly", *args)


def test_plugin_is_registered_by_its_entry_point(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--help")
    result.stdout.fnmatch_lines(["*cmlab lab sites*", "*--cmlab-mode*", "*--cmlab-timeout*"])


def test_each_fixture_passes(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import pytest
        from cmlab.testing import (
            SAMPLE_UPDATE, SYNCED_STATES, LabHierarchy, LabSite, State,
        )

        def test_site_is_synced_and_running(cmlab_site):
            assert isinstance(cmlab_site, LabSite)
            assert cmlab_site.running
            assert cmlab_site.states() == dict(SYNCED_STATES)
            assert cmlab_site.waiting_files() == []

        def test_factory_makes_sites_of_each_stage(cmlab_site_factory):
            new = cmlab_site_factory(stage="new", start=False)
            ready = cmlab_site_factory(stage="downloaded")
            assert new.path != ready.path
            assert not new.running and new.states() == {}
            assert ready.state(SAMPLE_UPDATE) == State.DOWNLOAD_SUCCESS

        def test_factory_writes_settings(cmlab_site_factory):
            site = cmlab_site_factory(stage="downloaded", settings={"facts.pending_restart": True})
            assert site.config.facts.values["pending_restart"] is True
            site.prereq(SAMPLE_UPDATE)
            site.wait_state(SAMPLE_UPDATE, State.PREREQ_ERROR, fail_on=())

        @pytest.mark.cmlab(stage="downloaded")
        def test_marker_chooses_the_stage(cmlab_site):
            cmlab_site.install(SAMPLE_UPDATE, wait=True)
            assert cmlab_site.history(SAMPLE_UPDATE)[-1] == State.INSTALL_SUCCESS

        def test_hierarchy(cmlab_hierarchy):
            assert isinstance(cmlab_hierarchy, LabHierarchy)
            assert [s.site_code for s in cmlab_hierarchy] == ["CAS", "PR1", "SEC"]
            assert cmlab_hierarchy["PR1"].config.parent == str(cmlab_hierarchy.top.path)
        """,
        "-v",
    )
    result.assert_outcomes(passed=5)
    # A hierarchy is slow, and marked so by the plugin.
    deselected = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-m", "not cmlab_slow")
    deselected.assert_outcomes(passed=4, deselected=1)


def test_template_copies_are_independent(pytester: pytest.Pytester) -> None:
    """The first test changes its site every way it can; the second still gets a clean one."""
    result = run(
        pytester,
        """
        from cmlab.testing import SAMPLE_UPDATE, State

        def test_a_changes_its_site(cmlab_site):
            cmlab_site.download(SAMPLE_UPDATE, wait=True)
            cmlab_site.drop("hman.box", "junk.SCU", "not a notification")
            (cmlab_site.path / "site.toml").write_text("broken")

        def test_b_gets_a_clean_site(cmlab_site):
            assert cmlab_site.state(SAMPLE_UPDATE) == State.APPLICABILITY_SUCCESS
            assert cmlab_site.bad_files("hman.box") == []
            assert cmlab_site.log("dmpdownloader.log").count("Checking for preview version~~") == 1
        """,
    )
    result.assert_outcomes(passed=2)


def test_failing_wait_is_readable(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        from cmlab.testing import SAMPLE_UPDATE, State

        def test_waits_for_what_never_comes(cmlab_site):
            cmlab_site.wait_state(SAMPLE_UPDATE, State.INSTALL_SUCCESS, timeout=0.3)

        def test_waits_for_a_line_never_written(cmlab_site):
            cmlab_site.wait_log("hman.log", "no such line", timeout=0.2)

        def test_state_assertion(cmlab_site):
            assert cmlab_site.state(SAMPLE_UPDATE) == State.INSTALL_SUCCESS
        """,
    )
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            "*WaitTimeout: CAS: timed out after 0.3 s waiting for "
            "420E3E18-73C5-4BE9-88B0-6F1E30A012CA to reach INSTALL_SUCCESS;"
            " last APPLICABILITY_SUCCESS (327682)",
            "*seen: APPLICABILITY_SUCCESS (327682)",
            "*WaitTimeout: CAS: timed out after 0.2 s waiting for 'no such line' in hman.log",
            "*APPLICABILITY_SUCCESS (327682) == INSTALL_SUCCESS (196612)",
        ]
    )


def test_a_failure_state_ends_a_wait_at_once(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import pytest
        from cmlab.testing import SAMPLE_UPDATE, WaitFailed

        @pytest.mark.cmlab(stage="downloaded", settings={"facts.pending_restart": True})
        def test_prereq_error(cmlab_site):
            with pytest.raises(WaitFailed, match="stopped at PREREQ_ERROR"):
                cmlab_site.install(SAMPLE_UPDATE, wait=True, timeout=600)
        """,
    )
    result.assert_outcomes(passed=1)


def test_subprocess_mode_kills_for_real(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import os
        from cmlab.testing import SAMPLE_UPDATE, State

        def test_kill_and_start_again(cmlab_site):
            assert cmlab_site.mode == "subprocess"
            pid = int((cmlab_site.path / "db" / "cmlab.lock").read_text())
            assert pid != os.getpid()
            cmlab_site.kill()
            assert not cmlab_site.running
            cmlab_site.start()
            cmlab_site.download(SAMPLE_UPDATE, wait=True)
            assert cmlab_site.state(SAMPLE_UPDATE) == State.DOWNLOAD_SUCCESS
        """,
        "--cmlab-mode=subprocess",
    )
    result.assert_outcomes(passed=1)


def test_bad_options_are_usage_errors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(cmlab_site): pass")
    result = pytester.runpytest_inprocess("--cmlab-timeout=-1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*cmlab_timeout must be more than 0 seconds*"])
    result = pytester.runpytest_inprocess("--cmlab-mode=docker")
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_async_tests_use_the_same_sites(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import re
        import pytest
        from cmlab.testing import SAMPLE_UPDATE, LabSite, State

        @pytest.mark.asyncio
        async def test_async_with(tmp_path, cmlab_templates):
            template = cmlab_templates.get("synced")
            async with LabSite(tmp_path / "CAS", template=template) as site:
                site.download(SAMPLE_UPDATE)
                got = await site.wait_state_async(SAMPLE_UPDATE, "DOWNLOAD_SUCCESS")
                assert got == State.DOWNLOAD_SUCCESS
                pattern = re.compile("Generating state message: 10 for package", re.I)
                line = await site.wait_log_async("dmpdownloader.log", pattern)
                assert line == f"Generating state message: 10 for package {SAMPLE_UPDATE.lower()}~~"
            assert not site.running
        """,
    )
    result.assert_outcomes(passed=1)
