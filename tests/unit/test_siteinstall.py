"""cmlab.site.installation: the emulated site's installation and the 16 install steps of the sample
update, on a real lab site (cmlab init), a real staging folder (the lab cloud's signed payload
and redists, placeholders replaced by the media check), a real SQLite site database and real
signed CABs. Crashes are real SIGKILLs of a child process at named crash points."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from cmlab.admin.init import InitOptions, init_site
from cmlab.admin.installation_layout import SITE_SERVER_BINARIES, create_installation
from cmlab.admin.payload import build_cab_from_dir, load_package
from cmlab.components.cmupdate.redist_media import check_media, process_redists
from cmlab.core.hashing import sha256_bytes, sha256_file
from cmlab.site.cab import create_cab, extract_cab, extract_cab_into
from cmlab.site.config import load_config
from cmlab.site.formats.install_map import InstallStep, parse_install_map
from cmlab.site.formats.sample_binary import sample_binary, sample_build_number
from cmlab.site.formats.update_map import (
    MapComponent,
    MapDirectory,
    MapFile,
    UpdateMap,
    decode_update_map,
    parse_update_map,
)
from cmlab.site.installation import (
    CONSOLE_EXE,
    RCM_KEY,
    SETUP_KEY,
    SQL_KEY,
    InstallContext,
    InstallStepError,
    SiteInstaller,
    backup_dir_for,
    installed_build,
)
from cmlab.site.resources import data_dir
from cmlab.site.sitedb import SCHEMA_VERSION, connect, transaction
from cmlab.site.sitedb.triggers import trigger_defs
from cmlab.site.trust import TrustStore, load_lab_ca

GUID = "420E3E18-73C5-4BE9-88B0-6F1E30A012CA"
OLD_BUILD, OLD_FULL_VERSION, OLD_VERSION = 9135, "5.00.9135.1006", "5.00.9135.1000"
NEW_BUILD, NEW_VERSION = 9141, "5.00.9141.1000"
SCRIPTS_CAB = "ConfigMgr.AutoUpgradeScripts.cab"
REPO = Path(__file__).resolve().parents[2]
DAEMON = REPO / "daemon"
SERVICES = ("SMS_EXECUTIVE", "SMS_SITE_COMPONENT_MANAGER")
# Left by the pre-upgrade scripts, which a rollback does not undo (docs/installation.md).
SCRIPT_TABLES = ("CM_UpgradeHistory", "SiteInstallScripts")


# ---------------------------------------------------------------------------------------
# The lab site


def staging_of(root: Path) -> Path:
    return root / "CMUStaging" / GUID


def make_ctx(root: Path, say: Callable[[str], None]) -> InstallContext:
    config = load_config(root)
    staging = staging_of(root)
    text = decode_update_map((staging / "SMSSetup" / "update.map").read_bytes())
    return InstallContext(
        site_root=root,
        staging=staging,
        db_file=config.paths.db_file,
        site_code=config.site_code,
        guid=GUID,
        target_build=NEW_BUILD,
        target_version=NEW_VERSION,
        update_map=parse_update_map(text),
        trust=TrustStore.from_pem_files(config.trust_roots, config.microsoft_roots),
        say=say,
        show=config.paths.show,
    )


@dataclasses.dataclass
class Site:
    root: Path
    lines: list[str]
    ctx: InstallContext
    installer: SiteInstaller
    steps: tuple[InstallStep, ...]

    def run(self, first: int = 1, last: int = 16) -> None:
        for step in self.steps[first - 1 : last]:
            self.installer.run_step(step)

    def step(self, ident: int) -> InstallStep:
        return self.steps[ident - 1]

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        conn = connect(self.ctx.db_file, self.ctx.site_code)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def one(self, sql: str, *args: object) -> Any:
        rows = self.query(sql, *args)
        return rows[0][0] if rows else None

    def setting(self, name: str) -> str | None:
        return self.one("SELECT Value FROM SiteServerSettings WHERE Name = ?", name)

    def service(self, name: str) -> tuple[str, int] | None:
        rows = self.query("SELECT State, Build FROM SiteServices WHERE ServiceName = ?", name)
        return rows[0] if rows else None

    def registry(self, key: str, name: str) -> str | None:
        return self.one("SELECT Value FROM SiteRegistry WHERE KeyPath = ? AND Name = ?", key, name)

    def has(self, kind: str, name: str) -> bool:
        return bool(
            self.query("SELECT 1 FROM sqlite_master WHERE type = ? AND name = ?", kind, name)
        )

    def site_version(self) -> str:
        return str(self.one("SELECT fnCurrentSiteVersion()"))

    @property
    def x64(self) -> Path:
        return self.root / "bin" / "x64"

    @property
    def backup(self) -> Path:
        return backup_dir_for(staging_of(self.root))


def open_site(root: Path, say: Callable[[str], None] | None = None) -> Site:
    lines: list[str] = []
    ctx = make_ctx(root, say or lines.append)
    steps = parse_install_map(
        (staging_of(root) / "SMSSetup" / "install.map").read_text(encoding="utf-8")
    )
    return Site(root, lines, ctx, SiteInstaller(ctx), steps)


def stage_update(root: Path, temp: Path) -> None:
    """CMUStaging/<GUID> as CMUpdate leaves it before the install steps: the payload and its
    redists (from the lab cloud), update.map extracted, placeholders replaced from redist."""
    staging = staging_of(root)
    extract_cab(root / "cloud" / f"{GUID}.cab", staging)
    shutil.copytree(root / "cloud" / GUID / "redist", staging / "redist")
    extract_cab_into(staging / "SMSSetup" / "update.map.cab", staging / "SMSSetup")
    ctx = make_ctx(root, lambda _line: None)
    plan = process_redists(staging, ctx.trust, ctx.say, str, tmp_dir=temp)
    check_media(staging, ctx.update_map, plan, root, ctx.say, str)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("siteinstall")
    root = init_site(
        InitOptions(site_dir=base / "CAS", site_code="CAS", sync_interval=0, auto_download=False)
    )
    create_installation(root, OLD_BUILD, OLD_FULL_VERSION)
    stage_update(root, base / "TEMP")
    return root


@pytest.fixture
def site(template: Path, tmp_path: Path) -> Site:
    shutil.copytree(template, tmp_path / "CAS", symlinks=True)
    return open_site(tmp_path / "CAS")


# ---------------------------------------------------------------------------------------
# Comparing whole sites


_TIME_COLUMN = re.compile(r"(Time|Date|At)$|^(Requested|Started|Finished)$")


def state(root: Path, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Every file of the site (but Logs and the database file) by hash, and the database by
    content: every table's rows without their timestamps, and the schema (triggers included).
    `skip` leaves tables out."""
    skipped = set(skip)
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.relative_to(root).parts[0] not in ("Logs", "db")
    }
    conn = sqlite3.connect(root / "db" / "site.db")
    try:
        tables: dict[str, list[str]] = {}
        names = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
        for (name,) in names:
            if name in skipped:
                continue
            cur = conn.execute(f'SELECT * FROM "{name}"')
            keep = [i for i, d in enumerate(cur.description) if not _TIME_COLUMN.search(d[0])]
            tables[name] = sorted(repr(tuple(row[i] for i in keep)) for row in cur)
        schema = sorted(
            (str(t), str(n), str(s))
            for t, n, s in conn.execute("SELECT type, name, sql FROM sqlite_master")
            if n not in skipped and not str(n).startswith("sqlite_")
        )
    finally:
        conn.close()
    return {"files": files, "tables": tables, "schema": schema}


def without(st: dict[str, Any], *rels: str) -> dict[str, Any]:
    """`st` without the files a test changed on purpose (e.g. a tampered staging file)."""
    return {**st, "files": {k: v for k, v in st["files"].items() if k not in rels}}


def temporaries(root: Path) -> list[Path]:
    return sorted(root.rglob(".~cmlab-*"))


def in_order(lines: Sequence[str], expected: Sequence[str]) -> None:
    """Every expected line appears, in this order (other lines may come between)."""
    i = 0
    for want in expected:
        while i < len(lines) and lines[i] != want:
            i += 1
        assert i < len(lines), f"missing, or out of order: {want!r}"
        i += 1


@pytest.fixture(scope="module")
def original(template: Path) -> dict[str, Any]:
    return state(template)


@pytest.fixture(scope="module")
def installed(template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The site after an uninterrupted installation, finished."""
    root = tmp_path_factory.mktemp("installed") / "CAS"
    shutil.copytree(template, root, symlinks=True)
    clean = open_site(root)
    clean.run()
    clean.installer.finish()
    return state(root)


def map_file(site: Site, name: str, component: str = "SITE_SERVER") -> MapFile:
    found = site.ctx.update_map.component(component)
    assert found is not None
    return next(f for d in found.directories for f in d.files if f.name == name)


def notifications(site: Site) -> int:
    return int(site.one("SELECT count(*) FROM TableChangeNotifications"))


def poke_package(site: Site, state_code: int) -> None:
    """An administrator's action on CM_UpdatePackages: what SMSDBMon's trigger watches."""
    conn = connect(site.ctx.db_file, site.ctx.site_code)
    try:
        with transaction(conn):
            conn.execute(
                "INSERT OR IGNORE INTO CM_UpdatePackages (PackageGuid, Name) VALUES (?, 'x')",
                ("00000000-0000-0000-0000-0000000000AA",),
            )
            conn.execute(
                "UPDATE CM_UpdatePackages SET State = ? WHERE PackageGuid = ?",
                (state_code, "00000000-0000-0000-0000-0000000000AA"),
            )
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------
# create_installation


def test_create_installation_lays_out_an_installed_site(site: Site) -> None:
    assert installed_build(site.root) == OLD_BUILD
    package = load_package(data_dir("payloads") / "updates" / "cm2509")
    sizes = {
        Path(b.path).name: b.size
        for b in package.binaries
        if b.path.startswith("SMSSetup/bin/x64/")
    }
    assert dict(SITE_SERVER_BINARIES) == sizes  # the sizes of package.toml
    for name, size in SITE_SERVER_BINARIES:
        path = site.x64 / name
        assert path.stat().st_size == size
        assert path.read_bytes() == sample_binary(name, OLD_BUILD, OLD_FULL_VERSION, size)
    # The redists an installed site has are the update's: same hash, so they are skipped.
    component = site.ctx.update_map.component("SITE_SERVER")
    assert component is not None
    listed = {f.name for d in component.directories for f in d.files}
    assert {p.name for p in site.x64.iterdir()} == listed
    redists = listed - dict(SITE_SERVER_BINARIES).keys()
    assert len(redists) == 3
    for name in redists:
        assert sha256_file(site.x64 / name) == map_file(site, name).hash
    console = site.root / "AdminConsole" / "bin" / CONSOLE_EXE
    assert sample_build_number(console) == OLD_BUILD
    ctrl = (site.root / "inboxes" / "sitectrl.box" / "sitectrl.ct0").read_text()
    assert "        <CAS>\n" in ctrl
    assert f"PROPERTY <Build Number><><{OLD_BUILD}><0>" in ctrl
    assert f"PROPERTY <Full Version><><{OLD_FULL_VERSION}><0>" in ctrl

    # The database rows of a working site server.
    assert site.setting("ServiceBroker") == "ON"
    assert site.setting("WMIProviders") == "Loaded"
    assert site.setting("DatabaseVersion") == OLD_VERSION
    for name in (*SERVICES, "CONFIGURATION_MANAGER_UPDATE"):
        assert site.service(name) == ("Running", OLD_BUILD)
    assert site.registry(SETUP_KEY, "Full Version") == OLD_FULL_VERSION
    assert site.registry(SETUP_KEY, "Build Number") == str(OLD_BUILD)
    assert site.registry(SQL_KEY, "Database Version") == OLD_VERSION
    assert site.site_version() == OLD_VERSION

    # Again (twice: the first run in this copy writes its own Installation Directory).
    create_installation(site.root, OLD_BUILD, OLD_FULL_VERSION)
    before = state(site.root)
    create_installation(site.root, OLD_BUILD, OLD_FULL_VERSION)
    assert state(site.root) == before
    assert temporaries(site.root) == []


# ---------------------------------------------------------------------------------------
# The 16 steps


def test_the_sixteen_steps_update_the_site(site: Site) -> None:
    s = site
    poke_package(s, 0)
    assert s.has("trigger", "CM_UpdatePackages_UPD_HMAN")

    s.run(1, 1)
    assert s.has("table", "CM_UpgradeHistory")  # made by the sample pre-upgrade script
    assert s.query("SELECT ScriptName FROM SiteInstallScripts") == [("001_CM_UpgradeHistory.sql",)]
    assert (s.backup / "state.json").is_file()
    s.run(2, 2)
    assert s.setting("ServiceBroker") == "OFF"
    s.run(3, 3)
    assert s.service("SMS_EXECUTIVE") == ("Stopped", OLD_BUILD)
    assert s.service("SMS_SITE_COMPONENT_MANAGER") == ("Stopped", OLD_BUILD)
    assert s.service("CONFIGURATION_MANAGER_UPDATE") == ("Running", OLD_BUILD)
    s.run(4, 4)
    assert s.setting("WMIProviders") == "Unloaded"
    s.run(5, 5)
    for t in trigger_defs("CAS"):
        assert not s.has("trigger", t.name), t.name
    before = notifications(s)
    poke_package(s, 2)  # nobody hears it while the triggers are gone
    assert notifications(s) == before
    poke_package(s, 0)
    s.run(6, 6)
    ctrl = s.root / "inboxes" / "sitectrl.box" / "sitectrl.ct0"
    saved = s.backup / "files" / "inboxes" / "sitectrl.box" / "sitectrl.ct0"
    assert saved.read_bytes() == ctrl.read_bytes()
    s.run(7, 7)
    assert s.query("SELECT PackageGUID, FromBuild, ToBuild FROM CM_UpgradeHistory") == [
        (GUID, OLD_BUILD, NEW_BUILD)
    ]
    assert s.setting("DatabaseVersion") == NEW_VERSION
    assert s.site_version() == OLD_VERSION  # not yet: that is step 14
    s.run(8, 9)
    assert s.registry(SQL_KEY, "Database Version") == NEW_VERSION
    assert s.registry(RCM_KEY, "Build Number") == str(NEW_BUILD)
    assert s.registry(RCM_KEY, "Full Version") == NEW_VERSION
    assert s.registry(SETUP_KEY, "Build Number") == str(OLD_BUILD)
    s.run(10, 10)
    assert installed_build(s.root) == NEW_BUILD
    component = s.ctx.update_map.component("SITE_SERVER")
    assert component is not None
    for f in component.directories[0].files:
        assert sha256_file(s.x64 / f.name) == f.hash, f.name
    saved_bin = s.backup / "files" / "bin" / "x64"
    assert sorted(p.name for p in saved_bin.iterdir()) == sorted(n for n, _ in SITE_SERVER_BINARIES)
    assert sample_build_number(saved_bin / "cmupdate.exe") == OLD_BUILD
    s.run(11, 11)
    assert f"PROPERTY <Build Number><><{NEW_BUILD}><0>" in ctrl.read_text()
    assert f"PROPERTY <Full Version><><{NEW_VERSION}><0>" in ctrl.read_text()
    s.run(12, 12)
    assert s.setting("ServiceBrokerConfiguredBuild") == str(NEW_BUILD)
    assert s.setting("ServiceBroker") == "OFF"
    s.run(13, 13)
    for t in trigger_defs("CAS"):
        assert s.has("trigger", t.name), t.name
    poke_package(s, 2)  # SMSDBMon hears the site again
    assert notifications(s) == before + 1
    for name in SERVICES:
        assert s.service(name) == ("Running", NEW_BUILD)
    assert s.setting("WMIProviders") == "Loaded"
    s.run(14, 14)
    assert s.site_version() == NEW_VERSION
    assert s.one("SELECT fnSetupFullVersion()") == NEW_VERSION
    assert s.one("SELECT BuildNumber FROM Sites WHERE SiteCode = 'CAS'") == NEW_BUILD
    assert s.registry(SETUP_KEY, "Full Version") == NEW_VERSION
    assert s.registry(SETUP_KEY, "Build Number") == str(NEW_BUILD)
    s.run(15, 15)
    assert sample_build_number(s.root / "AdminConsole" / "bin" / CONSOLE_EXE) == NEW_BUILD
    s.run(16, 16)
    assert s.setting("ServiceBroker") == "ON"
    assert s.installer.completed_steps() == frozenset(range(1, 17))

    s.installer.finish()
    assert not s.backup.exists()
    assert temporaries(s.root) == []
    in_order(
        s.lines,
        [
            "INFO: Running install step 1 (RUN_PREUPGRADE_SCRIPTS): Unpack and run the "
            "pre-upgrade SQL scripts",
            f"File '{staging_of(s.root) / 'redist' / SCRIPTS_CAB}' is signed and trusted.",
            "INFO: Running pre-upgrade script 001_CM_UpgradeHistory.sql (1 statement(s))",
            "INFO: Applied 1 pre-upgrade script(s), 1 statement(s), to the site database in one "
            "transaction.",
            "INFO: Install step 1 (RUN_PREUPGRADE_SCRIPTS) completed.",
            "INFO: Turning off SQL Server Service Broker...",
            "INFO: SQL Server Service Broker is OFF (was ON).",
            "INFO: Stopping service SMS_EXECUTIVE",
            "INFO: Service SMS_EXECUTIVE is stopped.",
            "INFO: Stopping service SMS_SITE_COMPONENT_MANAGER",
            "INFO: Unloading the WMI providers...",
            "INFO: Deleting SMSDBMON triggers...",
            "INFO: Dropped SMSDBMON trigger CM_UpdatePackages_UPD_HMAN on CM_UpdatePackages",
            "INFO: Deleted 14 SMSDBMON trigger(s).",
            f"INFO: Saved site control settings to {saved}",
            f"INFO: Updating the Configuration Manager database from {OLD_VERSION} to "
            f"{NEW_VERSION}...",
            f"INFO: {SQL_KEY}\\Database Version = {NEW_VERSION} (was {OLD_VERSION})",
            f"INFO: {RCM_KEY}\\Build Number = {NEW_BUILD} (was {OLD_BUILD})",
            f"INFO: Installed {s.x64 / 'cmupdate.exe'} (hash {map_file(s, 'cmupdate.exe').hash})",
            "INFO: Installed 9 file(s) of component SITE_SERVER; 3 already up to date.",
            f"INFO: Updating site control settings: Build Number {OLD_BUILD} -> {NEW_BUILD}, "
            f"Full Version {OLD_FULL_VERSION} -> {NEW_VERSION}",
            f"INFO: Configuring SQL Server Service Broker for build {NEW_BUILD} (port 4022)...",
            "INFO: Created SMSDBMON trigger CM_UpdatePackages_UPD_HMAN on CM_UpdatePackages",
            "INFO: Starting service SMS_EXECUTIVE",
            "INFO: Service SMS_EXECUTIVE is running.",
            f"INFO: Updating the site table: site CAS version {OLD_VERSION} -> {NEW_VERSION} "
            f"(build {OLD_BUILD} -> {NEW_BUILD})",
            f"INFO: Updated {s.root / 'AdminConsole' / 'bin' / CONSOLE_EXE} from build "
            f"{OLD_BUILD} to {NEW_BUILD}",
            "INFO: SQL Server Service Broker is ON (was OFF).",
            "INFO: Install step 16 (SSB_ON) completed.",
            f"INFO: Removed the installation backup {s.backup}",
        ],
    )


def test_each_step_run_twice_leaves_what_one_run_leaves(template: Path, tmp_path: Path) -> None:
    shutil.copytree(template, tmp_path / "once", symlinks=True)
    shutil.copytree(template, tmp_path / "twice", symlinks=True)
    once, twice = open_site(tmp_path / "once"), open_site(tmp_path / "twice")
    for step in once.steps:
        once.installer.run_step(step)
        twice.installer.run_step(step)
        twice.installer.run_step(step)
        assert state(twice.root) == state(once.root), step
    once.installer.finish()
    twice.installer.finish()
    twice.installer.finish()
    assert state(twice.root) == state(once.root)
    assert installed_build(twice.root) == NEW_BUILD
    assert any(
        line.endswith("were already applied to the site database; not run again.")
        for line in twice.lines
    )
    assert any("is already OFF" in line for line in twice.lines)
    assert any("already has hash" in line and "cmupdate.exe" in line for line in twice.lines)


# ---------------------------------------------------------------------------------------
# Failures, rollback and recovery


def rebuild_scripts_cab(site: Site, scripts: dict[str, str], tmp: Path, *, signed: bool) -> None:
    folder = tmp / "scripts-src"
    folder.mkdir()
    for name, text in scripts.items():
        (folder / name).write_text(text, encoding="utf-8")
    cab = staging_of(site.root) / "redist" / SCRIPTS_CAB
    if signed:
        build_cab_from_dir(folder, cab, load_lab_ca(site.root / "trust").signer())
    else:
        create_cab({name: folder / name for name in scripts}, cab)


SAMPLE_SCRIPT = (
    data_dir("payloads") / "updates" / "cm2509" / "AutoUpgradeScripts" / "001_CM_UpgradeHistory.sql"
)


def test_a_failing_pre_upgrade_script_applies_nothing_and_the_fixed_update_installs(
    site: Site, template: Path, tmp_path: Path, original: dict[str, Any]
) -> None:
    rebuild_scripts_cab(
        site,
        {
            "001_CM_UpgradeHistory.sql": SAMPLE_SCRIPT.read_text(encoding="utf-8"),
            "002_broken.sql": "CREATE TABLE CM_Broken (x INTEGER);\n"
            "INSERT INTO NoSuchTable VALUES (1);\n",
        },
        tmp_path,
        signed=True,
    )
    with pytest.raises(InstallStepError) as failed:
        site.run(1, 1)
    message = str(failed.value)
    assert message.startswith("install step 1 (RUN_PREUPGRADE_SCRIPTS) failed: ")
    assert "pre-upgrade script 002_broken.sql failed at statement 2" in message
    assert "no such table: NoSuchTable" in message
    assert "Nothing was applied" in message
    assert failed.value.step == site.step(1)
    assert "ERROR: Pre-upgrade script 002_broken.sql failed: no such table: NoSuchTable" in (
        site.lines
    )
    # One transaction: the first script's table and the second's are both absent.
    assert not site.has("table", "CM_UpgradeHistory")
    assert not site.has("table", "CM_Broken")
    assert site.query("SELECT * FROM SiteInstallScripts") == []
    assert temporaries(site.root) == []

    site.installer.rollback()
    cab = f"CMUStaging/{GUID}/redist/{SCRIPTS_CAB}"
    assert without(state(site.root), cab) == without(original, cab)
    assert not site.backup.exists()

    # The fix: the update's own (good) scripts CAB, then install again.
    shutil.copy2(staging_of(template) / "redist" / SCRIPTS_CAB, staging_of(site.root) / "redist")
    site.run()
    site.installer.finish()
    assert installed_build(site.root) == NEW_BUILD
    assert site.site_version() == NEW_VERSION


def test_an_untrusted_scripts_cab_runs_no_script(site: Site, tmp_path: Path) -> None:
    rebuild_scripts_cab(
        site,
        {"001_CM_UpgradeHistory.sql": SAMPLE_SCRIPT.read_text(encoding="utf-8")},
        tmp_path,
        signed=False,
    )
    with pytest.raises(InstallStepError, match=r"is not trusted \(.*no pre-upgrade script was run"):
        site.run(1, 1)
    cab = staging_of(site.root) / "redist" / SCRIPTS_CAB
    assert f"Error in verifying the trust of file {cab}." in site.lines
    assert not site.has("table", "CM_UpgradeHistory")


def test_a_script_that_ends_the_transaction_is_refused(site: Site, tmp_path: Path) -> None:
    rebuild_scripts_cab(
        site,
        {"001_x.sql": "CREATE TABLE T1 (x);\nCOMMIT;\nCREATE TABLE T2 (x);\n"},
        tmp_path,
        signed=True,
    )
    with pytest.raises(InstallStepError, match=r"001_x\.sql controls the transaction"):
        site.run(1, 1)
    assert not site.has("table", "T1")


def test_a_tampered_staging_file_fails_install_files_and_the_repaired_update_installs(
    site: Site, template: Path, original: dict[str, Any]
) -> None:
    staged = staging_of(site.root) / "SMSSetup" / "bin" / "x64" / "hman.dll"
    data = bytearray(staged.read_bytes())
    data[-1] ^= 0xFF
    staged.write_bytes(bytes(data))
    expected, actual = map_file(site, "hman.dll").hash, sha256_bytes(bytes(data))
    site.run(1, 9)
    with pytest.raises(InstallStepError) as failed:
        site.run(10, 10)
    message = str(failed.value)
    assert message.startswith("install step 10 (INSTALL_FILES) failed: ")
    assert f"{staged} (hman.dll, component SITE_SERVER) has hash {actual}" in message
    assert f"update.map expects {expected}" in message
    assert "the installation folder was not changed" in message
    assert f"Expected hash:{expected}, Actual hash:{actual}" in site.lines
    # Nothing installed, nothing half-installed.
    assert installed_build(site.root) == OLD_BUILD
    assert {p.name: sha256_file(p) for p in site.x64.iterdir()} == {
        k.split("/")[-1]: v for k, v in original["files"].items() if k.startswith("bin/x64/")
    }
    assert temporaries(site.root) == []

    site.installer.rollback()
    tampered = f"CMUStaging/{GUID}/SMSSetup/bin/x64/hman.dll"
    assert without(state(site.root, SCRIPT_TABLES), tampered) == without(
        state(template, SCRIPT_TABLES), tampered
    )
    assert installed_build(site.root) == OLD_BUILD
    assert site.site_version() == OLD_VERSION
    assert site.setting("ServiceBroker") == "ON"
    for t in trigger_defs("CAS"):
        assert site.has("trigger", t.name)
    assert site.query("SELECT * FROM CM_UpgradeHistory") == []
    assert site.installer.completed_steps() == frozenset()
    assert any(line.startswith("INFO: Rollback of update") for line in site.lines)

    shutil.copy2(staging_of(template) / "SMSSetup" / "bin" / "x64" / "hman.dll", staged)
    site.run()
    site.installer.finish()
    assert installed_build(site.root) == NEW_BUILD
    assert sha256_file(site.x64 / "hman.dll") == expected
    assert site.query("SELECT FromBuild, ToBuild FROM CM_UpgradeHistory") == [
        (OLD_BUILD, NEW_BUILD)
    ]


def test_a_zero_byte_placeholder_names_the_media_check(site: Site) -> None:
    staged = staging_of(site.root) / "SMSSetup" / "bin" / "x64" / "smsexec.exe"
    staged.write_bytes(b"")
    with pytest.raises(InstallStepError, match="still a 0-byte redist placeholder"):
        site.run(10, 10)


def test_a_missing_staging_file_is_named(site: Site) -> None:
    (staging_of(site.root) / "SMSSetup" / "bin" / "x64" / "distmgr.dll").unlink()
    with pytest.raises(InstallStepError, match=r"distmgr.dll is missing from the staging folder"):
        site.run(10, 10)
    assert installed_build(site.root) == OLD_BUILD


@pytest.mark.parametrize("last", [1, 3, 5, 6, 9, 10, 13, 14, 16])
def test_rollback_after_any_step_restores_the_old_site(
    site: Site, template: Path, last: int
) -> None:
    site.run(1, last)
    site.installer.rollback()
    assert state(site.root, SCRIPT_TABLES) == state(template, SCRIPT_TABLES)
    assert installed_build(site.root) == OLD_BUILD
    assert site.site_version() == OLD_VERSION
    site.installer.rollback()  # again: nothing left to do, still a working site
    assert state(site.root, SCRIPT_TABLES) == state(template, SCRIPT_TABLES)
    assert temporaries(site.root) == []


def test_finish_refuses_an_incomplete_installation(site: Site) -> None:
    site.run(1, 13)
    with pytest.raises(InstallStepError, match="is at build 9135, not 9141"):
        site.installer.finish()
    assert (site.backup / "state.json").is_file()  # kept for the rollback


def test_an_unknown_action_or_inconsistent_parameters_fail_before_any_change(
    site: Site, original: dict[str, Any]
) -> None:
    with pytest.raises(InstallStepError, match="unknown action FORMAT_DISK"):
        site.installer.run_step(InstallStep(17, "FORMAT_DISK", "INSTALL_IN_PROGRESS", "x", ()))
    assert state(site.root) == original
    bad = dataclasses.replace(site.step(7), params=(("build", "9999"), ("version", NEW_VERSION)))
    with pytest.raises(InstallStepError, match=r"install\.map says build=9999"):
        site.installer.run_step(bad)
    assert site.query("SELECT * FROM SiteInstallSteps") == []


def test_a_link_in_the_installation_folder_is_refused(site: Site, tmp_path: Path) -> None:
    outside = tmp_path / "outside.dll"
    outside.write_bytes(b"not part of the site")
    (site.x64 / "hman.dll").unlink()
    (site.x64 / "hman.dll").symlink_to(outside)
    with pytest.raises(InstallStepError, match=r"hman\.dll is a symbolic link"):
        site.run(10, 10)
    assert outside.read_bytes() == b"not part of the site"


def test_admin_console_files_from_update_map_are_installed_and_rolled_back(site: Site) -> None:
    """A payload that ships console files (an ADMIN_CONSOLE component in update.map) gets them
    installed with their hashes checked; a file the site did not have is removed on rollback."""
    src = staging_of(site.root) / "SMSSetup" / "AdminConsole" / "bin"
    src.mkdir(parents=True)
    files = {
        CONSOLE_EXE: sample_binary(CONSOLE_EXE, NEW_BUILD, NEW_VERSION, 8192),
        "AdminUI.Common.dll": sample_binary("AdminUI.Common.dll", NEW_BUILD, NEW_VERSION, 4096),
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    console = MapComponent(
        "ADMIN_CONSOLE",
        268436010,
        (
            MapDirectory(
                r"AdminConsole\bin",
                ("5", "AMD64", ""),
                tuple(
                    MapFile(name, 0, len(data), "SHA256", sha256_bytes(data))
                    for name, data in files.items()
                ),
            ),
        ),
        ("SMS",),
    )
    ctx = dataclasses.replace(
        site.ctx, update_map=UpdateMap((*site.ctx.update_map.components, console))
    )
    installer = SiteInstaller(ctx)
    dst = site.root / "AdminConsole" / "bin"
    before = (dst / CONSOLE_EXE).read_bytes()
    installer.run_step(site.step(15))
    for name, data in files.items():
        assert (dst / name).read_bytes() == data
    installer.rollback()
    assert (dst / CONSOLE_EXE).read_bytes() == before
    assert not (dst / "AdminUI.Common.dll").exists()
    assert any(
        line.startswith(f"INFO: Removed {dst / 'AdminUI.Common.dll'}") for line in site.lines
    )


def test_a_missing_site_control_file_is_recreated_from_the_database(site: Site) -> None:
    ctrl = site.root / "inboxes" / "sitectrl.box" / "sitectrl.ct0"
    ctrl.unlink()
    site.run(6, 6)
    assert f"PROPERTY <Build Number><><{OLD_BUILD}><0>" in ctrl.read_text()
    assert any(line.startswith("WARNING: The site control file") for line in site.lines)


def test_a_site_database_from_before_schema_4_is_migrated(site: Site) -> None:
    conn = connect(site.ctx.db_file, "CAS")
    try:
        with transaction(conn):
            for table in (
                "SiteServerSettings",
                "SiteServices",
                "SiteRegistry",
                "SiteInstallScripts",
                "SiteInstallSteps",
            ):
                conn.execute(f"DROP TABLE {table}")
            conn.execute("UPDATE SchemaInfo SET Value = '3' WHERE Name = 'version'")
    finally:
        conn.close()
    site.run()
    site.installer.finish()
    assert site.site_version() == NEW_VERSION
    assert site.service("SMS_EXECUTIVE") == ("Running", NEW_BUILD)
    assert site.one("SELECT Value FROM SchemaInfo WHERE Name = 'version'") == str(SCHEMA_VERSION)


# ---------------------------------------------------------------------------------------
# Killed mid-way: re-running the step, or rolling back, converges

CHILD = """
import sys
from pathlib import Path
from tests.unit.test_siteinstall import open_site
site = open_site(Path(sys.argv[1]), print)
site.run(int(sys.argv[2]), int(sys.argv[3]))
if sys.argv[4] == "rollback":
    site.installer.rollback()
"""


def kill_inside(root: Path, point: str, first: int, last: int, then: str = "") -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(DAEMON), str(REPO)]),
        "CMLAB_CRASHPOINTS": point,
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(first), str(last), then],
        env=env,
        timeout=120,
        capture_output=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]


# during_backup is reached once in step 6 (the site control file), then once per file.
@pytest.mark.parametrize(
    "point",
    [
        "siteinstall.during_backup:2",
        "siteinstall.during_backup:7",
        "siteinstall.install_files_staged",
        "siteinstall.during_install_files:1",
        "siteinstall.during_install_files:6",
    ],
)
@pytest.mark.parametrize("recovery", ["rerun", "rollback"])
def test_killed_inside_install_files(
    site: Site,
    template: Path,
    installed: dict[str, Any],
    point: str,
    recovery: str,
) -> None:
    kill_inside(site.root, point, 1, 10)
    done = sum(
        sample_build_number(site.x64 / name) == NEW_BUILD for name, _ in SITE_SERVER_BINARIES
    )
    if point.startswith("siteinstall.during_install_files"):
        assert done == int(point.rsplit(":", 1)[1])
        assert len(temporaries(site.x64)) == 9 - done  # staged, never renamed in
    else:
        assert done == 0
    assert site.installer.completed_steps() == frozenset(range(1, 10))

    if recovery == "rerun":
        site.run(10, 16)
        site.installer.finish()
        assert state(site.root) == installed
    else:
        site.installer.rollback()
        assert state(site.root, SCRIPT_TABLES) == state(template, SCRIPT_TABLES)
    assert temporaries(site.root) == []


@pytest.mark.parametrize("recovery", ["rerun", "rollback"])
def test_killed_inside_the_pre_upgrade_scripts(
    site: Site,
    installed: dict[str, Any],
    original: dict[str, Any],
    recovery: str,
) -> None:
    kill_inside(site.root, "siteinstall.during_preupgrade_scripts", 1, 1)
    # Killed before COMMIT: nothing of the scripts is in the database.
    assert not site.has("table", "CM_UpgradeHistory")
    assert site.query("SELECT * FROM SiteInstallScripts") == []
    assert temporaries(site.root / "CMUStaging")  # the killed run's extracted scripts

    if recovery == "rerun":
        site.run(1, 1)
        assert site.has("table", "CM_UpgradeHistory")
        assert temporaries(site.root) == []
        site.run(2, 16)
        site.installer.finish()
        assert state(site.root) == installed
    else:
        site.installer.rollback()
        assert state(site.root) == original
    assert temporaries(site.root) == []


@pytest.mark.parametrize(
    "point", ["siteinstall.during_rollback:1", "siteinstall.during_rollback:5"]
)
def test_killed_inside_rollback(site: Site, template: Path, point: str) -> None:
    kill_inside(site.root, point, 1, 16, "rollback")
    assert site.backup.is_dir()  # dropped only once the rollback is complete
    site.installer.rollback()
    assert state(site.root, SCRIPT_TABLES) == state(template, SCRIPT_TABLES)
    assert temporaries(site.root) == []
