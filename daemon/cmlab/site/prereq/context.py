"""The prerequisite check's vocabulary: a rule's status, the context it reads, its result.

Shared by the rules (`rules`) and the runner that logs and records them (`checker`), so that
neither imports the other's module for its types.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from cmlab.site.prereq.facts import DEFAULT_FACTS

__all__ = ["PrereqContext", "PrereqOutcome", "RuleResult", "Status"]


class Status(enum.IntEnum):
    """CM_UpdatePackagePrereqStatus.Status."""

    PASSED = 0
    WARNING = 1
    FAILED = 2

    @property
    def log_word(self) -> str:
        """The word ConfigMgrPrereq.log shows for this status."""
        return ("Passed", "Warning", "Error")[self.value]


@dataclass(frozen=True)
class PrereqContext:
    site_code: str
    role: str  # "cas" | "primary" | "secondary"
    server: str  # site server FQDN; also SQL and SDK server unless facts name others
    installed_build: int
    installed_version: str  # e.g. "5.00.9135.1000"
    target_build: int
    target_version: str  # e.g. "5.00.9141.1000"
    update_number: str  # e.g. "2509"
    min_cm_version: str  # manifest MinCMVersion, "" if absent
    max_cm_version: str  # manifest MaxCMVersion, "" if absent
    is_hotfix: bool
    facts: Mapping[str, object]  # site.toml [facts] merged over DEFAULT_FACTS
    package_guid: str = ""  # optional: names \EasySetupPayload\<GUID>\redist in messages

    def fact(self, key: str) -> object:
        """The fact's value, or its default when the caller did not merge the defaults."""
        return self.facts[key] if key in self.facts else DEFAULT_FACTS[key]

    @property
    def sql_server(self) -> str:
        return str(self.fact("sql_server")) or self.server

    @property
    def sdk_server(self) -> str:
        return str(self.fact("sdk_server")) or self.server

    def server_for(self, prereq_type: str) -> str:
        if prereq_type == "SQL":
            return self.sql_server
        if prereq_type == "SDK":
            return self.sdk_server
        return self.server


@dataclass(frozen=True)
class RuleResult:
    role: str  # "SITE_PRI" | "SQL" | "SDK" (the guide's Prerequisite Type)
    server: str
    category: str
    rule: str
    status: Status
    message: str  # "" when passed

    def log_lines(self) -> tuple[str, ...]:
        """`server;    rule;    Passed`, plus `...;    Warning|Error;    message` if not passed."""
        head = f"{self.server};    {self.rule};    {self.status.log_word}"
        if self.status is Status.PASSED:
            return (head,)
        return (head, f"{head};    {self.message}")


@dataclass(frozen=True)
class PrereqOutcome:
    results: tuple[RuleResult, ...]

    @property
    def overall(self) -> Status:
        """The worst result (PASSED when there is none)."""
        return max((r.status for r in self.results), default=Status.PASSED)

    def by_status(self, status: Status) -> tuple[RuleResult, ...]:
        return tuple(r for r in self.results if r.status is status)
