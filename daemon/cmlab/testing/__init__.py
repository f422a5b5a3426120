"""cmlab.testing: lab sites for the tests of tools that watch ConfigMgr inboxes, logs and
tables. The public Python API of cmlab (docs/testing.md; versioned as docs/versioning.md
says): everything in `__all__`, and nothing else under `cmlab.`.

    from cmlab.testing import LabSite, SAMPLE_UPDATE, State

    def test_my_tool_sees_the_install(tmp_path):
        with LabSite(tmp_path / "CAS") as site:
            site.sync(wait=True)
            site.download(SAMPLE_UPDATE, wait=True)
            site.install(SAMPLE_UPDATE, wait=True)
            assert site.history(SAMPLE_UPDATE)[-1] == State.INSTALL_SUCCESS

With pytest, the plugin (loaded by itself once cmlab is installed) gives `cmlab_site`,
`cmlab_site_factory` and `cmlab_hierarchy`.

The names are imported when first used (PEP 562): pytest imports this package for its plugin
in every run where cmlab is installed, and the daemon behind LabSite takes 0.6-0.7 s to
import."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cmlab.admin.hierarchy_spec import HierarchySpec, SiteSpec
    from cmlab.admin.waiting import FAILURE_STATES
    from cmlab.site.state_codes import PackageState as State
    from cmlab.testing.hierarchy import LabHierarchy
    from cmlab.testing.logs import assert_in_order
    from cmlab.testing.modes import Mode
    from cmlab.testing.runners import LabError
    from cmlab.testing.samples import (
        SAMPLE_HIDDEN,
        SAMPLE_NOT_APPLICABLE,
        SAMPLE_UPDATE,
        SYNCED_STATES,
    )
    from cmlab.testing.site import LabSite, WaitFailed, WaitTimeout

# Each public name -> (module, name in it).
_WHERE: dict[str, tuple[str, str]] = {
    "FAILURE_STATES": ("cmlab.admin.waiting", "FAILURE_STATES"),
    "SAMPLE_HIDDEN": ("cmlab.testing.samples", "SAMPLE_HIDDEN"),
    "SAMPLE_NOT_APPLICABLE": ("cmlab.testing.samples", "SAMPLE_NOT_APPLICABLE"),
    "SAMPLE_UPDATE": ("cmlab.testing.samples", "SAMPLE_UPDATE"),
    "SYNCED_STATES": ("cmlab.testing.samples", "SYNCED_STATES"),
    "HierarchySpec": ("cmlab.admin.hierarchy_spec", "HierarchySpec"),
    "LabError": ("cmlab.testing.runners", "LabError"),
    "LabHierarchy": ("cmlab.testing.hierarchy", "LabHierarchy"),
    "LabSite": ("cmlab.testing.site", "LabSite"),
    "Mode": ("cmlab.testing.modes", "Mode"),
    "SiteSpec": ("cmlab.admin.hierarchy_spec", "SiteSpec"),
    "State": ("cmlab.site.state_codes", "PackageState"),
    "WaitFailed": ("cmlab.testing.site", "WaitFailed"),
    "WaitTimeout": ("cmlab.testing.site", "WaitTimeout"),
    "assert_in_order": ("cmlab.testing.logs", "assert_in_order"),
}

__all__ = [
    "FAILURE_STATES",
    "SAMPLE_HIDDEN",
    "SAMPLE_NOT_APPLICABLE",
    "SAMPLE_UPDATE",
    "SYNCED_STATES",
    "HierarchySpec",
    "LabError",
    "LabHierarchy",
    "LabSite",
    "Mode",
    "SiteSpec",
    "State",
    "WaitFailed",
    "WaitTimeout",
    "assert_in_order",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where[0]), where[1])
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
