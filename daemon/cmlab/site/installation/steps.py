"""The install.map actions this lab knows, in the order the sample update runs them, and the
function that runs each (docs/installation.md, "The steps").

The table is data: SiteInstaller.run_step looks the action up here, and ACTIONS (what an
unknown action's error lists) is its keys. A new action is one row and one function.
"""

from __future__ import annotations

from collections.abc import Callable

from cmlab.site.formats.install_map import InstallStep
from cmlab.site.installation import file_steps, scripts, server_steps
from cmlab.site.installation.session import InstallSession

__all__ = ["ACTIONS", "STEPS", "StepHandler"]

StepHandler = Callable[[InstallSession, InstallStep], None]

STEPS: dict[str, StepHandler] = {
    "RUN_PREUPGRADE_SCRIPTS": scripts.run_preupgrade_scripts,
    "SSB_OFF": server_steps.ssb_off,
    "STOP_SERVICES": server_steps.stop_services,
    "UNLOAD_WMI": server_steps.unload_wmi,
    "DELETE_DBMON_TRIGGERS": server_steps.delete_dbmon_triggers,
    "SAVE_SITE_CONTROL": file_steps.save_site_control,
    "UPGRADE_DATABASE": server_steps.upgrade_database,
    "UPDATE_SQL_REGISTRY": server_steps.update_sql_registry,
    "UPDATE_RCM_REGISTRY": server_steps.update_rcm_registry,
    "INSTALL_FILES": file_steps.install_files,
    "UPDATE_SITE_CONTROL": file_steps.update_site_control,
    "CONFIGURE_SSB": server_steps.configure_ssb,
    "INSTALL_SERVICES": server_steps.install_services,
    "UPDATE_SITE_TABLE": server_steps.update_site_table,
    "UPDATE_ADMIN_CONSOLE": file_steps.update_admin_console,
    "SSB_ON": server_steps.ssb_on,
}
ACTIONS = tuple(STEPS)
