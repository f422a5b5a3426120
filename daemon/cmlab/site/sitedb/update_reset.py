"""The Update Reset Tool's rows (`cmlab reset`, CMUpdateReset.exe; docs/reset.md): what the
database holds of one update package, and deleting it so the next synchronization starts the
package over. The tool decides in `cmlab.admin.reset`; it reads and deletes here, in one
transaction of its own, so no component moves the package on in between.

StateMessages stay: they are history."""

from __future__ import annotations

import sqlite3

__all__ = [
    "ALL_TABLES",
    "GUID_TABLES",
    "NOTIFICATION_EXTENSIONS",
    "delete_package_rows",
    "has_leftovers",
    "package_row",
    "site_states",
]

# Deleted by PackageGuid, in this order (SMSPackages and EasySetupSettings come first, as
# SMSPackages is found through EasySetupSettings.PackageID).
GUID_TABLES = (
    "CM_UpdatePackagesToDownload",
    "CM_UpdatePackageSiteStatus",
    "CM_UpdatePackage_MonitoringStatus",
    "CM_UpdatePackagePrereqStatus",
    "CM_UpdatePackages",
)
ALL_TABLES = ("SMSPackages", "EasySetupSettings", "TableChangeNotifications", *GUID_TABLES)

# Drop files SMSDBMon has not written yet that would wake a component for this package.
NOTIFICATION_EXTENSIONS = (".DMP", ".CME", ".CMU", ".CMI")


def _marks(values: list[str]) -> str:
    return ", ".join("?" for _ in values)


def _notification_names(guid: str) -> list[str]:
    return [guid.upper() + ext for ext in NOTIFICATION_EXTENSIONS]


def package_row(conn: sqlite3.Connection, guid: str) -> tuple[str, str, int] | None:
    """(PackageGuid, Name, State) of the package's CM_UpdatePackages row."""
    row = conn.execute(
        "SELECT PackageGuid, Name, State FROM CM_UpdatePackages WHERE PackageGuid = ?", (guid,)
    ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]), int(row[2]))


def site_states(conn: sqlite3.Connection, guid: str) -> list[tuple[int, str]]:
    """(State, SiteCode) of each of the package's CM_UpdatePackageSiteStatus rows ("" for a
    site ServerData does not know)."""
    return [
        (int(state), str(code or ""))
        for state, code in conn.execute(
            "SELECT s.State, d.SiteCode FROM CM_UpdatePackageSiteStatus s "
            "LEFT JOIN ServerData d ON d.ID = s.SiteNumber WHERE s.PackageGuid = ?",
            (guid,),
        )
    ]


def has_leftovers(conn: sqlite3.Connection, guid: str) -> bool:
    """Rows of the package other than its CM_UpdatePackages and site status rows, or a
    notification for it SMSDBMon has not handled: the leftovers of an interrupted reset."""
    for table in ("EasySetupSettings", *GUID_TABLES):
        if conn.execute(f"SELECT 1 FROM {table} WHERE PackageGuid = ? LIMIT 1", (guid,)).fetchone():
            return True
    names = _notification_names(guid)
    return bool(
        conn.execute(
            f"SELECT 1 FROM TableChangeNotifications WHERE upper(FileName) IN ({_marks(names)})",
            names,
        ).fetchone()
    )


def delete_package_rows(conn: sqlite3.Connection, guid: str) -> dict[str, int]:
    """Delete the package's rows from ALL_TABLES; returns how many went from each."""
    rows: dict[str, int] = {}
    rows["SMSPackages"] = conn.execute(
        "DELETE FROM SMSPackages WHERE PkgID IN "
        "(SELECT PackageID FROM EasySetupSettings WHERE PackageGuid = ?)",
        (guid,),
    ).rowcount
    rows["EasySetupSettings"] = conn.execute(
        "DELETE FROM EasySetupSettings WHERE PackageGuid = ?", (guid,)
    ).rowcount
    names = _notification_names(guid)
    rows["TableChangeNotifications"] = conn.execute(
        f"DELETE FROM TableChangeNotifications WHERE upper(FileName) IN ({_marks(names)})",
        names,
    ).rowcount
    for table in GUID_TABLES:
        rows[table] = conn.execute(f"DELETE FROM {table} WHERE PackageGuid = ?", (guid,)).rowcount
    return rows
