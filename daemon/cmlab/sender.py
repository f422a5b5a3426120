"""SMS_LAN_SENDER (docs/hierarchy.md). Skeleton: being written."""

from __future__ import annotations

from pathlib import Path

from cmlab.component import Component
from cmlab.inbox import Outcome


class Sender(Component):
    component = "SMS_LAN_SENDER"
    log_file = "sender.log"

    async def on_send_request(self, path: Path) -> Outcome:
        raise NotImplementedError
