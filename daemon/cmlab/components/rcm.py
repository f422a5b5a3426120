"""SMS_REPLICATION_CONFIGURATION_MONITOR (rcmctrl.log): the CMUpdates replication group
(docs/hierarchy.md, "The CMUpdates replication group").

Every `replication.cmupdates_interval` seconds, and right away at start, each site sends one
message per link (its parent, each direct child with an address) into the other site's
`inboxes/rcm.box/receive/` when the content for that link changed since the last message
sent on it; a message that arrives is applied in one transaction.

The message's format is `cmlab.site.formats.cmupdates_message`; what goes into a message and
how one is applied are queries of the site database, `cmlab.site.sitedb.replication_group`
(`links`, `prepare_message`, `record_sent`, `apply_message`). The component only schedules
them and writes and reads the files."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import traceback
from pathlib import Path

from cmlab.core.fs import write_atomic
from cmlab.site.component import Component, SiteContext, utc_now_iso
from cmlab.site.formats.cmupdates_message import (
    GROUP,
    message_file_name,
    parse_message,
    read_message_file,
)
from cmlab.site.inbox import Outcome
from cmlab.site.sitedb.replication_group import (
    Link,
    Outgoing,
    apply_message,
    links,
    prepare_message,
    record_sent,
)
from cmlab.site.state_codes import PackageState

# -- the other site's inbox ---------------------------------------------------------------------


def rcm_receive_folder(site_folder: str, relative_to: Path) -> Path:
    """Another site's CMUpdates inbox; a relative address is taken from this site's folder."""
    root = Path(site_folder)
    if not root.is_absolute():
        root = relative_to / root
    return root / "inboxes" / "rcm.box" / "receive"


def write_message(folder: Path, name: str, data: bytes) -> Path:
    """Into the other site's inbox through a temporary name in that same folder. Never creates
    the other site's folders: a missing inbox means the site is not reachable (yet)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"the folder {folder} does not exist")
    path = folder / name
    write_atomic(path, data)
    return path


# -- the component ------------------------------------------------------------------------------


class ReplicationMonitor(Component):
    component = "SMS_REPLICATION_CONFIGURATION_MONITOR"
    log_file = "rcmctrl.log"

    def __init__(self, ctx: SiteContext) -> None:
        super().__init__(ctx)
        self._busy = asyncio.Lock()
        self._poked = asyncio.Event()

    async def start(self) -> None:
        self.spawn(self._loop(), "cmupdates")

    def poke(self) -> None:
        """Send what changed now rather than at the next interval."""
        self._poked.set()

    async def _loop(self) -> None:
        interval = self.config.replication.cmupdates_interval
        while True:
            self._poked.clear()
            try:
                await self.replicate()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The loop is the group's only sender: it must outlive any one bad pass.
                self.say(f"ERROR: Failed to replicate the {GROUP} group: {exc}", level="error")
                traceback.print_exc(file=sys.stderr)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), interval if interval > 0 else None)

    def _retry_text(self) -> str:
        interval = self.config.replication.cmupdates_interval
        if interval > 0:
            return f"Will retry in {interval:g} seconds."
        return "Will retry at the next replication pass."

    async def replicate(self) -> list[Outgoing]:
        """One pass over the links: the messages sent."""
        sent = []
        async with self._busy:
            for link in await self.db.read(links):
                out = await self._send(link)
                if out is not None:
                    sent.append(out)
        return sent

    async def _send(self, link: Link) -> Outgoing | None:
        folder = rcm_receive_folder(link.folder, self.paths.root)
        if not await self.in_thread(folder.is_dir):  # another site's folder, perhaps a share
            # Checked before a seq is reserved, so an unreachable site does not use one up
            # every pass; write_message checks again.
            self._cannot(link, f"the folder {folder} does not exist")
            return None
        out = await self.db.tx(prepare_message, link.code, utc_now_iso())
        if out is None:
            return None
        name = message_file_name(self.config.site_code, out.seq)
        try:
            await self.in_thread(write_message, folder, name, out.data)
        except OSError as exc:
            self._cannot(link, exc.strerror or str(exc) if not exc.filename else str(exc))
            return None
        await self.db.tx(record_sent, link.code, out.seq, out.content_hash)
        self.say(
            f"Sent {GROUP} replication group message {out.seq} to site {link.code} "
            f"({out.status_rows} site status rows)."
        )
        return out

    def _cannot(self, link: Link, reason: str) -> None:
        self.say(
            f"WARNING: Cannot replicate the {GROUP} group to site {link.code}: {reason}. "
            f"{self._retry_text()}",
            level="warning",
        )

    async def on_replication_message(self, path: Path) -> Outcome:
        data = await self.in_thread(read_message_file, path)
        msg = parse_message(data)
        applied = await self.db.tx(apply_message, msg)
        if applied.stale:
            self.say(
                f"Ignored {GROUP} replication group message {msg.seq} from site {msg.sender}: "
                f"message {applied.last_seq} was received already."
            )
            return Outcome.DONE
        self.say(
            f"Received {GROUP} replication group message {msg.seq} from site {msg.sender}: "
            f"applied {applied.changes} changes."
        )
        for guid, state in applied.progress:
            self.say(f"Update {guid} is now {PackageState.name_of(state)} ({state}) at this site.")
        if applied.changes or applied.progress:
            # What arrived may change what this site sends on its other links (a relay).
            self.poke()
        return Outcome.DONE
