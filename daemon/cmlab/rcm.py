"""SMS_REPLICATION_CONFIGURATION_MONITOR (docs/hierarchy.md). Skeleton: being written."""

from __future__ import annotations

from pathlib import Path

from cmlab.component import Component
from cmlab.inbox import Outcome


class ReplicationMonitor(Component):
    component = "SMS_REPLICATION_CONFIGURATION_MONITOR"
    log_file = "rcmctrl.log"

    async def on_replication_message(self, path: Path) -> Outcome:
        raise NotImplementedError
