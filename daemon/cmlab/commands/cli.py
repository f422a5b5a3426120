"""The `cmlab` command line: an administrator's commands on a site folder.

Administrator actions go through the site database, as the SMS Provider's do (cmlab.admin.
actions); SMSDBMon's triggers wake the components. `cmlab wait` and the actions' `--wait`
wait for a result through cmlab.admin.waiting, as the testing API does, so a shell script and
a test agree on what "done", "failed" and "timed out" mean; the exit codes are the table in
commands/exit_codes.py, printed below."""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

from cmlab.admin import actions, waiting
from cmlab.admin.reset import BadGuid, normalize_guid
from cmlab.admin.status import collect_status, daemon_running, print_status
from cmlab.commands.exit_codes import HANDLED, ExitCode, epilog, exit_code_of
from cmlab.commands.progress import ProgressLine, outcome
from cmlab.site.config import load_config
from cmlab.site.formats.ids import is_site_code_either_case
from cmlab.site.sitedb import connected, overview, procs, scripts, servicing
from cmlab.site.state_codes import PackageFlag, PackageState

# How long `cmlab wait` and `--wait` wait by default. A lab update runs sync to INSTALL_SUCCESS
# in about 1 s (README, Performance) and a 200 MB payload in about 3 s; a hierarchy's child
# waits for the CMUpdates replication group (60 s by default) and takes about 2 min to report
# back. Ten minutes covers all of these with room for a loaded machine.
DEFAULT_TIMEOUT = 600.0
# A command polls every 50 ms, not waiting.POLL_SECONDS' 10 ms (the testing API's, where each
# millisecond counts): over a 5 s wait on a 2-vCPU VM at load 3.4 it took 0.19 CPU s (3.8% of a
# core) against 0.78 (15.7%), and 40 ms more is nothing to a script whose `cmlab` takes 0.7 s
# to start.
POLL_SECONDS = 0.05

_VERDICT_CODES = {
    waiting.Verdict.DONE: ExitCode.DONE,
    waiting.Verdict.FAILED: ExitCode.FAILED,
    waiting.Verdict.TIMEOUT: ExitCode.TIMEOUT,
}


def _fail(message: str, code: ExitCode = ExitCode.FAILED) -> int:
    print(f"cmlab: {message}", file=sys.stderr)
    return int(code)


def _message(exc: BaseException) -> str:
    # A LookupError's str() is repr() of its argument (quotes and all) for KeyError.
    if len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


# -- argument types: a wrong value is argparse's bad usage (2) with a one-line reason ----------


def _guid(text: str) -> str:
    try:
        return normalize_guid(text)
    except BadGuid as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _site_code(text: str) -> str:
    if not is_site_code_either_case(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a site code is three letters or digits, e.g. CAS or PR1"
        )
    return text.upper()


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds, 0 or more")
    return value


def _package_state(text: str) -> PackageState:
    """A state by name in any case (install_success) or by its number (196612)."""
    word = text.strip()
    if word.isdigit():
        try:
            return PackageState(int(word))
        except ValueError:
            pass
    else:
        name = word.upper()
        if name in PackageState.__members__:
            return PackageState[name]
    near = difflib.get_close_matches(word.upper(), list(PackageState.__members__), n=1)
    hint = f"; did you mean {near[0]}?" if near else " (`cmlab wait --help` lists them)"
    raise argparse.ArgumentTypeError(
        f"{text!r} is not an update package state: a name such as INSTALL_SUCCESS or its "
        f"number (196612){hint}"
    )


# -- commands ---------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from cmlab.admin.init import InitOptions, init_site

    if args.role != "cas" and not args.parent:
        return _fail(
            f"a {args.role} site needs --parent (the parent site's folder)", ExitCode.USAGE
        )
    root = init_site(
        InitOptions(
            site_dir=Path(args.site_dir),
            site_code=args.site_code,
            role=args.role,
            parent=Path(args.parent) if args.parent else None,
            address=Path(args.address) if args.address else None,
            content_source=Path(args.content_source) if args.content_source else None,
            display_root=args.display_root or "",
            sync_interval=args.sync_interval,
            rescan_interval=args.rescan_interval,
            ca_dir=Path(args.ca) if args.ca else None,
            key_type=args.key_type,
            scp_remote=args.scp_remote,
            auto_download=not args.no_auto_download,
        )
    )
    print(f"Created site {args.site_code.upper()} in {root}")
    print(f"  run it:   cmlab run {root}")
    print(f"  sync:     cmlab sync {root}")
    return ExitCode.DONE


def cmd_init_hierarchy(args: argparse.Namespace) -> int:
    """Every site of a hierarchy spec (docs/testing.md has the format), top first."""
    from cmlab.admin.hierarchy_spec import HierarchySpec, create_hierarchy

    spec = HierarchySpec.load(Path(args.spec))
    root = Path(args.root)
    taken = [s.code for s in spec.sites if (root / s.code / "site.toml").exists()]
    if taken:
        return _fail(f"{root / taken[0]} already holds a site (site.toml exists)", ExitCode.REFUSED)
    sites = create_hierarchy(spec, root)
    for site in spec.sites:
        under = f" under {site.parent}" if site.parent else ""
        print(f"Created site {site.code} ({site.role}{under}) in {sites[site.code]}")
    print("  run each: " + "; ".join(f"cmlab run {p}" for p in sites.values()))
    return ExitCode.DONE


def cmd_run(args: argparse.Namespace) -> int:
    from cmlab.daemon import run

    return run(Path(args.site_dir))


def cmd_status(args: argparse.Namespace) -> int:
    status = collect_status(Path(args.site_dir))
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print_status(status)
    return ExitCode.DONE


# -- waiting ----------------------------------------------------------------------------------


def _note_no_daemon(site: Path, then: str = "the request waits for `cmlab run {site}`") -> None:
    """Say once, on stderr, that nothing will happen until a daemon serves the site: the
    request is recorded all the same, and someone else may start the daemon."""
    if not daemon_running(site):
        said = then.format(site=site)
        print(f"cmlab: no daemon is running for {site}: {said}.", file=sys.stderr)


def _wait(check: Callable[[], waiting.Progress], timeout: float) -> waiting.WaitResult:
    line = ProgressLine.on(sys.stdout)
    try:
        return waiting.wait(check, timeout, on_progress=line.update, interval=POLL_SECONDS)
    finally:
        line.finish()


def _package_name(site: Path, guid: str) -> str:
    config = load_config(site)
    with connected(config.paths.db_file, config.site_code) as conn:
        names = {p.guid.upper(): p.name for p in overview.packages(conn)}
    return names.get(guid.upper()) or guid


class _KnownPackageCheck:
    """waiting.package_check, and "not found" for a GUID that no synchronization will bring:
    the site has synchronized, and nothing is pending that could add it. `wait` closes it (and
    with it the check's read connection)."""

    def __init__(self, site: Path, guid: str, goal: waiting.Goal) -> None:
        self.config = load_config(site)
        self.guid = guid
        self.check = waiting.package_check(site, guid, goal)

    def __call__(self) -> waiting.Progress:
        progress = self.check()
        if progress.state is None and not waiting.package_may_appear(self.config):
            raise procs.UnknownPackage(
                f"no update package {self.guid} in CM_UpdatePackages, and the last "
                "synchronization is over: `cmlab status` lists the packages"
            )
        return progress

    def close(self) -> None:
        self.check.close()


def _await_package(site: Path, guid: str, goal: waiting.Goal, timeout: float) -> int:
    result = _wait(_KnownPackageCheck(site, guid, goal), timeout)
    # A package that never appeared: the progress lines name its GUID themselves.
    label = _package_name(site, guid) if result.state is not None else None
    print(outcome(label, result, goal.what, timeout))
    return _VERDICT_CODES[result.verdict]


def cmd_wait(args: argparse.Namespace) -> int:
    """`cmlab wait SITE GUID STATE`: until the package is at STATE, or stops at a failure."""
    site = Path(args.site_dir)
    goal = waiting.state_goal(args.state)
    load_config(site)  # a folder that is not a site is "not found" before any note
    _note_no_daemon(site, "its packages change state only once `cmlab run {site}` serves it")
    return _await_package(site, args.guid, goal, args.timeout)


# -- the administrator's actions ----------------------------------------------------------------


def cmd_sync(args: argparse.Namespace) -> int:
    site = Path(args.site_dir)
    sync_id = actions.request_sync(site)
    print(f"Synchronization requested (SyncHistory ID={sync_id}).")
    _note_no_daemon(site)
    if not args.wait:
        return ExitCode.DONE
    result = _wait(waiting.sync_check(site, sync_id), args.timeout)
    print(outcome(None, result, f"synchronization {sync_id}", args.timeout))
    return _VERDICT_CODES[result.verdict]


def cmd_download(args: argparse.Namespace) -> int:
    """The console's Download: spAddPackageToDownload; SMSDBMon's trigger wakes DMPDownloader."""
    site = Path(args.site_dir)
    if actions.download(site, args.guid):
        print(f"Package {args.guid} added to CM_UpdatePackagesToDownload.")
    else:
        print(f"Package {args.guid} is already in CM_UpdatePackagesToDownload.")
    return _then_wait(args, site, waiting.DOWNLOAD_GOAL)


def _then_wait(args: argparse.Namespace, site: Path, goal: waiting.Goal) -> int:
    _note_no_daemon(site)
    if not args.wait:
        return ExitCode.DONE
    return _await_package(site, args.guid, goal, args.timeout)


def _initiate_upgrade(args: argparse.Namespace, flag: PackageFlag) -> int:
    site = Path(args.site_dir)
    was = actions.initiate_upgrade(site, args.guid, flag)
    print(
        f"InitiateUpgrade({args.guid}, Flag={int(flag)} {flag.name}): State "
        f"{PackageState.name_of(was)} ({was}) -> ENABLED (2). SMSDBMon drops 2.ESC for HMAN."
    )
    return _then_wait(args, site, waiting.run_goal(flag))


def cmd_prereq(args: argparse.Namespace) -> int:
    """The console's Run prerequisite check: InitiateUpgrade with Flag=1 (PREREQ_ONLY)."""
    return _initiate_upgrade(args, PackageFlag.PREREQ_ONLY)


def cmd_install(args: argparse.Namespace) -> int:
    """The console's Install: InitiateUpgrade with Flag=0, or 2 to ignore prerequisite warnings."""
    flag = PackageFlag.IGNORE_WARNINGS if args.ignore_warnings else PackageFlag.NORMAL
    return _initiate_upgrade(args, flag)


def cmd_retry_replication(args: argparse.Namespace) -> int:
    """SMS_CM_UpdatePackages.RetryContentReplication: update the Easy Setup Package again."""
    site = Path(args.site_dir)
    package_id = actions.retry_replication(site, args.guid)
    print(
        f"RetryContentReplication({args.guid}): ReturnValue 0. Easy Setup Package {package_id} "
        "will be updated from its source (SMSDBMon drops 2.ESC); follow distmgr.log."
    )
    # The restarted run keeps the package's flag: it ends where that flag's run ends.
    flag = _current_flag(site, args.guid) if args.wait else PackageFlag.NORMAL
    return _then_wait(args, site, waiting.run_goal(flag))


def _current_flag(site: Path, guid: str) -> PackageFlag:
    config = load_config(site)
    with connected(config.paths.db_file, config.site_code) as conn:
        progress = servicing.package_progress(conn, guid)
    return PackageFlag(progress.flag) if progress is not None else PackageFlag.NORMAL


def cmd_recover_secondary(args: argparse.Namespace) -> int:
    """The console's Recover Secondary Site, at the secondary's parent primary."""
    number = actions.recover_secondary(Path(args.primary_dir), args.site_code)
    print(
        f"Recover Secondary Site {args.site_code}: request {number} queued; the primary "
        "site's HMAN reinstalls it with its own files (follow hman.log, sender.log, and the "
        "secondary's despool.log)."
    )
    return ExitCode.DONE


def cmd_sql(args: argparse.Namespace) -> int:
    """Run one of the guide's queries (T-SQL spellings like dbo. and TOP n are accepted)."""
    config = load_config(Path(args.site_dir))
    try:
        with connected(config.paths.db_file, config.site_code) as conn:
            cols, rows = scripts.run_query(conn, args.query)
    except sqlite3.Error as exc:
        return _fail(f"the query failed: {exc}")
    if args.json:
        print(json.dumps([dict(zip(cols, r, strict=True)) for r in rows], indent=2, default=str))
    else:
        if cols:
            print(" | ".join(cols))
        for r in rows:
            print(" | ".join("NULL" if v is None else str(v) for v in r))
    return ExitCode.DONE


def cmd_reset(args: argparse.Namespace) -> int:
    """The Update Reset Tool (CMUpdateReset.exe): see docs/reset.md."""
    from cmlab.admin.reset import ResetResult, print_report, reset_package

    report = reset_package(Path(args.site_dir), args.guid, force=args.force)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report)
    codes = {
        ResetResult.RESET: ExitCode.FAILED if report.errors else ExitCode.DONE,
        ResetResult.UNKNOWN_PACKAGE: ExitCode.NOT_FOUND,
        ResetResult.INSTALLING: ExitCode.REFUSED,
        ResetResult.DOWNLOADED: ExitCode.REFUSED,
        ResetResult.NOT_TOP_LEVEL: ExitCode.REFUSED,
    }
    return codes[report.outcome]


def cmd_payload_build(args: argparse.Namespace) -> int:
    from cmlab.admin.payload import build_cab_from_dir
    from cmlab.site.trust import Signer

    signer = None
    if not args.unsigned:
        if not (args.key and args.cert):
            return _fail("payload build needs --key and --cert (or --unsigned)", ExitCode.USAGE)
        signer = Signer.from_pem_files(
            Path(args.key), Path(args.cert), Path(args.chain) if args.chain else None, args.digest
        )
    build_cab_from_dir(Path(args.src), Path(args.out), signer)
    print(f"Built {'unsigned' if signer is None else 'signed'} {args.out}")
    return ExitCode.DONE


def cmd_payload_verify(args: argparse.Namespace) -> int:
    from cmlab.site.trust import TrustStore, verify_cab

    config = load_config(Path(args.site))
    trust = TrustStore.from_pem_files(config.trust_roots, config.microsoft_roots)
    verdict = verify_cab(Path(args.file), trust)
    result = {
        "file": args.file,
        "status": verdict.status.name,
        "trusted": verdict.trusted,
        "ms_root": verdict.ms_root,
        "reason": verdict.reason,
        "digest_algorithm": verdict.digest_algorithm,
        "signer": verdict.signer_subject,
        "root": verdict.root_subject,
        "signing_time": verdict.signing_time.isoformat() if verdict.signing_time else None,
        "chain": [c.subject.rfc4514_string() for c in verdict.chain],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        if verdict.trusted:
            print(f"File '{args.file}' is signed and trusted.")
            if verdict.ms_root:
                print(f"File '{args.file}' is signed with MS root cert.")
        else:
            print(f"File '{args.file}' is NOT trusted: {verdict.status.name}: {verdict.reason}")
        for i, subject in enumerate(result["chain"]):
            print(f"  chain[{i}]: {subject}")
    return ExitCode.DONE if verdict.trusted else ExitCode.FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    from cmlab.commands.demo import run_demo

    return run_demo(Path(args.dir) if args.dir else None)


def _wait_options(p: argparse.ArgumentParser, until: str) -> None:
    p.set_defaults(wait_parser=p)  # for its usage line when --timeout comes without --wait
    p.add_argument(
        "--wait",
        action="store_true",
        help=f"then wait {until}, showing each state; exit 0 done, 1 failed, 3 timed out",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help=f"with --wait: give up after S seconds (default {DEFAULT_TIMEOUT:g})",
    )


def _package_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("site_dir")
    p.add_argument("guid", type=_guid, help="the update package's Package Guid")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmlab",
        description=__doc__,
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a site folder")
    p.add_argument("site_dir")
    p.add_argument("--site-code", required=True, type=_site_code)
    p.add_argument("--role", choices=("cas", "primary", "secondary"), default="cas")
    p.add_argument(
        "--parent", help="the parent site's folder (primary: a CAS; secondary: a primary)"
    )
    p.add_argument(
        "--address",
        help="how the parent reaches this site's folder (a mount point on its host); "
        "this folder by default",
    )
    p.add_argument("--content-source")
    p.add_argument("--display-root", help=r"show paths Windows-style, e.g. 'E:\ConfigMgr'")
    p.add_argument(
        "--sync-interval", type=float, default=86400.0, help="seconds; 0 = on request only"
    )
    p.add_argument("--rescan-interval", type=float, default=5.0)
    p.add_argument("--ca", help="use an existing lab CA folder instead of creating one")
    p.add_argument("--key-type", choices=("rsa", "ecdsa"), default="rsa")
    p.add_argument(
        "--scp-remote", action="store_true", help="SCP remote: MCMs go via MP/OUTBOXES/MCM.box"
    )
    p.add_argument(
        "--no-auto-download",
        action="store_true",
        help="do not download the newest applicable update by itself (use `cmlab download`)",
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "init-hierarchy",
        help="create every site of a hierarchy spec (a TOML file: docs/testing.md) in ROOT/<CODE>",
    )
    p.add_argument("spec", help="the hierarchy spec: [defaults] and one [[site]] per site")
    p.add_argument("root", help="the folder the sites are made in, one folder per site code")
    p.set_defaults(func=cmd_init_hierarchy)

    p = sub.add_parser("run", help="run the site's components in the foreground")
    p.add_argument("site_dir")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="packages, states, inbox backlog")
    p.add_argument("site_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("sync", help="check for updates now")
    p.add_argument("site_dir")
    _wait_options(p, "until the synchronization is over and every package is decided")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("download", help="download an update package (spAddPackageToDownload)")
    _package_arguments(p)
    _wait_options(p, "for DOWNLOAD_SUCCESS")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("prereq", help="run the prerequisite check (InitiateUpgrade, Flag=1)")
    _package_arguments(p)
    _wait_options(p, "for PREREQ_SUCCESS or PREREQ_WARNING")
    p.set_defaults(func=cmd_prereq)

    p = sub.add_parser("install", help="install an update (InitiateUpgrade, Flag=0)")
    _package_arguments(p)
    _wait_options(
        p, "for INSTALL_SUCCESS (a prerequisite warning fails it unless --ignore-warnings)"
    )
    p.add_argument(
        "--ignore-warnings",
        action="store_true",
        help="go on to installation after prerequisite warnings (Flag=2)",
    )
    p.set_defaults(func=cmd_install)

    p = sub.add_parser(
        "retry-replication",
        help="update the Easy Setup Package from its source again (RetryContentReplication)",
    )
    _package_arguments(p)
    _wait_options(p, "for the end of the run it restarts (as its flag: check or install)")
    p.set_defaults(func=cmd_retry_replication)

    p = sub.add_parser(
        "wait",
        help="wait until an update package reaches a state (or stops at a failure state)",
        description="Wait until the update package is at STATE. Exit 0 when it is there, 1 "
        "when it stops at another failure state ("
        + ", ".join(s.name for s in PackageState if s in waiting.FAILURE_STATES)
        + "), 3 when the timeout passes first, 5 when the site has synchronized and has no "
        "such package. STATE is one of: " + ", ".join(PackageState.__members__) + ".",
    )
    _package_arguments(p)
    p.add_argument(
        "state",
        type=_package_state,
        help="a state name in any case (INSTALL_SUCCESS) or its number (196612)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        default=DEFAULT_TIMEOUT,
        help=f"give up after S seconds (default {DEFAULT_TIMEOUT:g})",
    )
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser(
        "recover-secondary",
        help="reinstall a secondary site with its parent primary's files (Recover Secondary Site)",
    )
    p.add_argument("primary_dir")
    p.add_argument("site_code", type=_site_code)
    p.set_defaults(func=cmd_recover_secondary)

    p = sub.add_parser("sql", help="run a query against the site database (the guide's queries)")
    p.add_argument("site_dir")
    p.add_argument("query")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser(
        "reset",
        help="the Update Reset Tool (CMUpdateReset.exe): remove a package that has not started "
        "installing, so the next sync starts it over",
    )
    p.add_argument("site_dir")
    p.add_argument("guid", type=_guid, help="the update package's Package Guid")
    p.add_argument(
        "--force",
        action="store_true",
        help="also delete a successfully downloaded package (the tool's -FDELETE); "
        "never one that started installing",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reset)

    p = sub.add_parser("payload", help="build or verify signed CABs")
    psub = p.add_subparsers(dest="payload_command", required=True)
    b = psub.add_parser("build", help="CAB a folder and sign it")
    b.add_argument("src")
    b.add_argument("out")
    b.add_argument("--key")
    b.add_argument("--cert")
    b.add_argument("--chain")
    b.add_argument("--digest", choices=("sha256", "sha384", "sha1"), default="sha256")
    b.add_argument("--unsigned", action="store_true")
    b.set_defaults(func=cmd_payload_build)
    v = psub.add_parser("verify", help="verify a CAB's signature against a site's trust")
    v.add_argument("file")
    v.add_argument("--site", required=True)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_payload_verify)

    p = sub.add_parser("demo", help="a whole update on a fresh lab site")
    p.add_argument("dir", nargs="?")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "wait"):  # the actions' --wait; `cmlab wait` has its own default
        if args.timeout is not None and not args.wait:
            args.wait_parser.error("--timeout goes with --wait")
        if args.timeout is None:
            args.timeout = DEFAULT_TIMEOUT
    try:
        return int(args.func(args))
    except HANDLED as exc:
        return _fail(_message(exc), exit_code_of(exc))
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
