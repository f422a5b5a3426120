"""Real lab sites for end-to-end tests: made once per session by `cmlab init`, copied per test,
run by the real daemon (`python -m cmlab run`) as a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cmlab.site.contract import waiting_drop_files
from cmlab.site.sms_log import read_messages
from cmlab.site.state_codes import PackageState
from tests.helpers.waiting import wait_until

GUID_2509 = "420E3E18-73C5-4BE9-88B0-6F1E30A012CA"
GUID_2503_HFRU = "6B0783D9-B8A2-4848-82F6-8EFE956F4988"
GUID_2409_HFRU = "345A6BE1-3D07-43ED-B6E5-FAC0889DA04C"

# Where a synchronization leaves the sample manifest (auto-download off, as in test sites).
SYNCED = {
    GUID_2509: PackageState.APPLICABILITY_SUCCESS,
    GUID_2503_HFRU: PackageState.APPLICABILITY_HIDE,
    GUID_2409_HFRU: PackageState.APPLICABILITY_NA,
}


def make_template(folder: Path, **overrides: Any) -> Path:
    from cmlab.admin.init import InitOptions, init_site

    opts = {
        "site_dir": folder,
        "site_code": "CAS",
        "sync_interval": 0.0,
        "rescan_interval": 0.5,
        "auto_download": False,  # tests start downloads themselves, or turn it on
    }
    opts.update(overrides)
    return init_site(InitOptions(**opts))


def copy_site(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    return dest


def set_toml(site: Path, table: str, key: str, value: str) -> None:
    """Rewrite one `key = value` line in a table of site.toml (value is TOML text)."""
    path = site / "site.toml"
    lines = path.read_text().splitlines()
    current = ""
    for i, line in enumerate(lines):
        if line.startswith("["):
            current = line.strip("[]")
        elif current == table and line.split("=")[0].strip() == key:
            lines[i] = f"{key} = {value}"
            break
    else:
        raise KeyError(f"{table}.{key} not in site.toml")
    path.write_text("\n".join(lines) + "\n")


def cmlab(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "cmlab", *args], capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"cmlab {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


class Daemon:
    """`cmlab run SITE` in a subprocess, stopped gracefully or killed."""

    def __init__(
        self, site: Path, env: dict[str, str] | None = None, prefix: Sequence[str] = ()
    ) -> None:
        self.site = site
        self.env = env or {}
        # A command the daemon runs under (e.g. `unshare` with a bind mount): it must exec the
        # daemon, so the process signalled is the daemon itself.
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self, **extra_env: str) -> Daemon:
        env = dict(os.environ)
        env.pop("CMLAB_CRASHPOINTS", None)
        env.update(self.env)
        env.update(extra_env)
        self.runs += 1
        out = open(self.site / f"daemon-stdout-{self.runs}.jsonl", "wb")  # noqa: SIM115
        err = open(self.site / f"daemon-stderr-{self.runs}.txt", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "cmlab", "run", str(self.site)],
            stdout=out,
            stderr=err,
            env=env,
        )
        out.close()
        err.close()
        return self

    def stderr(self) -> str:
        return (self.site / f"daemon-stderr-{self.runs}.txt").read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            # The daemon dumps every thread's stack to stderr when a stop is slow.
            raise AssertionError(
                f"the daemon did not stop in {timeout} s:\n{self.stderr()}"
            ) from exc
        self.proc = None
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(20)
        self.proc = None

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.kill()


def query(site: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{site / 'db' / 'site.db'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def states(site: Path) -> dict[str, int]:
    return {
        g.upper(): s for g, s in query(site, "SELECT PackageGuid, State FROM CM_UpdatePackages")
    }


def log(site: Path, name: str) -> list[str]:
    return read_messages(site / "Logs" / name)


def assert_in_order(messages: Sequence[str], expected: Iterable[str | re.Pattern[str]]) -> None:
    """Every expected line appears, in this order (other lines may come between)."""
    i = 0
    for want in expected:
        while i < len(messages):
            got = messages[i]
            i += 1
            if want.fullmatch(got) if isinstance(want, re.Pattern) else got == want:
                break
        else:
            shown = want.pattern if isinstance(want, re.Pattern) else want
            raise AssertionError(
                f"line not found in order: {shown!r}\n--- log ---\n" + "\n".join(messages)
            )


def wait_for_line(site: Path, name: str, line: str, timeout: float = 60.0) -> None:
    wait_until(lambda: line in log(site, name), timeout=timeout, what=f"{line!r} in {name}")


def inbox_files(site: Path) -> list[str]:
    """Drop files waiting in the inboxes (the contract's folders and patterns; BAD excluded)."""
    return waiting_drop_files(site)


def synced(site: Path) -> bool:
    """Sync and applicability are over: every package decided, every drop file consumed, and
    no change SMSDBMon has still to turn into one (a late state message 4 makes it drop
    another `<SiteCode>.SCU`), looking at the inboxes on both sides of that."""
    return (
        states(site) == SYNCED
        and not inbox_files(site)
        and not query(site, "SELECT 1 FROM TableChangeNotifications LIMIT 1")
        and not inbox_files(site)
    )


def sync_once(site: Path) -> Path:
    """Synchronize `site` with the real daemon, then stop it: a template for tests to copy."""
    with Daemon(site) as daemon:
        daemon.start()
        cmlab("sync", str(site))
        wait_until(lambda: synced(site), timeout=60, what="the template's sync")
        assert daemon.stop() == 0
    return site


def download_once(site: Path, guid: str = GUID_2509) -> Path:
    """Synchronize `site` and download `guid` with the real daemon, then stop it: a template
    "Ready to install" for the replication, prerequisite and installation tests."""
    with Daemon(site) as daemon:
        daemon.start()
        cmlab("sync", str(site))
        wait_until(lambda: synced(site), timeout=60, what="the template's sync")
        cmlab("download", str(site), guid)
        wait_until(
            lambda: (
                states(site).get(guid) == PackageState.DOWNLOAD_SUCCESS and not inbox_files(site)
            ),
            timeout=120,
            what="the template's download",
        )
        assert daemon.stop() == 0
    return site


def payload_hash(site: Path, guid: str = GUID_2509) -> str:
    """The manifest's PayloadHash, as HMAN stored it in CM_UpdatePackages."""
    rows = query(site, "SELECT PayloadHash FROM CM_UpdatePackages WHERE PackageGuid = ?", [guid])
    return str(rows[0][0])


def temporaries(site: Path) -> list[str]:
    """cmlab's temporary files and folders left anywhere in the site."""
    return [str(p.relative_to(site)) for p in site.rglob(".~cmlab-*")]


def settled_at(site: Path, state: int, guid: str = GUID_2509) -> bool:
    """`guid` at `state` with nothing left to do: no drop file, and no change SMSDBMon has still
    to turn into one (HMAN can reach a state before the last CME is dropped)."""
    return (
        states(site).get(guid) == state
        and not inbox_files(site)
        and not query(site, "SELECT 1 FROM TableChangeNotifications LIMIT 1")
        and not inbox_files(site)
    )


def site_history(site: Path, guid: str = GUID_2509) -> list[int]:
    """Every state this site's status row for `guid` passed through, in order."""
    return [
        int(r[0])
        for r in query(
            site,
            "SELECT State FROM CM_UpdatePackageSiteStatus_HIST WHERE PackageGuid = ? ORDER BY ID",
            [guid],
        )
    ]


def site_version(site: Path) -> str:
    """What fnCurrentSiteVersion() returns (through `cmlab sql`, which registers it)."""
    out = cmlab("sql", str(site), "SELECT dbo.fnCurrentSiteVersion()").stdout
    found = re.findall(r"5\.00\.\d{4}\.\d{4}", out)
    assert len(found) == 1, out
    return found[0]


def wait_serving(site: Path, daemon: Daemon) -> None:
    """The daemon's current run is up (SMSDBMon has set its triggers), so a SIGTERM from here on
    is a graceful stop, not a kill during start-up."""
    out = site / f"daemon-stdout-{daemon.runs}.jsonl"
    wait_until(
        lambda: "Modified trigger definition" in out.read_text(errors="replace"),
        timeout=30,
        what=f"the daemon's run {daemon.runs} to serve",
    )
