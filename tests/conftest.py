from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cmlab.testing.plugin import Templates

# Each folder under tests/ is a kind of test and a marker of the same name (pyproject.toml),
# so `pytest -m unit` and `pytest tests/unit` select the same tests.
KINDS = ("unit", "e2e", "crash", "faults")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = item.path.relative_to(TESTS).parts[0]
        if kind in KINDS:
            item.add_marker(kind)


# cmlab's own tests use the plugin every test author uses (cmlab.testing.plugin, loaded by
# its pytest11 entry point): these fixtures are the site folders of its session templates,
# for the tests that take a folder rather than a LabSite.
@pytest.fixture(scope="session")
def template(cmlab_templates: Templates) -> Path:
    """A lab site as `cmlab init` makes it (stage "new"), made once; tests copy it."""
    return cmlab_templates.get("new")


@pytest.fixture
def site(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "CAS", symlinks=True))


@pytest.fixture(scope="session")
def downloaded_template(cmlab_templates: Templates) -> Path:
    """A lab site whose sample update 2509 is downloaded ("Ready to install"), made once."""
    return cmlab_templates.get("downloaded")
