"""The prerequisite checker as a pure library: each rule's real check of the facts, the
ConfigMgrPrereq.log lines it says, the results it records, and validation of site.toml [facts]."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmlab.core.errors import PrereqError
from cmlab.site.config import render_toml
from cmlab.site.prereq import (
    DEFAULT_FACTS,
    FACT_DOCS,
    PrereqContext,
    PrereqOutcome,
    RuleResult,
    Status,
    run_prereq_checks,
    validate_facts,
)
from cmlab.site.prereq.facts import KINDS
from cmlab.site.prereq.rules import RULES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "prereq.md"
SERVER = "cas.cmlab.local"

CAS = PrereqContext(
    site_code="CAS",
    role="cas",
    server=SERVER,
    installed_build=9135,
    installed_version="5.00.9135.1000",
    target_build=9141,
    target_version="5.00.9141.1000",
    update_number="2509",
    min_cm_version="5.00.9128.1000",
    max_cm_version="5.00.9135.1999",
    is_hotfix=False,
    facts=dict(DEFAULT_FACTS),
)
PRI = dataclasses.replace(CAS, site_code="PS1", role="primary", server="ps1.cmlab.local")


@dataclasses.dataclass
class Run:
    lines: list[str]
    recorded: list[RuleResult]
    outcome: PrereqOutcome

    def result(self, prereq_type: str, rule: str) -> RuleResult:
        found = [r for r in self.outcome.results if r.role == prereq_type and r.rule == rule]
        assert len(found) == 1, (prereq_type, rule, found)
        return found[0]


def run(ctx: PrereqContext = CAS, **facts: Any) -> Run:
    if facts:
        ctx = dataclasses.replace(ctx, facts={**ctx.facts, **facts})
    lines: list[str] = []
    recorded: list[RuleResult] = []
    outcome = run_prereq_checks(ctx, lines.append, recorded.append)
    return Run(lines, recorded, outcome)


CATEGORIES = [
    ("Access Permissions", "Checking access permissions..."),
    ("System Requirements", "Checking system requirements for ConfigMgr..."),
    ("Dependent Components", "Checking dependent components for ConfigMgr..."),
    ("Site Upgrade Requirements", "Checking if the target ConfigMgr site is ready to upgrade..."),
]


def skeleton(ctx: PrereqContext, kind: str) -> list[str]:
    """The whole log of a run in which every rule passes, without its result lines."""
    s = ctx.server
    out = [
        "********************************************",
        "******* Start Prerequisite checking. *******",
        "********************************************",
        f"INFO: Checking SQLNCli version on ServerName {s}",
        "INFO: SQLNCli version is 11.4.7001.0",
        f"INFO: SDK Provider is on {s}.",
        "Check Type: Configuration Manager Update",
        f"Check Type: Easy Update ~ Site Server: {s},~ SQL Server: {s}",
        f"INFO: Prerequisite rules for {kind} site update are being run.",
        "INFO: Executing prerequisite functions...",
    ]
    for prereq_type in ("SITE_PRI", "SQL", "SDK"):
        out.append(f"===== INFO: Prerequisite Type & Server: {prereq_type}:{s} =====")
        for name, desc in CATEGORIES:
            out += [f"<<<RuleCategory: {name}>>>", f"<<<CategoryDesc: {desc}>>>"]
    out += [
        "***************************************************",
        "******* Prerequisite checking is completed. *******",
        "***************************************************",
    ]
    return out


# --- healthy defaults -----------------------------------------------------------------------


@pytest.mark.parametrize(("ctx", "kind"), [(CAS, "CAS"), (PRI, "primary")])
def test_defaults_pass_every_rule_with_the_guide_log_skeleton(
    ctx: PrereqContext, kind: str
) -> None:
    r = run(ctx)
    assert r.outcome.overall is Status.PASSED
    assert r.outcome.results and all(x.status is Status.PASSED for x in r.outcome.results)
    assert all(x.message == "" for x in r.outcome.results)
    result_lines = [line for line in r.lines if line.endswith(";    Passed")]
    assert [line for line in r.lines if line not in result_lines] == skeleton(ctx, kind)
    assert len(result_lines) == len(r.outcome.results)
    # every rule that applies runs exactly once: "Active replica MP" only at a primary site,
    # the remote SQL Server's pending restart only with a remote SQL Server
    expected = {(x.prereq_type, x.name) for x in RULES if x.applies(ctx)}
    assert {(x.role, x.rule) for x in r.outcome.results} == expected
    assert len(r.outcome.results) == len(expected) == len(RULES) - (2 if ctx is CAS else 1)
    assert (("SITE_PRI", "Active replica MP") in expected) == (ctx.role == "primary")


def test_result_lines_sit_under_their_type_and_category_in_rule_order() -> None:
    r = run(PRI)
    current_type = current_cat = ""
    seen: list[tuple[str, str, str]] = []
    for line in r.lines:
        if line.startswith("===== INFO: Prerequisite Type & Server: "):
            current_type = line.split(": ", 2)[2].split(":")[0]
        elif line.startswith("<<<RuleCategory: "):
            current_cat = line.removeprefix("<<<RuleCategory: ").removesuffix(">>>")
        elif line.endswith(";    Passed"):
            server, rule, _ = line.split(";    ")
            assert server == PRI.server
            seen.append((current_type, current_cat, rule))
    assert seen == [(x.role, x.category, x.rule) for x in r.outcome.results]
    order = ["SITE_PRI", "SQL", "SDK"]
    cats = [name for name, _ in CATEGORIES]
    keys = [(order.index(t), cats.index(c)) for t, c, _ in seen]
    assert keys == sorted(keys)


def test_sql_and_sdk_servers_from_facts_name_their_headers_and_lines() -> None:
    r = run(PRI, sql_server="sql01.cmlab.local", sdk_server="sms01.cmlab.local")
    assert "INFO: SDK Provider is on sms01.cmlab.local." in r.lines
    assert (
        "Check Type: Easy Update ~ Site Server: ps1.cmlab.local,~ SQL Server: sql01.cmlab.local"
        in r.lines
    )
    assert "===== INFO: Prerequisite Type & Server: SQL:sql01.cmlab.local =====" in r.lines
    assert "===== INFO: Prerequisite Type & Server: SDK:sms01.cmlab.local =====" in r.lines
    servers = {x.role: x.server for x in r.outcome.results}
    assert servers == {
        "SITE_PRI": "ps1.cmlab.local",
        "SQL": "sql01.cmlab.local",
        "SDK": "sms01.cmlab.local",
    }


# --- every rule breaks on its own fact --------------------------------------------------------

W, F = Status.WARNING, Status.FAILED
CASES: list[tuple[str, PrereqContext, dict[str, Any], str, str, Status, tuple[str, ...]]] = [
    (
        "admin-rights",
        CAS,
        {"site_server_admin_rights": False},
        "SITE_PRI",
        "Administrative rights on site system",
        F,
        ("Administrator rights", SERVER),
    ),
    (
        "ws2012r2-site-server",
        CAS,
        {"site_server_os": "Windows Server 2012 R2"},
        "SITE_PRI",
        "Windows Server 2012/R2 lifecycle",
        F,
        ("Support for Windows Server 2012 and 2012 R2 ends on October 9, 2023", "SMS_Executive"),
    ),
    (
        "free-disk-site",
        CAS,
        {"free_disk_gb_site_server": 14.5},
        "SITE_PRI",
        "Free disk space on site server",
        F,
        ("14.5 GB", "at least 15 GB"),
    ),
    (
        "pending-restart",
        CAS,
        {"pending_restart": True},
        "SITE_PRI",
        "Pending system restart",
        F,
        ("restart is pending", "Restart the server"),
    ),
    (
        "dotnet-minimum",
        CAS,
        {"dotnet_version": "4.6.1"},
        "SITE_PRI",
        "Required version of Microsoft .NET Framework",
        F,
        ("4.6.2 or later", "4.6.1", "restart the system"),
    ),
    (
        "dotnet-recommended",
        CAS,
        {"dotnet_version": "4.7.2"},
        "SITE_PRI",
        "Recommended version of Microsoft .NET Framework",
        W,
        ("version 4.8", "4.7.2"),
    ),
    (
        "sqlncli",
        CAS,
        {"sqlncli_version": "11.4.6000.0"},
        "SITE_PRI",
        "SQL Server Native Client",
        F,
        (
            "11.4.7001.0 or a later version",
            "HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\SQLNCLI11\\InstalledVersion",
            "sqlncli.msi from the \\EasySetupPayload\\<Update GUID>\\redist folder",
        ),
    ),
    (
        "odbc18-missing",
        CAS,
        {"odbc18_version": ""},
        "SITE_PRI",
        "SQL ODBC driver for SQL Server",
        F,
        (
            "ODBC Driver 18 isn't installed",
            "HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\MSODBCSQL18\\InstalledVersion",
            "msodbcsql.msi",
        ),
    ),
    (
        "version-below-min",
        dataclasses.replace(CAS, installed_version="5.00.9122.1000", installed_build=9122),
        {},
        "SITE_PRI",
        "Unsupported upgrade path",
        F,
        ("5.00.9128.1000 through 5.00.9135.1999", "5.00.9122.1000", "Update the site"),
    ),
    (
        "http-only",
        CAS,
        {"client_comm": "http"},
        "SITE_PRI",
        "Enable site system roles for HTTPS or Enhanced HTTP",
        F,
        ("HTTPS or Enhanced HTTP are not enabled for client communication", "linkid=2155007"),
    ),
    (
        "cmg-classic",
        CAS,
        {"cmg_classic": True},
        "SITE_PRI",
        "Check for a cloud management gateway (CMG) as a cloud service (classic)",
        F,
        ("Process to convert a CMG to a virtual machine scale set", "linkid=2187166"),
    ),
    (
        "resource-access-profiles",
        CAS,
        {"resource_access_profiles": True},
        "SITE_PRI",
        "Resource access policies are no longer supported",
        F,
        ("deprecated", "Resource Access Policies workload slider to Intune only"),
    ),
    (
        "active-replica-mp",
        PRI,
        {"mp_database_replicas": True},
        "SITE_PRI",
        "Active replica MP",
        F,
        ("database replica for management points", "disable database replication"),
    ),
    (
        "maintenance-tasks",
        CAS,
        {"maintenance_tasks_during_update": True},
        "SITE_PRI",
        "Site maintenance tasks scheduled during the update",
        W,
        ("disable database maintenance tasks", "Backup Site Server"),
    ),
    (
        "antivirus",
        CAS,
        {"antivirus_running": True},
        "SITE_PRI",
        "Antivirus software on the site server",
        W,
        ("stop it", "lock files"),
    ),
    (
        "sql-admin-rights",
        CAS,
        {"sql_server_admin_rights": False},
        "SQL",
        "Site server computer account administrative rights",
        F,
        ("local administrative rights on the SQL Server site database server",),
    ),
    (
        "sql-sysadmin",
        CAS,
        {"sql_sysadmin_rights": False},
        "SQL",
        "SQL Server sysadmin rights",
        F,
        ("sysadmin",),
    ),
    (
        "free-disk-sql",
        CAS,
        {"free_disk_gb_sql": 4},
        "SQL",
        "Free disk space on site database server",
        F,
        ("4 GB", "at least 5 GB"),
    ),
    (
        "sql-2008r2",
        CAS,
        {"sql_server_version": "10.50.6000.34"},
        "SQL",
        "SQL Server version",
        F,
        ("SQL Server 2008 / 2008 R2", "isn't a supported version"),
    ),
    (
        "sql-unknown",
        CAS,
        {"sql_server_version": ""},
        "SQL",
        "SQL Server version",
        F,
        ("couldn't be read",),
    ),
    (
        "sql-2012-lifecycle",
        CAS,
        {"sql_server_version": "11.0.7001.0"},
        "SQL",
        "SQL Server 2012 lifecycle",
        W,
        ("SQL Server 2012", "July 12, 2022", "Plan to upgrade"),
    ),
    (
        "remote-sql-pending-restart",
        CAS,
        {"sql_server": "sql01.cmlab.local", "sql_pending_restart": True},
        "SQL",
        "Pending system restart on the remote SQL Server",
        W,
        ("sql01.cmlab.local", "Restart it"),
    ),
    (
        "ag-automatic-failover",
        CAS,
        {"sql_ag_failover_mode": "automatic"},
        "SQL",
        "SQL Server Always On availability group configured for manual failover",
        F,
        ("manual failover before you start the update installation",),
    ),
    (
        "sdk-admin-rights",
        CAS,
        {"sdk_server_admin_rights": False},
        "SDK",
        "Site server computer account administrative rights",
        F,
        ("SMS Provider server",),
    ),
    (
        "sdk-os",
        CAS,
        {"sdk_server": "sms01.cmlab.local", "sdk_server_os": "Windows Server 2012"},
        "SDK",
        "Supported operating system for the SMS Provider",
        F,
        ("sms01.cmlab.local runs Windows Server 2012", "Windows Server 2016 or later"),
    ),
    (
        "adk-unsupported",
        CAS,
        {"adk_version": "10.1.19041.1"},
        "SDK",
        "Supported version of the Windows ADK",
        W,
        ("10.1.19041.1", "Support for the Windows ADK", "boot images"),
    ),
    (
        "adk-missing",
        CAS,
        {"adk_version": ""},
        "SDK",
        "Windows Deployment Tools installed",
        F,
        ("Windows Deployment Tools component of the Windows ADK isn't installed",),
    ),
    (
        "custom-sdk-solutions",
        CAS,
        {"custom_sdk_solutions": True},
        "SDK",
        "Custom solutions based on the Configuration Manager SDK",
        W,
        ("Disable this code before you update the site",),
    ),
]


@pytest.mark.parametrize(
    ("ctx", "facts", "prereq_type", "rule", "status", "fragments"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_each_rule_warns_or_fails_on_its_fact_with_a_message(
    ctx: PrereqContext,
    facts: dict[str, Any],
    prereq_type: str,
    rule: str,
    status: Status,
    fragments: tuple[str, ...],
) -> None:
    r = run(ctx, **facts)
    result = r.result(prereq_type, rule)
    assert result.status is status
    for fragment in fragments:
        assert fragment in result.message
    assert "\n" not in result.message
    word = "Warning" if status is W else "Error"
    server = result.server
    assert f"{server};    {rule};    {word}" in r.lines
    assert f"{server};    {rule};    {word};    {result.message}" in r.lines
    assert r.outcome.overall is max(x.status for x in r.outcome.results)
    assert r.outcome.overall >= status


def test_every_rule_has_a_breaking_case() -> None:
    covered = {(c[3], c[4]) for c in CASES}
    assert covered == {(x.prereq_type, x.name) for x in RULES}


def test_every_fact_is_defaulted_documented_validated_and_read() -> None:
    assert set(DEFAULT_FACTS) == set(FACT_DOCS) == set(KINDS)
    read = {key for rule in RULES for key in rule.facts}
    assert read <= set(DEFAULT_FACTS)
    assert set(DEFAULT_FACTS) - read == {"sql_server", "sdk_server"}  # the checker's servers
    assert all(line and "\n" not in line for line in FACT_DOCS.values())
    assert "build" not in DEFAULT_FACTS and "minor_build" not in DEFAULT_FACTS  # config.Facts'


def test_default_facts_survive_site_toml_and_validate() -> None:
    text = render_toml({"facts": dict(DEFAULT_FACTS)})
    loaded = tomllib.loads(text)["facts"]
    assert loaded == DEFAULT_FACTS
    validate_facts(loaded)
    validate_facts({**loaded, "something_new": object()})  # unknown keys are ignored


# --- overall = worst ----------------------------------------------------------------------------


def test_overall_is_the_worst_result() -> None:
    warned = run(CAS, antivirus_running=True)
    assert warned.outcome.overall is Status.WARNING
    assert [x.rule for x in warned.outcome.by_status(W)] == [
        "Antivirus software on the site server"
    ]
    both = run(CAS, antivirus_running=True, cmg_classic=True)
    assert both.outcome.overall is Status.FAILED
    assert len(both.outcome.by_status(W)) == 1 and len(both.outcome.by_status(F)) == 1
    assert PrereqOutcome(()).overall is Status.PASSED


DOTNET_REQUIRED = "Required version of Microsoft .NET Framework"
DOTNET_RECOMMENDED = "Recommended version of Microsoft .NET Framework"


@pytest.mark.parametrize(
    ("dotnet", "required", "recommended"),
    [
        ("", F, Status.PASSED),  # below 4.6.2: the error only, as the real rules do
        ("4.5.2", F, Status.PASSED),
        ("4.6.1", F, Status.PASSED),
        ("4.6.2", Status.PASSED, W),
        ("4.7.2", Status.PASSED, W),
        ("4.8", Status.PASSED, Status.PASSED),
        ("4.8.0", Status.PASSED, Status.PASSED),
        ("4.8.1", Status.PASSED, Status.PASSED),
    ],
)
def test_dotnet_error_below_462_warning_below_48(
    dotnet: str, required: Status, recommended: Status
) -> None:
    r = run(CAS, dotnet_version=dotnet)
    assert r.result("SITE_PRI", DOTNET_REQUIRED).status is required
    assert r.result("SITE_PRI", DOTNET_RECOMMENDED).status is recommended
    if not dotnet:
        assert ".NET Framework isn't installed" in r.result("SITE_PRI", DOTNET_REQUIRED).message


def test_sql_pending_restart_is_checked_only_on_a_remote_sql_server() -> None:
    local = run(CAS, sql_pending_restart=True)
    assert local.outcome.overall is Status.PASSED
    assert "Pending system restart on the remote SQL Server" not in {
        x.rule for x in local.outcome.results
    }
    remote = run(CAS, sql_server="SQL01.cmlab.local", sql_pending_restart=True)
    assert remote.outcome.overall is Status.WARNING
    same = run(CAS, sql_server=SERVER.upper(), sql_pending_restart=True)
    assert same.outcome.overall is Status.PASSED


def test_sql_server_2012_warns_and_2008_r2_fails() -> None:
    sql_2012 = run(CAS, sql_server_version="11.0.7001.0")
    assert sql_2012.result("SQL", "SQL Server version").status is Status.PASSED
    assert sql_2012.outcome.overall is Status.WARNING
    assert run(CAS, sql_server_version="13.0.5026.0").outcome.overall is Status.PASSED


def test_adk_older_warns_missing_fails() -> None:
    older = run(CAS, adk_version="10.1.22000.1")
    assert older.result("SDK", "Supported version of the Windows ADK").status is W
    assert older.result("SDK", "Windows Deployment Tools installed").status is Status.PASSED
    missing = run(CAS, adk_version="")
    assert missing.result("SDK", "Supported version of the Windows ADK").status is Status.PASSED
    before_2403 = dataclasses.replace(
        CAS, update_number="2309", target_build=9122, max_cm_version=""
    )
    assert run(before_2403, adk_version="10.1.22000.1").outcome.overall is Status.PASSED


# --- ODBC Driver 18 ---------------------------------------------------------------------------

ODBC = "SQL ODBC driver for SQL Server"


@pytest.mark.parametrize(
    ("update_number", "target_build", "odbc", "status"),
    [
        ("2409", 9132, "18.3.3.1", Status.PASSED),  # 18.4.1.1 only since 2503
        ("2503", 9135, "18.3.3.1", Status.FAILED),
        ("2509", 9141, "18.3.3.1", Status.FAILED),
        ("2509", 9141, "18.4.1.1", Status.PASSED),
        ("2509", 9141, "18.5", Status.PASSED),
        ("2409", 9132, "", Status.FAILED),  # ODBC 18 itself since 2303
        ("2303", 9106, "", Status.FAILED),
        ("2211", 9096, "", Status.PASSED),  # before 2303: not required
        ("KB28290310", 9135, "18.3.3.1", Status.FAILED),  # a hotfix: release from its build
        ("KB28290310", 9132, "18.3.3.1", Status.PASSED),
    ],
)
def test_odbc18_threshold_applies_from_2503(
    update_number: str, target_build: int, odbc: str, status: Status
) -> None:
    ctx = dataclasses.replace(
        CAS,
        update_number=update_number,
        target_build=target_build,
        min_cm_version="",
        max_cm_version="",
    )
    result = run(ctx, odbc18_version=odbc).result("SITE_PRI", ODBC)
    assert result.status is status
    if status is Status.FAILED and odbc:
        assert "18.4.1.1" in result.message and f"version {odbc} is installed" in result.message


def test_odbc_message_names_the_package_redist_folder() -> None:
    ctx = dataclasses.replace(CAS, package_guid="420E3E18-73C5-4BE9-88B0-6F1E30A012CA")
    message = run(ctx, odbc18_version="").result("SITE_PRI", ODBC).message
    assert "\\EasySetupPayload\\420E3E18-73C5-4BE9-88B0-6F1E30A012CA\\redist" in message


# --- Windows Server 2012 / 2012 R2 ------------------------------------------------------------

WS = "Windows Server 2012/R2 lifecycle"


@pytest.mark.parametrize(
    ("ctx", "facts", "status", "fragment"),
    [
        pytest.param(
            CAS,
            {"distribution_point_os": ["dp01.cmlab.local=Windows Server 2012 R2"]},
            Status.WARNING,
            "distribution point dp01.cmlab.local runs Windows Server 2012 R2",
            id="dp-2012r2-warns",
        ),
        pytest.param(
            CAS,
            {"distribution_point_os": ["Windows Server 2022", "Windows Server 2012"]},
            Status.WARNING,
            "distribution point #2 runs Windows Server 2012",
            id="unnamed-dp-2012-warns",
        ),
        pytest.param(
            CAS,
            {"site_server_os": "Windows Server 2012 R2"},
            Status.FAILED,
            f"the site server {SERVER} runs Windows Server 2012 R2",
            id="site-server-2012r2-fails",
        ),
        pytest.param(
            CAS,
            {"site_system_os": ["mp01.cmlab.local=Windows Server 2012"]},
            Status.FAILED,
            "site system mp01.cmlab.local runs Windows Server 2012",
            id="site-system-2012-fails",
        ),
        pytest.param(
            CAS,
            {
                "site_system_os": ["mp01=Windows Server 2012 R2"],
                "distribution_point_os": ["dp01=Windows Server 2012 R2"],
            },
            Status.FAILED,
            "mp01 runs Windows Server 2012 R2, distribution point dp01",
            id="both-fails",
        ),
        pytest.param(
            CAS,
            {"distribution_point_os": ["Windows 11", "Windows Server 2016"]},
            Status.PASSED,
            "",
            id="dp-client-os-passes",
        ),
        pytest.param(
            CAS,
            {"site_server_os": "Windows Server 2008 R2"},
            Status.FAILED,
            "no longer supports",
            id="older-fails",
        ),
        pytest.param(
            dataclasses.replace(CAS, role="secondary"),
            {
                "site_system_os": ["Windows Server 2012 R2"],
                "distribution_point_os": ["Windows Server 2012"],
            },
            Status.PASSED,
            "",
            id="secondary-remote-roles-exempt",
        ),
        pytest.param(
            dataclasses.replace(CAS, role="secondary"),
            {"site_server_os": "Windows Server 2012"},
            Status.FAILED,
            "the site server",
            id="secondary-site-server-fails",
        ),
    ],
)
def test_windows_server_2012_error_for_servers_warning_for_dps(
    ctx: PrereqContext, facts: dict[str, Any], status: Status, fragment: str
) -> None:
    result = run(ctx, **facts).result("SITE_PRI", WS)
    assert result.status is status
    assert fragment in result.message
    if status is Status.WARNING:
        assert "temporarily doesn't apply to distribution points" in result.message


# --- MinCMVersion .. MaxCMVersion -------------------------------------------------------------

SUPPORTED = "Unsupported upgrade path"


@pytest.mark.parametrize(
    ("installed", "status", "fragment"),
    [
        ("5.00.9128.1000", Status.PASSED, ""),  # = MinCMVersion
        ("5.00.9135.1999", Status.PASSED, ""),  # = MaxCMVersion
        ("5.0.9135.1999", Status.PASSED, ""),  # compared by number, not text
        ("5.00.9128.999", Status.FAILED, "Update the site to version 5.00.9128.1000 or later"),
        ("5.00.9135.2000", Status.FAILED, "later version than this update applies to"),
        ("5.00.9141.1000", Status.FAILED, "later version than this update applies to"),
        ("not-a-version", Status.FAILED, "can't be read"),
    ],
)
def test_installed_version_must_be_within_min_and_max(
    installed: str, status: Status, fragment: str
) -> None:
    result = run(dataclasses.replace(CAS, installed_version=installed)).result(
        "SITE_PRI", SUPPORTED
    )
    assert result.status is status
    assert fragment in result.message
    if status is Status.FAILED and fragment != "can't be read":
        assert "5.00.9128.1000 through 5.00.9135.1999" in result.message
        assert "Configuration Manager 2509 (5.00.9141.1000)" in result.message


@pytest.mark.parametrize(
    ("low", "high", "installed", "status", "span"),
    [
        ("", "", "5.00.9000.1000", Status.PASSED, ""),
        ("5.00.9128.1000", "", "5.00.9999.1000", Status.PASSED, ""),
        ("5.00.9128.1000", "", "5.00.9127.1000", Status.FAILED, "5.00.9128.1000 or later"),
        ("", "5.00.9135.1999", "5.00.9136.1000", Status.FAILED, "5.00.9135.1999 or earlier"),
        ("latest", "", "5.00.9135.1000", Status.FAILED, "isn't a version"),
    ],
)
def test_one_sided_or_absent_bounds(
    low: str, high: str, installed: str, status: Status, span: str
) -> None:
    ctx = dataclasses.replace(
        CAS, min_cm_version=low, max_cm_version=high, installed_version=installed, is_hotfix=True
    )
    result = run(ctx).result("SITE_PRI", SUPPORTED)
    assert result.status is status
    assert span in result.message
    if status is Status.FAILED and span != "isn't a version":
        assert "this hotfix" in result.message


@pytest.mark.parametrize(
    ("update_number", "target_build", "status"),
    [("2309", 9122, Status.WARNING), ("2403", 9128, Status.FAILED), ("2509", 9141, Status.FAILED)],
)
def test_http_is_an_error_from_2403_and_a_warning_before(
    update_number: str, target_build: int, status: Status
) -> None:
    ctx = dataclasses.replace(
        CAS, update_number=update_number, target_build=target_build, max_cm_version=""
    )
    rule = "Enable site system roles for HTTPS or Enhanced HTTP"
    result = run(ctx, client_comm="http").result("SITE_PRI", rule)
    assert result.status is status
    assert "HTTPS or Enhanced HTTP are not enabled for client communication" in result.message
    assert run(ctx, client_comm="https").outcome.overall is Status.PASSED


def test_co_management_and_crp_name_their_fixes() -> None:
    rule = "Resource access policies are no longer supported"
    co = run(CAS, comanaged_ra_workload_configmgr=True).result("SITE_PRI", rule)
    assert co.status is F and "co-managed devices" in co.message
    crp = run(CAS, certificate_registration_point=True).result("SITE_PRI", rule)
    assert crp.status is F
    assert "Servers and Site System Roles" in crp.message and "remove the role" in crp.message
    assert "slider" not in crp.message


def test_replica_mp_rule_runs_only_at_primary_sites() -> None:
    assert run(CAS, mp_database_replicas=True).outcome.overall is Status.PASSED
    assert run(PRI, mp_database_replicas=True).outcome.overall is Status.FAILED


# --- record ---------------------------------------------------------------------------------


def test_record_gets_every_result_in_log_order() -> None:
    r = run(PRI, antivirus_running=True, sql_ag_failover_mode="automatic", adk_version="")
    assert r.recorded == list(r.outcome.results)
    heads = [line.split(";    ")[:2] for line in r.lines if line.count(";    ") == 2]
    assert heads == [[x.server, x.rule] for x in r.recorded]


def test_record_is_optional() -> None:
    lines: list[str] = []
    outcome = run_prereq_checks(CAS, lines.append)
    assert outcome.overall is Status.PASSED and lines


# --- validate_facts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dotnet_version", 4.8),
        ("dotnet_version", "4.8 (release)"),
        ("odbc18_version", "18.4.1.1."),
        ("sqlncli_version", "1" * 5000),
        ("pending_restart", "false"),
        ("pending_restart", 0),
        ("cmg_classic", None),
        ("free_disk_gb_site_server", "120"),
        ("free_disk_gb_site_server", -1.0),
        ("free_disk_gb_site_server", 10**400),
        ("free_disk_gb_sql", float("nan")),
        ("free_disk_gb_sql", float("inf")),
        ("free_disk_gb_sql", True),
        ("client_comm", "HTTPS"),
        ("client_comm", 1),
        ("sql_ag_failover_mode", "auto"),
        ("site_server_os", "Windows Server 2022 Datacenter"),
        ("site_server_os", ""),
        ("site_server_os", ["Windows Server 2022"]),
        ("sdk_server_os", "Linux"),
        ("site_system_os", "Windows Server 2022"),
        ("distribution_point_os", ["Windows Server 2022", 2019]),
        ("distribution_point_os", ["dp1=Windows Server 2012", "dp 2=Windows Server 2019"]),
        ("sql_server", "sql01;drop"),
        ("sdk_server", 42),
    ],
)
def test_validate_facts_rejects_wrong_types_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(PrereqError, match=f"facts.{key}"):
        validate_facts({**DEFAULT_FACTS, key: value})


def test_validate_facts_rejects_a_non_table() -> None:
    with pytest.raises(PrereqError):
        validate_facts(["dotnet_version"])  # type: ignore[arg-type]


def test_run_validates_before_saying_anything() -> None:
    lines: list[str] = []
    with pytest.raises(PrereqError, match="pending_restart"):
        run_prereq_checks(dataclasses.replace(CAS, facts={"pending_restart": "yes"}), lines.append)
    assert lines == []


def test_partial_facts_fall_back_to_the_defaults() -> None:
    lines: list[str] = []
    outcome = run_prereq_checks(dataclasses.replace(CAS, facts={"cmg_classic": True}), lines.append)
    assert outcome.overall is Status.FAILED
    assert [x.rule for x in outcome.by_status(F)] == [
        "Check for a cloud management gateway (CMG) as a cloud service (classic)"
    ]


JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.binary(max_size=10)
    | st.sampled_from(
        ["", "4.8", "18.4.1.1", "Windows Server 2012 R2", "x=Windows 10", "https", "manual"]
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(DEFAULT_FACTS)) | st.text(max_size=10), JUNK))
def test_junk_facts_raise_only_prereq_error_and_valid_ones_run(junk: Mapping[str, object]) -> None:
    facts = {**DEFAULT_FACTS, **junk}
    try:
        validate_facts(facts)
    except PrereqError:
        return
    outcome = run_prereq_checks(dataclasses.replace(PRI, facts=facts), lambda _line: None)
    assert outcome.overall in Status


@settings(max_examples=200, deadline=None)
@given(
    installed=st.text(max_size=20),
    low=st.text(max_size=20),
    high=st.text(max_size=20),
    update_number=st.text(max_size=12),
    target_build=st.integers(min_value=-(2**40), max_value=2**40),
    role=st.text(max_size=10),
)
def test_junk_context_never_crashes_the_checker(
    installed: str, low: str, high: str, update_number: str, target_build: int, role: str
) -> None:
    ctx = dataclasses.replace(
        CAS,
        installed_version=installed,
        min_cm_version=low,
        max_cm_version=high,
        update_number=update_number,
        target_build=target_build,
        role=role,
    )
    outcome = run_prereq_checks(ctx, lambda _line: None)
    assert all(x.status is Status.PASSED or x.message for x in outcome.results)


# --- docs -----------------------------------------------------------------------------------


def test_docs_list_every_rule_and_fact() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for rule in RULES:
        assert rule.name in text
    for key in DEFAULT_FACTS:
        assert f"`{key}`" in text, key
