"""SMS_DESPOOLER (docs/hierarchy.md). Skeleton: being written."""

from __future__ import annotations

from pathlib import Path

from cmlab.component import Component
from cmlab.inbox import Outcome


class Despooler(Component):
    component = "SMS_DESPOOLER"
    log_file = "despool.log"

    async def on_instruction(self, path: Path) -> Outcome:
        raise NotImplementedError
