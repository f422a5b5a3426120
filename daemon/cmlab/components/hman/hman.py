"""HMAN (SMS_HIERARCHY_MANAGER): forwards DMPDownloader's messages into its CFD inbox, and on
the site control update file (`<SiteCode>.SCU`) verifies, extracts and processes the update
manifest: one applicability check per package, each package's state in CM_UpdatePackages.
Its CMUHandler records the download states DMPDownloader reports in `CFD/<guid>.CMU`. The
forwarding messages and the CMU format are cmlab.site.formats.cmu."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cmlab.components.hman.easysetup import EasySetupHandlers
from cmlab.components.hman.postinstall import PostInstallHandlers
from cmlab.components.hman.secondary import SecondarySiteHandlers
from cmlab.core.errors import BadInput, CmlabError, ManifestError
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import move_durable
from cmlab.core.hashing import sha256_file
from cmlab.site.component import Component, SiteContext
from cmlab.site.formats.cmu import (
    MAX_CMU_BYTES,
    CmuError,
    forwarded_name,
    is_manifest_mcm,
    parse_cmu,
)
from cmlab.site.formats.manifest import (
    Manifest,
    ManifestPackage,
    applicability_path,
    parse_manifest,
)
from cmlab.site.inbox import Outcome, quarantine
from cmlab.site.sitedb import procs, scripts
from cmlab.site.state_codes import PackageState

MANIFEST_CAB_NAME = "ConfigMgr.Update.Manifest.CAB"
UTF8_BOM = b"\xef\xbb\xbf"
APPLICABILITY_TIMEOUT = 10.0  # seconds an applicability script may run before it is stopped

APPLICABILITY_RESULT_STATES = {
    1: PackageState.APPLICABILITY_SUCCESS,
    0: PackageState.APPLICABILITY_NA,
    2: PackageState.APPLICABILITY_HIDE,
}


@dataclass(frozen=True)
class Applicability:
    state: PackageState
    messages: tuple[str, ...]
    error: str = ""


def find_case_insensitive(folder: Path, name: str) -> Path | None:
    """The guide spells drop files both ways (`2.esc`, `2.ESC`): match names as Windows does."""
    exact = folder / name
    if os.path.lexists(exact):
        return exact
    upper = name.upper()
    try:
        for entry in os.scandir(folder):
            if entry.name.upper() == upper:
                return folder / entry.name
    except FileNotFoundError:
        return None
    return None


def _read_capped(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BadInput(f"{path.name} is over {limit} bytes: not a CMU notification")
    return data


def gmtdate(now: datetime) -> str:
    return (
        now.strftime("%a %b %d %H:%M:%S.") + f"{now.microsecond // 1000:03d} " + now.strftime("%Y")
    )


class HierarchyManager(Component):
    component = "SMS_HIERARCHY_MANAGER"
    log_file = "hman.log"

    def __init__(self, ctx: SiteContext) -> None:
        super().__init__(ctx)
        self.post_install = PostInstallHandlers(self)
        self.easy_setup = EasySetupHandlers(self, on_installed=self.post_install.on_installed)
        self.secondary_sites = SecondarySiteHandlers(self)
        # The contract's handlers that are not HMAN's own methods are found on these.
        self.handler_groups = (self.easy_setup, self.post_install, self.secondary_sites)

    async def start(self) -> None:
        await super().start()
        self.secondary_sites.start()

    def forward(self, path: Path) -> Path:
        if path.lstat().st_size == 0:
            raise BadInput(
                f"{path.name} is empty: a forwarding message carries a CAB or a CMU body"
            )
        target = self.paths.hman_cfd / forwarded_name(path.name)
        self.paths.hman_cfd.mkdir(parents=True, exist_ok=True)
        move_durable(path, target)
        return target

    async def on_forward(self, path: Path) -> Outcome:
        await self.in_thread(self.forward, path)
        crashpoint("hman.after_forward")
        return Outcome.CONSUMED

    def forward_pending_manifests(self) -> None:
        """Before processing on `.SCU`, take any manifest message the forwarding thread has not
        reached yet, so the manifest that caused the SCU is the one processed."""
        try:
            entries = list(os.scandir(self.paths.hman_forwarding))
        except FileNotFoundError:
            return
        for entry in entries:
            if is_manifest_mcm(entry.name) and entry.is_file(follow_symlinks=False):
                try:
                    self.forward(Path(entry.path))
                except (BadInput, CmuError):
                    continue  # the forwarding inbox quarantines it with the reason
                except FileNotFoundError:
                    continue

    # -- site control update: the manifest -----------------------------------------------------

    async def on_scu(self, path: Path) -> Outcome:
        pid = os.getpid()
        self.say(
            f'STATMSG: ID=3306 SEV=I LEV=M SOURCE="SMS Server" COMP="{self.component}" '
            f"SYS={self.config.fqdn} SITE={self.config.site_code} PID={pid} TID={self.thread_id} "
            f'GMTDATE={gmtdate(datetime.now(UTC))} ISTR0="{self.show(path)}"'
        )
        await self.in_thread(self.forward_pending_manifests)
        await self.in_thread(self.process_manifest)
        crashpoint("hman.before_scu_delete")
        return Outcome.DONE

    def process_manifest(self) -> None:
        cab = find_case_insensitive(self.paths.hman_cfd, MANIFEST_CAB_NAME)
        if cab is None:
            return
        shown = self.show(cab)
        if cab.is_symlink() or not cab.is_file():
            self._reject(cab, "it is not a regular file (links are never followed)")
            return
        from cmlab.site.trust import verify_cab

        verdict = verify_cab(cab, self.ctx.trust)
        if not verdict.trusted:
            self.say(
                f"ERROR: Failed to verify the trust of file '{shown}': {verdict.reason}",
                level="error",
            )
            self._reject(cab, f"{verdict.status.name}: {verdict.reason}")
            return
        self.trust_lines(shown, verdict)
        staging = self.paths.cmu_staging
        staging.mkdir(parents=True, exist_ok=True)
        self.say(f"Extracting file {shown} to {self.show(staging, trailing_sep=True)}~")
        from cmlab.site.cab import extract_cab_into

        try:
            extract_cab_into(
                cab,
                staging,
                on_file=lambda e: self.say(f"Extracted {self.show(staging / e.path)}"),
            )
        except CmlabError as exc:
            self.say(f"ERROR: Failed to extract {shown}: {exc}", level="error")
            self._reject(cab, f"extraction failed: {exc}")
            return
        crashpoint("hman.after_extract")
        manifest_file = find_case_insensitive(staging, "Manifest.xml")
        self.say(
            "Processing Configuration Manager Update manifest file "
            f"{self.show(staging / 'manifest.xml')}"
        )
        try:
            if manifest_file is None:
                raise ManifestError("the manifest CAB has no Manifest.xml")
            manifest = parse_manifest(manifest_file.read_bytes())
        except ManifestError as exc:
            self.say(f"ERROR: Failed to process the manifest: {exc}", level="error")
            self._reject(cab, str(exc))
            return
        failures = self.check_applicability(manifest)
        crashpoint("hman.after_applicability")
        self.queue_auto_download(manifest)
        if failures:
            self._reject(cab, "; ".join(failures))
        else:
            cab.unlink(missing_ok=True)

    def queue_auto_download(self, manifest: Manifest) -> None:
        """ConfigMgr downloads the newest applicable update by itself unless told not to."""
        if not self.config.auto_download:
            return

        def queue(conn: sqlite3.Connection) -> str | None:
            guid = procs.newest_applicable(conn, [p.guid for p in manifest.packages])
            if guid is None or not procs.spAddPackageToDownload(conn, guid):
                return None
            return guid

        guid = self.db.call_sync(queue)
        if guid is not None:
            self.say(f"Automatic download is enabled. Added package {guid} to download queue.")

    # -- CMUHandler: download states from DMPDownloader ----------------------------------------

    async def on_cmu(self, path: Path) -> Outcome:
        shown = self.show(path)
        self.say(f"Validate CMU file {shown} with no intune subscription.")
        data = await self.in_thread(_read_capped, path, MAX_CMU_BYTES)
        note = parse_cmu(path.name, data)
        guid, state = note.guid, note.state
        if self.config.log_verbose:
            bom = "File with BOM" if data.startswith(UTF8_BOM) else "File without BOM"
            self.say(f"INFO: {bom} : ({shown})")
            self.say(f"There is no additional error details {shown} from file")
        if not await self.db.tx(procs.spCMUSetUpdatePackageState, guid.upper(), state):
            raise BadInput(f"{path.name}: there is no update package {guid} in CM_UpdatePackages")
        self.say(f"Updated CMUpdatePackage state to {state} (PackageGuid={guid})")
        crashpoint("hman.before_cmu_delete")
        return Outcome.DONE

    def on_cmu_deleted(self, path: Path) -> None:
        self.say(f"deleted file {self.show(path)}")

    def _reject(self, cab: Path, reason: str) -> None:
        quarantine(cab, reason, self.show, lambda line: self.say(line, level="error"))

    def check_applicability(self, manifest: Manifest) -> list[str]:
        """Run every package's applicability SQL; returns the reasons the CAB is bad, if any."""
        rows = [self._row(p) for p in manifest.packages]
        fresh = self.db.call_sync(
            lambda conn: [
                p.guid
                for p, row in zip(manifest.packages, rows, strict=True)
                if procs.spCMUUpsertManifestPackage(conn, row)
            ]
        )
        failures: list[str] = []
        for package in manifest.packages:
            if package.guid not in fresh:
                continue  # already past applicability: downloading, installed, ...
            sql_file = applicability_path(self.paths.cmu_staging, package)
            shown = self.show(sql_file)
            if not sql_file.is_file() or sql_file.is_symlink():
                self.say(f"ERROR: {shown} is missing from the manifest CAB", level="error")
                failures.append(f"{package.applicability_file} is missing")
                self._set(package, PackageState.APPLICABILITY_FAILED)
                continue
            actual = sha256_file(sql_file)
            self.say(f"{shown} has hash value SHA256:{actual}")
            if actual != package.applicability_hash:
                self.say(
                    f"ERROR: {shown} hash SHA256:{actual} does not match the manifest's "
                    f"SHA256:{package.applicability_hash}. The applicability check is not run.",
                    level="error",
                )
                failures.append(f"{package.applicability_file} hash does not match the manifest")
                self._set(package, PackageState.APPLICABILITY_FAILED)
                continue
            result = self.run_applicability(sql_file.read_text(encoding="utf-8", errors="replace"))
            for message in result.messages:
                self.say(f"SQL MESSAGE:  - {message}")
            guid = package.guid
            if result.state is PackageState.APPLICABILITY_SUCCESS:
                self.say(f"Configuration Manager Update (PackageGuid={guid}) is applicable")
            elif result.state is PackageState.APPLICABILITY_FAILED:
                self.say(
                    f"ERROR: Failed to run the applicability check of {guid}: {result.error}",
                    level="error",
                )
            else:
                self.say(
                    f"Configuration Manager Update (PackageGuid={guid}) is not applicable and "
                    "should be filtered."
                )
            self._set(package, result.state)
        return failures

    def _set(self, package: ManifestPackage, state: PackageState) -> None:
        self.db.call_sync(procs.spCMUSetApplicability, package.guid, state)

    @staticmethod
    def _row(p: ManifestPackage) -> procs.ManifestPackageRow:
        return procs.ManifestPackageRow(
            guid=p.guid,
            name=p.name,
            description=p.description,
            update_number=p.update,
            package_type=1 if p.package_type == "Hotfix" else 0,
            full_version=p.full_version,
            min_cm_version=p.min_cm_version,
            max_cm_version=p.max_cm_version,
            more_info_link=p.more_info_link,
            content_url=p.content_url,
            content_hash=p.content_hash,
            payload_hash=p.payload_hash,
            redist_manifest_url=p.redist_manifest_url,
            language_pack_manifest_url=p.language_pack_manifest_url,
            applicability_check=p.applicability_file,
            applicability_hash=p.applicability_hash,
            date_released=p.date_released,
        )

    def run_applicability(self, sql: str) -> Applicability:
        """Run a package's applicability script read-only against the site database. The last
        statement's first column says: 1 applicable, 0 not applicable, 2 hidden (superseded)."""
        messages: list[str] = []
        conn = scripts.connect_for_script(
            self.paths.db_file,
            self.config.site_code,
            timeout=APPLICABILITY_TIMEOUT,
            print_sink=messages.append,
        )
        try:
            statements, value = scripts.run_script(conn, sql)
            if not statements:
                return Applicability(PackageState.APPLICABILITY_FAILED, (), "the script is empty")
        except sqlite3.Error as exc:
            return Applicability(
                PackageState.APPLICABILITY_FAILED, tuple(messages), f"SQL error: {exc}"
            )
        finally:
            conn.close()
        if isinstance(value, int) and value in APPLICABILITY_RESULT_STATES:
            return Applicability(APPLICABILITY_RESULT_STATES[value], tuple(messages))
        return Applicability(
            PackageState.APPLICABILITY_FAILED,
            tuple(messages),
            f"the script returned {value!r}; expected 1 (applicable), 0 (not applicable) "
            "or 2 (hidden)",
        )
