"""The `.SMX` state message: what DMPDownloader (and later CMUpdate) drops in
`inboxes/auth/statesys.box/incoming/high` as `___CMU<8 random>.SMX`, and statesys records in
StateMessages.

One element, its fields as attributes:

    <?xml version="1.0" encoding="utf-8"?>
    <StateMessage Component="SMS_DMP_DOWNLOADER" MachineName="cas.lab.local"
        TopicID="3b1e0a8d-..." StateID="4" StateName="MANIFEST_DOWNLOADED"
        MessageTime="2026-11-21T13:15:08" />

Interface: `render_state_message(msg) -> bytes`, `parse_state_message(data) -> StateMessage`
(StateMessageError saying what is wrong: empty, over MAX_SMX_BYTES, not the element, a TopicID
that is not a GUID, a StateID that is not a number, no Component; the TopicID it returns is
lower case), `random_smx_name()` (the file name, unique by its 8 random characters).
"""

from __future__ import annotations

import secrets
import string
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from cmlab.core.errors import BadInput
from cmlab.core.safe_xml import parse_xml
from cmlab.site.formats.ids import is_guid

__all__ = [
    "MAX_SMX_BYTES",
    "StateMessage",
    "StateMessageError",
    "parse_state_message",
    "random_smx_name",
    "render_state_message",
]

MAX_SMX_BYTES = 64 * 1024


class StateMessageError(BadInput):
    """An `.SMX` file that is not a state message."""


@dataclass(frozen=True)
class StateMessage:
    component: str
    machine: str
    topic_id: str
    state_id: int
    state_name: str
    message_time: str


def random_smx_name() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "___CMU" + "".join(secrets.choice(alphabet) for _ in range(8)) + ".SMX"


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
