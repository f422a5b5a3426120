"""The identifiers the drop files, messages and manifests carry: one pattern for each.

- GUID: an update package's `PackageGuid` (`3B1E0A8D-...-B3C1F2E6A9D0`), a state message's
  `TopicID`, the `<GUID>` in `<GUID>.CMU`, `.CME`, `.CMI`, `___CMU<GUID>.MCM`. Either case:
  the guide prints upper case, some of its logs lower case.
- site code: three letters or digits (`CAS`, `PR1`), upper case; `is_site_code_either_case`
  for a message field that may carry it in lower case (the caller upper-cases it after).
- PackageID: the site code and five hex digits (`CAS10001`), upper case.
- job ID: a SchedulerJobs.JobID as files name it, eight hex digits (`00000391`), upper case.
- SHA-256: 64 hex digits; `is_sha256` takes either case (manifests as written by hand),
  `is_upper_sha256` only the upper case cmlab itself writes.

Every pattern is anchored with `\\A` and `\\Z`: `match`, `fullmatch` and `search` all mean "the
whole text is one". (`^...$` with `match`, which three copies of the GUID pattern used, also
lets a trailing line feed through.) The patterns are ASCII only. A reader that takes a name in
either case, as drop-file names are matched (the guide writes `2.esc` and `2.ESC`), upper-cases
it first and then asks the upper-case helper; that is in the caller, so it stays visible.

The bare pattern texts (`GUID`, `SITE_CODE`, ...) are for building a larger name pattern,
such as `<ChildSite>_<PkgID>_<Version>.RSQ`.
"""

from __future__ import annotations

import re

__all__ = [
    "GUID",
    "GUID_RE",
    "JOB_ID",
    "JOB_ID_RE",
    "PACKAGE_ID",
    "PACKAGE_ID_RE",
    "SHA256",
    "SHA256_RE",
    "SITE_CODE",
    "SITE_CODE_EITHER_CASE",
    "SITE_CODE_EITHER_CASE_RE",
    "SITE_CODE_RE",
    "UPPER_SHA256",
    "UPPER_SHA256_RE",
    "is_guid",
    "is_job_id",
    "is_package_id",
    "is_sha256",
    "is_site_code",
    "is_site_code_either_case",
    "is_upper_sha256",
]

GUID = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
SITE_CODE = r"[A-Z0-9]{3}"
SITE_CODE_EITHER_CASE = r"[A-Za-z0-9]{3}"
PACKAGE_ID = r"[A-Z0-9]{3}[0-9A-F]{5}"
JOB_ID = r"[0-9A-F]{8}"
SHA256 = r"[0-9A-Fa-f]{64}"
UPPER_SHA256 = r"[0-9A-F]{64}"


def _whole(pattern: str) -> re.Pattern[str]:
    return re.compile(rf"\A(?:{pattern})\Z")


GUID_RE = _whole(GUID)
SITE_CODE_RE = _whole(SITE_CODE)
SITE_CODE_EITHER_CASE_RE = _whole(SITE_CODE_EITHER_CASE)
PACKAGE_ID_RE = _whole(PACKAGE_ID)
JOB_ID_RE = _whole(JOB_ID)
SHA256_RE = _whole(SHA256)
UPPER_SHA256_RE = _whole(UPPER_SHA256)


def is_guid(text: str) -> bool:
    """`text` is a GUID, 8-4-4-4-12 hex digits, in either case."""
    return GUID_RE.match(text) is not None


def is_site_code(text: str) -> bool:
    """`text` is a site code: three upper-case ASCII letters or digits."""
    return SITE_CODE_RE.match(text) is not None


def is_site_code_either_case(text: str) -> bool:
    """`text` is a site code in either case: three ASCII letters or digits."""
    return SITE_CODE_EITHER_CASE_RE.match(text) is not None


def is_package_id(text: str) -> bool:
    """`text` is a PackageID such as `CAS10001`, upper case."""
    return PACKAGE_ID_RE.match(text) is not None


def is_job_id(text: str) -> bool:
    """`text` is a job ID as files name it: eight upper-case hex digits (00000000 included:
    whether 0 is a job is the reader's rule)."""
    return JOB_ID_RE.match(text) is not None


def is_sha256(text: str) -> bool:
    """`text` is a SHA-256 digest in hex, either case."""
    return SHA256_RE.match(text) is not None


def is_upper_sha256(text: str) -> bool:
    """`text` is a SHA-256 digest in upper-case hex, as cmlab writes them."""
    return UPPER_SHA256_RE.match(text) is not None
