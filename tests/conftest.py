from __future__ import annotations

import sys
from pathlib import Path

# Test helpers (waiting.py, site fixtures) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))


import pytest

from sites import copy_site, download_once, make_template


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
