"""cmlab.testing's public names: each resolves, the sample GUIDs are the lab cloud's, and
loading the pytest plugin (done in every pytest run where cmlab is installed) does not import
the daemon."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import cmlab.testing
from cmlab.site.resources import data_dir
from cmlab.site.state_codes import PackageState


def test_every_public_name_resolves() -> None:
    for name in cmlab.testing.__all__:
        assert getattr(cmlab.testing, name) is not None, name
    assert set(cmlab.testing.__all__) <= set(dir(cmlab.testing))
    assert cmlab.testing.State is PackageState
    try:
        cmlab.testing.Daemon  # noqa: B018 (an internal name is not public)
    except AttributeError as exc:
        assert "has no attribute 'Daemon'" in str(exc)
    else:
        raise AssertionError("cmlab.testing.Daemon should not exist")


def test_the_sample_guids_are_the_lab_clouds() -> None:
    with open(data_dir("payloads") / "manifest" / "packages.toml", "rb") as f:
        packages = {p["name"]: p["guid"] for p in tomllib.load(f)["package"]}
    assert packages["Configuration Manager 2509"] == cmlab.testing.SAMPLE_UPDATE
    assert packages["Configuration Manager 2503 Hotfix Rollup"] == cmlab.testing.SAMPLE_HIDDEN
    assert (
        packages["Configuration Manager 2409 Hotfix Rollup"] == cmlab.testing.SAMPLE_NOT_APPLICABLE
    )


def test_loading_the_plugin_does_not_import_the_daemon() -> None:
    probe = (
        "import sys, cmlab.testing.plugin\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('cmlab.daemon', "
        "'cmlab.components', 'cmlab.admin')))\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
