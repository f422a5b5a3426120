"""prereqcore's RunPrereqChecks: run the rules of `cmlab.site.prereq.rules`, log, record.

CMUpdate calls `run_prereq_checks` after it has extracted the update and verified
prereqcore.dll. Everything goes through the two callables it passes: `say` writes one
ConfigMgrPrereq.log line (the caller adds the SMS trace format), `record` stores one result
(spCMUAddPrereqMessage into CM_UpdatePackagePrereqStatus). No files, no database, no clock:
the same context always gives the same lines and results. docs/prereq.md describes the log.
"""

from __future__ import annotations

from collections.abc import Callable

from cmlab.site.prereq.context import PrereqContext, PrereqOutcome, RuleResult, Status
from cmlab.site.prereq.facts import validate_facts
from cmlab.site.prereq.rules import RULES

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
