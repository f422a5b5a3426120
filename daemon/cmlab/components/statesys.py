"""statesys (SMS_STATE_SYSTEM): consumes the `.SMX` state messages that DMPDownloader (and
later CMUpdate) drop in `auth/statesys.box/incoming/high`, records them in StateMessages and
statesys.log, so they never pile up."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from cmlab.core.errors import CmlabError
from cmlab.core.failpoints import crashpoint
from cmlab.core.safexml import parse_xml
from cmlab.site.component import Component
from cmlab.site.formats.ids import is_guid
from cmlab.site.inbox import Outcome
from cmlab.site.sitedb import procs
from cmlab.site.statecodes import DmpStateMessage

MAX_SMX_BYTES = 64 * 1024


class StateMessageError(CmlabError):
    pass


@dataclass(frozen=True)
class StateMessage:
    component: str
    machine: str
    topic_id: str
    state_id: int
    state_name: str
    message_time: str


def render_state_message(msg: StateMessage) -> bytes:
    el = ET.Element(
        "StateMessage",
        {
            "Component": msg.component,
            "MachineName": msg.machine,
            "TopicID": msg.topic_id,
            "StateID": str(msg.state_id),
            "StateName": msg.state_name,
            "MessageTime": msg.message_time,
        },
    )
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(el) + b"\n"


def parse_state_message(data: bytes) -> StateMessage:
    if not data.strip():
        raise StateMessageError("the state message file is empty")
    el = parse_xml(
        data,
        what="the state message",
        root="StateMessage",
        error=StateMessageError,
        max_bytes=MAX_SMX_BYTES,
    )
    topic = el.get("TopicID", "")
    if not is_guid(topic):
        raise StateMessageError(f"TopicID {topic!r} is not a GUID")
    try:
        state_id = int(el.get("StateID", ""))
    except ValueError as exc:
        raise StateMessageError("StateID is not a number") from exc
    component = el.get("Component", "")
    if not component:
        raise StateMessageError("Component is missing")
    return StateMessage(
        component=component,
        machine=el.get("MachineName", ""),
        topic_id=topic.lower(),
        state_id=state_id,
        state_name=el.get("StateName", ""),
        message_time=el.get("MessageTime", ""),
    )


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
