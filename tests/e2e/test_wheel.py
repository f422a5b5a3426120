"""The wheel is the product: built from this tree, installed (not editable) into a fresh venv,
it runs `cmlab demo` to INSTALL_SUCCESS.

Every other test imports cmlab from the source tree, where the data folders (inboxes/,
payloads/, systemd/) sit beside the package; only an installed wheel shows that they ship as
cmlab/_data and that the metadata names every dependency the code imports. The venv's
dependencies come from the package index this machine reaches, resolved by pip from the
wheel's own metadata, as a user's install would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(args: list[str | Path], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # Nothing may lead the new venv back to the source tree.
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo_to_install_success(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dist, REPO],
        cwd=tmp_path,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("cmlab-*.whl")

    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", venv], cwd=tmp_path, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    installed = run(
        [venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel],
        cwd=tmp_path,
        timeout=900,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    # The venv imports its own copy, with the data beside it, and no py.typed is lost.
    where = run(
        [
            venv / "bin" / "python",
            "-c",
            "import cmlab, pathlib; print(pathlib.Path(cmlab.__file__).parent)",
        ],
        cwd=tmp_path,
        timeout=60,
    )
    package = Path(where.stdout.strip())
    assert package.is_relative_to(venv), where.stdout + where.stderr
    for shipped in ("_data/inboxes/contract.toml", "_data/payloads", "_data/systemd", "py.typed"):
        assert (package / shipped).exists(), shipped

    demo = run([venv / "bin" / "cmlab", "demo", tmp_path / "lab"], cwd=tmp_path, timeout=600)
    out = demo.stdout + demo.stderr
    assert demo.returncode == 0, out
    assert "Configuration Manager 2509: INSTALL_SUCCESS (196612)" in out
