"""The prerequisite checker (prereqcore.dll's rules) as a pure library: facts in, results out.

CMUpdate calls `run_prereq_checks`; site.toml `[facts]` describe the emulated environment.
See docs/prereq.md.
"""

from cmlab.site.prereq.checker import run_prereq_checks
from cmlab.site.prereq.context import PrereqContext, PrereqOutcome, RuleResult, Status
from cmlab.site.prereq.facts import DEFAULT_FACTS, FACT_DOCS, validate_facts

__all__ = [
    "DEFAULT_FACTS",
    "FACT_DOCS",
    "PrereqContext",
    "PrereqOutcome",
    "RuleResult",
    "Status",
    "run_prereq_checks",
    "validate_facts",
]
