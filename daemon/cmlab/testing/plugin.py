"""cmlab's pytest plugin (the `pytest11` entry point `cmlab`): lab sites as fixtures.

- `cmlab_site`: a fresh lab site, synchronized and running, for one test. It is a copy of a
  session template (made and synchronized once per run), so each test starts from a clean,
  synced site in milliseconds; `@pytest.mark.cmlab(stage=..., mode=..., **init_options)`
  changes what it is.
- `cmlab_site_factory`: make as many sites as a test needs, each with its own options.
- `cmlab_hierarchy`: every site of a hierarchy spec, running
  (`@pytest.mark.cmlab_hierarchy(spec)` to give one; CAS, PR1 and SEC by default).
- `--cmlab-mode` (inprocess or subprocess) and `--cmlab-timeout` (seconds a wait allows),
  or `cmlab_mode` / `cmlab_timeout` in the ini file.
- `cmlab_slow`: added to every test that runs a hierarchy or a subprocess daemon, so
  `-m "not cmlab_slow"` keeps the quick ones.
- An assertion comparing states shows their names: `INSTALL_FAILED (262143) !=
  INSTALL_SUCCESS (196612)`.

Stages: "new" (`cmlab init` only), "synced" (a synchronization done: SYNCED_STATES), and
"downloaded" (SAMPLE_UPDATE downloaded: "Ready to install")."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from cmlab.site.state_codes import PackageState
from cmlab.testing.modes import DEFAULT_TIMEOUT, MODES, Mode

# pytest loads this module in every run where cmlab is installed, tests of cmlab or not: the
# modules that import the daemon (0.6-0.7 s) are imported when a fixture first needs them.
if TYPE_CHECKING:
    from cmlab.testing.hierarchy import LabHierarchy
    from cmlab.testing.site import LabSite

STAGES = ("new", "synced", "downloaded")

# The hierarchy `cmlab_hierarchy` makes unless a test gives its own: a CAS with a child
# primary and a secondary under it, replicating within a fraction of a second.
DEFAULT_HIERARCHY: dict[str, Any] = {
    "defaults": {
        "replication.cmupdates_interval": 0.2,
        "replication.sender_retry_delay": 0.3,
    },
    "site": [
        {"code": "CAS"},
        {"code": "PR1", "parent": "CAS"},
        {"code": "SEC", "parent": "PR1"},
    ],
}


class Templates:
    """The session's template sites, one per (stage, site code, init options), each made
    the first time a test asks for it and copied for every test after."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[tuple[Any, ...], Path] = {}
        self._lock = threading.Lock()

    def get(self, stage: str, site_code: str = "CAS", **init_options: Any) -> Path:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
        key = (stage, site_code.upper(), tuple(sorted(init_options.items())))
        with self._lock:
            if key not in self._made:
                self._made[key] = self._make(stage, site_code, init_options, len(self._made))
            return self._made[key]

    def _make(self, stage: str, site_code: str, init_options: dict[str, Any], n: int) -> Path:
        from cmlab.testing.samples import SAMPLE_UPDATE
        from cmlab.testing.site import LabSite

        path = self.root / f"{n:03d}-{stage}" / site_code.upper()
        site = LabSite(path, site_code=site_code, **init_options)
        site.create()
        if stage == "new":
            return path
        with site:
            site.sync(wait=True)
            if stage == "downloaded":
                site.download(SAMPLE_UPDATE, wait=True)
            site.wait_idle()
        return path


def _option(config: pytest.Config, name: str) -> Any:
    value = config.getoption(f"--cmlab-{name}")
    if value is None:
        value = config.getini(f"cmlab_{name}") or None
    return value


def _mode(config: pytest.Config) -> Mode:
    value = _option(config, "mode") or "inprocess"
    if value not in MODES:
        raise pytest.UsageError(f"cmlab_mode must be one of {', '.join(MODES)}, not {value!r}")
    return value


def _timeout(config: pytest.Config) -> float:
    value = _option(config, "timeout")
    try:
        timeout = float(value) if value is not None else DEFAULT_TIMEOUT
    except ValueError:
        raise pytest.UsageError(
            f"cmlab_timeout must be a number of seconds, not {value!r}"
        ) from None
    if timeout <= 0:
        raise pytest.UsageError(f"cmlab_timeout must be more than 0 seconds, not {value!r}")
    return timeout


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cmlab", "cmlab lab sites")
    group.addoption(
        "--cmlab-mode",
        choices=MODES,
        default=None,
        help="how lab sites' daemons run: inprocess (default; milliseconds to start) or "
        "subprocess (cmlab run in a child process; kill() works)",
    )
    group.addoption(
        "--cmlab-timeout",
        type=float,
        default=None,
        help=f"seconds a lab site's wait allows (default {DEFAULT_TIMEOUT:g})",
    )
    parser.addini("cmlab_mode", "default for --cmlab-mode", default="")
    parser.addini("cmlab_timeout", "default for --cmlab-timeout", default="")


def pytest_configure(config: pytest.Config) -> None:
    # A bad --cmlab-mode or --cmlab-timeout stops the run before any test, as pytest's own
    # options do.
    _mode(config)
    _timeout(config)
    config.addinivalue_line(
        "markers",
        "cmlab(stage='synced', mode=None, settings=None, **init_options): how cmlab_site "
        "makes this test's site",
    )
    config.addinivalue_line(
        "markers", "cmlab_hierarchy(spec): the hierarchy spec cmlab_hierarchy makes"
    )
    config.addinivalue_line(
        "markers",
        "cmlab_slow: runs a hierarchy or a subprocess daemon (added by the cmlab plugin)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    default_mode = _mode(config)
    for item in items:
        marker = item.get_closest_marker("cmlab")
        mode = (marker.kwargs.get("mode") if marker else None) or default_mode
        fixtures = getattr(item, "fixturenames", ())
        if "cmlab_hierarchy" in fixtures or (
            mode == "subprocess" and {"cmlab_site", "cmlab_site_factory"} & set(fixtures)
        ):
            item.add_marker(pytest.mark.cmlab_slow)


def _named(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{PackageState.name_of(value)} ({int(value)})"
    return repr(value)


def pytest_assertrepr_compare(
    config: pytest.Config, op: str, left: object, right: object
) -> list[str] | None:
    """States by name: `INSTALL_FAILED (262143) == INSTALL_SUCCESS (196612)` rather than two
    numbers, for a state and for a history (a list of states)."""
    if op not in ("==", "!="):
        return None
    if isinstance(left, PackageState) or isinstance(right, PackageState):
        return [f"{_named(left)} {op} {_named(right)}"]
    if (
        isinstance(left, list)
        and isinstance(right, list)
        and any(isinstance(v, PackageState) for v in (*left, *right))
    ):
        return [
            f"states {op}",
            "  got:  " + " -> ".join(_named(v) for v in left),
            "  want: " + " -> ".join(_named(v) for v in right),
        ]
    return None


@pytest.fixture(scope="session")
def cmlab_templates(tmp_path_factory: pytest.TempPathFactory) -> Templates:
    """The session's template sites (`Templates.get(stage, site_code, **init_options)`)."""
    return Templates(tmp_path_factory.mktemp("cmlab-templates"))


@pytest.fixture
def cmlab_site_factory(
    cmlab_templates: Templates, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., LabSite]]:
    """`make(site_code="CAS", *, stage="synced", mode=None, start=True, settings=None,
    **init_options)`: a new site in this test's tmp_path, copied from a session template,
    running unless start=False; `settings` ({"table.key": value}) are written into its
    site.toml before it starts. Every site it made is stopped after the test."""
    from cmlab.admin.hierarchy_spec import apply_settings
    from cmlab.testing.site import LabSite

    made: list[LabSite] = []
    default_mode = _mode(request.config)
    timeout = _timeout(request.config)

    def make(
        site_code: str = "CAS",
        *,
        stage: str = "synced",
        mode: Mode | None = None,
        start: bool = True,
        settings: dict[str, object] | None = None,
        **init_options: Any,
    ) -> LabSite:
        path = tmp_path / site_code.upper()
        n = 1
        while path.exists():
            n += 1
            path = tmp_path / f"{site_code.upper()}-{n}"
        template = cmlab_templates.get(stage, site_code, **init_options)
        site = LabSite(
            path,
            site_code=site_code,
            mode=mode or default_mode,
            template=template,
            timeout=timeout,
        )
        made.append(site)
        site.create()
        if settings:
            apply_settings(path, settings)
        if start:
            site.start()
        return site

    yield make
    errors: list[str] = []
    for site in reversed(made):
        try:
            site.stop()
        except Exception as exc:  # every site is stopped; the first failure is reported
            errors.append(f"{site.site_code}: {exc}")
    if errors:
        pytest.fail("a lab site did not stop cleanly:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def cmlab_site(
    cmlab_site_factory: Callable[..., LabSite], request: pytest.FixtureRequest
) -> LabSite:
    """A fresh lab site for this test, synchronized and running (SYNCED_STATES)."""
    marker = request.node.get_closest_marker("cmlab")
    return cmlab_site_factory(**(marker.kwargs if marker else {}))


@pytest.fixture
def cmlab_hierarchy(
    cmlab_templates: Templates, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[LabHierarchy]:
    """Every site of a hierarchy spec, running; the top site starts with SAMPLE_UPDATE
    downloaded (a copy of the session's downloaded template)."""
    from cmlab.admin.hierarchy_spec import HierarchySpec
    from cmlab.testing.hierarchy import LabHierarchy

    marker = request.node.get_closest_marker("cmlab_hierarchy")
    spec = marker.args[0] if marker and marker.args else DEFAULT_HIERARCHY
    if isinstance(spec, dict):
        spec = HierarchySpec.from_dict(spec)
    elif isinstance(spec, str):
        spec = HierarchySpec.from_toml(spec)
    mode = _mode(request.config)
    timeout = _timeout(request.config)
    top_options = {k: v for k, v in spec.settings_of(spec.top.code).items() if "." not in k}
    top = cmlab_templates.get("downloaded", spec.top.code, **top_options)
    root = tmp_path / "hierarchy"
    hierarchy = LabHierarchy(root, spec, mode=mode, top_from=top, timeout=timeout)
    with hierarchy:
        yield hierarchy
