"""SMS_DESPOOLER (despool.log): the receiving end of file-based replication (docs/hierarchy.md).

The parent's Sender delivers `ds_<jobid>.pkg` into `despoolr.box/receive` and then, last,
`<JobID>.INS` (the instruction, cmlab.site.formats.replication). The INS wakes the despooler:

- JobType SWD (at a child primary): the Easy Setup Package. Verified (size, SHA-256, CAB,
  content hash), stored in this site's content library, recorded in SMSPackages,
  EasySetupSettings and ObjectDistributionState, then `servicing.child_run_progress` moves
  this site's run on (CONTENT_REPLICATION_SUCCESS once the hash is the one the top-level site
  recorded). These are the guide's despool.log lines.
- JobType SiteRecovery (at a secondary): the parent primary's `bin/x64` files. Installed over
  this site's, and this site's version and installed updates recorded (Recover Secondary Site).

A damaged package never reaches the content library: both files go to `BAD/`, and an SWD
package is re-requested from the parent with `<ThisSite>_<PkgID>_<V>.RSQ` in its distmgr.box.

Why it is shaped like this: the INS is deleted only after everything it caused is durable,
and a crash may come anywhere in between, so every step can be run again. The package is
first renamed to `SMSPKG/<PkgID>.PCK.temp` (the guide's name) and found there on a replay;
store_snapshot is idempotent; the database rows are written in one transaction; and a version
already recorded and present in the content library is recognised and not stored again.
"""

from __future__ import annotations

import os
import stat
from functools import partial
from pathlib import Path

from cmlab.core.errors import BadInput, CabError, CmlabError, ContentLibError, WorkFailed
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import (
    copy_file_durable,
    fsync_dir,
    move_durable,
    remove_path,
    tmp_name_for,
    write_atomic,
)
from cmlab.core.hashing import folder_hash, folder_records
from cmlab.site.cab import extract_cab
from cmlab.site.component import Component
from cmlab.site.content_library import ContentLibrary
from cmlab.site.file_replication import DamagedPackage, package_file_ok, verify_package_file
from cmlab.site.formats.replication import (
    SITE_RECOVERY,
    SWD,
    Instruction,
    ReplicationFormatError,
    delivered_package_name,
    read_instruction,
    render_resend_request,
    resend_request_name,
)
from cmlab.site.formats.sample_binary import sample_build_number
from cmlab.site.formats.site_control import render_site_control
from cmlab.site.inbox import Outcome, quarantine
from cmlab.site.installation import (
    INSTALL_DIR,
    RCM_KEY,
    SETUP_KEY,
    SITE_CONTROL,
    installed_build,
)
from cmlab.site.sitedb import hierarchy, recovery, servicing
from cmlab.site.sitedb.servicing import DistributionState


def package_file_for(ins_path: Path) -> Path:
    """`<JobID>.INS` -> `ds_<jobid lower>.pkg` beside it (the Sender's name for the package)."""
    return ins_path.with_name(delivered_package_name(ins_path.name[: -len(".INS")]))


def _library_holds(lib: ContentLibrary, pkg_id: str, version: int, digest: str) -> bool:
    """The content library has `version` as the package's current version, with `digest`.
    The database alone is not trusted: a library removed or restored by hand is refilled."""
    try:
        if lib.current_version(pkg_id) != version:
            return False
        info = lib.snapshot_info(pkg_id, version)
    except ContentLibError:
        return False
    return info is not None and info.hash == digest


def _either_exists(a: Path, b: Path) -> bool:
    return os.path.lexists(a) or os.path.lexists(b)


class Despooler(Component):
    component = "SMS_DESPOOLER"
    log_file = "despool.log"

    @property
    def library(self) -> ContentLibrary:
        return ContentLibrary(self.paths.content_lib)

    # -- the instruction ---------------------------------------------------------------------

    async def on_instruction(self, path: Path) -> Outcome:
        pkg = package_file_for(path)
        try:
            ins = await self.in_thread(read_instruction, path)
            local = await self.db.read(hierarchy.local_site)
            self._check_addressed_here(ins, local, path.name)
        except (BadInput, ReplicationFormatError) as exc:
            # The engine moves the INS to BAD; its package goes with it, or it would lie in
            # receive/ forever.
            await self.in_thread(
                self._quarantine, pkg, f"its instruction {path.name} was refused: {exc}"
            )
            raise
        if ins.job_type == SWD:
            return await self._despool_package(path, pkg, ins, local.code)
        return await self._recover_site(path, pkg, ins, local.code)

    @staticmethod
    def _check_addressed_here(ins: Instruction, local: hierarchy.SiteRow, name: str) -> None:
        if name[: -len(".INS")].upper() != ins.job:
            raise BadInput(f"{name}: the file name is not its job {ins.job}")
        if ins.dest_site != local.code:
            raise BadInput(f"{name}: job {ins.job} is for site {ins.dest_site}, not {local.code}")
        if local.parent is None or ins.source_site != local.parent:
            raise BadInput(
                f"{name}: job {ins.job} comes from site {ins.source_site}, which is not the "
                f"parent site of {local.code}"
            )
        if ins.job_type == SWD and local.site_type == hierarchy.SECONDARY:
            raise BadInput(
                f"{name}: {local.code} is a secondary site; secondary sites never receive the "
                "Easy Setup Package"
            )
        if ins.job_type == SITE_RECOVERY:
            if local.site_type != hierarchy.SECONDARY:
                raise BadInput(
                    f"{name}: {local.code} is a {local.role} site; only a secondary site is "
                    "recovered with its parent's files"
                )
            if ins.package_id != local.code:
                raise BadInput(f"{name}: a recovery of site {ins.package_id}, not {local.code}")

    def _quarantine(self, path: Path, reason: str) -> None:
        if os.path.lexists(path):
            quarantine(path, reason, self.show, self.log.error)

    def _take_package(self, pkg: Path, temp: Path) -> bool:
        """Move the delivered package to its working name; False when it was not delivered
        (a replay finds it at `temp` already). A link is never moved: it stays, and its
        verification (which never follows links) fails."""
        try:
            st = os.lstat(pkg)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return True
        temp.parent.mkdir(parents=True, exist_ok=True)
        move_durable(pkg, temp)
        return True

    def _verified_package(self, pkg: Path, temp: Path, delivered: bool, ins: Instruction) -> Path:
        """The package to extract: `temp` (where it was moved) when it is the one the
        instruction describes; DamagedPackage otherwise."""
        if delivered and os.path.lexists(pkg):
            verify_package_file(pkg, ins.file_size, ins.file_hash)  # a link or special file
        try:
            verify_package_file(temp, ins.file_size, ins.file_hash)
        except DamagedPackage:
            if not delivered:
                # What lies at the working name is another job's leftover, or nothing.
                raise DamagedPackage(f"{pkg.name}: the package file is missing") from None
            raise
        return temp

    def _extract(self, cab: Path, near: Path, content_hash: str) -> Path:
        """The CAB extracted to a temporary folder (swept at start-up if a crash leaves it),
        whose folder hash must be `content_hash`."""
        dest = tmp_name_for(near, "despool")
        try:
            extract_cab(cab, dest)
        except CabError as exc:
            remove_path(dest)
            raise DamagedPackage(f"{cab.name}: not a usable CAB: {exc}") from None
        try:
            digest = folder_hash(dest)
        except CmlabError as exc:
            remove_path(dest)
            raise DamagedPackage(f"{cab.name}: {exc}") from None
        if digest != content_hash.upper():
            remove_path(dest)
            raise DamagedPackage(
                f"{cab.name}: its content has hash {digest}, the instruction says {content_hash}"
            )
        return dest

    # -- SWD: the Easy Setup Package ---------------------------------------------------------

    async def _despool_package(
        self, ins_path: Path, pkg: Path, ins: Instruction, site_code: str
    ) -> Outcome:
        pkg_id, version = ins.package_id, ins.version
        temp = self.paths.smspkg / f"{pkg_id}.PCK.temp"
        lib = self.library
        stored = await self.db.read(servicing.stored_package, pkg_id)
        if version <= stored.version and await self.in_thread(
            _library_holds, lib, pkg_id, stored.version, stored.hash
        ):
            self.say(
                f"Package {pkg_id} version {version} is already stored (Stored Package "
                f"Version = {stored.version}); nothing to do."
            )
            await self.in_thread(self._tidy_stored, pkg, temp, ins, stored.version)
            return Outcome.DONE
        self.say(
            f"Received package {pkg_id} version {version}. Compressed file -  "
            f"{ins.package_file} as {self.show(pkg)}"
        )
        self.say(f"Content Library: {self.show(self.paths.content_lib)}")
        delivered = await self.in_thread(self._take_package, pkg, temp)
        crashpoint("despooler.after_move")
        self.say(f"Extracting from {self.show(temp)}")
        folder: Path | None = None
        try:
            await self.in_thread(self._verified_package, pkg, temp, delivered, ins)
            folder = await self.in_thread(
                self._extract, temp, self.paths.smspkg / f"{pkg_id}.{version}", ins.content_hash
            )
        except DamagedPackage as exc:
            return await self._damaged(ins_path, pkg, temp, ins, site_code, str(exc))
        try:
            self.say(f"Extracting package {pkg_id}")
            self.say(f"Extracting content {pkg_id}.{version}")
            try:
                snap = await self.in_thread(lib.store_snapshot, pkg_id, version, folder)
            except ContentLibError as exc:
                return await self._not_stored(ins_path, pkg, temp, ins, site_code, str(exc))
            crashpoint("despooler.after_store")
            self.say(f"Writing package definition for {pkg_id}")
            old = await self.db.tx(
                partial(
                    servicing.record_despooled_package,
                    pkg_id=ins.package_id,
                    guid=ins.package_guid,
                    source=ins.source,
                    source_site=ins.source_site,
                    version=ins.version,
                    digest=snap.hash,
                    site_code=site_code,
                )
            )
            crashpoint("despooler.after_record")
            self.say(
                f"Package {pkg_id} (version {old}) exists in the distribution source, save the "
                f"newer version (version {version})."
            )
            self.say(f"Stored Package {pkg_id}. Stored Package Version = {version}")
        finally:
            await self.in_thread(remove_path, folder)
        await self.in_thread(self._tidy_stored, pkg, temp, ins, version)
        return Outcome.DONE

    def _tidy_stored(self, pkg: Path, temp: Path, ins: Instruction, keep: int) -> None:
        """After a version is stored: the delivered and working copies of this package go
        (the working copy only if it is this job's: it could be another's leftover), and so
        do the library's older versions."""
        remove_path(pkg)
        if os.path.lexists(temp) and package_file_ok(temp, ins.file_size, ins.file_hash):
            remove_path(temp)
        lib = self.library
        try:
            if lib.current_version(ins.package_id) == keep:
                lib.remove_old_versions(ins.package_id, keep)
        except ContentLibError as exc:
            # The version is stored and recorded: a library that cannot be tidied is not a
            # reason to refuse the instruction (DistMgr's next store tidies it again).
            self.say(f"WARNING: Cannot remove older versions of {ins.package_id}: {exc}")

    async def _damaged(
        self,
        ins_path: Path,
        pkg: Path,
        temp: Path,
        ins: Instruction,
        site_code: str,
        reason: str,
    ) -> Outcome:
        pkg_id, version, parent = ins.package_id, ins.version, ins.source_site
        self.say(
            f"ERROR: Package {pkg_id} version {version} from site {parent} is damaged: {reason}. "
            f"It is not stored; it is re-requested from site {parent}.",
            level="error",
        )
        await self.db.tx(
            servicing.set_distribution_state,
            pkg_id,
            site_code,
            DistributionState.INSTALL_RETRYING,
            version,
            f"Damaged package, re-requested: {reason}",
        )
        await self._request_resend(site_code, ins, reason)
        await self.in_thread(self._quarantine_both, ins_path, pkg, temp, reason)
        return Outcome.CONSUMED

    async def _not_stored(
        self,
        ins_path: Path,
        pkg: Path,
        temp: Path,
        ins: Instruction,
        site_code: str,
        reason: str,
    ) -> Outcome:
        """The package is sound but this site's content library refused it (damaged or
        edited by hand): nothing to re-request; the administrator repairs the library."""
        self.say(
            f"ERROR: Failed to store package {ins.package_id} version {ins.version} in the "
            f"content library {self.show(self.paths.content_lib)}: {reason}",
            level="error",
        )
        await self.db.tx(
            servicing.set_distribution_state,
            ins.package_id,
            site_code,
            DistributionState.INSTALL_FAILED,
            ins.version,
            f"Content library: {reason}",
        )
        await self.in_thread(self._quarantine_both, ins_path, pkg, temp, reason)
        return Outcome.CONSUMED

    def _quarantine_both(self, ins_path: Path, pkg: Path, temp: Path, reason: str) -> None:
        # The package goes back to its delivered name first, so BAD/ holds the pair the
        # Sender delivered (<JobID>.INS, ds_<jobid>.pkg).
        if os.path.lexists(temp) and not os.path.lexists(pkg) and not os.path.islink(temp):
            move_durable(temp, pkg)
        self._quarantine(pkg, reason)
        self._quarantine(ins_path, reason)

    async def _request_resend(self, site_code: str, ins: Instruction, reason: str) -> None:
        parent = await self.db.read(hierarchy.parent_site)
        name = resend_request_name(site_code, ins.package_id, ins.version)
        if parent is None or not parent.folder:
            self.say(
                f"ERROR: Cannot re-request package {ins.package_id} version {ins.version}: "
                f"this site's database has no address for its parent site {ins.source_site}.",
                level="error",
            )
            return
        box = Path(parent.folder) / "inboxes" / "distmgr.box"
        try:
            await self.in_thread(self._write_resend, box, name, reason)
        except OSError as exc:
            self.say(
                f"ERROR: Cannot reach parent site {parent.code} at {parent.folder} to re-request "
                f"package {ins.package_id} version {ins.version}: {exc}",
                level="error",
            )
            return
        self.say(
            f"Requested site {parent.code} to send package {ins.package_id} version "
            f"{ins.version} again ({box / name})."
        )

    @staticmethod
    def _write_resend(box: Path, name: str, reason: str) -> None:
        # The parent's inbox must exist: a missing one means its folder is not reachable (an
        # unmounted share), and creating it would hide that.
        if not box.is_dir():
            raise FileNotFoundError(f"{box} is not a folder")
        write_atomic(box / name, render_resend_request(reason))

    # -- SiteRecovery: Recover Secondary Site ------------------------------------------------

    async def _recover_site(
        self, ins_path: Path, pkg: Path, ins: Instruction, site_code: str
    ) -> Outcome:
        rec = ins.recovery
        assert rec is not None  # parse_instruction requires it for SiteRecovery
        parent = ins.source_site
        temp = self.paths.smspkg / f"{site_code}.RCV.temp"
        self.say(
            f"Received site recovery package from site {parent} for site {site_code} "
            f"(build {rec.build}). Compressed file -  {ins.package_file} as {self.show(pkg)}"
        )
        if not await self.in_thread(_either_exists, pkg, temp):
            done = await self.db.read(
                recovery.recovery_recorded, site_code, rec.build, rec.installed_updates
            )
            if done and await self.in_thread(installed_build, self.paths.root) == rec.build:
                # A replay after the reinstallation completed: its package is gone already.
                self.say(f"Site {site_code} is already reinstalled at build {rec.build}.")
                return Outcome.DONE
        delivered = await self.in_thread(self._take_package, pkg, temp)
        self.say(f"Extracting from {self.show(temp)}")
        folder: Path | None = None
        try:
            await self.in_thread(self._verified_package, pkg, temp, delivered, ins)
            folder = await self.in_thread(
                self._extract, temp, self.paths.smspkg / f"{site_code}.RCV", ins.content_hash
            )
            await self.in_thread(self._check_build, folder, rec.build)
        except DamagedPackage as exc:
            if folder is not None:
                await self.in_thread(remove_path, folder)
            self.say(
                f"ERROR: The site recovery package from site {parent} is damaged: {exc}. Site "
                f"{site_code} is not reinstalled; run Recover Secondary Site at site {parent} "
                "again.",
                level="error",
            )
            await self.in_thread(self._quarantine_both, ins_path, pkg, temp, str(exc))
            return Outcome.CONSUMED
        try:
            self.say(
                f"Reinstalling site {site_code} with the files of its parent site {parent} "
                f"(Configuration Manager {rec.full_version})."
            )
            bin_dir = self.paths.root.joinpath(*INSTALL_DIR)
            count = await self.in_thread(self._install_files, folder, bin_dir)
            crashpoint("despooler.after_install_files")
            self.say(f"Installed {count} files in {self.show(bin_dir)}")
            ctrl = self.paths.root.joinpath(*SITE_CONTROL)
            text = render_site_control(
                site_code, self.config.fqdn, rec.build, rec.full_version, str(self.paths.root)
            )
            await self.in_thread(self._write_site_control, ctrl, text)
            self.say(
                f"Updated the site control file {self.show(ctrl)}: Build Number {rec.build}, "
                f"Full Version {rec.full_version}."
            )
            await self.db.tx(
                partial(
                    recovery.record_recovery,
                    site_code=site_code,
                    build=rec.build,
                    version=rec.version,
                    full_version=rec.full_version,
                    guids=rec.installed_updates,
                    registry_keys=(SETUP_KEY, RCM_KEY),
                )
            )
            for guid in rec.installed_updates:
                self.say(f"Update {guid} is installed at site {site_code} (INSTALL_SUCCESS).")
            self.say(f"Site {site_code} has been reinstalled at build {rec.build}.")
        finally:
            await self.in_thread(remove_path, folder)
        await self.in_thread(remove_path, pkg)
        await self.in_thread(remove_path, temp)
        return Outcome.DONE

    @staticmethod
    def _check_build(folder: Path, build: int) -> None:
        """The files must be the build the instruction names: it becomes this site's version."""
        try:
            found = sample_build_number(folder / "smsexec.exe")
        except (OSError, CmlabError) as exc:
            raise DamagedPackage(f"no readable smsexec.exe in the package ({exc})") from None
        if found != build:
            raise DamagedPackage(f"its smsexec.exe is build {found}, the instruction says {build}")

    @staticmethod
    def _install_files(folder: Path, bin_dir: Path) -> int:
        """Each file of `folder` over this site's one, written to a temporary sibling and
        renamed (a crash leaves the old or the new file, never half of one). Files the package
        does not carry are kept: a reinstallation does not remove the site's own files."""
        count = 0
        for rel, is_file in folder_records(folder):
            if not is_file:
                continue
            parts = os.fsdecode(rel).split("/")
            target_dir = bin_dir
            for part in parts[:-1]:
                target_dir = target_dir / part
                if os.path.islink(target_dir):
                    raise WorkFailed(f"{target_dir} is a link; not followed")
                target_dir.mkdir(exist_ok=True)
            copy_file_durable(folder / os.fsdecode(rel), target_dir / parts[-1])
            count += 1
        fsync_dir(bin_dir)
        return count

    @staticmethod
    def _write_site_control(ctrl: Path, text: str) -> None:
        ctrl.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(ctrl, text)
