"""The project's own exceptions: every parser and verifier raises one of these, nothing else."""


class CmlabError(Exception):
    """Base of every error cmlab raises on bad input."""


class CabError(CmlabError):
    """A CAB file that cannot be read, created or safely extracted."""


class CabLimitError(CabError):
    """A CAB whose declared or actual content exceeds the configured caps."""


class CabPathError(CabError):
    """A CAB entry whose name would escape the destination (absolute, `..`, link)."""


class SignatureFormatError(CmlabError):
    """An Authenticode signature blob that cannot be parsed."""


class ManifestError(CmlabError):
    """A Manifest.xml (or other XML drop) that is malformed or hostile."""


class UpdateMapError(CmlabError):
    """An update.map that does not follow the BEGIN_COMPONENT_FILELIST grammar."""


class ConfigError(CmlabError):
    """A site.toml that is missing or invalid."""


class ContentLibError(CmlabError):
    """A content library (SCCMContentLib) entry that is missing, corrupt or inconsistent."""


class PrereqError(CmlabError):
    """Prerequisite facts (site.toml [facts]) that cannot be checked: wrong type or format."""
