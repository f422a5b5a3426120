"""The command line: the exit-code table every command follows (commands/exit_codes.py),
`cmlab wait` and the actions' `--wait` (no daemon: states are set by hand, as a trainee with
`sqlite3` would), the progress line in both of its modes, payload build and verify."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cmlab.admin.reset import BadGuid
from cmlab.admin.waiting import Progress, Verdict, WaitResult
from cmlab.commands.cli import main
from cmlab.commands.exit_codes import MEANINGS, ExitCode, exit_code_of
from cmlab.commands.progress import ProgressLine, outcome
from cmlab.core.errors import BadInput, ConfigError, WorkFailed
from cmlab.site.config import SiteNotFound
from cmlab.site.sitedb import (
    connected,
    create_site_db,
    hierarchy,
    one_transaction,
    procs,
    recovery,
    servicing,
    transaction,
)
from cmlab.site.state_codes import PackageFlag, PackageState
from cmlab.site.trust import create_lab_ca
from cmlab.testing import SAMPLE_UPDATE, LabSite
from tests.helpers.cli import cmlab


def test_payload_build_and_verify(template: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "SMSSetup").mkdir(parents=True)
    (src / "SMSSetup" / "readme.txt").write_text("hello")
    out = tmp_path / "p.cab"
    trust = template / "trust"
    cmlab(
        "payload", "build", str(src), str(out),
        "--key", str(trust / "signing.key"), "--cert", str(trust / "signing.pem"),
        "--chain", str(trust / "intermediate.pem"),
    )  # fmt: skip
    ok = cmlab("payload", "verify", str(out), "--site", str(template))
    assert f"File '{out}' is signed and trusted." in ok.stdout
    assert f"File '{out}' is signed with MS root cert." in ok.stdout
    doc = json.loads(cmlab("payload", "verify", str(out), "--site", str(template), "--json").stdout)
    assert doc["status"] == "TRUSTED" and len(doc["chain"]) == 3

    # osslsigncode, a verifier nobody here wrote, accepts what `payload build` signed.
    proc = subprocess.run(
        ["osslsigncode", "verify", "-CAfile", str(trust / "root.pem"), "-in", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    data = bytearray(out.read_bytes())
    data[100] ^= 1
    out.write_bytes(bytes(data))
    bad = cmlab("payload", "verify", str(out), "--site", str(template), check=False)
    assert bad.returncode == 1 and "DIGEST_MISMATCH" in bad.stdout


def test_payload_signed_by_another_root_is_not_trusted(template: Path, tmp_path: Path) -> None:
    other = create_lab_ca(tmp_path / "other")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    out = tmp_path / "p.cab"
    cmlab(
        "payload", "build", str(src), str(out),
        "--key", str(other.signing_key), "--cert", str(other.signing_cert),
        "--chain", str(other.intermediate_cert),
    )  # fmt: skip
    proc = cmlab("payload", "verify", str(out), "--site", str(template), check=False)
    assert proc.returncode == 1 and "UNTRUSTED_ROOT" in proc.stdout


def test_unsigned_payload_and_bad_usage(template: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    out = tmp_path / "u.cab"
    cmlab("payload", "build", str(src), str(out), "--unsigned")
    proc = cmlab("payload", "verify", str(out), "--site", str(template), check=False)
    assert proc.returncode == 1 and "NOT_SIGNED" in proc.stdout
    assert cmlab("payload", "build", str(src), str(out), check=False).returncode == 2
    assert cmlab("frobnicate", check=False).returncode == 2


def test_init_refuses_an_existing_site_and_a_bad_code(template: Path, tmp_path: Path) -> None:
    proc = cmlab("init", str(template), "--site-code", "CAS", check=False)
    assert proc.returncode == 4 and "already holds a site" in proc.stderr  # refused
    # Wrong arguments are bad usage (2), before anything is made.
    proc = cmlab("init", str(tmp_path / "X"), "--site-code", "TOOLONG", check=False)
    assert proc.returncode == 2 and "three letters" in proc.stderr
    proc = cmlab(
        "init", str(tmp_path / "Y"), "--site-code", "PR1", "--role", "primary", check=False
    )
    assert proc.returncode == 2 and "--parent" in proc.stderr
    assert not (tmp_path / "X").exists() and not (tmp_path / "Y").exists()


def test_status_of_a_folder_that_is_not_a_site(tmp_path: Path) -> None:
    proc = cmlab("status", str(tmp_path), check=False)
    assert proc.returncode == 5 and "cmlab init" in proc.stderr  # not found


def test_a_second_daemon_on_the_same_site_is_refused(
    cmlab_site_factory: Callable[..., LabSite],
) -> None:
    # The first daemon serves (it holds the site's lock) once start() returns; it runs in
    # this process, the second is `cmlab run` in another.
    first = cmlab_site_factory(stage="new")
    second = cmlab("run", str(first.path), check=False)
    assert second.returncode == 4 and "already running" in second.stderr  # refused
    assert first.running
    assert first.stop() == 0


# -- the exit-code table --------------------------------------------------------------------------

GUID = SAMPLE_UPDATE
UNKNOWN = "00000000-0000-0000-0000-0000000000AB"


def test_the_exit_code_table_is_in_help_and_in_the_readme(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Exit codes", 1)[1].split("\n\n")
    table = next(block for block in section if block.startswith("| "))
    rows = [line.split("|")[1:3] for line in table.splitlines()[2:]]
    assert [(int(code), name.strip()) for code, name in rows] == [
        (int(code), MEANINGS[code].split(":")[0]) for code in ExitCode
    ]
    for code in ExitCode:
        # argparse wraps the epilog's lines as they are: compare with whitespace folded.
        assert f"{int(code)} {' '.join(MEANINGS[code].split())}" in shown


def test_each_error_has_its_exit_code(tmp_path: Path) -> None:
    cases: list[tuple[BaseException, ExitCode]] = [
        (SiteNotFound("no site.toml"), ExitCode.NOT_FOUND),
        (procs.NoPackageToDownload("no package"), ExitCode.NOT_FOUND),
        (servicing.NoPackageToInitiate("no package"), ExitCode.NOT_FOUND),
        (procs.UnknownPackage("no package, synchronized"), ExitCode.NOT_FOUND),
        (recovery.UnknownSecondary("no site SEC"), ExitCode.NOT_FOUND),
        (procs.NotDownloadable("APPLICABILITY_HIDE"), ExitCode.REFUSED),
        (servicing.NotInitiable("another update is in progress"), ExitCode.REFUSED),
        (recovery.NotRecoverable("not a secondary"), ExitCode.REFUSED),
        (ConfigError("site.toml: bad"), ExitCode.REFUSED),
        (BadGuid("not a GUID"), ExitCode.USAGE),
        (WorkFailed("could not"), ExitCode.FAILED),
        (BadInput("a bad CAB"), ExitCode.FAILED),
        (LookupError("no local site row"), ExitCode.FAILED),
    ]
    assert [(type(e).__name__, exit_code_of(e)) for e, _ in cases] == [
        (type(e).__name__, code) for e, code in cases
    ]
    # The "not found" classes are still the refusals every existing `except` catches.
    assert issubclass(procs.NoPackageToDownload, procs.NotDownloadable)
    assert issubclass(servicing.NoPackageToInitiate, servicing.NotInitiable)
    assert issubclass(recovery.UnknownSecondary, LookupError)
    assert issubclass(SiteNotFound, ConfigError)


def test_recover_secondary_tells_an_unknown_site_from_one_it_may_not_recover(
    tmp_path: Path,
) -> None:
    db_file = tmp_path / "db" / "site.db"
    create_site_db(
        db_file, site_code="PR1", role="primary", server="pr1.lab", build=9135, minor_build=0
    )
    with connected(db_file, "PR1") as conn:
        with transaction(conn):
            hierarchy.ensure_site(
                conn, "SE2", parent="PR2", site_type=hierarchy.SECONDARY, server="se2"
            )
        with pytest.raises(recovery.UnknownSecondary, match="not known at PR1"):
            recovery.request_secondary_recovery(conn, "SEC")
        with pytest.raises(recovery.NotRecoverable, match="child of PR2") as refused:
            recovery.request_secondary_recovery(conn, "SE2")
        assert not isinstance(refused.value, recovery.UnknownSecondary)


# -- bad input: one line on stderr, the right code ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["wait", "{site}", GUID, "INSTALL_SUCESS"], "did you mean INSTALL_SUCCESS?"),
        (["wait", "{site}", GUID, "1234"], "'1234' is not an update package state"),
        (["wait", "{site}", "420E3E18", "INSTALL_SUCCESS"], "is not an update package GUID"),
        (["download", "{site}", "../../etc"], "is not an update package GUID"),
        (["wait", "{site}", GUID, "196612", "--timeout", "-1"], "0 or more"),
        (["install", "{site}", GUID, "--wait", "--timeout", "nan"], "0 or more"),
        (["sync", "{site}", "--timeout", "5"], "--timeout goes with --wait"),
        (["recover-secondary", "{site}", "SECOND"], "three letters or digits"),
    ],
)
def test_bad_usage_exits_2_with_the_reason(
    site: Path, capsys: pytest.CaptureFixture[str], args: list[str], reason: str
) -> None:
    with pytest.raises(SystemExit) as bad:
        main([a.format(site=site) for a in args])
    assert bad.value.code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"cmlab {args[0]}: error: ") and reason in err, err


@pytest.mark.parametrize(
    "args",
    [
        ["sync", "{missing}"],
        ["sync", "{missing}", "--wait", "--timeout", "1"],
        ["download", "{missing}", GUID],
        ["prereq", "{missing}", GUID, "--wait"],
        ["install", "{missing}", GUID],
        ["retry-replication", "{missing}", GUID],
        ["wait", "{missing}", GUID, "INSTALL_SUCCESS"],
        ["status", "{missing}"],
        ["reset", "{missing}", GUID],
        ["recover-secondary", "{missing}", "SEC"],
    ],
)
def test_a_missing_site_is_not_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    missing = tmp_path / "nowhere"
    assert main([a.format(missing=missing) for a in args]) == ExitCode.NOT_FOUND
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        err
        == f"cmlab: {missing / 'site.toml'} not found: is {missing} a site made by `cmlab init`?\n"
    )


def test_an_unknown_package_is_not_found_and_a_wrong_state_is_refused(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    set_state(site, GUID, PackageState.APPLICABILITY_HIDE)
    for command in (["download"], ["prereq"], ["install"], ["retry-replication"]):
        assert main([*command, str(site), UNKNOWN]) == ExitCode.NOT_FOUND
        assert (
            capsys.readouterr().err == f"cmlab: no update package {UNKNOWN} in CM_UpdatePackages\n"
        )
        assert main([*command, str(site), GUID]) == ExitCode.REFUSED
        err = capsys.readouterr().err  # retry-replication: no Easy Setup Package yet
        assert "APPLICABILITY_HIDE (393213)" in err or "no Easy Setup Package yet" in err
    assert main(["reset", str(site), UNKNOWN]) == ExitCode.NOT_FOUND
    assert main(["recover-secondary", str(site), "SEC"]) == ExitCode.REFUSED
    assert "CAS is a cas site" in capsys.readouterr().err


def test_sql_that_the_database_refuses_is_one_line(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sql", str(site), "SELECT * FROM NoSuchTable"]) == ExitCode.FAILED
    assert capsys.readouterr().err == "cmlab: the query failed: no such table: NoSuchTable\n"


# -- no daemon: the request is recorded and waits for `cmlab run` ---------------------------------


def test_an_action_without_a_daemon_is_recorded_and_says_it_waits_for_cmlab_run(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sync", str(site)]) == ExitCode.DONE
    out, err = capsys.readouterr()
    assert out == "Synchronization requested (SyncHistory ID=1).\n"
    assert (
        err
        == f"cmlab: no daemon is running for {site}: the request waits for `cmlab run {site}`.\n"
    )
    # Read without starting it: LabSite on a folder that holds a site uses it as it is.
    assert LabSite(site).query("SELECT ID, Finished FROM SyncHistory") == [(1, None)]

    set_state(site, GUID, PackageState.APPLICABILITY_SUCCESS)
    assert main(["download", str(site), GUID.lower()]) == ExitCode.DONE
    out, err = capsys.readouterr()
    assert out == f"Package {GUID} added to CM_UpdatePackagesToDownload.\n"
    assert "the request waits for `cmlab run" in err


def test_sync_wait_without_a_daemon_says_so_once_and_times_out_with_what_it_saw(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sync", str(site), "--wait", "--timeout", "0.05"]) == ExitCode.TIMEOUT
    out, err = capsys.readouterr()
    assert err.count("no daemon is running") == 1
    assert out.splitlines() == [
        "Synchronization requested (SyncHistory ID=1).",
        "[   0.0 s] synchronization 1 requested",
        "Timed out after 0.05 s waiting for synchronization 1; last seen: synchronization 1 "
        "requested; seen: synchronization 1 requested.",
    ]


def test_retry_replication_waits_for_the_end_of_the_run_its_flag_starts(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    set_state(site, GUID, PackageState.CONTENT_REPLICATION_FAILED, flag=PackageFlag.PREREQ_ONLY)
    with transaction_on(site) as conn:
        package_id = servicing.easy_setup_package_id(conn, GUID, "CAS")
        servicing.sp_UpdateEasySetupSettings(
            conn, package_id, 2, "A" * 64, guid=GUID, source="src", source_site="CAS", source_size=1
        )
    command = ["retry-replication", str(site), GUID, "--wait", "--timeout", "0"]
    assert main(command) == ExitCode.TIMEOUT
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == (
        "Configuration Manager 2509: timed out after 0 s waiting for the prerequisite check "
        "(PREREQ_SUCCESS or PREREQ_WARNING); last state ENABLED (2); seen: ENABLED (2)."
    )
    assert err.count("the request waits for `cmlab run") == 1


# -- `cmlab wait` -------------------------------------------------------------------------------


def test_wait_for_a_state_already_reached_exits_0_at_once(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    set_state(site, GUID, PackageState.INSTALL_SUCCESS)
    for state in ("INSTALL_SUCCESS", "install_success", "196612"):
        assert main(["wait", str(site), GUID, state]) == ExitCode.DONE
        out = capsys.readouterr().out.splitlines()
        assert out[0] == "[   0.0 s] INSTALL_SUCCESS (196612)"
        assert re.fullmatch(
            r"Configuration Manager 2509: INSTALL_SUCCESS \(196612\) after \d+\.\d s\.", out[1]
        )


def test_wait_stops_at_a_failure_state_with_the_log_to_read(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    set_state(site, GUID, PackageState.PREREQ_ERROR, flag=PackageFlag.NORMAL)
    assert main(["wait", str(site), GUID, "INSTALL_SUCCESS"]) == ExitCode.FAILED
    last = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(
        r"Configuration Manager 2509: PREREQ_ERROR \(196607\) after \d+\.\d s, instead of "
        r"INSTALL_SUCCESS; see ConfigMgrPrereq\.log\.",
        last,
    ), last
    # The failure state itself is a state to wait for.
    assert main(["wait", str(site), GUID, "PREREQ_ERROR"]) == ExitCode.DONE


def test_wait_goes_on_past_a_state_the_run_goes_on_from(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # PREREQ_SUCCESS with Flag 0: CMUpdate goes on to install; waiting for it times out.
    set_state(site, GUID, PackageState.PREREQ_SUCCESS, flag=PackageFlag.NORMAL)
    assert main(["wait", str(site), GUID, "INSTALL_SUCCESS", "--timeout", "0"]) == 3
    assert "last state PREREQ_SUCCESS (131074)" in capsys.readouterr().out
    # A failed download queued again: DMPDownloader retries it, so it is not a failure yet.
    set_state(site, GUID, PackageState.DOWNLOAD_FAILED)
    assert main(["wait", str(site), GUID, "DOWNLOAD_SUCCESS", "--timeout", "0"]) == 1
    assert "see dmpdownloader.log" in capsys.readouterr().out
    with transaction_on(site) as conn:
        procs.spAddPackageToDownload(conn, GUID)
    assert main(["wait", str(site), GUID, "DOWNLOAD_SUCCESS", "--timeout", "0"]) == 3
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (
        "Configuration Manager 2509: timed out after 0 s waiting for DOWNLOAD_SUCCESS; last "
        "state DOWNLOAD_FAILED (327679); seen: DOWNLOAD_FAILED (327679)."
    )


def test_wait_for_an_unknown_package_waits_for_a_sync_and_not_after_one(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No synchronization yet: the package may still come; the wait times out.
    assert main(["wait", str(site), UNKNOWN, "DOWNLOAD_SUCCESS", "--timeout", "0.05"]) == 3
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == (
        "Timed out after 0.05 s waiting for DOWNLOAD_SUCCESS; last seen: "
        f"{UNKNOWN}: not in CM_UpdatePackages (yet); seen: {UNKNOWN}: not in "
        "CM_UpdatePackages (yet)."
    )
    # A synchronization over, nothing pending: no such package, at once.
    with transaction_on(site) as conn:
        sync_id = procs.spRequestSync(conn)
        procs.finish_syncs(conn, [sync_id], "success")
        conn.execute("DELETE FROM TableChangeNotifications")
    assert main(["wait", str(site), UNKNOWN, "DOWNLOAD_SUCCESS"]) == ExitCode.NOT_FOUND
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        f"cmlab: no update package {UNKNOWN} in CM_UpdatePackages, and the last "
        "synchronization is over: `cmlab status` lists the packages"
    )


# -- the progress line ------------------------------------------------------------------------


def progress(line: str, state: int | None = None) -> Progress:
    return Progress(Verdict.WAITING, line, state)


def test_on_a_terminal_the_progress_line_is_redrawn_in_place() -> None:
    stream = io.StringIO()
    shown = ProgressLine(stream, is_tty=True)
    shown.update(progress("ENABLED (2)"), 0.0)
    shown.update(progress("ENABLED (2)"), 0.04)  # same tenth, same state: nothing
    shown.update(progress("ENABLED (2)"), 0.12)  # the seconds move on
    shown.update(progress("PREREQ_IN_PROGRESS (131073)"), 0.13)
    shown.finish()
    assert stream.getvalue() == (
        "\r\033[K[   0.0 s] ENABLED (2)"
        "\r\033[K[   0.1 s] ENABLED (2)"
        "\r\033[K[   0.1 s] PREREQ_IN_PROGRESS (131073)"
        "\r\033[K"
    )
    assert "\n" not in stream.getvalue()


def test_elsewhere_the_progress_is_one_line_per_state_change() -> None:
    stream = io.StringIO()
    shown = ProgressLine(stream, is_tty=False)
    for line, elapsed in [
        ("ENABLED (2)", 0.0),
        ("ENABLED (2)", 0.5),
        ("PREREQ_IN_PROGRESS (131073)", 1.25),
        ("PREREQ_IN_PROGRESS (131073)", 2.0),
        ("PREREQ_SUCCESS (131074)", 12.0),
    ]:
        shown.update(progress(line), elapsed)
    shown.finish()
    assert stream.getvalue() == (
        "[   0.0 s] ENABLED (2)\n"
        "[   1.2 s] PREREQ_IN_PROGRESS (131073)\n"
        "[  12.0 s] PREREQ_SUCCESS (131074)\n"
    )
    assert ProgressLine.on(stream).is_tty is False


def test_the_outcome_line_says_what_happened_in_the_consoles_words() -> None:
    seen = ("ENABLED (2)", "PREREQ_IN_PROGRESS (131073)")
    done = WaitResult(Verdict.DONE, "INSTALL_SUCCESS (196612)", 196612, seen, 0.84)
    assert outcome("Configuration Manager 2509", done, "INSTALL_SUCCESS", 5) == (
        "Configuration Manager 2509: INSTALL_SUCCESS (196612) after 0.8 s."
    )
    late = WaitResult(Verdict.TIMEOUT, "PREREQ_IN_PROGRESS (131073)", 131073, seen, 5.01)
    assert outcome("Configuration Manager 2509", late, "INSTALL_SUCCESS", 5) == (
        "Configuration Manager 2509: timed out after 5 s waiting for INSTALL_SUCCESS; last "
        "state PREREQ_IN_PROGRESS (131073); seen: ENABLED (2) -> PREREQ_IN_PROGRESS (131073)."
    )
    warned = WaitResult(Verdict.FAILED, "PREREQ_WARNING (131075)", 131075, seen, 1.0)
    assert outcome("Configuration Manager 2509", warned, "the installation", 5).endswith(
        "instead of the installation; see ConfigMgrPrereq.log; `cmlab install "
        "--ignore-warnings` installs despite warnings."
    )
    failed_sync = WaitResult(Verdict.FAILED, "synchronization 4: failed", None, (), 0.3)
    assert outcome(None, failed_sync, "synchronization 4", 5) == (
        "Synchronization 4: failed after 0.3 s."
    )


# -- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def transaction_on(site: Path) -> Iterator[sqlite3.Connection]:
    with one_transaction(site / "db" / "site.db", "CAS") as conn:
        yield conn


def set_state(site: Path, guid: str, state: int, *, flag: int = 0) -> None:
    """The package at `state`, by hand (a site made by `cmlab init` has no packages yet)."""
    with transaction_on(site) as conn:
        conn.execute(
            "INSERT INTO CM_UpdatePackages (PackageGuid, Name, UpdateNumber, FullVersion, "
            "MinCMVersion, MaxCMVersion, State, Flag) VALUES (?, 'Configuration Manager 2509', "
            "'2509', '5.00.9141.1000', '5.00.8790.1000', '5.00.9135.1000', ?, ?) "
            "ON CONFLICT (PackageGuid) DO UPDATE SET State = excluded.State, Flag = excluded.Flag",
            (guid, int(state), int(flag)),
        )
        conn.execute("DELETE FROM CM_UpdatePackagesToDownload")


def test_init_hierarchy_makes_every_site_of_a_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "lab.toml"
    spec.write_text(
        '[defaults]\nsync_interval = 0\n"replication.cmupdates_interval" = 0.5\n'
        '[[site]]\ncode = "CAS"\n[[site]]\ncode = "PR1"\nparent = "CAS"\n'
    )
    assert main(["init-hierarchy", str(spec), str(tmp_path / "lab")]) == ExitCode.DONE
    out = capsys.readouterr().out
    assert f"Created site PR1 (primary under CAS) in {tmp_path / 'lab' / 'PR1'}" in out
    assert main(["status", "--json", str(tmp_path / "lab" / "CAS")]) == ExitCode.DONE
    status = json.loads(capsys.readouterr().out)
    assert [s["SiteCode"] for s in status["sites"]] == ["CAS", "PR1"]
    # Again: the sites are there, nothing is touched.
    assert main(["init-hierarchy", str(spec), str(tmp_path / "lab")]) == ExitCode.REFUSED
    assert "already holds a site" in capsys.readouterr().err
    spec.write_text(
        '[[site]]\ncode = "CAS"\n[[site]]\ncode = "SEC"\nparent = "CAS"\nrole = "secondary"\n'
    )
    assert main(["init-hierarchy", str(spec), str(tmp_path / "other")]) == ExitCode.REFUSED
    err = capsys.readouterr().err
    assert err == (
        "cmlab: hierarchy spec: site SEC: a secondary site cannot be under CAS, a cas site\n"
    )
    assert not (tmp_path / "other" / "CAS").exists()
