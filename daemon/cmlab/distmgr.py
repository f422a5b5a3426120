"""DistMgr (SMS_DISTRIBUTION_MANAGER): on `<PkgID>.PKN` ("package properties updated
notification"), takes a snapshot of the Easy Setup Package from its source share
(`\\\\<server>\\EasySetupPayLoad\\<GUID>`) into this site's content library, and reports the
outcome through ObjectDistributionState and this site's state for the update
(CONTENT_REPLICATION_SUCCESS or CONTENT_REPLICATION_FAILED).

The guide's "Process step 3" and "Process step 4" of the Replication stage; the minijob that
sends the package to child primaries belongs to the hierarchy."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path, PureWindowsPath

from cmlab.component import Component
from cmlab.contentlib import ContentLibrary, Snapshot
from cmlab.errors import CmlabError
from cmlab.failpoints import crashpoint
from cmlab.inbox import BadInput, Outcome
from cmlab.manifest import GUID_RE
from cmlab.sitedb import servicing
from cmlab.statecodes import PackageState

S = PackageState
PKG_ID_RE = re.compile(r"^[A-Z0-9]{3}[0-9A-F]{5}$", re.IGNORECASE)

# ObjectDistributionState.State, as ConfigMgr numbers them.
INSTALLED, INSTALL_PENDING, INSTALL_FAILED = 0, 1, 3
REPLICATING = (S.CONTENT_REPLICATING,)


class DistributionManager(Component):
    component = "SMS_DISTRIBUTION_MANAGER"
    log_file = "distmgr.log"

    @property
    def library(self) -> ContentLibrary:
        return ContentLibrary(self.paths.content_lib)

    def local_source(self, share: str) -> Path:
        """The folder behind `\\\\<server>\\EasySetupPayLoad\\<GUID>`: this site server's own
        share. Any other server's is refused (DistMgr here cannot reach it)."""
        parts = PureWindowsPath(share).parts
        # ('\\\\server\\EasySetupPayLoad\\', 'GUID')
        if len(parts) != 2 or not GUID_RE.match(parts[1]):
            raise CmlabError(f"{share} is not an EasySetupPayLoad share path")
        anchor = parts[0].strip("\\").split("\\")
        if len(anchor) != 2 or anchor[1].lower() != "easysetuppayload":
            raise CmlabError(f"{share} is not an EasySetupPayLoad share path")
        if anchor[0].lower() != self.config.fqdn.lower():
            raise CmlabError(f"{share} is not on this site server ({self.config.fqdn})")
        return self.paths.payload_folder(parts[1])

    async def on_pkn(self, path: Path) -> Outcome:
        pkg_id = path.name[: -len(".PKN")].upper()
        if not PKG_ID_RE.match(pkg_id):
            raise BadInput(f"{path.name}: the file name is not <PackageID>.PKN")
        self.say(f"Found package properties updated notification for package '{pkg_id}'")
        esp = await self.db.read(servicing.easy_setup_package_by_id, pkg_id)
        if esp is None:
            raise BadInput(f"{path.name}: package {pkg_id} is not an Easy Setup Package here")
        version = esp.source_version
        if esp.stored_pkg_version == version and esp.stored_pkg_hash:
            # A replayed notification: this version is stored already; make sure it was said.
            await self.db.tx(self._stored, esp, version, esp.stored_pkg_hash)
            return Outcome.DONE
        self.say(f"Info: package '{pkg_id}' is set to replicate to site servers only.")
        self.say(f"Taking package snapshot for package {pkg_id} from source {esp.source}")
        await self.db.tx(
            servicing.set_distribution_state,
            pkg_id,
            self.config.site_code,
            INSTALL_PENDING,
            version,
            "Taking package snapshot",
        )
        try:
            source = self.local_source(esp.source)
            snap: Snapshot = await self.in_thread(
                self.library.store_snapshot, pkg_id, version, source
            )
        except (OSError, CmlabError) as exc:
            await self._failed(esp, version, f"Failed to take snapshot of package {pkg_id}: {exc}")
            return Outcome.DONE
        crashpoint("distmgr.after_snapshot")
        if snap.hash != esp.package_hash.upper():
            await self._failed(
                esp,
                version,
                f"The snapshot of package {pkg_id} has hash {snap.hash}, not the source hash "
                f"{esp.package_hash} HMAN recorded: the source changed while it was replicated. "
                "Retry the content replication.",
            )
            return Outcome.DONE
        self.say(f"Adding package '{pkg_id}' to package processing queue.")
        self.say(f"Started package processing thread for package '{pkg_id}',")
        self.say(f"Start updating the package {pkg_id}...")
        await self.db.tx(self._stored, esp, version, snap.hash)
        self.say(f"Successfully created/updated the package {pkg_id}")
        await self.in_thread(self.library.remove_old_versions, pkg_id, version)
        return Outcome.DONE

    def _stored(
        self, conn: sqlite3.Connection, esp: servicing.EasySetupPackage, version: int, digest: str
    ) -> None:
        servicing.record_stored_package(conn, esp.package_id, version, digest)
        servicing.set_distribution_state(
            conn, esp.package_id, self.config.site_code, INSTALLED, version, "Package stored"
        )
        servicing.spCMUSetSiteState(
            conn, esp.package_guid, S.CONTENT_REPLICATION_SUCCESS, only_from=REPLICATING
        )

    async def _failed(self, esp: servicing.EasySetupPackage, version: int, reason: str) -> None:
        self.say(f"ERROR: {reason}", level="error")

        def record(conn: sqlite3.Connection) -> None:
            servicing.set_distribution_state(
                conn, esp.package_id, self.config.site_code, INSTALL_FAILED, version, reason
            )
            servicing.spCMUSetSiteState(
                conn, esp.package_guid, S.CONTENT_REPLICATION_FAILED, only_from=REPLICATING
            )

        await self.db.tx(record)
        self.say(
            f"Failed to process package {esp.package_id}: content replication of update "
            f"{esp.package_guid} failed (CONTENT_REPLICATION_FAILED). Fix the cause, then run "
            "RetryContentReplication (`cmlab retry-replication`).",
            level="error",
        )

    async def on_resend_request(self, path: Path) -> Outcome:
        raise NotImplementedError
