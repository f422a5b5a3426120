from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.sites import copy_site, download_once, make_template

# Each folder under tests/ is a kind of test and a marker of the same name (pyproject.toml),
# so `pytest -m unit` and `pytest tests/unit` select the same tests.
KINDS = ("unit", "e2e", "crash", "faults")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = item.path.relative_to(TESTS).parts[0]
        if kind in KINDS:
            item.add_marker(kind)


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One lab site made by `cmlab init` for the whole run; tests work on copies of it."""
    return make_template(tmp_path_factory.mktemp("template") / "CAS")


@pytest.fixture
def site(template: Path, tmp_path: Path) -> Path:
    return copy_site(template, tmp_path / "CAS")


@pytest.fixture(scope="session")
def downloaded_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lab site whose sample update 2509 is downloaded ("Ready to install"), made once."""
    site = make_template(tmp_path_factory.mktemp("downloaded") / "CAS")
    return download_once(site)
