"""DMPDownloader (SMS_DMP_DOWNLOADER): synchronizes the update manifest from the "Microsoft
cloud" (the site's `content_source` folder) and, later, downloads update payloads.

It reports progress with high-priority `.SMX` state messages and hands the verified manifest to
HMAN as `___CABConfigMgr.Update.Manifest.mcm` in `hman.box/ForwardingMsg` (or in
`MP/OUTBOXES/MCM.box` when the SCP is remote from the site server).

Wake-ups come through `inboxes/dmpdownloader.box` (cmlab's own inbox: SMSDBMon drops
`SYNC.DMP` when SyncHistory gets a request, from `cmlab sync` or from the sync interval)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from cmlab.atomic import atomic_output, move_durable, write_atomic
from cmlab.component import Component, random_smx_name, utc_now_iso
from cmlab.failpoints import crashpoint
from cmlab.inbox import Outcome, quarantine
from cmlab.sitedb import procs
from cmlab.statecodes import NULL_PACKAGE_GUID, DmpStateMessage
from cmlab.statesys import StateMessage, render_state_message

MANIFEST_CAB = "ConfigMgr.Update.Manifest.cab"
MANIFEST_MCM = "___CABConfigMgr.Update.Manifest.mcm"


def copy_file(src: Path, dst: Path) -> int:
    """Stream `src` to `dst` atomically; returns the size."""
    with open(src, "rb") as fin, atomic_output(dst) as fout:
        shutil.copyfileobj(fin, fout, 1024 * 1024)
        return fout.tell()


class DMPDownloader(Component):
    component = "SMS_DMP_DOWNLOADER"
    log_file = "dmpdownloader.log"

    @property
    def outbox(self) -> Path:
        return self.paths.mcm_outbox if self.config.scp_remote else self.paths.hman_forwarding

    async def start(self) -> None:
        if self.config.scp_mode == "online" and self.config.intervals.sync > 0:
            self.spawn(self._sync_timer(), "sync-timer")

    async def _sync_timer(self) -> None:
        interval = self.config.intervals.sync
        while True:
            since = await self.db.read(procs.seconds_since_last_sync)
            if since is None or since >= interval:
                await self.db.tx(procs.spRequestSync, "interval")
                since = 0.0
            await asyncio.sleep(max(interval - since, 0.05))

    # -- state messages ------------------------------------------------------------------------

    def state_message(self, state: DmpStateMessage, guid: str = NULL_PACKAGE_GUID) -> None:
        self.say(f"Generating state message: {int(state)} for package {guid}~~")
        target = self.paths.statesys_high / random_smx_name()
        self.say(f"Write the state message in {self.show(target)}~~")
        body = render_state_message(
            StateMessage(
                component=self.component,
                machine=self.config.fqdn,
                topic_id=guid,
                state_id=int(state),
                state_name=state.name,
                message_time=utc_now_iso(),
            )
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, body)
        self.say(f"Successfully Dropped the state message {int(state)}~~")

    # -- synchronization -----------------------------------------------------------------------

    async def on_sync(self, path: Path) -> Outcome:
        pending = await self.db.read(procs.pending_syncs)
        if not pending:
            return Outcome.DONE  # a replayed wake-up whose sync already finished
        ids = [i for i, _ in pending]
        await self.db.tx(procs.start_syncs, ids)
        result = await self.in_thread(self.synchronize, any(r == "interval" for _, r in pending))
        await self.db.tx(procs.finish_syncs, ids, result)
        return Outcome.DONE

    def synchronize(self, by_interval: bool) -> str:
        """One synchronization, state messages 0 to 4 (runs on a worker thread)."""
        if by_interval:
            self.say("Hasn't synced recently.")
        self.state_message(DmpStateMessage.START_PROCESS)
        self.say("Checking for preview version~~")
        self.say("Site is preview? no~~")
        self.say("Is it a fast channel? :False~~")
        source = self.config.content_source
        if source is None:
            self.say(
                "ERROR: No content source is configured (scp.content_source).~~", level="error"
            )
            return "failed: no content source"
        src = source / MANIFEST_CAB
        self.say(f"Easysetup fwlink to download the manifest: {src}~~")
        self.say("Download Easy setup payloads~~")
        self.say("Get manifest.cab url~~")
        self.say("Get manifest.cab from download center.~~")
        self.say("GetSABranchInfo: Site is at 1 branch.~~")
        self.say("Flighting is not configured, fallback to default setting.~~")
        self.state_message(DmpStateMessage.START_VERIFY_MANIFEST)
        self.say("Download manifest.cab~~")
        self.say(f"Redirected to URL {src}~~")
        dest = self.paths.easysetup_payload / MANIFEST_CAB
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            size = copy_file(src, dest)
        except OSError as exc:
            self.say(f"ERROR: Failed to download manifest.cab from {src}: {exc}~~", level="error")
            return f"failed: download: {exc}"
        self.say(f"manifest.cab (http response) size is {size}~~")
        crashpoint("dmp.after_download")
        self.state_message(DmpStateMessage.START_VERIFY_MANIFESTFILE_TRUSTED)
        from cmlab.trust import verify_cab

        verdict = verify_cab(dest, self.ctx.trust)
        shown = self.show(dest)
        if not verdict.trusted:
            self.say(
                f"ERROR: File '{shown}' failed the trust check: {verdict.reason}~~", level="error"
            )
            self.say(
                "ERROR: Failed to verify manifest.cab. Synchronization stopped.~~", level="error"
            )
            quarantine(
                dest,
                f"{verdict.status.name}: {verdict.reason}",
                self.show,
                lambda line: self.say(line, level="error"),
            )
            return f"failed: {verdict.status.name}"
        self.trust_lines(shown, verdict)
        self.say("Finished calling verify manifest~~")
        self.state_message(DmpStateMessage.VERIFIED_MANIFEST)
        outbox = self.outbox
        outbox.mkdir(parents=True, exist_ok=True)
        move_durable(dest, outbox / MANIFEST_MCM)
        crashpoint("dmp.after_move")
        self.say("Manifest.cab was successfully moved to the connector outbox~~")
        self.state_message(DmpStateMessage.MANIFEST_DOWNLOADED)
        return "success"
