"""The guide's state codes: update package states and flags, DMPDownloader state messages,
and the substage IDs reported in `Successfully reported ConfigMgr update status` lines."""

from __future__ import annotations

import enum


class PackageState(enum.IntEnum):
    """`CM_UpdatePackages.State`, exactly the guide's table."""

    UNKNOWN = 0
    ENABLED = 2
    DOWNLOAD_IN_PROGRESS = 262145
    DOWNLOAD_SUCCESS = 262146
    DOWNLOAD_FAILED = 327679
    APPLICABILITY_CHECKING = 327681
    APPLICABILITY_SUCCESS = 327682
    APPLICABILITY_HIDE = 393213
    APPLICABILITY_NA = 393214
    APPLICABILITY_FAILED = 393215
    CONTENT_REPLICATING = 65537
    CONTENT_REPLICATION_SUCCESS = 65538
    CONTENT_REPLICATION_FAILED = 131071
    PREREQ_IN_PROGRESS = 131073
    PREREQ_SUCCESS = 131074
    PREREQ_WARNING = 131075
    PREREQ_ERROR = 196607
    INSTALL_IN_PROGRESS = 196609
    INSTALL_WAITING_SERVICE_WINDOW = 196610
    INSTALL_WAITING_PARENT = 196611
    INSTALL_SUCCESS = 196612
    INSTALL_PENDING_REBOOT = 196613
    INSTALL_FAILED = 262143
    INSTALL_CMU_VALIDATING = 196614
    INSTALL_CMU_STOPPED = 196615
    INSTALL_CMU_INSTALLFILES = 196616
    INSTALL_CMU_STARTED = 196617
    INSTALL_CMU_SUCCESS = 196618
    INSTALL_WAITING_CMU = 196619
    INSTALL_CMU_FAILED = 262142
    INSTALL_INSTALLFILES = 196620
    INSTALL_UPGRADESITECTRLIMAGE = 196621
    INSTALL_CONFIGURESERVICEBROKER = 196622
    INSTALL_INSTALLSYSTEM = 196623
    INSTALL_CONSOLE = 196624
    INSTALL_INSTALLBASESERVICES = 196625
    INSTALL_UPDATE_SITES = 196626
    INSTALL_SSB_ACTIVATION_ON = 196627
    INSTALL_UPGRADEDATABASE = 196628
    INSTALL_UPDATEADMINCONSOLE = 196629

    @classmethod
    def name_of(cls, value: int) -> str:
        try:
            return cls(value).name
        except ValueError:
            return f"UNDEFINED({value})"


class PackageFlag(enum.IntEnum):
    """The `Flag` of InitiateUpgrade."""

    NORMAL = 0
    PREREQ_ONLY = 1
    IGNORE_WARNINGS = 2


class DmpStateMessage(enum.IntEnum):
    """DMPDownloader's high-priority state messages (`Generating state message: N ...`).

    The guide names 0-4, 6 and 10; the others are named after the step the guide shows them
    at (7, 14-24 are not used by this flow and are left undefined on purpose)."""

    START_PROCESS = 0
    START_VERIFY_MANIFEST = 1
    START_VERIFY_MANIFESTFILE_TRUSTED = 2
    VERIFIED_MANIFEST = 3
    MANIFEST_DOWNLOADED = 4
    MANIFEST_FAILED = 5
    FOUND_NEW_PACKAGE = 6
    START_DOWNLOAD_PACKAGE = 8
    START_DOWNLOAD_PAYLOAD = 9
    PAYLOAD_DOWNLOADED = 10
    REDIST_DOWNLOADED = 11
    PACKAGE_CONTENT_VERIFIED = 12
    PACKAGE_DOWNLOADED = 13
    PAYLOAD_EXTRACTED = 25


class SubStage(enum.IntEnum):
    """Substage IDs of `Successfully reported ConfigMgr update status (... SubStageID=0x...)`."""

    EASY_SETUP_PACKAGE_UPDATED = 0xB0001
    # cmlab's: the Easy Setup Package stored in a site's content library (fed by the
    # ObjectDistributionState triggers; the guide names the table, not the substage).
    CONTENT_STORED_AT_SITE = 0xB0002
    EXTRACT_UPDATE_PACKAGE = 0xD0005
    PROCESS_REDIST = 0xD0006
    CHECK_SERVICE_READINESS = 0xD0007
    UPDATE_OSD_PACKAGES = 0xD001A
    UPDATE_CLIENT_PACKAGE = 0xE0007
    UPDATE_CLIENT_UPGRADE_PACKAGE = 0xE0008
    UPDATE_CLIENT_PILOTING_PACKAGE = 0xE0009


class IsComplete(enum.IntEnum):
    IN_PROGRESS = 1
    SUCCESS = 2
    WARNING = 3
    FAILURE = 4


NULL_PACKAGE_GUID = "00000000-0000-0000-0000-000000000000"


class SiteType(enum.IntEnum):
    """ServerData.SiteType, as in ConfigMgr: what the site database, the CMUpdates message
    and the hierarchy's roll-ups call a site's kind."""

    SECONDARY = 1
    PRIMARY = 2
    CAS = 4
