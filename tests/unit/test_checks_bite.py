"""The machine-checked rules fail when they are broken, not only pass when they hold.

A check that has never been seen failing may be checking nothing: a contract whose module
name is misspelt, a mypy configuration that no longer applies. So each check runs here on
something made to break it (the fixture package tests/data/contracts/pkg, whose core imports a
component; a snippet that passes a str where an int is typed) and must fail for that reason,
and the real package must pass the import contracts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTRACTS_FIXTURE = Path(__file__).resolve().parents[1] / "data" / "contracts"
# The tools installed beside the interpreter running the tests (the project's venv).
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")
# Some import-linter releases colour their report even into a pipe.
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def lint_imports(*args: str, cwd: Path, pythonpath: Path | None = None) -> tuple[int, str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(
        [LINT_IMPORTS, "--no-cache", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, ANSI.sub("", done.stdout + done.stderr)


def test_import_contracts_fail_when_core_imports_a_component() -> None:
    code, out = lint_imports(
        "--config", "contracts.toml", cwd=CONTRACTS_FIXTURE, pythonpath=CONTRACTS_FIXTURE
    )
    assert code == 1, out
    assert "core imports nothing above it BROKEN" in out
    assert "layers, top to bottom BROKEN" in out
    assert "pkg.core.util -> pkg.components.worker (l.5)" in out


def test_the_package_keeps_its_import_contracts() -> None:
    code, out = lint_imports(cwd=REPO)
    assert code == 0, out
    assert "0 broken" in out


def test_mypy_with_the_project_settings_fails_on_a_wrong_snippet(tmp_path: Path) -> None:
    good = tmp_path / "good.py"
    good.write_text(
        "from __future__ import annotations\n\n\n"
        "def double(n: int) -> int:\n    return n * 2\n\n\n"
        "double(2)\n"
    )
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from __future__ import annotations\n\n\n"
        "def double(n: int) -> int:\n    return n * 2\n\n\n"
        'double("2")\n\n\n'
        "def untyped(x):\n    return x\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(REPO / "pyproject.toml"),
            "--cache-dir",
            os.devnull,  # no cache written into the repository or kept between runs
            good.name,
            bad.name,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    errors = [line for line in out.splitlines() if ": error: " in line]
    # Only the wrong snippet fails, so the configuration itself is sound...
    assert all(line.startswith("bad.py:") for line in errors), out
    # ...the str for an int is caught...
    assert any(
        'Argument 1 to "double" has incompatible type "str"; expected "int"  [arg-type]' in line
        for line in errors
    ), out
    # ...and so is the unannotated function, which only the project's strict setting refuses.
    assert any("[no-untyped-def]" in line for line in errors), out
