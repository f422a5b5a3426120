"""`make demo`'s job: a fresh lab site and one update from synchronization to INSTALL_SUCCESS,
read back from the site."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmlab.commands.demo import run_demo
from cmlab.testing import SAMPLE_HIDDEN, SAMPLE_NOT_APPLICABLE, SAMPLE_UPDATE, LabSite, State


def test_demo_takes_the_sample_update_to_install_success(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_demo(tmp_path, deadline_s=120) == 0
    # The demo's site, read back as it left it (its daemon is stopped).
    assert LabSite(tmp_path / "CAS").states() == {
        SAMPLE_UPDATE: State.INSTALL_SUCCESS,
        SAMPLE_HIDDEN: State.APPLICABILITY_HIDE,
        SAMPLE_NOT_APPLICABLE: State.APPLICABILITY_NA,
    }
    out = capsys.readouterr().out
    assert "Configuration Manager 2509: DOWNLOAD_SUCCESS (262146)" in out
    assert "Install Update Pack (InitiateUpgrade, Flag=0)" in out
    for state in ("ENABLED (2)", "INSTALL_SUCCESS (196612)"):
        assert f"Configuration Manager 2509: {state}" in out
    # The site's own states (the package's roll-up can pass over a short-lived one).
    for state in (
        "CONTENT_REPLICATION_SUCCESS (65538)",
        "PREREQ_SUCCESS (131074)",
        "INSTALL_INSTALLFILES (196620)",
    ):
        assert f"Configuration Manager 2509 at site: {state}" in out
    for step in range(1, 17):
        assert f"step {step:>2}/16 " in out
    assert "DMPDownloader state message 13 PACKAGE_DOWNLOADED" in out
