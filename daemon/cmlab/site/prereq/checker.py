"""prereqcore's RunPrereqChecks: run the rules of `cmlab.site.prereq.rules`, log, record.

CMUpdate calls `run_prereq_checks` after it has extracted the update and verified
prereqcore.dll. Everything goes through the two callables it passes: `say` writes one
ConfigMgrPrereq.log line (the caller adds the SMS trace format), `record` stores one result
(spCMUAddPrereqMessage into CM_UpdatePackagePrereqStatus). No files, no database, no clock:
the same context always gives the same lines and results. docs/prereq.md describes the log.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cmlab.site.prereq.facts import DEFAULT_FACTS, validate_facts

PREREQ_TYPES = ("SITE_PRI", "SQL", "SDK")  # the guide's "Prerequisite Type & Server" order
CATEGORIES: dict[str, str] = {  # the guide's order and CategoryDesc text
    "Access Permissions": "Checking access permissions...",
    "System Requirements": "Checking system requirements for ConfigMgr...",
    "Dependent Components": "Checking dependent components for ConfigMgr...",
    "Site Upgrade Requirements": "Checking if the target ConfigMgr site is ready to upgrade...",
}
SITE_KIND = {"cas": "CAS", "primary": "primary", "secondary": "secondary"}

STARS_START = (
    "********************************************",
    "******* Start Prerequisite checking. *******",
    "********************************************",
)
STARS_END = (
    "***************************************************",
    "******* Prerequisite checking is completed. *******",
    "***************************************************",
)


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


def _version_line(value: object) -> str:
    return str(value) if value else "(not installed)"


def run_prereq_checks(
    ctx: PrereqContext,
    say: Callable[[str], None],
    record: Callable[[RuleResult], None] | None = None,
) -> PrereqOutcome:
    """Run every rule that applies to this site for SITE_PRI, SQL and SDK, in the guide's order.

    Validates the facts first (PrereqError, before any line is logged). Each result is logged
    and then passed to `record`, in log order.
    """
    from cmlab.site.prereq.rules import RULES  # rules import this module's types

    validate_facts(ctx.facts)
    for line in STARS_START:
        say(line)
    say(f"INFO: Checking SQLNCli version on ServerName {ctx.server}")
    say(f"INFO: SQLNCli version is {_version_line(ctx.fact('sqlncli_version'))}")
    say(f"INFO: SDK Provider is on {ctx.sdk_server}.")
    say("Check Type: Configuration Manager Update")
    say(f"Check Type: Easy Update ~ Site Server: {ctx.server},~ SQL Server: {ctx.sql_server}")
    kind = SITE_KIND.get(ctx.role, ctx.role)
    say(f"INFO: Prerequisite rules for {kind} site update are being run.")
    say("INFO: Executing prerequisite functions...")

    results: list[RuleResult] = []
    for prereq_type in PREREQ_TYPES:
        server = ctx.server_for(prereq_type)
        say(f"===== INFO: Prerequisite Type & Server: {prereq_type}:{server} =====")
        for category, description in CATEGORIES.items():
            rules = [
                r
                for r in RULES
                if r.prereq_type == prereq_type and r.category == category and r.applies(ctx)
            ]
            if not rules:
                continue
            say(f"<<<RuleCategory: {category}>>>")
            say(f"<<<CategoryDesc: {description}>>>")
            for rule in rules:
                status, message = rule.check(ctx)
                result = RuleResult(
                    role=prereq_type,
                    server=server,
                    category=category,
                    rule=rule.name,
                    status=status,
                    message="" if status is Status.PASSED else message,
                )
                for line in result.log_lines():
                    say(line)
                if record is not None:
                    record(result)
                results.append(result)
    for line in STARS_END:
        say(line)
    return PrereqOutcome(tuple(results))
