"""The prerequisite rules: real checks of `PrereqContext` (its facts and the update's versions).

Each rule belongs to one Prerequisite Type (SITE_PRI, SQL, SDK: the guide's "Prerequisite Type &
Server") and one RuleCategory, reads the facts it names, and returns PASSED, or WARNING/FAILED with
a message that tells the trainee what to fix, in the words of the reference documents
(../shared/reference/): the guide's "Troubleshoot the Prerequisite check stage", the checklist for
update 2403 and the example upgrade checklist. Rule names and severities follow Microsoft's "List
of prerequisite checks", which the guide points to. `source` says which; docs/prereq.md lists all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from cmlab.site.prereq.context import PrereqContext, Status
from cmlab.site.prereq.facts import OS_RE, parse_version

Finding = tuple[Status, str]
PASS: Finding = (Status.PASSED, "")

GUIDE = "updates-and-servicing-troubleshooting.md"
GUIDE_SQL = f"{GUIDE}, Troubleshooting SQL Client prerequisites"
GUIDE_BLOCKING = f"{GUIDE}, Troubleshooting blocking checks that frequently recur"
CHECKLIST = "checklist-update-2403.md"
EXAMPLE_2007 = "example-upgrade-checklist-cm2007.txt"
CMLAB = "cmlab's figure (not in the reference documents)"
LIST = "List of prerequisite checks (learn.microsoft.com, linked from the guide)"

# Current-branch releases and their builds, for a target whose update_number is not a YYMM
# release (a hotfix named by its KB): the release is the latest one at or below target_build.
RELEASE_BUILDS: tuple[tuple[int, int], ...] = (
    (2303, 9106),
    (2309, 9122),
    (2403, 9128),
    (2409, 9132),
    (2503, 9135),
    (2509, 9141),
)

DOTNET_MINIMUM = (4, 6, 2)
DOTNET_RECOMMENDED = (4, 8)
SQLNCLI_MINIMUM = (11, 4, 7001)
ODBC18_REQUIRED_FROM = 2303  # the guide: "since version 2303 ... requires ODBC Driver 18"
ODBC18_MINIMUM_2503 = (18, 4, 1, 1)  # the guide: "since version 2503 ... 18.4.1.1 or later"
HTTP_ERROR_FROM = 2403  # List of prerequisite checks: "Starting in version 2403 ... this error"
MIN_FREE_GB_SITE_SERVER = 15.0
MIN_FREE_GB_SQL = 5.0
# Windows ADK (Deployment Tools) builds cmlab accepts: ADK for Windows 11 22H2 (10.1.22621) or
# later for updates 2403 and later, ADK for Windows 10 2004 (10.1.19041) or later before.
ADK_MINIMUM: tuple[tuple[int, tuple[int, ...]], ...] = (
    (2403, (10, 1, 22621, 1)),
    (0, (10, 1, 19041, 1)),
)
SQL_RELEASES = {  # SERVERPROPERTY('ProductVersion') major -> SQL Server release
    9: "2005",
    10: "2008 / 2008 R2",
    11: "2012",
    12: "2014",
    13: "2016",
    14: "2017",
    15: "2019",
    16: "2022",
    17: "2025",
}

WS2012_TEXT = (
    "Windows Server 2012 and 2012 R2 lifecycle: Support for Windows Server 2012 and 2012 R2 "
    "ends on October 9, 2023. Plan to upgrade your site servers to a supported operating system. "
    "For more information, see New options for SQL Server 2012 and Windows Server 2012 end of "
    "support (https://go.microsoft.com/fwlink/?linkid=2186091)."
)
HTTP_TEXT = (
    "HTTPS or Enhanced HTTP are not enabled for client communication. HTTP-only communication "
    "is deprecated, and support is removed in this version of Configuration Manager. To proceed "
    "with the upgrade, enable a more secure communication method for the site by enabling "
    "either HTTPS or Enhanced HTTP. For more information, see "
    "https://go.microsoft.com/fwlink/?linkid=2155007."
)
CMG_TEXT = (
    "The option to deploy a cloud management gateway (CMG) as a cloud service (classic) is "
    "deprecated. All CMG deployments should use a virtual machine scale set. For more "
    "information, see Process to convert a CMG to a virtual machine scale set "
    "(https://go.microsoft.com/fwlink/?linkid=2187166)."
)
RA_SLIDER_FIX = (
    "To pass the check, follow the guidance in Co-management workloads to move the Resource "
    "Access Policies workload slider to Intune only (if co-management isn't configured, "
    "configure it at least temporarily to be able to move the slider)."
)


@dataclass(frozen=True)
class Rule:
    name: str  # display name, as in ConfigMgrPrereq.log and CM_UpdatePackagePrereqStatus
    prereq_type: str  # "SITE_PRI" | "SQL" | "SDK"
    category: str  # a key of checker.CATEGORIES
    facts: tuple[str, ...]  # the fact keys it reads
    source: str  # the reference document its condition and message come from
    check: Callable[[PrereqContext], Finding]
    site_roles: frozenset[str] | None = None  # None: every site role
    when: Callable[[PrereqContext], bool] | None = None  # another condition for the rule to run

    def applies(self, ctx: PrereqContext) -> bool:
        if self.site_roles is not None and ctx.role not in self.site_roles:
            return False
        return self.when is None or self.when(ctx)


# --- helpers -------------------------------------------------------------------------------


def _text(ctx: PrereqContext, key: str) -> str:
    value = ctx.fact(key)
    return value if isinstance(value, str) else ""


def _flag(ctx: PrereqContext, key: str) -> bool:
    return ctx.fact(key) is True


def _number(ctx: PrereqContext, key: str) -> float:
    value = ctx.fact(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)


def _texts(ctx: PrereqContext, key: str) -> list[str]:
    value = ctx.fact(key)
    if not isinstance(value, list | tuple):
        return []
    return [v for v in value if isinstance(v, str)]


def _shown(version: tuple[int, ...]) -> str:
    return ".".join(str(p) for p in version)


def _found(text: str, what: str) -> str:
    return f"{what} version {text} is installed" if text else f"{what} isn't installed"


def target_release(ctx: PrereqContext) -> int:
    """The current-branch release (YYMM) the update brings the site to; 0 if older than 2303."""
    number = str(ctx.update_number).strip()
    if re.fullmatch(r"\d{4}", number):
        return int(number)
    known = [release for release, build in RELEASE_BUILDS if build <= ctx.target_build]
    return max(known, default=0)


def _what(ctx: PrereqContext) -> str:
    name = "this hotfix" if ctx.is_hotfix else f"Configuration Manager {ctx.update_number}"
    return f"{name} ({ctx.target_version})" if ctx.target_version else name


def _redist(ctx: PrereqContext, msi: str) -> str:
    guid = ctx.package_guid or "<Update GUID>"
    return f"{msi} from the \\EasySetupPayload\\{guid}\\redist folder"


# --- SITE_PRI: Access Permissions -------------------------------------------------------------


def check_site_admin_rights(ctx: PrereqContext) -> Finding:
    if _flag(ctx, "site_server_admin_rights"):
        return PASS
    return (
        Status.FAILED,
        f"The account that runs the update (Local System on {ctx.server}) doesn't have "
        f"Administrator rights on the site server {ctx.server}. Give the site server computer "
        "account local administrative rights again, then run the prerequisite check again.",
    )


# --- SITE_PRI: System Requirements ------------------------------------------------------------


def _os_problem(os_entry: str, *, distribution_point: bool) -> tuple[str, str, Status] | None:
    """(who, what is wrong, severity) for one OS entry, or None when it is supported."""
    m = OS_RE.match(os_entry)
    if m is None:
        return None
    who = m.group("name") or ""
    os_name = os_entry.split("=", 1)[1] if m.group("name") else os_entry
    if m.group("client"):
        if distribution_point:
            return None
        return who, f"{os_name}, which isn't a server operating system", Status.FAILED
    year = int(m.group("year"))
    if year == 2012:
        severity = Status.WARNING if distribution_point else Status.FAILED
        return who, os_name, severity
    if year < 2012:
        return who, f"{os_name}, which Configuration Manager no longer supports", Status.FAILED
    return None


def check_windows_server_2012(ctx: PrereqContext) -> Finding:
    entries: list[tuple[str, str, bool]] = [
        (f"the site server {ctx.server}", _text(ctx, "site_server_os"), False)
    ]
    if ctx.role != "secondary":  # the guide: doesn't apply to secondary site remote roles
        for i, os_entry in enumerate(_texts(ctx, "site_system_os")):
            entries.append((f"site system #{i + 1}", os_entry, False))
        for i, os_entry in enumerate(_texts(ctx, "distribution_point_os")):
            entries.append((f"distribution point #{i + 1}", os_entry, True))
    errors: list[str] = []
    warnings: list[str] = []
    for default_who, os_entry, is_dp in entries:
        problem = _os_problem(os_entry, distribution_point=is_dp)
        if problem is None:
            continue
        named, what, severity = problem
        who = default_who
        if named:
            who = f"distribution point {named}" if is_dp else f"site system {named}"
        (errors if severity is Status.FAILED else warnings).append(f"{who} runs {what}")
    if not errors and not warnings:
        return PASS
    found = "Found: " + ", ".join(errors + warnings) + "."
    if errors:
        return (
            Status.FAILED,
            f"{WS2012_TEXT} {found} The check failed and you can't install the update: upgrade "
            "the site server and every site system server to a supported Windows Server "
            "version (Windows Server 2016 or later). If you recently performed an in-place "
            "upgrade of a remote site system, restart that computer or its SMS_Executive "
            "service so that the check detects the new operating system.",
        )
    return (
        Status.WARNING,
        f"{WS2012_TEXT} {found} The check temporarily doesn't apply to distribution points, so "
        "this is only a warning and the update can install: plan to upgrade these distribution "
        "points to a supported operating system.",
    )


def check_free_disk_site_server(ctx: PrereqContext) -> Finding:
    free = _number(ctx, "free_disk_gb_site_server")
    if free >= MIN_FREE_GB_SITE_SERVER:
        return PASS
    return (
        Status.FAILED,
        f"The site server {ctx.server} has {free:g} GB of free disk space. Updating the site "
        f"needs at least {MIN_FREE_GB_SITE_SERVER:g} GB free on the Configuration Manager "
        "installation drive: free up disk space, then run the prerequisite check again.",
    )


def check_pending_restart(ctx: PrereqContext) -> Finding:
    if not _flag(ctx, "pending_restart"):
        return PASS
    return (
        Status.FAILED,
        f"A system restart is pending on the site server {ctx.server}. Restart the server "
        "before you start the update: installing .NET or critical Windows updates puts a "
        "server into a reboot pending state, and no files may be flagged as pending restart "
        "when the installation begins.",
    )


# --- SITE_PRI: Dependent Components -----------------------------------------------------------


def check_dotnet_minimum(ctx: PrereqContext) -> Finding:
    text = _text(ctx, "dotnet_version")
    version = parse_version(text)
    if version is not None and version >= DOTNET_MINIMUM:
        return PASS
    return (
        Status.FAILED,
        "Configuration Manager requires Microsoft .NET Framework version 4.6.2 or later for "
        f"site servers. On the site server {ctx.server}, {_found(text, '.NET Framework')}. "
        "Update .NET (if "
        "possible, install the latest version, .NET Framework 4.8) and restart the system "
        "before you update the site.",
    )


def check_dotnet_recommended(ctx: PrereqContext) -> Finding:
    """Warns from 4.6.2 up to 4.8; below 4.6.2 the required-version rule fails instead."""
    text = _text(ctx, "dotnet_version")
    version = parse_version(text)
    if version is None or version < DOTNET_MINIMUM or version >= DOTNET_RECOMMENDED:
        return PASS
    return (
        Status.WARNING,
        f"On the site server {ctx.server}, {_found(text, 'Microsoft .NET Framework')}. If possible "
        "in your environment, install the latest version of .NET, version 4.8. The installation "
        "can put the server into a reboot pending state: restart it before you update the site.",
    )


def check_sqlncli(ctx: PrereqContext) -> Finding:
    text = _text(ctx, "sqlncli_version")
    version = parse_version(text)
    if version is not None and version >= SQLNCLI_MINIMUM:
        return PASS
    return (
        Status.FAILED,
        "Since version 1810, Configuration Manager requires SQL Server Native Client version "
        f"11.4.7001.0 or a later version. On the site server {ctx.server}, "
        f"{_found(text, 'SQL Server Native Client')} "
        "(HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\SQLNCLI11\\InstalledVersion). The update "
        f"doesn't install SQL clients for you: install {_redist(ctx, 'sqlncli.msi')} "
        "(available for major releases only), or SQL Server 2012 Native Client from the "
        "Microsoft Download Center, then run the prerequisite check again.",
    )


def check_odbc18(ctx: PrereqContext) -> Finding:
    release = target_release(ctx)
    if release < ODBC18_REQUIRED_FROM:
        return PASS
    text = _text(ctx, "odbc18_version")
    version = parse_version(text)
    needs_2503 = release >= 2503
    minimum = ODBC18_MINIMUM_2503 if needs_2503 else (18,)
    if version is not None and version >= minimum:
        return PASS
    required = (
        "Since version 2503, Configuration Manager requires ODBC Driver 18.4.1.1 for SQL Server "
        "or a later version"
        if needs_2503
        else "Since version 2303, Configuration Manager requires ODBC Driver 18 for SQL Server "
        "or a later version"
    )
    return (
        Status.FAILED,
        f"{required}. On the site server {ctx.server}, {_found(text, 'ODBC Driver 18')} "
        "(HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\MSODBCSQL18\\InstalledVersion). The update "
        f"doesn't install SQL clients for you: install {_redist(ctx, 'msodbcsql.msi')} "
        "(available for major releases only), or the latest ODBC Driver 18 for SQL Server from "
        "the Microsoft Download Center, then run the prerequisite check again.",
    )


# --- SITE_PRI: Site Upgrade Requirements ------------------------------------------------------


def check_supported_version(ctx: PrereqContext) -> Finding:
    installed_text = ctx.installed_version or (
        f"5.00.{ctx.installed_build}.1000" if ctx.installed_build else ""
    )
    installed = parse_version(installed_text)
    if installed is None:
        return (
            Status.FAILED,
            f"The installed version of Configuration Manager ({installed_text!r}) can't be read, "
            "so the update can't be checked against the versions it installs on. Check the "
            "site's version in the console (Administration > Site Configuration > Sites).",
        )
    bounds: dict[str, tuple[int, ...] | None] = {}
    for tag, text in (("MinCMVersion", ctx.min_cm_version), ("MaxCMVersion", ctx.max_cm_version)):
        if not text:
            bounds[tag] = None
            continue
        parsed = parse_version(text)
        if parsed is None:
            return (
                Status.FAILED,
                f"The update's manifest gives {tag} {text!r}, which isn't a version: the update "
                "package is damaged. Reset it with the Update Reset Tool and synchronize again.",
            )
        bounds[tag] = parsed
    low, high = bounds["MinCMVersion"], bounds["MaxCMVersion"]
    if (low is None or installed >= low) and (high is None or installed <= high):
        return PASS
    if ctx.min_cm_version and ctx.max_cm_version:
        span = f"{ctx.min_cm_version} through {ctx.max_cm_version}"
    elif ctx.min_cm_version:
        span = f"{ctx.min_cm_version} or later"
    else:
        span = f"{ctx.max_cm_version} or earlier"
    what = _what(ctx)
    head = (
        f"This site runs Configuration Manager {installed_text}, but {what} can be installed "
        f"only on sites that run version {span}."
    )
    if low is not None and installed < low:
        return (
            Status.FAILED,
            f"{head} Update the site to version {ctx.min_cm_version} or later first (each "
            "site server in the hierarchy must run the same, supported version before you can "
            "start the installation), then run the prerequisite check again.",
        )
    return (
        Status.FAILED,
        f"{head} The site already runs a later version than this update applies to: don't "
        "install it. Check for updates to get the updates for the installed version.",
    )


def check_client_communication(ctx: PrereqContext) -> Finding:
    if _text(ctx, "client_comm") in ("https", "ehttp"):
        return PASS
    fix = (
        " Switch the site's client communication to Enhanced HTTP or HTTPS (see Enable the "
        "site for HTTPS-only or enhanced HTTP in the List of prerequisite checks)."
    )
    if target_release(ctx) >= HTTP_ERROR_FROM:
        return (Status.FAILED, HTTP_TEXT + fix)
    return (
        Status.WARNING,
        "HTTPS or Enhanced HTTP are not enabled for client communication. HTTP-only "
        "communication is deprecated: starting in version 2403 this check is an error." + fix,
    )


def check_cmg_classic(ctx: PrereqContext) -> Finding:
    if not _flag(ctx, "cmg_classic"):
        return PASS
    return (
        Status.FAILED,
        f"{CMG_TEXT} A cloud management gateway deployed as a classic cloud service blocks the "
        "update: convert it to a virtual machine scale set (moving to CMGv2, Modify a cloud "
        "management gateway > Convert), then run the prerequisite check again.",
    )


def check_resource_access(ctx: PrereqContext) -> Finding:
    found: list[str] = []
    fixes: list[str] = []
    if _flag(ctx, "resource_access_profiles"):
        found.append("resource access profiles (or their deployments) exist")
    if _flag(ctx, "comanaged_ra_workload_configmgr"):
        found.append(
            "co-managed devices have the Resource Access Policies workload set toward "
            "Configuration Manager"
        )
    if found:
        fixes.append(RA_SLIDER_FIX)
    if _flag(ctx, "certificate_registration_point"):
        found.append("a certificate registration point role is installed")
        fixes.append(
            "In the console, go to Administration > Overview > Site Configuration > Servers "
            "and Site System Roles, select the site system that hosts the CRP role, and remove "
            "the role."
        )
    if not found:
        return PASS
    return (
        Status.FAILED,
        "Resource access profiles and their related features and deployments are deprecated, "
        f"and the update is blocked: {', '.join(found)}. " + " ".join(fixes),
    )


def check_replica_mp(ctx: PrereqContext) -> Finding:
    if not _flag(ctx, "mp_database_replicas"):
        return PASS
    return (
        Status.FAILED,
        "A management point of this primary site uses a database replica. Configuration "
        "Manager can't successfully update a primary site that has a database replica for "
        "management points enabled: disable database replication for management points before "
        "you install the update, and reconfigure the replicas after the site has updated.",
    )


def check_maintenance_tasks(ctx: PrereqContext) -> Finding:
    if not _flag(ctx, "maintenance_tasks_during_update"):
        return PASS
    return (
        Status.WARNING,
        "A site maintenance task is scheduled to run while the update installs. When a site "
        "database maintenance task runs during the update installation, the update installation "
        "can fail: disable database maintenance tasks that might run during the update (for "
        "example Backup Site Server, Delete Aged Client Operations, Delete Aged Discovery Data). "
        "Record each task's schedule first, and reconfigure the tasks after the update.",
    )


def check_antivirus(ctx: PrereqContext) -> Finding:
    if not _flag(ctx, "antivirus_running"):
        return PASS
    return (
        Status.WARNING,
        f"Antivirus software is running on the site server {ctx.server}. Temporarily stop it "
        "before you update the site: it can lock files that the update needs to replace, which "
        "makes the update fail.",
    )


# --- SQL ----------------------------------------------------------------------------------------


def check_sql_admin_rights(ctx: PrereqContext) -> Finding:
    if _flag(ctx, "sql_server_admin_rights"):
        return PASS
    return (
        Status.FAILED,
        f"The site server computer account ({ctx.server}) doesn't have Administrator rights on "
        f"the site database server {ctx.sql_server}. The site server computer account requires "
        "local administrative rights on the SQL Server site database server: add it to that "
        "server's local Administrators group.",
    )


def check_sql_sysadmin(ctx: PrereqContext) -> Finding:
    if _flag(ctx, "sql_sysadmin_rights"):
        return PASS
    return (
        Status.FAILED,
        f"The site server computer account ({ctx.server}) doesn't have the sysadmin role on the "
        f"SQL Server instance of the site database on {ctx.sql_server}. Grant it the sysadmin "
        "server role, then run the prerequisite check again.",
    )


def check_free_disk_sql(ctx: PrereqContext) -> Finding:
    free = _number(ctx, "free_disk_gb_sql")
    if free >= MIN_FREE_GB_SQL:
        return PASS
    return (
        Status.FAILED,
        f"The site database server {ctx.sql_server} has {free:g} GB of free disk space. The "
        f"site database upgrade needs at least {MIN_FREE_GB_SQL:g} GB free on the database "
        "drive (more for large sites: the database grows with the number of clients): free up "
        "disk space, then run the prerequisite check again.",
    )


def check_sql_pending_restart(ctx: PrereqContext) -> Finding:
    if not _flag(ctx, "sql_pending_restart"):
        return PASS
    return (
        Status.WARNING,
        f"A system restart is pending on the remote site database server {ctx.sql_server}: "
        "another program requires the server to be restarted. Restart it before you start the "
        "update.",
    )


def _sql_major(ctx: PrereqContext) -> tuple[str, int | None, str]:
    text = _text(ctx, "sql_server_version")
    version = parse_version(text)
    if version is None:
        return text, None, "SQL Server"
    major = version[0]
    name = f"SQL Server {SQL_RELEASES[major]}" if major in SQL_RELEASES else "SQL Server"
    return text, major, name


def check_sql_version(ctx: PrereqContext) -> Finding:
    text, major, name = _sql_major(ctx)
    if major is None:
        return (
            Status.FAILED,
            f"The version of SQL Server on {ctx.sql_server} couldn't be read. A supported "
            "version of SQL Server must be installed on the site database server, with its "
            "latest updates.",
        )
    if major <= 10:
        return (
            Status.FAILED,
            f"The site database runs {name} ({text}), which isn't a supported version of SQL "
            "Server for Configuration Manager. Upgrade SQL Server to a supported version and "
            "install its latest updates before you update the site.",
        )
    return PASS


def check_sql_2012_lifecycle(ctx: PrereqContext) -> Finding:
    text, major, name = _sql_major(ctx)
    if major != 11:
        return PASS
    return (
        Status.WARNING,
        f"The site database runs {name} ({text}). The support lifecycle for SQL Server 2012 "
        "ended on July 12, 2022 (see New options for SQL Server 2012 and Windows Server 2012 "
        "end of support, https://go.microsoft.com/fwlink/?linkid=2186091). Plan to upgrade the "
        "database servers in your environment, including SQL Server Express at secondary sites.",
    )


def check_ag_failover(ctx: PrereqContext) -> Finding:
    if _text(ctx, "sql_ag_failover_mode") != "automatic":
        return PASS
    return (
        Status.FAILED,
        "The site database is in a SQL Server Always On availability group set to automatic "
        "failover. Set the availability group to manual failover before you start the update "
        "installation. After the site has updated, you can restore failover to be automatic.",
    )


# --- SDK ----------------------------------------------------------------------------------------


def check_sdk_admin_rights(ctx: PrereqContext) -> Finding:
    if _flag(ctx, "sdk_server_admin_rights"):
        return PASS
    return (
        Status.FAILED,
        f"The site server computer account ({ctx.server}) doesn't have Administrator rights on "
        f"the SMS Provider server {ctx.sdk_server}, so the update can't update the SMS Provider "
        "there. Add it to that server's local Administrators group.",
    )


def check_sdk_os(ctx: PrereqContext) -> Finding:
    os_entry = _text(ctx, "sdk_server_os") or _text(ctx, "site_server_os")
    problem = _os_problem(os_entry, distribution_point=False)
    if problem is None:
        return PASS
    _, what, _ = problem
    lifecycle = f"{WS2012_TEXT} " if os_entry.endswith(("2012", "2012 R2")) else ""
    return (
        Status.FAILED,
        f"{lifecycle}The SMS Provider server {ctx.sdk_server} runs {what}. The SMS Provider "
        "needs a supported Windows Server version (Windows Server 2016 or later): upgrade the "
        "server or move the SMS Provider to a supported server before you update the site.",
    )


def check_deployment_tools(ctx: PrereqContext) -> Finding:
    if _text(ctx, "adk_version"):
        return PASS
    return (
        Status.FAILED,
        f"The Windows Deployment Tools component of the Windows ADK isn't installed on the SMS "
        f"Provider server {ctx.sdk_server}. Install a version of the Windows ADK that's "
        "supported for the Configuration Manager version you update to (see Support for the "
        "Windows ADK), with its Deployment Tools, then run the prerequisite check again.",
    )


def check_adk(ctx: PrereqContext) -> Finding:
    release = target_release(ctx)
    minimum = next(v for since, v in ADK_MINIMUM if release >= since)
    text = _text(ctx, "adk_version")
    version = parse_version(text)
    if version is None or version >= minimum:  # not installed: Windows Deployment Tools fails
        return PASS
    return (
        Status.WARNING,
        f"The SMS Provider server {ctx.sdk_server} has Windows ADK {text}, which isn't "
        "supported for the Configuration Manager version you update to (cmlab accepts "
        f"{_shown(minimum)} or later). The version of the Windows ADK should be supported for "
        "this version (see Support for the Windows ADK). Update the Windows ADK before you "
        "begin the update, so the default boot images are automatically updated to the latest "
        "version of Windows PE. Manually update any custom boot images after updating the site.",
    )


def check_custom_sdk_solutions(ctx: PrereqContext) -> Finding:
    if not _flag(ctx, "custom_sdk_solutions"):
        return PASS
    return (
        Status.WARNING,
        "Custom solutions based on the Configuration Manager SDK or PowerShell are enabled "
        "against this SMS Provider. Disable this code before you update the site, and test it "
        "with the new version in a lab environment before you enable it again.",
    )


# --- the table ----------------------------------------------------------------------------------

AP, SR, DC, SUR = (
    "Access Permissions",
    "System Requirements",
    "Dependent Components",
    "Site Upgrade Requirements",
)


def _remote_sql(ctx: PrereqContext) -> bool:
    return ctx.sql_server.lower() != ctx.server.lower()


RULES: tuple[Rule, ...] = (
    Rule(
        "Administrative rights on site system",
        "SITE_PRI",
        AP,
        ("site_server_admin_rights",),
        f"{LIST}; {EXAMPLE_2007} (site system permissions)",
        check_site_admin_rights,
    ),
    Rule(
        "Windows Server 2012/R2 lifecycle",
        "SITE_PRI",
        SR,
        ("site_server_os", "site_system_os", "distribution_point_os"),
        f"{GUIDE_BLOCKING}: Site system server runs on Windows Server 2012 or 2012 R2; {LIST}",
        check_windows_server_2012,
    ),
    Rule(
        "Free disk space on site server",
        "SITE_PRI",
        SR,
        ("free_disk_gb_site_server",),
        f"{LIST} (15 GB); {EXAMPLE_2007} (adequate disk space)",
        check_free_disk_site_server,
    ),
    Rule(
        "Pending system restart",
        "SITE_PRI",
        SR,
        ("pending_restart",),
        f"{LIST} (error); {EXAMPLE_2007} (no files flagged as pending restart); {CHECKLIST} "
        "(restart after critical Windows updates and .NET)",
        check_pending_restart,
    ),
    Rule(
        "Required version of Microsoft .NET Framework",
        "SITE_PRI",
        DC,
        ("dotnet_version",),
        f"{CHECKLIST}: Review Microsoft .NET versions; {LIST}",
        check_dotnet_minimum,
    ),
    Rule(
        "Recommended version of Microsoft .NET Framework",
        "SITE_PRI",
        DC,
        ("dotnet_version",),
        f"{CHECKLIST}: Review Microsoft .NET versions (4.8 if possible); {LIST}",
        check_dotnet_recommended,
    ),
    Rule(
        "SQL Server Native Client",
        "SITE_PRI",
        DC,
        ("sqlncli_version",),
        f"{GUIDE_SQL}; {CHECKLIST}: Review SQL Server Native Client version",
        check_sqlncli,
    ),
    Rule(
        "SQL ODBC driver for SQL Server",
        "SITE_PRI",
        DC,
        ("odbc18_version",),
        f"{GUIDE_SQL}; {CHECKLIST}: Review SQL ODBC driver for CM",
        check_odbc18,
    ),
    Rule(
        "Unsupported upgrade path",
        "SITE_PRI",
        SUR,
        (),
        f"{CHECKLIST}: All sites run a supported version of Configuration Manager; the "
        "manifest's MinCMVersion and MaxCMVersion",
        check_supported_version,
    ),
    Rule(
        "Enable site system roles for HTTPS or Enhanced HTTP",
        "SITE_PRI",
        SUR,
        ("client_comm",),
        f"{GUIDE_BLOCKING}: Only enhanced HTTP or HTTPS communication is allowed; {LIST}",
        check_client_communication,
    ),
    Rule(
        "Check for a cloud management gateway (CMG) as a cloud service (classic)",
        "SITE_PRI",
        SUR,
        ("cmg_classic",),
        f"{GUIDE_BLOCKING}: Deprecated features: Cloud Management Gateway (CMG) as a classic "
        "cloud service",
        check_cmg_classic,
    ),
    Rule(
        "Resource access policies are no longer supported",
        "SITE_PRI",
        SUR,
        (
            "resource_access_profiles",
            "comanaged_ra_workload_configmgr",
            "certificate_registration_point",
        ),
        f"{GUIDE_BLOCKING}: Deprecated features: Resource access profiles or the certificate "
        f"registration point role; {LIST}",
        check_resource_access,
    ),
    Rule(
        "Active replica MP",
        "SITE_PRI",
        SUR,
        ("mp_database_replicas",),
        f"{CHECKLIST}: Disable database replicas for management points at primary sites; "
        f"{LIST} (error, primary site)",
        check_replica_mp,
        site_roles=frozenset({"primary"}),
    ),
    Rule(
        "Site maintenance tasks scheduled during the update",
        "SITE_PRI",
        SUR,
        ("maintenance_tasks_during_update",),
        f"{CHECKLIST}: Disable site maintenance tasks at each site",
        check_maintenance_tasks,
    ),
    Rule(
        "Antivirus software on the site server",
        "SITE_PRI",
        SUR,
        ("antivirus_running",),
        f"{CHECKLIST}: Temporarily stop any antivirus software",
        check_antivirus,
    ),
    Rule(
        "Site server computer account administrative rights",
        "SQL",
        AP,
        ("sql_server_admin_rights",),
        f"{EXAMPLE_2007} (the primary site server computer account requires local "
        f"administrative rights on SQL Server site database servers); {LIST}",
        check_sql_admin_rights,
    ),
    Rule(
        "SQL Server sysadmin rights",
        "SQL",
        AP,
        ("sql_sysadmin_rights",),
        f"{LIST}; {EXAMPLE_2007} (configure SQL Server properly to host the site database)",
        check_sql_sysadmin,
    ),
    Rule(
        "Free disk space on site database server",
        "SQL",
        SR,
        ("free_disk_gb_sql",),
        f"{EXAMPLE_2007} (disk space for the site database upgrade); 5 GB is {CMLAB}",
        check_free_disk_sql,
    ),
    Rule(
        "Pending system restart on the remote SQL Server",
        "SQL",
        SR,
        ("sql_pending_restart",),
        f"{LIST} (warning, remote SQL Server only); {EXAMPLE_2007} (restart site systems)",
        check_sql_pending_restart,
        when=_remote_sql,
    ),
    Rule(
        "SQL Server version",
        "SQL",
        DC,
        ("sql_server_version",),
        f"{LIST}; {EXAMPLE_2007} (supported SQL Server with its latest updates)",
        check_sql_version,
    ),
    Rule(
        "SQL Server 2012 lifecycle",
        "SQL",
        DC,
        ("sql_server_version",),
        f"{LIST} (warning); {GUIDE_BLOCKING} (the SQL Server 2012 end of support link)",
        check_sql_2012_lifecycle,
    ),
    Rule(
        "SQL Server Always On availability group configured for manual failover",
        "SQL",
        SUR,
        ("sql_ag_failover_mode",),
        f"{CHECKLIST}: Set SQL Server Always On availability groups to manual failover; "
        f"{LIST} (error)",
        check_ag_failover,
    ),
    Rule(
        "Site server computer account administrative rights",
        "SDK",
        AP,
        ("sdk_server_admin_rights",),
        f"{EXAMPLE_2007} (site server computer account permissions)",
        check_sdk_admin_rights,
    ),
    Rule(
        "Supported operating system for the SMS Provider",
        "SDK",
        SR,
        ("sdk_server_os", "site_server_os"),
        f"{GUIDE_BLOCKING}: Windows Server 2012 or 2012 R2; {EXAMPLE_2007} (supported OS)",
        check_sdk_os,
    ),
    Rule(
        "Windows Deployment Tools installed",
        "SDK",
        DC,
        ("adk_version",),
        f"{LIST} (error, SMS Provider); {CHECKLIST}: Review the version of the Windows ADK",
        check_deployment_tools,
    ),
    Rule(
        "Supported version of the Windows ADK",
        "SDK",
        DC,
        ("adk_version",),
        f"{CHECKLIST}: Review the version of the Windows ADK (version table: {CMLAB})",
        check_adk,
    ),
    Rule(
        "Custom solutions based on the Configuration Manager SDK",
        "SDK",
        SUR,
        ("custom_sdk_solutions",),
        f"{CHECKLIST}: Disable any custom solutions",
        check_custom_sdk_solutions,
    ),
)
