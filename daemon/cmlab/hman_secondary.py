"""HMAN's Recover Secondary Site (docs/hierarchy.md). Skeleton: being written."""

from __future__ import annotations

from pathlib import Path

from cmlab.component import Component
from cmlab.inbox import Outcome


class SecondarySiteHandlers(Component):
    """Mixed into HierarchyManager."""

    async def on_recover_secondary(self, path: Path) -> Outcome:
        raise NotImplementedError
