"""DMPDownloader (SMS_DMP_DOWNLOADER): synchronizes the update manifest from the "Microsoft
cloud" (the site's `content_source` folder) and downloads update payloads and their redists.

It reports progress with high-priority `.SMX` state messages and tells HMAN through the
connector's outbox, `hman.box/ForwardingMsg` (or `MP/OUTBOXES/MCM.box` when the SCP is remote
from the site server): the verified manifest as `___CABConfigMgr.Update.Manifest.mcm`, a
package's download state as `___CMU<guid>.MCM`.

Wake-ups come through `inboxes/dmpdownloader.box` (cmlab's own inbox): SMSDBMon drops
`SYNC.DMP` when SyncHistory gets a request (`cmlab sync`, the sync interval) and `<GUID>.DMP`
when a package is added to CM_UpdatePackagesToDownload (`cmlab download`, auto-download)."""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cmlab.components.dmpdownloader.setupdl import COMPONENT as SETUP_COMPONENT
from cmlab.components.dmpdownloader.setupdl import LOG_FILE as SETUP_LOG
from cmlab.components.dmpdownloader.setupdl import (
    RedistError,
    RedistManifestLocation,
    SetupDownloader,
)
from cmlab.core.errors import CabError, CmlabError, WorkFailed
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import (
    atomic_output,
    fsync_dir,
    move_durable,
    remove_path,
    tmp_name_for,
    write_atomic,
)
from cmlab.core.hashing import folder_hash, sha256_file
from cmlab.site.component import Component, utc_now_iso
from cmlab.site.formats.cmu import MANIFEST_MCM, CmuNotification, cmu_mcm_name, render_cmu
from cmlab.site.formats.state_message import StateMessage, random_smx_name, render_state_message
from cmlab.site.inbox import Outcome, quarantine
from cmlab.site.sitedb import procs
from cmlab.site.state_codes import NULL_PACKAGE_GUID, DmpStateMessage, PackageState

MANIFEST_CAB = "ConfigMgr.Update.Manifest.cab"
PARTIAL = ".partial"  # a payload being copied; kept across a crash so the copy resumes
COPY_CHUNK = 1024 * 1024
FSYNC_EVERY = 64 * 1024 * 1024  # bytes: what a power loss can cost a resumed copy


class DownloadError(WorkFailed):
    """A package download failed; `bad` is the downloaded file to quarantine, if any, and
    `stage` the staging folder to remove once it is quarantined."""

    def __init__(self, message: str, bad: Path | None = None) -> None:
        super().__init__(message)
        self.bad = bad
        self.stage: Path | None = None


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
        # One download at a time: two wake-ups (or a wake-up and the sync cycle) may name the
        # same GUID. A request already served is not served again while HMAN catches up.
        self._download_lock = asyncio.Lock()
        self._served: set[tuple[str, str]] = set()
        # The verifier's imports (cryptography, asn1crypto) take ~0.1 s: pay it now, not in the
        # first synchronization or download.
        await self.in_thread(importlib.import_module, "cmlab.site.trust")
        if self.config.scp_mode == "online" and self.config.intervals.sync > 0:
            self.spawn(self._sync_timer(), "sync-timer")

    async def _sync_timer(self) -> None:
        interval = self.config.intervals.sync
        while True:
            since = await self.db.read(procs.seconds_since_last_sync)
            if since is None or since >= interval:
                await self.db.tx(procs.spRequestSync, procs.SyncReason.INTERVAL)
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

    def write_cmu(self, guid: str, state: PackageState) -> None:
        """The `.MCM` notification HMAN turns into `hman.box/CFD/<guid>.CMU`."""
        self.say("Write the package meta data to connector's outbox~~")
        outbox = self.outbox
        outbox.mkdir(parents=True, exist_ok=True)
        target = outbox / cmu_mcm_name(guid)
        self.say(f"The CMU file name is {self.show(target)}~~")
        body = render_cmu(CmuNotification(guid, int(state), utc_now_iso()))
        self.say(f"outerxml is {body}~~")
        write_atomic(target, body)
        self.say(f"Successfully write the update meta into outbox for package {guid}~~")

    # -- wake-ups --------------------------------------------------------------------------------

    async def on_wake(self, path: Path) -> Outcome:
        if path.name.upper() == "SYNC.DMP":
            return await self.on_sync(path)
        await self._download_cycle()
        return Outcome.DONE

    # -- synchronization -----------------------------------------------------------------------

    async def on_sync(self, path: Path) -> Outcome:
        pending = await self.db.read(procs.pending_syncs)
        if not pending:
            return Outcome.DONE  # a replayed wake-up whose sync already finished
        ids = [i for i, _ in pending]
        await self.db.tx(procs.start_syncs, ids)
        result = await self.in_thread(
            self.synchronize, any(r == procs.SyncReason.INTERVAL for _, r in pending)
        )
        await self.db.tx(procs.finish_syncs, ids, result)
        await self._download_cycle()  # DMPDownloader's cycle also looks for queued downloads
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
        self.say(f"Easysetup fwlink to download the manifest: {self.show(src)}~~")
        self.say("Download Easy setup payloads~~")
        self.say("Get manifest.cab url~~")
        self.say("Get manifest.cab from download center.~~")
        self.say("GetSABranchInfo: Site is at 1 branch.~~")
        self.say("Flighting is not configured, fallback to default setting.~~")
        self.state_message(DmpStateMessage.START_VERIFY_MANIFEST)
        self.say("Download manifest.cab~~")
        self.say(f"Redirected to URL {self.show(src)}~~")
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
        from cmlab.site.trust import verify_cab

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

    # -- download ------------------------------------------------------------------------------

    async def _download_cycle(self) -> None:
        """spCMUCheckAvailableUpdates, then each queued package in request order."""
        async with self._download_lock:
            guids = await self.db.read(procs.spCMUCheckAvailableUpdates)
            if not guids:
                return
            self.say("Get new Easy Setup Package IDs~~")
            self.say("Found a new available update~~")
            for guid in guids:
                row = await self.db.read(procs.download_row, guid)
                if row is None or (row.guid, row.request_time) in self._served:
                    continue
                if row.state not in procs.DOWNLOADABLE_STATES:
                    continue  # HMAN has recorded the result; the queue entry is on its way out
                await self.in_thread(self.download_package, row)
                self._served.add((row.guid, row.request_time))

    def payload_paths(self, guid: str) -> tuple[Path, Path]:
        """`EasySetupPayload\\<guid>.cab` and the folder it is extracted to."""
        base = self.paths.easysetup_payload
        return base / f"{guid}.cab", base / guid

    def download_package(self, row: procs.DownloadRow) -> bool:
        """EasySetupDownloadSinglePackage, state messages 6 to 13 (runs on a worker thread).
        Returns True when the package is downloaded and verified."""
        guid = row.guid.lower()
        self.state_message(DmpStateMessage.FOUND_NEW_PACKAGE, guid)
        self.say("EasySetupMaintenance - Redownload packages if needed~~")
        self.say(f"EasySetupMaintenance - Redownload package: {guid}~~")
        self.say(f"EasySetupDownloadSinglePackage downloading {guid}. ~~")
        self.state_message(DmpStateMessage.START_DOWNLOAD_PACKAGE, guid)
        cab, folder = self.payload_paths(guid)
        try:
            if not self.payload_is_local(row, folder):
                self.say(f"Content for {guid} does not exist locally. Download it from internet~~")
                self.write_cmu(guid, PackageState.DOWNLOAD_IN_PROGRESS)
                self.fetch_and_extract(row, guid, cab, folder)
            else:
                self.say(f"Content for {guid} exists locally. Skip downloading~~")
                self.state_message(DmpStateMessage.REDIST_DOWNLOADED, guid)
        except DownloadError as exc:
            self.download_failed(guid, exc)
            return False
        except (CmlabError, OSError) as exc:
            # Anything else that stops a download (a full disk, an unreadable content library)
            # fails the package too: left IN_PROGRESS it would wait for a download never to come.
            self.download_failed(guid, DownloadError(f"{type(exc).__name__}: {exc}"))
            return False
        self.write_cmu(guid, PackageState.DOWNLOAD_SUCCESS)
        self.state_message(DmpStateMessage.PACKAGE_CONTENT_VERIFIED, guid)
        self.state_message(DmpStateMessage.PACKAGE_DOWNLOADED, guid)
        self.say(f"EasySetupDownloadSinglePackage finishes downloading {guid}. ~~")
        return True

    def payload_is_local(self, row: procs.DownloadRow, folder: Path) -> bool:
        self.say("Checking IsPayloadLocal with HashAlgorithm = SHA256 ...~~")
        self.say(f"expected hash = {row.payload_hash}~~")
        actual = ""
        if folder.is_dir() and not folder.is_symlink():
            try:
                actual = folder_hash(folder)
            except (OSError, CmlabError) as exc:
                self.say(f"Cannot hash {self.show(folder)}: {exc}~~", level="warning")
        self.say(f"actual hash = {actual}~~")
        if not actual:
            exist = -1
        elif row.payload_hash and actual == row.payload_hash:
            exist = 1
        else:
            exist = 0
        self.say(f"PayloadExist = {exist}~~")
        return exist == 1

    def fetch_and_extract(self, row: procs.DownloadRow, guid: str, cab: Path, folder: Path) -> None:
        source = self.config.content_source
        if source is None:
            raise DownloadError("No content source is configured (scp.content_source).")
        src = source / row.content_url
        self.say(f"The payload to be processed is at {self.show(cab)}~~")
        self.state_message(DmpStateMessage.START_DOWNLOAD_PAYLOAD, guid)
        self.say(f"Download content for payload {guid}~~")
        known = sha256_file(cab) if cab.is_file() else None
        if known == row.content_hash:
            self.say(f"Payload {self.show(cab)} is already downloaded with the expected hash~~")
        else:
            known = None
            self.say("Download large file with BITs~~")
            self.say(f"Redirected to URL {self.show(src)}~~")
            self.copy_payload(src, cab)
        self.state_message(DmpStateMessage.PAYLOAD_DOWNLOADED, guid)
        self.write_cmu(guid, PackageState.DOWNLOAD_IN_PROGRESS)
        self.say("Verify the payload signature, hash value and extract the payload~~")
        self.verify_payload(row, cab, known)
        # Extract and fetch redists into a staging folder that becomes EasySetupPayload\<guid>
        # only when complete and verified: a crash never leaves half a package under that name.
        stage = tmp_name_for(folder, "download")
        try:
            self.extract_payload(cab, stage)
            self.state_message(DmpStateMessage.PAYLOAD_EXTRACTED, guid)
            self.download_redists(row, guid, stage / "redist", folder / "redist")
            self.verify_folder(row, guid, stage)
            remove_path(folder)
            os.rename(stage, folder)
            fsync_dir(folder.parent)
        except DownloadError as exc:
            exc.stage = stage  # removed after its bad file is quarantined
            raise
        except BaseException:
            remove_path(stage)
            raise
        crashpoint("dmp.after_payload_in_place")
        self.state_message(DmpStateMessage.REDIST_DOWNLOADED, guid)

    def copy_payload(self, src: Path, cab: Path) -> None:
        """Stream the payload to `<guid>.cab.partial`, resuming where a crash left it, then
        rename it into place."""
        partial = cab.with_name(cab.name + PARTIAL)
        cab.parent.mkdir(parents=True, exist_ok=True)
        try:
            total = src.stat().st_size
            with open(src, "rb") as fin:
                offset = partial.stat().st_size if partial.is_file() else 0
                if offset > total:
                    offset = 0
                if offset:
                    self.say(f"Resuming the download at byte {offset} of {total}~~")
                with open(partial, "r+b" if offset else "wb") as fout:
                    fin.seek(offset)
                    fout.seek(offset)
                    fout.truncate()
                    since_sync = 0
                    while chunk := fin.read(COPY_CHUNK):
                        fout.write(chunk)
                        since_sync += len(chunk)
                        if since_sync >= FSYNC_EVERY:
                            fout.flush()
                            os.fsync(fout.fileno())
                            since_sync = 0
                        crashpoint("dmp.during_payload_copy")
                    fout.flush()
                    os.fsync(fout.fileno())
        except OSError as exc:
            raise DownloadError(
                f"Failed to download the payload from {self.show(src)}: {exc}"
            ) from exc
        os.replace(partial, cab)
        fsync_dir(cab.parent)

    def verify_payload(self, row: procs.DownloadRow, cab: Path, sha256: str | None) -> None:
        """Signature, then the manifest's hash; `sha256` when the CAB's is already known."""
        from cmlab.site.trust import verify_cab

        shown = self.show(cab)
        # Both read the whole CAB: hashing on a second thread while the signature is checked
        # overlaps the two passes (hashlib and the verifier's digest release the GIL).
        if sha256 is None:
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(sha256_file, cab)
                verdict = verify_cab(cab, self.ctx.trust)
                sha256 = pending.result()
        else:
            verdict = verify_cab(cab, self.ctx.trust)
        actual = sha256
        if not verdict.trusted:
            raise DownloadError(
                f"File '{shown}' failed the trust check ({verdict.status.name}): {verdict.reason}",
                cab,
            )
        self.trust_lines(shown, verdict)
        if actual != row.content_hash:
            raise DownloadError(
                f"Payload {shown} has hash value SHA256:{actual}, the manifest expects "
                f"SHA256:{row.content_hash}",
                cab,
            )

    def extract_payload(self, cab: Path, stage: Path) -> None:
        from cmlab.site.cab import extract_cab

        def extracted(entry: object) -> None:
            self.say(f"File {getattr(entry, 'name', '')} is being extracted~~")
            crashpoint("dmp.during_extract")

        try:
            extract_cab(cab, stage, on_file=extracted)
        except CabError as exc:
            raise DownloadError(f"Failed to extract {self.show(cab)}: {exc}", cab) from exc
        except OSError as exc:
            raise DownloadError(f"Failed to extract {self.show(cab)}: {exc}") from exc
        self.say(f"File {self.show(cab)} has been extracted with 0~~")

    def download_redists(self, row: procs.DownloadRow, guid: str, dest: Path, shown: Path) -> None:
        self.say(f"Check if there is redist to download for update, {guid}~~")
        if not (row.redist_manifest_url or row.language_pack_manifest_url):
            self.say(f"There is no redist to download for update {guid}~~")
            return
        assert self.config.content_source is not None
        self.say(f"Download redist for update {guid}~~")
        setup = SetupDownloader(
            self.ctx.logs.get(SETUP_LOG, SETUP_COMPONENT),
            self.ctx.trust,
            self.show,
            thread=self.thread_id + 1,
        )
        try:
            setup.run(
                RedistManifestLocation(
                    self.config.content_source,
                    row.redist_manifest_url,
                    row.language_pack_manifest_url,
                ),
                dest,
                shown,
            )
        except RedistError as exc:
            raise DownloadError(f"Failed to download redist for {guid}: {exc}", exc.bad) from exc
        self.say(f"Successfully download redist for {guid}.~~")

    def verify_folder(self, row: procs.DownloadRow, guid: str, stage: Path) -> None:
        if not row.payload_hash:
            return
        actual = folder_hash(stage)
        if actual != row.payload_hash:
            raise DownloadError(
                f"The downloaded content of {guid} has hash {actual}, the manifest expects "
                f"{row.payload_hash}"
            )

    def download_failed(self, guid: str, exc: DownloadError) -> None:
        """Log why, keep the offending file in EasySetupPayload\\BAD, leave nothing half-made,
        and tell HMAN: DOWNLOAD_FAILED (327679)."""
        reason = str(exc)
        self.say(f"ERROR: {reason}~~", level="error")
        if exc.bad is not None and os.path.lexists(exc.bad):
            stage, folder = exc.stage, self.payload_paths(guid)[1]

            def shown(path: Path) -> str:
                # A file from the staging folder is named where it was going, as SetupDL's
                # lines name it, not by the temporary folder that is about to be removed.
                if stage is not None and path.is_relative_to(stage):
                    path = folder / path.relative_to(stage)
                return self.show(path)

            quarantine(
                exc.bad,
                reason,
                shown,
                lambda line: self.say(line, level="error"),
                bad=self.paths.easysetup_payload / "BAD",
            )
        if exc.stage is not None:
            remove_path(exc.stage)
        self.say(f"ERROR: Failed to download package {guid}~~", level="error")
        self.write_cmu(guid, PackageState.DOWNLOAD_FAILED)
