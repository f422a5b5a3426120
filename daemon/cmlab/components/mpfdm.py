"""MPFDM (SMS_MP_FILE_DISPATCH_MANAGER): when the service connection point is remote from the
site server, DMPDownloader leaves its `.MCM` files in `MP/OUTBOXES/MCM.box`; MPFDM moves them
on to the site server's `hman.box/ForwardingMsg`."""

from __future__ import annotations

from pathlib import Path

from cmlab.core.fs import move_durable
from cmlab.site.component import Component
from cmlab.site.inbox import Outcome


class MPFileDispatchManager(Component):
    component = "SMS_MP_FILE_DISPATCH_MANAGER"
    log_file = "mpfdm.log"

    async def on_mcm(self, path: Path) -> Outcome:
        target = self.paths.hman_forwarding / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        await self.in_thread(move_durable, path, target)
        self.say(f"Moved file {self.show(path)} to {self.show(target)}")
        return Outcome.CONSUMED
