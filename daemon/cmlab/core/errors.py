"""cmlab's exceptions: one tree, in which bad input and a failure of the work are told apart.

Why it exists: a component must be able to tell "this file (message, argument, setting) is
wrong" from "the work it asked for could not be done", because the guide answers them
differently: bad input is set aside with its reason and never retried as it is; a failed
piece of work is reported in the component's own state (DOWNLOAD_FAILED, INSTALL_FAILED, a
Failed job) and can succeed later, once the site is repaired. Every error cmlab raises on
purpose is in this tree; anything else that escapes a handler is a bug.

    CmlabError                      the root: `except CmlabError` catches both families
    ├── BadInput                    what was handed in is wrong: cannot be parsed, verified,
    │   │                           trusted or applied; the same input fails the same way again
    │   ├── UnsafeFile              read_regular_file's refusal: a link, not a regular file,
    │   │                           larger than its cap (also a ValueError, as it always was)
    │   ├── CabError                a CAB that cannot be read, created or safely extracted
    │   │   ├── CabLimitError
    │   │   ├── CabPathError
    │   │   └── NotACabError        cmlab.site.trust.cab_layout
    │   ├── SignatureFormatError    an Authenticode blob that cannot be parsed
    │   ├── ManifestError           Manifest.xml and the other XML drops
    │   ├── UpdateMapError          update.map
    │   ├── ConfigError             site.toml
    │   │   └── SiteNotFound        cmlab.site.config: no site.toml in the folder
    │   ├── PrereqError             the prerequisite facts (site.toml [facts])
    │   ├── SigningError, TrustStoreError   cmlab.site.trust.authenticode
    │   ├── LabCAError              cmlab.site.trust.lab_ca
    │   ├── DamagedPackage          cmlab.site.file_replication
    │   ├── ReplicationFormatError  cmlab.site.formats.replication (instruction, job names,
    │   │                           send and resend requests; the CMUpdates message raises
    │   │                           BadInput itself)
    │   ├── StateMessageError       cmlab.site.formats.state_message
    │   ├── CmuError                cmlab.site.formats.cmu
    │   ├── NotificationError       cmlab.site.formats.notifications
    │   └── BadGuid                 cmlab.admin.reset
    └── WorkFailed                  the input was accepted; the work it asked for failed
        ├── ContentLibError         the site's own content library is missing, damaged or
        │                           refuses a store: not the fault of the package handed in
        ├── InstallStepError        cmlab.site.installation
        ├── InstallFailed           cmlab.components.cmupdate.install
        ├── StageFailed             cmlab.components.cmupdate.cmupdate
        ├── MediaError              cmlab.components.cmupdate.redist_media
        ├── DownloadError           cmlab.components.dmpdownloader.dmpdownloader
        ├── RedistError             cmlab.components.dmpdownloader.setupdl
        ├── Unreachable, SourceDamaged      cmlab.components.sender
        └── ClientFilesError        cmlab.components.hman.postinstall

A class lives here when several modules raise it; one that belongs to a single format or
component stays beside it and derives from its family. A component that fails its work
because of bad content wraps the parser's error in its own WorkFailed class (CMUpdate's
StageFailed around a CabError, for one): the family says whose fault the outcome is. Code
raises a family or a class below it, never CmlabError itself (tests/unit/test_errors.py checks).

What the inbox engine does (cmlab.site.inbox): a drop file whose handler lets a CmlabError
escape is quarantined (moved to BAD/ with a .reason file) whatever its family; that is the
right answer for BadInput, the family the engine quarantines by design. Whether a WorkFailed
that escapes should be retried or given up instead is the hardening issue's to decide; this
tree only makes the distinction possible. Handlers today catch their WorkFailed classes
themselves and report them in the component's state.

Outside the tree on purpose: the site database's LookupError refusals of an administrator's
request (NotDownloadable, NotInitiable, NotRecoverable; UnknownPackage and UnknownSecondary
when what the request names does not exist) and SiteDBClosed (a RuntimeError at shutdown),
which callers catch by those standard types; and OSError, which is the filesystem's own.
"""

from __future__ import annotations

__all__ = [
    "BadInput",
    "CabError",
    "CabLimitError",
    "CabPathError",
    "CmlabError",
    "ConfigError",
    "ContentLibError",
    "ManifestError",
    "PrereqError",
    "SignatureFormatError",
    "UnsafeFile",
    "UpdateMapError",
    "WorkFailed",
]


class CmlabError(Exception):
    """Base of every error cmlab raises on purpose (both families)."""


class BadInput(CmlabError):
    """What was handed in is wrong (the message is the reason). Raised by every parser and
    verifier, and by a handler for a file that must go to BAD."""


class WorkFailed(CmlabError):
    """The input was accepted, but the work it asked for could not be done."""


# -- bad input ----------------------------------------------------------------------------


class UnsafeFile(BadInput, ValueError):
    """A file that is not read: a symbolic link, not a regular file, or larger than its cap.
    Also a ValueError, which is what read_regular_file raised before this tree existed."""


class CabError(BadInput):
    """A CAB file that cannot be read, created or safely extracted."""


class CabLimitError(CabError):
    """A CAB whose declared or actual content exceeds the configured caps."""


class CabPathError(CabError):
    """A CAB entry whose name would escape the destination (absolute, `..`, link)."""


class SignatureFormatError(BadInput):
    """An Authenticode signature blob that cannot be parsed."""


class ManifestError(BadInput):
    """A Manifest.xml (or other XML drop) that is malformed or hostile."""


class UpdateMapError(BadInput):
    """An update.map that does not follow the BEGIN_COMPONENT_FILELIST grammar."""


class ConfigError(BadInput):
    """A site.toml that is missing or invalid."""


class PrereqError(BadInput):
    """Prerequisite facts (site.toml [facts]) that cannot be checked: wrong type or format."""


# -- failures of the work -----------------------------------------------------------------


class ContentLibError(WorkFailed):
    """A content library (SCCMContentLib) entry that is missing, corrupt or inconsistent, or a
    store or extraction the library cannot make. The library is the site's own store: the
    package handed to it is not at fault (the despooler says "the package is sound")."""
