"""The emulated environment the prerequisite checker reads: site.toml `[facts]`.

Every key a rule reads is in `DEFAULT_FACTS`, with a value that passes every rule (a healthy
2503 site, build 9135, everything on one Windows Server 2022 machine). The caller merges the
site's `[facts]` over these defaults and calls `validate_facts` before running the checks.
Values are flat (str, int, float, bool, list of str) because site.toml is written by
`cmlab.site.config.render_toml`. docs/prereq.md has the table of keys, rules and failure conditions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cmlab.core.errors import PrereqError

DEFAULT_FACTS: dict[str, object] = {
    # Servers (site.toml names; "" = the site server itself)
    "sql_server": "",
    "sdk_server": "",
    # Operating systems
    "site_server_os": "Windows Server 2022",
    "site_system_os": ["Windows Server 2022"],
    "distribution_point_os": ["Windows Server 2022"],
    "sdk_server_os": "",
    # Access permissions
    "site_server_admin_rights": True,
    "sql_server_admin_rights": True,
    "sql_sysadmin_rights": True,
    "sdk_server_admin_rights": True,
    # System requirements
    "free_disk_gb_site_server": 120.0,
    "free_disk_gb_sql": 120.0,
    "pending_restart": False,
    "sql_pending_restart": False,
    # Dependent components (installed versions; "" = not installed)
    "dotnet_version": "4.8",
    "adk_version": "10.1.26100.1",
    "sqlncli_version": "11.4.7001.0",
    "odbc18_version": "18.4.1.1",
    "sql_server_version": "16.0.1000.6",
    # Site configuration
    "client_comm": "ehttp",
    "cmg_classic": False,
    "resource_access_profiles": False,
    "certificate_registration_point": False,
    "comanaged_ra_workload_configmgr": False,
    "mp_database_replicas": False,
    "sql_ag_failover_mode": "",
    "maintenance_tasks_during_update": False,
    "antivirus_running": False,
    "custom_sdk_solutions": False,
}

FACT_DOCS: dict[str, str] = {
    "sql_server": "FQDN of the site database server (SQL); '' = the site server",
    "sdk_server": "FQDN of the SMS Provider (SDK) server; '' = the site server",
    "site_server_os": "OS of the site server (Win32_OperatingSystem Caption), e.g. "
    "'Windows Server 2022'",
    "site_system_os": "OS of each remote site system server other than distribution points, "
    "'Windows Server 2019' or 'mp01.contoso.com=Windows Server 2019'",
    "distribution_point_os": "OS of each distribution point, same form as site_system_os "
    "(Windows 10/11 allowed)",
    "sdk_server_os": "OS of the SMS Provider server; '' = same as site_server_os",
    "site_server_admin_rights": "the account that runs the update (the site server's Local "
    "System) is in the site server's local Administrators group",
    "sql_server_admin_rights": "the site server computer account (DOMAIN\\SITESERVER$) is a "
    "local administrator of the site database server",
    "sql_sysadmin_rights": "the site server computer account has the sysadmin role on the "
    "site database's SQL Server instance",
    "sdk_server_admin_rights": "the site server computer account is a local administrator of "
    "the SMS Provider server",
    "free_disk_gb_site_server": "free space (GB) on the site server's installation drive",
    "free_disk_gb_sql": "free space (GB) on the site database server's database drive",
    "pending_restart": "a restart is pending on the site server (PendingFileRenameOperations, "
    "Component Based Servicing\\RebootPending)",
    "sql_pending_restart": "a restart is pending on the remote site database server (ignored "
    "when SQL Server is on the site server)",
    "dotnet_version": "Microsoft .NET Framework on the site server (HKLM\\SOFTWARE\\Microsoft"
    "\\NET Framework Setup\\NDP\\v4\\Full, as a version); '' = not installed",
    "adk_version": "Windows ADK (Deployment Tools) on the SMS Provider server, e.g. "
    "'10.1.26100.1'; '' = not installed",
    "sqlncli_version": "HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\SQLNCLI11\\InstalledVersion "
    "on the site server; '' = not installed",
    "odbc18_version": "HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\MSODBCSQL18\\InstalledVersion "
    "on the site server; '' = not installed",
    "sql_server_version": "SERVERPROPERTY('ProductVersion') of the site database's SQL Server, "
    "e.g. '16.0.1000.6' (SQL Server 2022); '' = unknown",
    "client_comm": "site client communication: 'https' (HTTPS only), 'ehttp' (HTTPS or HTTP "
    "with enhanced HTTP) or 'http' (HTTP only, deprecated)",
    "cmg_classic": "a cloud management gateway is deployed as a cloud service (classic)",
    "resource_access_profiles": "resource access profiles (VPN, Wi-Fi, email, certificate) or "
    "their deployments exist",
    "certificate_registration_point": "a certificate registration point role is installed",
    "comanaged_ra_workload_configmgr": "co-managed devices have the Resource access policies "
    "workload set to Configuration Manager",
    "mp_database_replicas": "a management point of this primary site uses a database replica",
    "sql_ag_failover_mode": "failover mode of the site database's Always On availability group: "
    "'manual', 'automatic', or '' (no availability group)",
    "maintenance_tasks_during_update": "a site database maintenance task (Backup Site Server, "
    "Delete Aged ...) is enabled and scheduled to run while the update installs",
    "antivirus_running": "antivirus software scans the site server's installation folders",
    "custom_sdk_solutions": "custom solutions based on the Configuration Manager SDK or "
    "PowerShell are enabled against the SMS Provider",
}

MAX_TEXT = 255  # long enough for any FQDN or version; keeps int() away from huge digit strings
MAX_LIST = 1000
MAX_GB = 1e9  # a petabyte: anything larger is a typo (and float() of a huge int overflows)

_VERSION_RE = re.compile(r"^\d{1,9}(?:\.\d{1,9}){0,5}$")
_SERVER_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,253})$")
OS_RE = re.compile(
    r"^(?:(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]{0,253})=)?"
    r"Windows (?:Server (?P<year>\d{4})(?P<r2> R2)?|(?P<client>10|11))$"
)


@dataclass(frozen=True)
class _Kind:
    what: str  # how the error message describes a valid value
    choices: tuple[str, ...] = ()


_BOOL = _Kind("true or false")
_GB = _Kind("a number of GB from 0 to 1e9")
_VERSION = _Kind("a dotted version like 11.4.7001.0, or '' for not installed")
_SERVER = _Kind("an FQDN like sql01.contoso.com, or '' for the site server")
_OS = _Kind("an OS like 'Windows Server 2022' (optionally 'NAME=Windows Server 2022')")
_OS_OR_EMPTY = _Kind("an OS like 'Windows Server 2022', or '' for the site server's")
_OS_LIST = _Kind("a list of OS strings like ['Windows Server 2022', 'dp1=Windows Server 2016']")

KINDS: dict[str, _Kind] = {
    "sql_server": _SERVER,
    "sdk_server": _SERVER,
    "site_server_os": _OS,
    "site_system_os": _OS_LIST,
    "distribution_point_os": _OS_LIST,
    "sdk_server_os": _OS_OR_EMPTY,
    "site_server_admin_rights": _BOOL,
    "sql_server_admin_rights": _BOOL,
    "sql_sysadmin_rights": _BOOL,
    "sdk_server_admin_rights": _BOOL,
    "free_disk_gb_site_server": _GB,
    "free_disk_gb_sql": _GB,
    "pending_restart": _BOOL,
    "sql_pending_restart": _BOOL,
    "dotnet_version": _VERSION,
    "adk_version": _VERSION,
    "sqlncli_version": _VERSION,
    "odbc18_version": _VERSION,
    "sql_server_version": _VERSION,
    "client_comm": _Kind("one of", ("https", "ehttp", "http")),
    "cmg_classic": _BOOL,
    "resource_access_profiles": _BOOL,
    "certificate_registration_point": _BOOL,
    "comanaged_ra_workload_configmgr": _BOOL,
    "mp_database_replicas": _BOOL,
    "sql_ag_failover_mode": _Kind("one of", ("manual", "automatic", "")),
    "maintenance_tasks_during_update": _BOOL,
    "antivirus_running": _BOOL,
    "custom_sdk_solutions": _BOOL,
}


def parse_version(text: str) -> tuple[int, ...] | None:
    """'11.4.7001.0' -> (11, 4, 7001), trailing zeros dropped so 4.8 == 4.8.0; None if not one."""
    if not isinstance(text, str) or not _VERSION_RE.match(text):
        return None
    parts = [int(p) for p in text.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _ok_os(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_TEXT and OS_RE.match(value) is not None


def _check(key: str, kind: _Kind, value: object) -> None:
    def bad() -> PrereqError:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        expected = kind.what
        if kind.choices:
            expected = "one of " + ", ".join(repr(c) for c in kind.choices)
        return PrereqError(f"facts.{key} = {shown}: must be {expected}")

    if kind is _BOOL:
        if not isinstance(value, bool):
            raise bad()
    elif kind is _GB:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        if isinstance(value, float) and not math.isfinite(value):
            raise bad()
        if not 0 <= value <= MAX_GB:
            raise bad()
    elif kind is _VERSION:
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise bad()
        if value and parse_version(value) is None:
            raise bad()
    elif kind is _SERVER:
        if not isinstance(value, str) or (value and not _SERVER_RE.match(value)):
            raise bad()
    elif kind is _OS:
        if not _ok_os(value):
            raise bad()
    elif kind is _OS_OR_EMPTY:
        if value != "" and not _ok_os(value):
            raise bad()
    elif kind is _OS_LIST:
        if not isinstance(value, list | tuple) or len(value) > MAX_LIST:
            raise bad()
        for item in value:
            if not _ok_os(item):
                raise bad()
    elif kind.choices and (not isinstance(value, str) or value not in kind.choices):
        raise bad()


def validate_facts(facts: Mapping[str, object]) -> None:
    """Raise PrereqError naming the first key with a wrong type or format; unknown keys pass."""
    if not isinstance(facts, Mapping):
        raise PrereqError(f"facts must be a table, not {type(facts).__name__}")
    for key, kind in KINDS.items():
        if key in facts:
            _check(key, kind, facts[key])
