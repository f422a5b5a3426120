"""The emulated site server's installation and the guide's 16 install steps ("Investigate the
Installation stage", process step 3), as a library CMUpdate calls once per install.map step.

Why it exists: the Installation stage is only worth learning from if the site really changes.
So the emulated site has an installation folder (`SITE/bin/x64`, `SITE/AdminConsole/bin`)
whose sample binaries carry their build number, a site control file
(`SITE/inboxes/sitectrl.box/sitectrl.ct0`), and, in the site database, the state a real
site server keeps elsewhere: SQL Server Service Broker and WMI (`SiteServerSettings`), the
Windows services (`SiteServices`) and the registry (`SiteRegistry`). Each install step makes
the change its title names, where a trainee can see it (docs/installation.md).

Why it is shaped like this:
- One step per call, each idempotent: CMUpdate reports an INSTALL_* state per step and, after
  a crash, simply runs the step it was in again. Nothing here keeps state in memory; every
  decision is taken from what is on disk and in the database.
- Backups before the first change, kept until `finish()`: `CMUStaging/<GUID>.backup/` holds
  the database state taken before step 1 (`state.json`) and a copy of every file a step
  replaces, made before that file changes (first copy wins, so a re-run never backs up a
  half-updated site). `rollback()` works from that folder alone, so it also works after a
  crash, and leaves the site at its old version and working.
- A file is installed by copying it next to its destination under a temporary name, hashing
  the bytes as they are copied, and renaming it into place only when every file of the step
  matches update.map: a tampered payload never changes the installation folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmlab.commands.payload import MAP_ROOT, InstallStep, sample_binary, sample_build_number
from cmlab.core.errors import CabPathError, CmlabError, WorkFailed
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import (
    READ,
    WRITE_NEW,
    copy_hashing,
    fsync_dir,
    make_tmp_dir,
    open_nofollow,
    remove_path,
    remove_stale_tmp,
    tmp_name_for,
    write_atomic,
)
from cmlab.core.hashing import EMPTY_SHA256, sha256_bytes, sha256_fd
from cmlab.site.cab import ExtractLimits, extract_cab, normalize_member_name
from cmlab.site.formats.site_control import (
    render_site_control,
    set_site_control_properties,
    site_control_properties,
)
from cmlab.site.formats.update_map import UpdateMap
from cmlab.site.sitedb import connect, migrate, site_server, split_statements, transaction, triggers
from cmlab.site.trust import TrustStore, verify_cab

__all__ = [
    "ACTIONS",
    "CONSOLE_DIR",
    "CONSOLE_EXE",
    "CONSOLE_SIZE",
    "INSTALL_DIR",
    "RCM_KEY",
    "SETUP_KEY",
    "SITE_CONTROL",
    "SQL_KEY",
    "InstallContext",
    "InstallStepError",
    "SiteInstaller",
    "backup_dir_for",
    "installed_build",
    "safe_dir",
    "seed_site_state",
]

INSTALL_DIR = ("bin", "x64")
CONSOLE_DIR = ("AdminConsole", "bin")
CONSOLE_EXE = "Microsoft.ConfigurationManagement.exe"
CONSOLE_SIZE = 8192
CONSOLE_COMPONENT = "ADMIN_CONSOLE"  # an update.map component that ships console files
SITE_CONTROL = ("inboxes", "sitectrl.box", "sitectrl.ct0")

SETUP_KEY = r"HKLM\SOFTWARE\Microsoft\SMS\Setup"
SQL_KEY = r"HKLM\SOFTWARE\Microsoft\SMS\SQL Server"
RCM_KEY = r"HKLM\SOFTWARE\Microsoft\SMS\Components\SMS_REPLICATION_CONFIGURATION_MONITOR"
_REGISTRY_KEYS = (SETUP_KEY, SQL_KEY, RCM_KEY)

RUNNING = "Running"
STOPPED = "Stopped"
SERVICE_BROKER_PORT = "4022"
# CONFIGURATION_MANAGER_UPDATE is seeded too but not in install.map's list: CMUpdate runs the
# installation, so it keeps running while the site's services are stopped.
DEFAULT_SERVICES = ("SMS_EXECUTIVE", "SMS_SITE_COMPONENT_MANAGER", "CONFIGURATION_MANAGER_UPDATE")

ACTIONS = (
    "RUN_PREUPGRADE_SCRIPTS",
    "SSB_OFF",
    "STOP_SERVICES",
    "UNLOAD_WMI",
    "DELETE_DBMON_TRIGGERS",
    "SAVE_SITE_CONTROL",
    "UPGRADE_DATABASE",
    "UPDATE_SQL_REGISTRY",
    "UPDATE_RCM_REGISTRY",
    "INSTALL_FILES",
    "UPDATE_SITE_CONTROL",
    "CONFIGURE_SSB",
    "INSTALL_SERVICES",
    "UPDATE_SITE_TABLE",
    "UPDATE_ADMIN_CONSOLE",
    "SSB_ON",
)

# The pre-upgrade scripts CAB holds a few SQL files; refuse anything absurd.
_SCRIPTS_LIMITS = ExtractLimits(
    max_files=1000, max_file_size=16 * 1024 * 1024, max_total_size=64 * 1024 * 1024
)
_MAX_SCRIPTS_CAB = 64 * 1024 * 1024
# The scripts run inside one transaction of ours: one that ends it would break "all or none".
_TX_CONTROL = re.compile(r"^\s*(BEGIN|COMMIT|END|ROLLBACK|SAVEPOINT|RELEASE)\b", re.IGNORECASE)
_SERVICE_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_VERSION_RE = re.compile(r"^\d+\.\d+\.(\d+)\.\d+$")


class InstallStepError(WorkFailed):
    """An install step that failed; the message says what, and how to fix it. `step` is the
    install.map step (None when the failure is not tied to one, e.g. in finish())."""

    def __init__(self, message: str, *, step: InstallStep | None = None) -> None:
        prefix = f"install step {step.id} ({step.action}) failed: " if step else ""
        super().__init__(prefix + message)
        self.step = step


@dataclass(frozen=True)
class InstallContext:
    site_root: Path
    staging: Path  # CMUStaging/<GUID>, placeholders already replaced (redistmedia.check_media)
    db_file: Path
    site_code: str
    guid: str
    target_build: int  # e.g. 9141
    target_version: str  # e.g. "5.00.9141.1000"
    update_map: UpdateMap
    trust: TrustStore  # to verify ConfigMgr.AutoUpgradeScripts.cab
    say: Callable[[str], None]
    show: Callable[[Path], str]


def backup_dir_for(staging: Path) -> Path:
    """`CMUStaging/<GUID>.backup`: beside the staging folder, not in it, so the staging
    folder's hash is not changed by the backups."""
    staging = Path(staging)
    return staging.with_name(staging.name + ".backup")


# ---------------------------------------------------------------------------------------
# Files, never through a link


def _parts(rel: str, what: str) -> list[str]:
    """A relative path (`\\` or `/`) as safe components; InstallStepError if it could escape."""
    if not rel:
        return []
    try:
        return normalize_member_name(rel).split("/")
    except CabPathError as exc:
        raise InstallStepError(f"{what}: {exc}") from None


def safe_dir(root: Path, parts: Sequence[str], show: Callable[[Path], str]) -> Path:
    """root/parts..., created if missing; InstallStepError if a component is a link or a file.

    The site's folders are the lab's to break: a link planted in them is refused, never
    followed, so an install cannot be tricked into writing outside the site."""
    found = _walk_dir(root, parts, show, create=True)
    assert found is not None
    return found


def _existing_dir(root: Path, parts: Sequence[str], show: Callable[[Path], str]) -> Path | None:
    """As _safe_dir, but None when a component is missing (nothing is created)."""
    return _walk_dir(root, parts, show, create=False)


def _walk_dir(
    root: Path, parts: Sequence[str], show: Callable[[Path], str], *, create: bool
) -> Path | None:
    path = Path(root)
    for part in ["", *parts]:
        path = path / part if part else path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(path, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise InstallStepError(
                f"{show(path)} is a symbolic link; cmlab never follows links in the site's "
                "folders. Replace it with a real folder and run the step again."
            )
        if not stat.S_ISDIR(st.st_mode):
            raise InstallStepError(f"{show(path)} is not a folder; move it away and retry.")
    return path


def _open_read(path: Path, show: Callable[[Path], str]) -> int | None:
    """A read descriptor of the regular file `path`; None if it does not exist."""
    try:
        fd = open_nofollow(path, READ)  # READ: a planted FIFO must not hang the install
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            raise InstallStepError(
                f"{show(path)} is a symbolic link; cmlab never follows links. Replace it with "
                "the real file (or delete it) and run the step again."
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InstallStepError(f"{show(path)} is not a regular file; move it away and retry.")
    return fd


def _file_hash(path: Path, show: Callable[[Path], str]) -> str | None:
    fd = _open_read(path, show)
    if fd is None:
        return None
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def _copy_to_tmp(src_fd: int, dst: Path, kind: str, limit: int | None = None) -> tuple[Path, str]:
    """Copy `src_fd` to a new temporary sibling of `dst` (fsynced) and return it with the
    SHA-256 of everything read. At most `limit` bytes are written: a longer source cannot be
    the expected file and must not fill the disk."""
    tmp = tmp_name_for(dst, kind)
    out = open_nofollow(tmp, WRITE_NEW)
    try:
        sha256, _ = copy_hashing(src_fd, out, limit, hash_all=True, fsync=True)
    except BaseException:
        os.close(out)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(out)
    return tmp, sha256


def _sweep(folder: Path) -> None:
    """Remove the temporaries of a killed run (cmlab.core.fs naming, dead writer's pid)."""
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(os.lstat(folder).st_mode):
            remove_stale_tmp(folder)


def _drop_tree(path: Path) -> bool:
    """Remove a folder so that a crash never leaves half of it under its real name: renamed
    to a temporary name first (swept later if the removal is cut short)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    gone = tmp_name_for(path, "drop")
    os.rename(path, gone)
    fsync_dir(path.parent)
    remove_path(gone)
    return True


# ---------------------------------------------------------------------------------------
# The emulated site server's state in the database


def _local_site(conn: sqlite3.Connection, site_code: str) -> site_server.SiteVersion:
    site = site_server.local_site(conn, site_code)
    if site is None:
        raise InstallStepError(
            f"the site database has no Sites row for site {site_code}; is this the right site?"
        )
    return site


def seed_site_state(conn: sqlite3.Connection, site_code: str) -> None:
    """The rows of a working site (Service Broker ON, WMI loaded, services running, registry
    from the Sites row), where missing: INSERT OR IGNORE, inside the caller's transaction.
    So a site database made before these tables existed works the same."""
    version, full_version, build = _local_site(conn, site_code)
    server, folder = site_server.server_and_folder(conn, site_code)
    db_name = site_server.database_name(conn)
    settings = {
        "ServiceBroker": "ON",
        "ServiceBrokerPort": SERVICE_BROKER_PORT,
        "ServiceBrokerConfiguredBuild": str(build),
        "WMIProviders": "Loaded",
        "DatabaseVersion": version,
    }
    registry = [
        (SETUP_KEY, "Full Version", full_version),
        (SETUP_KEY, "Build Number", str(build)),
        (SETUP_KEY, "Installation Directory", folder),
        (SQL_KEY, "Database Name", db_name),
        (SQL_KEY, "Server", server),
        (SQL_KEY, "Service Broker Port", SERVICE_BROKER_PORT),
        (SQL_KEY, "Database Version", version),
        (RCM_KEY, "Full Version", full_version),
        (RCM_KEY, "Build Number", str(build)),
    ]
    site_server.seed_site_server(
        conn,
        settings=settings,
        services=[(name, RUNNING, build) for name in DEFAULT_SERVICES],
        registry=registry,
    )


def _was(old: str | None, new: str) -> str:
    return "unchanged" if old == new else f"was {old}"


def _snapshot(conn: sqlite3.Connection, site_code: str) -> dict[str, Any]:
    """What rollback() restores in the database, as JSON-able data."""
    version, full_version, build = _local_site(conn, site_code)
    return {
        "site_code": site_code,
        "sites": {"Version": version, "FullVersion": full_version, "BuildNumber": build},
        "registry": site_server.registry_rows(conn),
        "settings": site_server.settings(conn),
        "services": site_server.service_builds(conn),
    }


def installed_build(site_root: Path) -> int:
    """The build of the site's installed binaries: the header of `bin/x64/smsexec.exe`. Not
    cmupdate.exe: CMUpdate upgrades itself before the install steps, and stays upgraded when
    they fail and are rolled back."""
    path = Path(site_root).joinpath(*INSTALL_DIR, "smsexec.exe")
    try:
        return sample_build_number(path)
    except OSError as exc:
        raise CmlabError(f"cannot read the installed build from {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------
# The installer


@dataclass(frozen=True)
class _FileJob:
    parts: tuple[str, ...]  # folder below SMSSetup (staging) and below the site root
    name: str
    expected: str
    size: int


class SiteInstaller:
    """Runs install.map's steps on the emulated site; see the module docstring."""

    def __init__(self, ctx: InstallContext) -> None:
        self.ctx = ctx
        self.code = ctx.site_code.upper()
        self.root = Path(ctx.site_root)
        self.staging = Path(ctx.staging)
        self.backup = backup_dir_for(self.staging)
        self._actions: dict[str, Callable[[InstallStep], None]] = {
            "RUN_PREUPGRADE_SCRIPTS": self._run_preupgrade_scripts,
            "SSB_OFF": self._ssb_off,
            "STOP_SERVICES": self._stop_services,
            "UNLOAD_WMI": self._unload_wmi,
            "DELETE_DBMON_TRIGGERS": self._delete_dbmon_triggers,
            "SAVE_SITE_CONTROL": self._save_site_control,
            "UPGRADE_DATABASE": self._upgrade_database,
            "UPDATE_SQL_REGISTRY": self._update_sql_registry,
            "UPDATE_RCM_REGISTRY": self._update_rcm_registry,
            "INSTALL_FILES": self._install_files,
            "UPDATE_SITE_CONTROL": self._update_site_control,
            "CONFIGURE_SSB": self._configure_ssb,
            "INSTALL_SERVICES": self._install_services,
            "UPDATE_SITE_TABLE": self._update_site_table,
            "UPDATE_ADMIN_CONSOLE": self._update_admin_console,
            "SSB_ON": self._ssb_on,
        }

    # -- plumbing ------------------------------------------------------------------------

    def say(self, line: str) -> None:
        self.ctx.say(line)

    def show(self, path: Path) -> str:
        return self.ctx.show(path)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = connect(self.ctx.db_file, self.code)
        try:
            migrate(conn)  # a site database older than these tables gets them
            yield conn
        finally:
            conn.close()

    def run_step(self, step: InstallStep) -> None:
        """Run one install.map step. Idempotent: after a crash anywhere inside it, running it
        again ends where one uninterrupted run ends. InstallStepError on failure, with the
        site left so that rollback() (or fixing the cause and running the step again) works.
        """
        handler = self._actions.get(step.action)
        if handler is None:
            raise InstallStepError(
                f"unknown action {step.action} in install.map; this cmlab knows "
                f"{', '.join(ACTIONS)}. The update package does not match this lab's version.",
                step=step,
            )
        self.say(f"INFO: Running install step {step.id} ({step.action}): {step.title}")
        try:
            self._begin()
            handler(step)
            with self._db() as conn, transaction(conn):
                site_server.record_step(conn, self.ctx.guid, step.id, step.action)
        except InstallStepError as exc:
            if exc.step is None:
                raise InstallStepError(str(exc), step=step) from exc
            raise
        except (OSError, sqlite3.Error, CmlabError) as exc:
            raise InstallStepError(
                f"{exc}. Fix the cause, then run the step again or roll back.", step=step
            ) from exc
        self.say(f"INFO: Install step {step.id} ({step.action}) completed.")

    def completed_steps(self) -> frozenset[int]:
        """The ids of the steps this update's installation has completed (SiteInstallSteps)."""
        with self._db() as conn:
            return site_server.completed_steps(conn, self.ctx.guid)

    def _begin(self) -> None:
        """Before the first change: the database state rollback() restores, in state.json.
        Its rename into place is the commit point; once there it is never taken again."""
        _sweep(self.staging.parent)
        state = self.backup / "state.json"
        if os.path.lexists(state):
            remove_stale_tmp(self.backup, recursive=True)
            return
        with self._db() as conn, transaction(conn):
            seed_site_state(conn, self.code)
            snap = _snapshot(conn, self.code)
        try:
            snap["installed_build"] = installed_build(self.root)
        except CmlabError:
            snap["installed_build"] = None
        snap["package"] = self.ctx.guid
        safe_dir(self.backup.parent, [self.backup.name], self.show)
        write_atomic(state, json.dumps(snap, indent=2, sort_keys=True) + "\n")
        self.say(
            f"INFO: Saved the site's state before installing update {self.ctx.guid} "
            f"to {self.show(self.backup)}"
        )

    def _state(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.backup / "state.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise InstallStepError(
                f"the installation backup {self.show(self.backup / 'state.json')} is unreadable "
                f"({exc})"
            ) from exc
        try:
            sites = data["sites"]
            valid = (
                isinstance(sites["Version"], str)
                and isinstance(sites["FullVersion"], str)
                and isinstance(sites["BuildNumber"], int)
                and all(isinstance(r, list) and len(r) == 3 for r in data["registry"])
                and isinstance(data["settings"], dict)
                and isinstance(data["services"], dict)
            )
        except (KeyError, TypeError):
            valid = False
        if not valid:
            raise InstallStepError(
                f"the installation backup {self.show(self.backup / 'state.json')} is not one "
                "cmlab wrote; restore it (or the site) by hand"
            )
        return dict(data)

    def _check_params(self, step: InstallStep) -> None:
        build, version = step.param("build"), step.param("version")
        if build and build != str(self.ctx.target_build):
            raise InstallStepError(
                f"install.map says build={build}, but the update installs build "
                f"{self.ctx.target_build}; the package is inconsistent (download it again)"
            )
        if version and version != self.ctx.target_version:
            raise InstallStepError(
                f"install.map says version={version}, but the update installs "
                f"{self.ctx.target_version}; the package is inconsistent (download it again)"
            )

    def _services(self, step: InstallStep) -> list[str]:
        names = [s.strip() for s in step.param("services").split(",") if s.strip()]
        for name in names:
            if not _SERVICE_RE.match(name):
                raise InstallStepError(f"install.map names a bad service {name!r}")
        return names

    # -- backups -------------------------------------------------------------------------

    def _record_backup(self, parts: Sequence[str]) -> bool:
        """Back up the site file `parts` before its first change: a copy under
        `backup/files/...`, or an empty marker under `backup/absent/...` when the file does
        not exist yet (rollback deletes it). The first record wins: it is the original.
        Returns True when a record was made now."""
        copy = self.backup.joinpath("files", *parts)
        marker = self.backup.joinpath("absent", *parts)
        if os.path.lexists(copy) or os.path.lexists(marker):
            return False
        live = self.root.joinpath(*parts)
        fd = _open_read(live, self.show)
        if fd is None:
            folder = safe_dir(self.backup, ["absent", *parts[:-1]], self.show)
            write_atomic(folder / parts[-1], b"")
        else:
            try:
                folder = safe_dir(self.backup, ["files", *parts[:-1]], self.show)
                tmp, _ = _copy_to_tmp(fd, folder / parts[-1], "backup")
            finally:
                os.close(fd)
            os.replace(tmp, folder / parts[-1])
            fsync_dir(folder)
        crashpoint("siteinstall.during_backup")
        return True

    # -- 1 RUN_PREUPGRADE_SCRIPTS --------------------------------------------------------

    def _run_preupgrade_scripts(self, step: InstallStep) -> None:
        rel = step.param("cab", r"redist\ConfigMgr.AutoUpgradeScripts.cab")
        cab = self.staging.joinpath(*_parts(rel, "install.map cab parameter"))
        shown = self.show(cab)
        safe_dir(self.staging.parent, [], self.show)
        tmp = make_tmp_dir(self.staging.parent / f"{self.staging.name}.AutoUpgradeScripts")
        try:
            scripts = self._extract_scripts(cab, shown, tmp)
            self._apply_scripts(scripts, rel)
        finally:
            remove_path(tmp)

    def _extract_scripts(self, cab: Path, shown: str, tmp: Path) -> list[tuple[str, str, str]]:
        """Verify a private copy of the CAB (what is checked is what is run), extract it;
        returns (name, hash, text) of each .sql in name order."""
        fd = _open_read(cab, self.show)
        if fd is None:
            raise InstallStepError(
                f"{shown} is missing from the update package; run RetryContentReplication "
                "(cmlab retry-replication) and install again"
            )
        copy = tmp / cab.name
        try:
            if os.fstat(fd).st_size > _MAX_SCRIPTS_CAB:
                raise InstallStepError(f"{shown} is larger than {_MAX_SCRIPTS_CAB} bytes")
            made, _ = _copy_to_tmp(fd, copy, "copy", _MAX_SCRIPTS_CAB)
        finally:
            os.close(fd)
        os.replace(made, copy)
        verdict = verify_cab(copy, self.ctx.trust)
        if not verdict.trusted:
            self.say(f"Error in verifying the trust of file {shown}.")
            raise InstallStepError(
                f"{shown} is not trusted ({verdict.reason}); no pre-upgrade script was run. "
                "Check that the redist files in EasySetupPayload have valid signatures, run "
                "RetryContentReplication, then install again."
            )
        self.say(f"File '{shown}' is signed and trusted.")
        if verdict.ms_root:
            self.say(f"File '{shown}' is signed with MS root cert.")
        out_dir = tmp / "scripts"
        try:
            entries = extract_cab(copy, out_dir, limits=_SCRIPTS_LIMITS)
        except CmlabError as exc:
            raise InstallStepError(f"cannot extract {shown}: {exc}") from exc
        scripts: list[tuple[str, str, str]] = []
        for entry in sorted(entries, key=lambda e: (e.path.lower(), e.path)):
            if not entry.path.lower().endswith(".sql"):
                continue
            path = out_dir / entry.path
            self.say(f"INFO: Extracted file {self.show(path)}")
            data = path.read_bytes()
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise InstallStepError(
                    f"pre-upgrade script {entry.path} in {shown} is not UTF-8 text ({exc})"
                ) from None
            scripts.append((entry.path, sha256_bytes(data), text))
        return scripts

    def _apply_scripts(self, scripts: list[tuple[str, str, str]], rel: str) -> None:
        if not scripts:
            self.say("INFO: The update has no pre-upgrade scripts.")
            return
        parsed: list[tuple[str, str, list[str]]] = []
        for name, digest, text in scripts:
            statements = split_statements(text)
            for stmt in statements:
                if _TX_CONTROL.match(stmt):
                    raise InstallStepError(
                        f"pre-upgrade script {name} controls the transaction ({stmt[:40]!r}); "
                        "the scripts run in CMUpdate's one transaction: remove it from the "
                        f"script in {rel}"
                    )
            parsed.append((name, digest, statements))
        wanted = {name: digest for name, digest, _ in parsed}
        with self._db() as conn:
            applied = site_server.applied_scripts(conn, self.ctx.guid)
            if applied == wanted:
                self.say(
                    f"INFO: The {len(wanted)} pre-upgrade script(s) of this update were already "
                    "applied to the site database; not run again."
                )
                return
            total = 0
            with site_server.scripts_transaction(conn):
                for name, _, statements in parsed:
                    self.say(
                        f"INFO: Running pre-upgrade script {name} ({len(statements)} statement(s))"
                    )
                    for number, stmt in enumerate(statements, 1):
                        try:
                            site_server.run_script_statement(conn, stmt)
                        except sqlite3.Error as exc:
                            self.say(f"ERROR: Pre-upgrade script {name} failed: {exc}")
                            raise InstallStepError(
                                f"pre-upgrade script {name} failed at statement {number} "
                                f"({' '.join(stmt.split())[:80]!r}): {exc}. Nothing was applied: "
                                "the scripts run in one transaction, which was rolled back. Fix "
                                f"the script in {rel} of the update package, then install again."
                            ) from None
                    total += len(statements)
                site_server.record_scripts(conn, self.ctx.guid, wanted)
                crashpoint("siteinstall.during_preupgrade_scripts")
        self.say(
            f"INFO: Applied {len(parsed)} pre-upgrade script(s), {total} statement(s), to the "
            "site database in one transaction."
        )

    # -- 2, 12, 16 Service Broker; 4 WMI --------------------------------------------------

    def _ssb(self, value: str, verb: str) -> None:
        self.say(f"INFO: Turning {verb} SQL Server Service Broker...")
        with self._db() as conn, transaction(conn):
            old = site_server.set_setting(conn, "ServiceBroker", value)
        if old == value:
            self.say(f"INFO: SQL Server Service Broker is already {value}.")
        else:
            self.say(f"INFO: SQL Server Service Broker is {value} (was {old}).")

    def _ssb_off(self, step: InstallStep) -> None:
        self._ssb("OFF", "off")

    def _ssb_on(self, step: InstallStep) -> None:
        self._ssb("ON", "on")

    def _configure_ssb(self, step: InstallStep) -> None:
        build = str(self.ctx.target_build)
        self.say(
            f"INFO: Configuring SQL Server Service Broker for build {build} "
            f"(port {SERVICE_BROKER_PORT})..."
        )
        with self._db() as conn, transaction(conn):
            site_server.set_setting(conn, "ServiceBrokerPort", SERVICE_BROKER_PORT)
            old = site_server.set_setting(conn, "ServiceBrokerConfiguredBuild", build)
        self.say(f"INFO: SQL Server Service Broker configured (build {old} -> {build}).")

    def _unload_wmi(self, step: InstallStep) -> None:
        self.say("INFO: Unloading the WMI providers...")
        with self._db() as conn, transaction(conn):
            old = site_server.set_setting(conn, "WMIProviders", "Unloaded")
        self.say(
            "INFO: The WMI providers are already unloaded."
            if old == "Unloaded"
            else "INFO: The WMI providers are unloaded."
        )

    # -- 3, 13 services -------------------------------------------------------------------

    def _stop_services(self, step: InstallStep) -> None:
        names = self._services(step)
        with self._db() as conn, transaction(conn):
            for name in names:
                self.say(f"INFO: Stopping service {name}")
                old = site_server.set_service(conn, name, STOPPED)
                self.say(
                    f"INFO: Service {name} is already stopped."
                    if old == STOPPED
                    else f"INFO: Service {name} is stopped."
                )

    def _install_services(self, step: InstallStep) -> None:
        names = self._services(step)
        try:
            build = installed_build(self.root)
        except CmlabError as exc:
            raise InstallStepError(
                f"cannot install the services: {exc}. Run INSTALL_FILES again first."
            ) from exc
        self.say("INFO: Starting WMI: loading the WMI providers...")
        with self._db() as conn, transaction(conn):
            site_server.set_setting(conn, "WMIProviders", "Loaded")
            self.say("INFO: Creating SMSDBMON triggers...")
            for t in triggers.trigger_defs(self.code):
                if not site_server.trigger_exists(conn, t.name):
                    self.say(f"INFO: Created SMSDBMON trigger {t.name} on {t.table}")
            defs = triggers.install_triggers(conn, self.code)
            self.say(f"INFO: {len(defs)} SMSDBMON triggers are in place.")
            for name in names:
                self.say(f"INFO: Installing service {name} from build {build} binaries")
                self.say(f"INFO: Starting service {name}")
                site_server.set_service(conn, name, RUNNING, build)
                self.say(f"INFO: Service {name} is running.")

    # -- 5 DELETE_DBMON_TRIGGERS ----------------------------------------------------------

    def _delete_dbmon_triggers(self, step: InstallStep) -> None:
        self.say("INFO: Deleting SMSDBMON triggers...")
        dropped = 0
        with self._db() as conn, transaction(conn):
            for t in triggers.trigger_defs(self.code):
                if site_server.drop_trigger(conn, t.name):
                    dropped += 1
                    self.say(f"INFO: Dropped SMSDBMON trigger {t.name} on {t.table}")
        self.say(f"INFO: Deleted {dropped} SMSDBMON trigger(s).")

    # -- 6, 11 site control ---------------------------------------------------------------

    def _site_control(self) -> Path:
        return safe_dir(self.root, SITE_CONTROL[:-1], self.show) / SITE_CONTROL[-1]

    def _recreate_site_control(self, path: Path) -> None:
        """A site without its site control file (made before it existed, or a trainee
        deleted it) gets it back from the site database."""
        with self._db() as conn:
            _, full_version, build = _local_site(conn, self.code)
            server, _ = site_server.server_and_folder(conn, self.code)
        self.say(
            f"WARNING: The site control file {self.show(path)} is missing; recreated from the "
            "site database."
        )
        write_atomic(
            path, render_site_control(self.code, server, build, full_version, str(self.root))
        )

    def _save_site_control(self, step: InstallStep) -> None:
        path = self._site_control()
        if not os.path.lexists(path):
            self._recreate_site_control(path)
        self.say(f"INFO: Saving site control settings {self.show(path)}...")
        made = self._record_backup(SITE_CONTROL)
        saved = self.backup.joinpath("files", *SITE_CONTROL)
        self.say(
            f"INFO: Saved site control settings to {self.show(saved)}"
            if made
            else f"INFO: Site control settings were already saved to {self.show(saved)}"
        )

    def _update_site_control(self, step: InstallStep) -> None:
        path = self._site_control()
        if not os.path.lexists(path):
            self._recreate_site_control(path)
        self._record_backup(SITE_CONTROL)
        fd = _open_read(path, self.show)
        if fd is None:
            raise InstallStepError(f"the site control file {self.show(path)} vanished; retry")
        try:
            with open(fd, "rb", closefd=False) as f:
                data = f.read()
        finally:
            os.close(fd)
        text = data.decode("utf-8", "replace")
        old = site_control_properties(text)
        values = {
            "Build Number": str(self.ctx.target_build),
            "Full Version": self.ctx.target_version,
        }
        new = set_site_control_properties(text, values)
        if new is None:
            raise InstallStepError(
                f"the site control file {self.show(path)} has no BEGIN_SITE_DEFINITION ... "
                "END_SITE_DEFINITION block; roll back (which restores the saved copy) and "
                "install again"
            )
        self.say(
            f"INFO: Updating site control settings: Build Number {old.get('Build Number')} -> "
            f"{values['Build Number']}, Full Version {old.get('Full Version')} -> "
            f"{values['Full Version']}"
        )
        if new != text:
            write_atomic(path, new)
        self.say(f"INFO: Updated site control settings in {self.show(path)}")

    # -- 7 UPGRADE_DATABASE; 8, 9 registry; 14 UPDATE_SITE_TABLE ---------------------------

    def _from_build(self) -> int:
        state = self._state()
        if state is not None:
            return int(state["sites"]["BuildNumber"])
        with self._db() as conn:
            return _local_site(conn, self.code).build

    def _upgrade_database(self, step: InstallStep) -> None:
        self._check_params(step)
        target, build = self.ctx.target_version, self.ctx.target_build
        from_build = self._from_build()
        with self._db() as conn, transaction(conn):
            old = site_server.setting(conn, "DatabaseVersion")
            self.say(f"INFO: Updating the Configuration Manager database from {old} to {target}...")
            site_server.record_upgrade(conn, self.ctx.guid, from_build, build)
            site_server.set_setting(conn, "DatabaseVersion", target)
        self.say(
            f"INFO: Recorded the upgrade in CM_UpgradeHistory (PackageGUID={self.ctx.guid}, "
            f"FromBuild={from_build}, ToBuild={build})."
        )
        self.say(f"INFO: The site database is at version {target}.")

    def _registry(self, what: str, key: str, values: dict[str, str]) -> None:
        self.say(f"INFO: Updating the {what} registry entries...")
        with self._db() as conn, transaction(conn):
            for name, value in values.items():
                old = site_server.set_registry(conn, key, name, value)
                self.say(f"INFO: {key}\\{name} = {value} ({_was(old, value)})")

    def _update_sql_registry(self, step: InstallStep) -> None:
        with self._db() as conn:
            server, _ = site_server.server_and_folder(conn, self.code)
        values = {
            "Database Name": Path(self.ctx.db_file).name,
            "Server": server,
            "Service Broker Port": SERVICE_BROKER_PORT,
            "Database Version": self.ctx.target_version,
        }
        self._registry("SQL", SQL_KEY, values)

    def _update_rcm_registry(self, step: InstallStep) -> None:
        values = {
            "Full Version": self.ctx.target_version,
            "Build Number": str(self.ctx.target_build),
        }
        self._registry("RCM", RCM_KEY, values)

    def _update_site_table(self, step: InstallStep) -> None:
        self._check_params(step)
        full_version = self.ctx.target_version
        found = _VERSION_RE.match(full_version)
        if found is None or found.group(1) != str(self.ctx.target_build):
            raise InstallStepError(
                f"the target version {full_version!r} does not carry build {self.ctx.target_build}"
            )
        version = ".".join(full_version.split(".")[:3]) + ".1000"
        build = self.ctx.target_build
        with self._db() as conn, transaction(conn):
            old_version, _, old_build = _local_site(conn, self.code)
            self.say(
                f"INFO: Updating the site table: site {self.code} version {old_version} -> "
                f"{version} (build {old_build} -> {build})"
            )
            site_server.set_site_version(
                conn, self.code, site_server.SiteVersion(version, full_version, build)
            )
            for name, value in (("Full Version", full_version), ("Build Number", str(build))):
                old = site_server.set_registry(conn, SETUP_KEY, name, value)
                self.say(f"INFO: {SETUP_KEY}\\{name} = {value} ({_was(old, value)})")
        self.say(f"INFO: Site {self.code} is at version {version}.")

    # -- 10 INSTALL_FILES; 15 UPDATE_ADMIN_CONSOLE ----------------------------------------

    def _install_files(self, step: InstallStep) -> None:
        _parts(step.param("map", r"SMSSetup\update.map"), "install.map map parameter")
        self._install_component(step.param("component", "SITE_SERVER"), step.param("redist"))

    def _install_component(self, name: str, redist: str = "") -> None:
        component = self.ctx.update_map.component(name)
        if component is None:
            raise InstallStepError(
                f"update.map has no component {name}; the update package is incomplete "
                "(download it again)"
            )
        jobs: list[_FileJob] = []
        for directory in component.directories:
            parts = tuple(_parts(directory.path, "update.map directory"))
            for f in directory.files:
                if f.algorithm != "SHA256":
                    raise InstallStepError(f"update.map lists {f.name} with {f.algorithm}")
                if len(_parts(f.name, "update.map file name")) != 1:
                    raise InstallStepError(f"update.map file name {f.name!r} is not a plain name")
                jobs.append(_FileJob(parts, f.name, f.hash, f.size))
        src_root = self.staging / MAP_ROOT
        self.say(
            f"INFO: Installing {len(jobs)} file(s) of component {name} from "
            f"{self.show(src_root)} to {self.show(self.root)}"
        )
        swept: set[tuple[str, ...]] = set()
        todo: list[tuple[_FileJob, Path]] = []
        for job in jobs:
            dst_dir = safe_dir(self.root, job.parts, self.show)
            if job.parts not in swept:
                _sweep(dst_dir)
                swept.add(job.parts)
            dst = dst_dir / job.name
            if _file_hash(dst, self.show) == job.expected:
                self.say(f"INFO: {self.show(dst)} already has hash {job.expected}; skipped.")
                continue
            todo.append((job, dst))
        if not todo:
            self.say(f"INFO: Every file of component {name} is already installed.")
            return
        made = sum(self._record_backup([*job.parts, job.name]) for job, _ in todo)
        self.say(f"INFO: Backed up {made} installed file(s) to {self.show(self.backup / 'files')}")
        staged: list[Path] = []
        try:
            for job, dst in todo:
                src = src_root.joinpath(*job.parts, job.name)
                fd = (
                    None
                    if _existing_dir(src_root, job.parts, self.show) is None
                    else _open_read(src, self.show)
                )
                if fd is None:
                    raise InstallStepError(
                        f"{self.show(src)} is missing from the staging folder; the installation "
                        "folder was not changed. Run RetryContentReplication (cmlab "
                        "retry-replication) and install again."
                    )
                try:
                    tmp, actual = _copy_to_tmp(fd, dst, "install", job.size)
                finally:
                    os.close(fd)
                staged.append(tmp)
                if actual != job.expected:
                    self.say(f"INFO: Verifying hash for file '{self.show(src)}'")
                    self.say(f"Expected hash:{job.expected}, Actual hash:{actual}")
                    self.say(f"WARNING: File hash mismatch for {self.show(src)}")
                    hint = (
                        " It is still a 0-byte redist placeholder: the media check must replace "
                        f"it from {self.show(self.staging / (redist or 'redist'))} first."
                        if actual == EMPTY_SHA256
                        else ""
                    )
                    raise InstallStepError(
                        f"{self.show(src)} ({job.name}, component {name}) has hash {actual}, "
                        f"but update.map expects {job.expected}; the installation folder was "
                        f"not changed.{hint} Repair the update content (cmlab retry-replication, "
                        "or cmlab reset and download it again), roll back, then install again."
                    )
            crashpoint("siteinstall.install_files_staged")
            for (job, dst), tmp in zip(todo, staged, strict=True):
                os.replace(tmp, dst)
                fsync_dir(dst.parent)
                self.say(f"INFO: Installed {self.show(dst)} (hash {job.expected})")
                crashpoint("siteinstall.during_install_files")
        except BaseException:
            for tmp in staged:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        self.say(
            f"INFO: Installed {len(todo)} file(s) of component {name}; "
            f"{len(jobs) - len(todo)} already up to date."
        )

    def _update_admin_console(self, step: InstallStep) -> None:
        name = step.param("component", CONSOLE_COMPONENT)
        if self.ctx.update_map.component(name) is not None:
            self.say(f"INFO: Updating the Admin console binaries from update.map component {name}")
            self._install_component(name)
            return
        # The sample payloads ship no console files: the console binary is regenerated for
        # the new build, so its header shows the console was updated.
        console_dir = safe_dir(self.root, CONSOLE_DIR, self.show)
        _sweep(console_dir)
        path = console_dir / CONSOLE_EXE
        self.say(f"INFO: Updating the Admin console binaries in {self.show(console_dir)}")
        try:
            current: int | None = sample_build_number(path)
        except (OSError, CmlabError):
            current = None
        if current == self.ctx.target_build:
            self.say(f"INFO: {self.show(path)} is already build {current}; skipped.")
            return
        self._record_backup([*CONSOLE_DIR, CONSOLE_EXE])
        write_atomic(
            path,
            sample_binary(
                CONSOLE_EXE, self.ctx.target_build, self.ctx.target_version, CONSOLE_SIZE
            ),
        )
        self.say(f"INFO: Updated {self.show(path)} from build {current} to {self.ctx.target_build}")

    # -- rollback and finish ---------------------------------------------------------------

    def _restore_files(self) -> tuple[int, int]:
        restored = removed = 0
        files_root = self.backup / "files"
        for folder, dirs, names in os.walk(files_root):
            dirs.sort()
            rel_dir = Path(folder).relative_to(files_root).parts
            for name in sorted(names):
                if name.startswith(".~cmlab-"):
                    continue
                saved = Path(folder) / name
                dst_dir = safe_dir(self.root, rel_dir, self.show)
                _sweep(dst_dir)
                dst = dst_dir / name
                fd = _open_read(saved, self.show)
                if fd is None:
                    continue
                try:
                    if _file_hash(dst, self.show) == sha256_fd(fd):
                        continue
                    os.lseek(fd, 0, os.SEEK_SET)
                    tmp, _ = _copy_to_tmp(fd, dst, "restore")
                finally:
                    os.close(fd)
                os.replace(tmp, dst)
                fsync_dir(dst_dir)
                restored += 1
                self.say(f"INFO: Restored {self.show(dst)}")
                crashpoint("siteinstall.during_rollback")
        absent_root = self.backup / "absent"
        for folder, dirs, names in os.walk(absent_root):
            dirs.sort()
            rel_dir = Path(folder).relative_to(absent_root).parts
            for name in sorted(names):
                if name.startswith(".~cmlab-"):
                    continue
                dst = self.root.joinpath(*rel_dir, name)
                try:
                    st = os.lstat(dst)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    continue
                os.unlink(dst)
                fsync_dir(dst.parent)
                removed += 1
                self.say(f"INFO: Removed {self.show(dst)}, which the update had added")
                crashpoint("siteinstall.during_rollback")
        return restored, removed

    def rollback(self) -> None:
        """After a failed step (or a crash, at any point): put the site back at its old
        version and working, from the backup folder and the database alone. Idempotent; the
        backup is dropped last. Pre-upgrade scripts are not undone (they must be harmless to
        run again, as ConfigMgr's are); the update's CM_UpgradeHistory row is removed."""
        self.say(
            f"WARNING: Rolling back the installation of update {self.ctx.guid} from "
            f"{self.show(self.backup)}"
        )
        try:
            _sweep(self.staging.parent)
            if os.path.lexists(self.backup):
                remove_stale_tmp(self.backup, recursive=True)
            state = self._state()
            restored, removed = self._restore_files()
            with self._db() as conn, transaction(conn):
                seed_site_state(conn, self.code)
                if state is not None:
                    sites = state["sites"]
                    site_server.set_site_version(
                        conn,
                        self.code,
                        site_server.SiteVersion(
                            sites["Version"], sites["FullVersion"], sites["BuildNumber"]
                        ),
                    )
                    site_server.replace_registry(conn, _REGISTRY_KEYS, state["registry"])
                    for name, value in state["settings"].items():
                        site_server.set_setting(conn, name, value)
                    for name, build in state["services"].items():
                        site_server.set_service(conn, name, RUNNING, build)
                # A working site, whatever the failed step had turned off.
                site_server.set_setting(conn, "ServiceBroker", "ON")
                site_server.set_setting(conn, "WMIProviders", "Loaded")
                for name in site_server.service_names(conn):
                    site_server.set_service(conn, name, RUNNING)
                defs = triggers.install_triggers(conn, self.code)
                # Only with a backup: after finish() the upgrade happened and stays recorded.
                if state is not None:
                    site_server.forget_upgrade(conn, self.ctx.guid)
                site_server.forget_steps(conn, self.ctx.guid)
                version = _local_site(conn, self.code).version
            self.say(
                f"INFO: Restored {restored} file(s), removed {removed} added file(s); site "
                f"database restored: Service Broker ON, WMI providers loaded, services running, "
                f"{len(defs)} SMSDBMON triggers in place."
            )
            if _drop_tree(self.backup):
                self.say(f"INFO: Removed the installation backup {self.show(self.backup)}")
        except InstallStepError:
            raise
        except (OSError, sqlite3.Error, CmlabError) as exc:
            raise InstallStepError(
                f"rollback of update {self.ctx.guid} failed: {exc}. Fix the cause and roll back "
                "again; the backup is kept until a rollback completes."
            ) from exc
        self.say(f"INFO: Rollback of update {self.ctx.guid} completed; site at version {version}.")

    def finish(self) -> None:
        """After the last step: the site must be at the target build; drop the backups."""
        try:
            with self._db() as conn:
                build = _local_site(conn, self.code).build
            if build != self.ctx.target_build:
                raise InstallStepError(
                    f"the installation of update {self.ctx.guid} is not complete: site "
                    f"{self.code} is at build {build}, not {self.ctx.target_build}. Run the "
                    "remaining install steps, or roll back; the backup is kept."
                )
            _sweep(self.staging.parent)
            if _drop_tree(self.backup):
                self.say(f"INFO: Removed the installation backup {self.show(self.backup)}")
        except InstallStepError:
            raise
        except (OSError, sqlite3.Error, CmlabError) as exc:
            raise InstallStepError(f"finishing update {self.ctx.guid} failed: {exc}") from exc
