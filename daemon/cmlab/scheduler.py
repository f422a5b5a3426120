"""SMS_SCHEDULER (docs/hierarchy.md). Skeleton: being written."""

from __future__ import annotations

from pathlib import Path

from cmlab.component import Component
from cmlab.inbox import Outcome


class Scheduler(Component):
    component = "SMS_SCHEDULER"
    log_file = "scheduler.log"

    async def on_job(self, path: Path) -> Outcome:
        raise NotImplementedError
