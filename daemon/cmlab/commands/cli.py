"""The `cmlab` command line. Exit codes: 0 done, 1 failed, 2 bad usage.

Administrator actions go through the site database, as the SMS Provider's do; SMSDBMon's
triggers wake the components."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from contextlib import AbstractContextManager
from pathlib import Path

from cmlab.admin.status import collect_status, print_status
from cmlab.core.errors import CmlabError
from cmlab.site.config import load_config
from cmlab.site.sitedb import (
    connected,
    one_transaction,
    procs,
    recovery,
    scripts,
    servicing,
)
from cmlab.site.state_codes import PackageFlag, PackageState


def _fail(message: str, code: int = 1) -> int:
    print(f"cmlab: {message}", file=sys.stderr)
    return code


def cmd_init(args: argparse.Namespace) -> int:
    from cmlab.admin.init import InitOptions, init_site

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
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from cmlab.daemon import run

    return run(Path(args.site_dir))


def cmd_status(args: argparse.Namespace) -> int:
    status = collect_status(Path(args.site_dir))
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print_status(status)
    return 0


def _transaction(site_dir: Path) -> AbstractContextManager[sqlite3.Connection]:
    """The site's database, for one administrator action in one transaction."""
    config = load_config(site_dir)
    return one_transaction(config.paths.db_file, config.site_code)


def cmd_sync(args: argparse.Namespace) -> int:
    with _transaction(Path(args.site_dir)) as conn:
        sync_id = procs.spRequestSync(conn, procs.SyncReason.ADMIN)
    print(f"Synchronization requested (SyncHistory ID={sync_id}).")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """The console's Download: spAddPackageToDownload; SMSDBMon's trigger wakes DMPDownloader."""
    with _transaction(Path(args.site_dir)) as conn:
        queued = procs.spAddPackageToDownload(conn, args.guid)
    if queued:
        print(f"Package {args.guid} added to CM_UpdatePackagesToDownload.")
    else:
        print(f"Package {args.guid} is already in CM_UpdatePackagesToDownload.")
    return 0


def _initiate_upgrade(site_dir: str, guid: str, flag: PackageFlag) -> None:
    with _transaction(Path(site_dir)) as conn:
        was = servicing.InitiateUpgrade(conn, guid, flag)
    print(
        f"InitiateUpgrade({guid}, Flag={int(flag)} {flag.name}): State "
        f"{PackageState.name_of(was)} ({was}) -> ENABLED (2). SMSDBMon drops 2.ESC for HMAN."
    )


def cmd_prereq(args: argparse.Namespace) -> int:
    """The console's Run prerequisite check: InitiateUpgrade with Flag=1 (PREREQ_ONLY)."""
    _initiate_upgrade(args.site_dir, args.guid, PackageFlag.PREREQ_ONLY)
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    """The console's Install: InitiateUpgrade with Flag=0, or 2 to ignore prerequisite warnings."""
    flag = PackageFlag.IGNORE_WARNINGS if args.ignore_warnings else PackageFlag.NORMAL
    _initiate_upgrade(args.site_dir, args.guid, flag)
    return 0


def cmd_retry_replication(args: argparse.Namespace) -> int:
    """SMS_CM_UpdatePackages.RetryContentReplication: update the Easy Setup Package again."""
    with _transaction(Path(args.site_dir)) as conn:
        package_id = servicing.RetryContentReplication(conn, args.guid)
    print(
        f"RetryContentReplication({args.guid}): ReturnValue 0. Easy Setup Package {package_id} "
        "will be updated from its source (SMSDBMon drops 2.ESC); follow distmgr.log."
    )
    return 0


def cmd_recover_secondary(args: argparse.Namespace) -> int:
    """The console's Recover Secondary Site, at the secondary's parent primary."""
    session = _transaction(Path(args.primary_dir))
    try:
        with session as conn:
            number = recovery.request_secondary_recovery(conn, args.site_code.upper())
    except LookupError as exc:
        return _fail(str(exc.args[0] if exc.args else exc))
    print(
        f"Recover Secondary Site {args.site_code.upper()}: request {number} queued; the primary "
        "site's HMAN reinstalls it with its own files (follow hman.log, sender.log, and the "
        "secondary's despool.log)."
    )
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    """Run one of the guide's queries (T-SQL spellings like dbo. and TOP n are accepted)."""
    config = load_config(Path(args.site_dir))
    with connected(config.paths.db_file, config.site_code) as conn:
        cols, rows = scripts.run_query(conn, args.query)
    if args.json:
        print(json.dumps([dict(zip(cols, r, strict=True)) for r in rows], indent=2, default=str))
    else:
        if cols:
            print(" | ".join(cols))
        for r in rows:
            print(" | ".join("NULL" if v is None else str(v) for v in r))
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    """The Update Reset Tool (CMUpdateReset.exe): see docs/reset.md."""
    from cmlab.admin.reset import BadGuid, print_report, reset_package

    try:
        report = reset_package(Path(args.site_dir), args.guid, force=args.force)
    except BadGuid as exc:
        return _fail(str(exc), 2)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report)
    return 0 if report.ok else 1


def cmd_payload_build(args: argparse.Namespace) -> int:
    from cmlab.admin.payload import build_cab_from_dir
    from cmlab.site.trust import Signer

    signer = None
    if not args.unsigned:
        if not (args.key and args.cert):
            return _fail("payload build needs --key and --cert (or --unsigned)", 2)
        signer = Signer.from_pem_files(
            Path(args.key), Path(args.cert), Path(args.chain) if args.chain else None, args.digest
        )
    build_cab_from_dir(Path(args.src), Path(args.out), signer)
    print(f"Built {'unsigned' if signer is None else 'signed'} {args.out}")
    return 0


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
    return 0 if verdict.trusted else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from cmlab.commands.demo import run_demo

    return run_demo(Path(args.dir) if args.dir else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a site folder")
    p.add_argument("site_dir")
    p.add_argument("--site-code", required=True)
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

    p = sub.add_parser("run", help="run the site's components in the foreground")
    p.add_argument("site_dir")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="packages, states, inbox backlog")
    p.add_argument("site_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("sync", help="check for updates now")
    p.add_argument("site_dir")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("download", help="download an update package (spAddPackageToDownload)")
    p.add_argument("site_dir")
    p.add_argument("guid")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("prereq", help="run the prerequisite check (InitiateUpgrade, Flag=1)")
    p.add_argument("site_dir")
    p.add_argument("guid")
    p.set_defaults(func=cmd_prereq)

    p = sub.add_parser("install", help="install an update (InitiateUpgrade, Flag=0)")
    p.add_argument("site_dir")
    p.add_argument("guid")
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
    p.add_argument("site_dir")
    p.add_argument("guid")
    p.set_defaults(func=cmd_retry_replication)

    p = sub.add_parser(
        "recover-secondary",
        help="reinstall a secondary site with its parent primary's files (Recover Secondary Site)",
    )
    p.add_argument("primary_dir")
    p.add_argument("site_code")
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
    p.add_argument("guid", help="the update package's Package Guid")
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
    try:
        return int(args.func(args))
    except CmlabError as exc:
        return _fail(str(exc))
    except LookupError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
