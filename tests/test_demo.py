"""`make demo`'s job: a fresh lab site taken as far as cmlab reaches, read back from the site."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmlab.demo import run_demo
from cmlab.statecodes import PackageState as S
from sites import GUID_2409_HFRU, GUID_2503_HFRU, GUID_2509, states


def test_demo_takes_the_sample_update_through_its_prerequisite_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_demo(tmp_path, deadline_s=60) == 0
    assert states(tmp_path / "CAS") == {
        GUID_2509: S.PREREQ_SUCCESS,
        GUID_2503_HFRU: S.APPLICABILITY_HIDE,
        GUID_2409_HFRU: S.APPLICABILITY_NA,
    }
    out = capsys.readouterr().out
    assert "Configuration Manager 2509: DOWNLOAD_SUCCESS (262146)" in out
    assert "Run prerequisite check (InitiateUpgrade, Flag=1)" in out
    for state in ("ENABLED (2)", "CONTENT_REPLICATION_SUCCESS (65538)", "PREREQ_SUCCESS (131074)"):
        assert f"Configuration Manager 2509: {state}" in out
    assert "DMPDownloader state message 13 PACKAGE_DOWNLOADED" in out
