"""Install step 1, RUN_PREUPGRADE_SCRIPTS: the update's ConfigMgr.AutoUpgradeScripts.cab,
verified, extracted, and its .sql scripts run on the site database.

What it promises: what is checked is what is run (a private copy of the CAB is verified and
extracted, never the staging folder's file twice); all the scripts run in one transaction,
so a failing statement leaves nothing applied; and the same scripts (by name and SHA-256)
are not run twice for an update, so the step can run again after a crash. A script may not
control the transaction itself (BEGIN, COMMIT, SAVEPOINT ...): that would break "all or
none".

Crash point: `siteinstall.during_preupgrade_scripts` (scripts run, not committed).
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

from cmlab.core.errors import CmlabError
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import make_tmp_dir, remove_path
from cmlab.core.hashing import sha256_bytes
from cmlab.site.cab import ExtractLimits, extract_cab
from cmlab.site.formats.install_map import InstallStep
from cmlab.site.installation import files
from cmlab.site.installation.context import InstallStepError
from cmlab.site.installation.session import InstallSession
from cmlab.site.sitedb import site_server, split_statements
from cmlab.site.trust import verify_cab

__all__ = ["run_preupgrade_scripts"]

# The pre-upgrade scripts CAB holds a few SQL files; refuse anything absurd.
_SCRIPTS_LIMITS = ExtractLimits(
    max_files=1000, max_file_size=16 * 1024 * 1024, max_total_size=64 * 1024 * 1024
)
_MAX_SCRIPTS_CAB = 64 * 1024 * 1024
# The scripts run inside one transaction of ours: one that ends it would break "all or none".
_TX_CONTROL = re.compile(r"^\s*(BEGIN|COMMIT|END|ROLLBACK|SAVEPOINT|RELEASE)\b", re.IGNORECASE)


def run_preupgrade_scripts(install: InstallSession, step: InstallStep) -> None:
    rel = step.param("cab", r"redist\ConfigMgr.AutoUpgradeScripts.cab")
    cab = install.staging.joinpath(*files.safe_parts(rel, "install.map cab parameter"))
    shown = install.show(cab)
    files.safe_dir(install.staging.parent, [], install.show)
    tmp = make_tmp_dir(install.staging.parent / f"{install.staging.name}.AutoUpgradeScripts")
    try:
        scripts = _extract_scripts(install, cab, shown, tmp)
        _apply_scripts(install, scripts, rel)
    finally:
        remove_path(tmp)


def _extract_scripts(
    install: InstallSession, cab: Path, shown: str, tmp: Path
) -> list[tuple[str, str, str]]:
    """Verify a private copy of the CAB (what is checked is what is run), extract it;
    returns (name, hash, text) of each .sql in name order."""
    fd = files.open_read(cab, install.show)
    if fd is None:
        raise InstallStepError(
            f"{shown} is missing from the update package; run RetryContentReplication "
            "(cmlab retry-replication) and install again"
        )
    copy = tmp / cab.name
    try:
        if os.fstat(fd).st_size > _MAX_SCRIPTS_CAB:
            raise InstallStepError(f"{shown} is larger than {_MAX_SCRIPTS_CAB} bytes")
        made, _ = files.copy_to_tmp(fd, copy, "copy", _MAX_SCRIPTS_CAB)
    finally:
        os.close(fd)
    os.replace(made, copy)
    verdict = verify_cab(copy, install.ctx.trust)
    if not verdict.trusted:
        install.say(f"Error in verifying the trust of file {shown}.")
        raise InstallStepError(
            f"{shown} is not trusted ({verdict.reason}); no pre-upgrade script was run. "
            "Check that the redist files in EasySetupPayload have valid signatures, run "
            "RetryContentReplication, then install again."
        )
    install.say(f"File '{shown}' is signed and trusted.")
    if verdict.ms_root:
        install.say(f"File '{shown}' is signed with MS root cert.")
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
        install.say(f"INFO: Extracted file {install.show(path)}")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InstallStepError(
                f"pre-upgrade script {entry.path} in {shown} is not UTF-8 text ({exc})"
            ) from None
        scripts.append((entry.path, sha256_bytes(data), text))
    return scripts


def _apply_scripts(install: InstallSession, scripts: list[tuple[str, str, str]], rel: str) -> None:
    if not scripts:
        install.say("INFO: The update has no pre-upgrade scripts.")
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
    with install.db() as conn:
        applied = site_server.applied_scripts(conn, install.ctx.guid)
        if applied == wanted:
            install.say(
                f"INFO: The {len(wanted)} pre-upgrade script(s) of this update were already "
                "applied to the site database; not run again."
            )
            return
        total = 0
        with site_server.scripts_transaction(conn):
            for name, _, statements in parsed:
                install.say(
                    f"INFO: Running pre-upgrade script {name} ({len(statements)} statement(s))"
                )
                for number, stmt in enumerate(statements, 1):
                    try:
                        site_server.run_script_statement(conn, stmt)
                    except sqlite3.Error as exc:
                        install.say(f"ERROR: Pre-upgrade script {name} failed: {exc}")
                        raise InstallStepError(
                            f"pre-upgrade script {name} failed at statement {number} "
                            f"({' '.join(stmt.split())[:80]!r}): {exc}. Nothing was applied: "
                            "the scripts run in one transaction, which was rolled back. Fix "
                            f"the script in {rel} of the update package, then install again."
                        ) from None
                total += len(statements)
            site_server.record_scripts(conn, install.ctx.guid, wanted)
            crashpoint("siteinstall.during_preupgrade_scripts")
    install.say(
        f"INFO: Applied {len(parsed)} pre-upgrade script(s), {total} statement(s), to the "
        "site database in one transaction."
    )
