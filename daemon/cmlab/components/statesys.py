"""statesys (SMS_STATE_SYSTEM): consumes the `.SMX` state messages that DMPDownloader (and
later CMUpdate) drop in `auth/statesys.box/incoming/high`, records them in StateMessages and
statesys.log, so they never pile up. The message format is cmlab.site.formats.state_message."""

from __future__ import annotations

from pathlib import Path

from cmlab.core.failpoints import crashpoint
from cmlab.site.component import Component
from cmlab.site.formats.state_message import parse_state_message
from cmlab.site.inbox import Outcome
from cmlab.site.sitedb import procs
from cmlab.site.state_codes import DmpStateMessage


class StateSystem(Component):
    component = "SMS_STATE_SYSTEM"
    log_file = "statesys.log"

    async def on_state_message(self, path: Path) -> Outcome:
        data = await self.in_thread(path.read_bytes)
        msg = parse_state_message(data)
        name = msg.state_name
        if not name and msg.component == "SMS_DMP_DOWNLOADER":
            try:
                name = DmpStateMessage(msg.state_id).name
            except ValueError:
                name = ""
        new = await self.db.tx(
            lambda conn: procs.spRecordStateMessage(
                conn,
                file_name=path.name,
                component=msg.component,
                machine=msg.machine,
                topic_id=msg.topic_id,
                state_id=msg.state_id,
                state_name=name,
                message_time=msg.message_time,
            )
        )
        crashpoint("statesys.after_record")
        if new:
            self.say(
                f"Processed state message {path.name}: {msg.component} state {msg.state_id}"
                f"{f' ({name})' if name else ''} for {msg.topic_id}"
            )
        return Outcome.DONE
