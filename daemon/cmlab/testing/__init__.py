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
`cmlab_site_factory` and `cmlab_hierarchy`."""

from __future__ import annotations

from cmlab.admin.hierarchy_spec import HierarchySpec, SiteSpec
from cmlab.admin.waiting import FAILURE_STATES
from cmlab.site.state_codes import PackageState as State
from cmlab.testing.hierarchy import LabHierarchy
from cmlab.testing.logs import assert_in_order
from cmlab.testing.runners import LabError, Mode
from cmlab.testing.samples import (
    SAMPLE_HIDDEN,
    SAMPLE_NOT_APPLICABLE,
    SAMPLE_UPDATE,
    SYNCED_STATES,
)
from cmlab.testing.site import LabSite, WaitFailed, WaitTimeout

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
