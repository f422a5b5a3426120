"""`cmlab reset SITE_DIR GUID`: the Update Reset Tool (CMUpdateReset.exe).

Microsoft's tool fixes an in-console update that has not installed yet and is stuck or failed
in download or replication: it removes the package's information from the site database and
its downloaded content, so the next synchronization starts the package over. It leaves a
successfully downloaded package alone unless forced (-FDELETE), and must not be used once the
package has started installing. It runs at the top-level site of the hierarchy.

Safe while the daemon runs: the database is reset first, in one transaction that also reads
the state it decides on, so DMPDownloader and HMAN see either the whole package or none of it;
the files follow. A reset interrupted between the two is finished by running it again."""

from __future__ import annotations

import enum
import os
import sqlite3
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cmlab.core.errors import BadInput
from cmlab.core.fs import remove_path
from cmlab.site.config import SiteConfig, load_config
from cmlab.site.formats.cmu import cmu_mcm_name, cmu_name
from cmlab.site.formats.ids import is_guid
from cmlab.site.formats.notifications import cme_name, cmi_name
from cmlab.site.sitedb import one_transaction, procs, update_reset
from cmlab.site.sms_log import LogSink, SmsLog
from cmlab.site.state_codes import PackageState

LOG_FILE = "CMUpdateReset.log"
COMPONENT = "CMUpdateReset"

# The states before download success: reset without being forced.
NOT_DOWNLOADED_STATES = frozenset(
    {*procs.APPLICABILITY_STATES, PackageState.DOWNLOAD_IN_PROGRESS, PackageState.DOWNLOAD_FAILED}
)


class Stage(enum.IntEnum):
    """How far a state is, for the reset: higher is more restrictive."""

    NOT_DOWNLOADED = 0
    DOWNLOADED = 1  # the docs' "post download state": only with force (-FDELETE)
    INSTALLING = 2  # started installing (or installed): never


def stage_of(state: int) -> Stage:
    # The state's high word is its stage: 1 replication, 2 prerequisite check, 3 installation,
    # 4 download, 5 applicability; x.FFFF is the failure of stage x+1 (262143 INSTALL_FAILED).
    if 0x30000 < state <= 0x3FFFF:
        return Stage.INSTALLING
    if state in NOT_DOWNLOADED_STATES:
        return Stage.NOT_DOWNLOADED
    return Stage.DOWNLOADED  # downloaded, replicating, prerequisite check, or undefined


class ResetResult(enum.Enum):
    """What the reset did: reset the update, or why it refused (the report's `outcome`)."""

    RESET = "reset"
    UNKNOWN_PACKAGE = "unknown-package"
    INSTALLING = "installing"
    DOWNLOADED = "downloaded-needs-force"
    NOT_TOP_LEVEL = "not-top-level-site"


@dataclass(frozen=True)
class Removed:
    path: Path
    kind: str  # file | folder | link


@dataclass
class ResetReport:
    site: str
    guid: str
    forced: bool
    outcome: ResetResult = ResetResult.UNKNOWN_PACKAGE
    message: str = ""
    name: str = ""
    state: int | None = None  # CM_UpdatePackages.State, None when the row was not there
    deciding_state: int | None = None  # the state the decision was made on
    deciding_site: str = ""  # its site, when a CM_UpdatePackageSiteStatus row decided
    rows: dict[str, int] = field(default_factory=dict)
    removed: list[Removed] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is ResetResult.RESET and not self.errors

    @property
    def state_name(self) -> str:
        return "" if self.state is None else PackageState.name_of(self.state)

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "guid": self.guid,
            "name": self.name,
            "state": self.state,
            "state_name": self.state_name or None,
            "forced": self.forced,
            "deciding_state": self.deciding_state,
            "deciding_site": self.deciding_site or None,
            "outcome": self.outcome.value,
            "ok": self.ok,
            "message": self.message,
            "rows": self.rows,
            "removed": [{"path": str(r.path), "kind": r.kind} for r in self.removed],
            "errors": self.errors,
            "advice": self.advice,
            "log": None if self.log is None else str(self.log),
        }


class BadGuid(BadInput):
    """The GUID argument is not a GUID (so it can never name a file outside its folder)."""


def normalize_guid(text: str) -> str:
    """`{61F16B3C-...}` or ` 61f16b3c-... ` (as copied from the console) -> upper case."""
    guid = text.strip()
    if guid.startswith("{") and guid.endswith("}"):
        guid = guid[1:-1]
    if not is_guid(guid):
        raise BadGuid(
            f"{text!r} is not an update package GUID (like 420E3E18-73C5-4BE9-88B0-6F1E30A012CA)"
        )
    return guid.upper()


def open_log(config: SiteConfig) -> SmsLog:
    """CMUpdateReset.log beside the components' logs. The daemon never writes this file, so
    this process is its only writer (log lines are appended whole)."""
    sink = LogSink(
        folder=config.paths.logs,
        max_size=config.log_max_size,
        json_stdout=False,
        site_code=config.site_code,
    )
    return SmsLog(sink, LOG_FILE, COMPONENT)


def _describe(state: int) -> str:
    return f"{PackageState.name_of(state)} ({state})"


def _decide(conn: sqlite3.Connection, report: ResetReport) -> tuple[Stage, int | None, str] | None:
    """Read the package and its per-site states; None when the database has nothing of it."""
    guid = report.guid
    row = update_reset.package_row(conn, guid)
    candidates: list[tuple[Stage, int, str]] = []
    if row is not None:
        report.guid, report.name, report.state = row[0].upper(), row[1], row[2]
        candidates.append((stage_of(report.state), report.state, ""))
    for state, code in update_reset.site_states(conn, guid):
        candidates.append((stage_of(state), state, code))
    if candidates:
        stage, state, site = max(candidates, key=lambda c: (c[0], c[2] == ""))
        return stage, state, site
    if update_reset.has_leftovers(conn, guid):
        return Stage.NOT_DOWNLOADED, None, ""  # leftovers of an interrupted reset
    return None


def content_locations(config: SiteConfig, guid: str) -> list[tuple[Path, tuple[str, ...]]]:
    """Each folder, and the names in it (matched case-insensitively) that hold this package's
    content or a pending drop file for it."""
    p = config.paths
    g = guid.upper()
    return [
        (p.easysetup_payload, (f"{g}.CAB", f"{g}.CAB.PARTIAL", g)),
        (p.cmu_staging, (g,)),
        (p.inboxes / "dmpdownloader.box", (f"{g}.DMP",)),
        (p.hman_forwarding, (cmu_mcm_name(g),)),
        (p.mcm_outbox, (cmu_mcm_name(g),)),  # the SCP is remote: not yet moved on by MPFDM
        (p.hman_cfd, (cmu_name(g), cme_name(g))),
        (p.cmupdate_box, (cmi_name(g),)),
    ]


def find_content(config: SiteConfig, guid: str) -> list[Path]:
    found: list[Path] = []
    for folder, names in content_locations(config, guid):
        wanted = set(names)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        found.extend(Path(e.path) for e in entries if e.name.upper() in wanted)
    return found


def _remove(path: Path) -> str | None:
    """Remove a file, a link (never what it points to) or a folder tree (whose links are
    removed, not followed). Returns its kind, or None when it was already gone. Retried a
    little, for a component that writes into the folder while it is being removed."""
    kind: str | None = None
    error: OSError | None = None
    for _attempt in range(3):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return kind
        if stat.S_ISLNK(st.st_mode):
            kind = "link"
        elif stat.S_ISDIR(st.st_mode):
            kind = "folder"
        else:
            kind = "file"
        try:
            remove_path(path)
        except OSError as exc:
            error = exc
            continue
        return kind
    assert error is not None
    raise error


def reset_package(site_dir: Path, guid: str, *, force: bool = False) -> ResetReport:
    """Reset one update package of the site in `site_dir`; see the module's docstring.

    Never raises for a refusal: the report's `outcome` says what happened and `ok` whether the
    package was reset completely."""
    guid = normalize_guid(guid)
    config = load_config(site_dir)
    log = open_log(config)
    report = ResetReport(site=config.site_code, guid=guid, forced=force, log=log.path)
    try:
        _reset(config, report, log)
    finally:
        log.close()
    return report


def _refuse(report: ResetReport, log: SmsLog, outcome: ResetResult, message: str) -> None:
    report.outcome = outcome
    report.message = f"{message} Nothing was removed."
    log.error(f"ERROR: {report.message}")


def _reset(config: SiteConfig, report: ResetReport, log: SmsLog) -> None:
    guid = report.guid
    forced = " with force delete (-FDELETE)" if report.forced else ""
    log(f"CMUpdateReset started on site {config.site_code} for update package {guid}{forced}")
    if config.parent or config.role == "secondary":
        _refuse(
            report,
            log,
            ResetResult.NOT_TOP_LEVEL,
            f"Site {config.site_code} is not the top-level site of its hierarchy (its parent is "
            f"{config.parent}): run the Update Reset Tool at the top-level site.",
        )
        return

    # One transaction reads the state it decides on and deletes: no component can move the
    # package on in between, and nothing is deleted when the answer is no.
    with one_transaction(
        config.paths.db_file, config.site_code, durability=config.durability
    ) as conn:
        decision = _decide(conn, report)
        if decision is not None:
            stage = decision[0]
            if stage is Stage.NOT_DOWNLOADED or (stage is Stage.DOWNLOADED and report.forced):
                report.rows = update_reset.delete_package_rows(conn, guid)

    what = f"update package {guid}" + (f" ({report.name})" if report.name else "")
    if decision is None:
        if not find_content(config, guid):
            _refuse(
                report,
                log,
                ResetResult.UNKNOWN_PACKAGE,
                f"There is no update package {guid} in CM_UpdatePackages, nor any row or content "
                "of it on this site. Check the Package Guid (SELECT Name, PackageGuid FROM "
                "v_LocalizedUpdatePackageMetaData_SiteLoc).",
            )
            return
        log(f"Update package {guid} is not in the site database: removing its leftover content")
        report.rows = dict.fromkeys(update_reset.ALL_TABLES, 0)
    else:
        stage, state, site = decision
        report.deciding_state, report.deciding_site = state, site
        at = f" at site {site}" if site else ""
        if state is None:
            log(f"Update package {guid} is not in CM_UpdatePackages: removing its leftover rows")
        else:
            log(f"The state of {what} is {_describe(state)}{at}")
        if stage is Stage.INSTALLING:
            _refuse(
                report,
                log,
                ResetResult.INSTALLING,
                f"The {what} is {_describe(state or 0)}{at}: it has started installing. After an "
                "update package starts installing, don't use CMUpdateReset.exe.",
            )
            return
        if stage is Stage.DOWNLOADED and not report.forced:
            _refuse(
                report,
                log,
                ResetResult.DOWNLOADED,
                f"The {what} is {_describe(state or 0)}{at}, a post-download state: a "
                "successfully downloaded update is only deleted when forced (--force, the "
                "tool's -FDELETE).",
            )
            return
        for table in update_reset.ALL_TABLES:
            if report.rows.get(table):
                log(f"Deleted {report.rows[table]} row(s) from {table}")

    show = config.paths.show
    for path in find_content(config, guid):
        try:
            kind = _remove(path)
        except OSError as exc:
            report.errors.append(f"{path}: {exc}")
            log.error(f"ERROR: Failed to delete {show(path)}: {exc}")
            continue
        if kind is not None:
            report.removed.append(Removed(path, kind))
            link = " (the link only: its target is left alone)" if kind == "link" else ""
            log(f"Deleted {kind} {show(path)}{link}")

    report.outcome = ResetResult.RESET
    if report.errors:
        report.message = (
            f"The {what} was removed from the site database, but some of its content could not "
            "be deleted: fix the cause and run the reset again to finish."
        )
        log.error(f"ERROR: {report.message}")
        return
    report.message = (
        f"Successfully reset {what}. Check for updates to synchronize and download it again."
    )
    log(report.message)
    report.advice.append(f"cmlab sync {config.root}")
    if report.state == PackageState.DOWNLOAD_IN_PROGRESS:
        report.advice.append(
            "A download was in progress: restart the daemon (`cmlab run`), as the tool's docs "
            "say to restart SMS_Executive, so that no download still in flight writes content."
        )


def print_report(report: ResetReport, out: TextIO | None = None, err: TextIO | None = None) -> None:
    """The human answer: what was removed, or why nothing was (on `err`)."""
    out = out or sys.stdout
    err = err or sys.stderr
    if report.outcome is not ResetResult.RESET:
        print(f"cmlab: reset: {report.message}", file=err)
        if report.log is not None:
            print(f"  see {report.log}", file=err)
        return
    what = report.guid + (f" ({report.name})" if report.name else "")
    state = f", was {report.state_name} ({report.state})" if report.state is not None else ""
    print(f"Update package {what}{state}", file=out)
    deleted = {t: n for t, n in report.rows.items() if n}
    if deleted:
        print("Rows deleted from the site database:", file=out)
        for table, count in deleted.items():
            print(f"  {table:36} {count}", file=out)
    else:
        print("No rows were left in the site database.", file=out)
    if report.removed:
        print("Deleted from disk:", file=out)
        for r in report.removed:
            print(f"  {r.kind:6} {r.path}", file=out)
    else:
        print("No content was on disk.", file=out)
    for error in report.errors:
        print(f"cmlab: reset: could not delete {error}", file=err)
    if report.errors:
        print(f"cmlab: reset: {report.message}", file=err)
        return
    print(report.message, file=out)
    for advice in report.advice:
        print(f"  next: {advice}", file=out)
    print(f"Log: {report.log}", file=out)
