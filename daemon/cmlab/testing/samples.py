"""The lab cloud's sample updates (payloads/manifest/packages.toml), by what a test needs them
for. A new lab site is at 2503 (build 9135); after a synchronization:"""

from __future__ import annotations

from types import MappingProxyType

from cmlab.site.state_codes import PackageState

# Configuration Manager 2509: applies; the one a test downloads and installs.
SAMPLE_UPDATE = "420E3E18-73C5-4BE9-88B0-6F1E30A012CA"
# Configuration Manager 2503 Hotfix Rollup: superseded by 2509, so hidden.
SAMPLE_HIDDEN = "6B0783D9-B8A2-4848-82F6-8EFE956F4988"
# Configuration Manager 2409 Hotfix Rollup: for an older version, so not applicable.
SAMPLE_NOT_APPLICABLE = "345A6BE1-3D07-43ED-B6E5-FAC0889DA04C"

# Where a synchronization leaves them (auto-download off, as in test sites).
SYNCED_STATES = MappingProxyType(
    {
        SAMPLE_UPDATE: PackageState.APPLICABILITY_SUCCESS,
        SAMPLE_HIDDEN: PackageState.APPLICABILITY_HIDE,
        SAMPLE_NOT_APPLICABLE: PackageState.APPLICABILITY_NA,
    }
)
