"""`cmlab status`: what a site's database and inboxes say, as a dict (`--json`) or a table.

Its own module because two commands show it: `cmlab status` and the end of `cmlab demo`.
With the table in cli.py, demo had to import the CLI that dispatches to it (a cycle hidden
behind a function-level import); here both import it and neither imports the other."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cmlab.site import site_lock
from cmlab.site.config import load_config
from cmlab.site.contract import load_contract, matches_any
from cmlab.site.sitedb import connected, hierarchy, overview
from cmlab.site.state_codes import PackageState


def daemon_running(site_dir: Path) -> bool:
    return site_lock.daemon_running(site_dir / "db")


def collect_status(site_dir: Path) -> dict[str, Any]:
    config = load_config(site_dir)
    with connected(config.paths.db_file, config.site_code) as conn:
        packages = [
            {
                "PackageGuid": p.guid,
                "Name": p.name,
                "State": p.state,
                "StateName": PackageState.name_of(p.state),
                "Flag": p.flag,
            }
            for p in overview.packages(conn)
        ]
        version = overview.current_site_version(conn)
        to_download = overview.packages_to_download(conn)
        last_sync = overview.last_sync(conn)
        # The hierarchy as this database knows it, each site's version and its state for
        # every update that has site status rows (the guide's query over ServerData).
        sites = [
            {
                "SiteCode": s.code,
                "Parent": s.parent,
                "Role": hierarchy.TYPE_NAMES.get(s.site_type, str(s.site_type)),
                "Local": s.local,
                "Version": s.version,
                "Address": s.folder,
                "States": {
                    guid: {"State": state, "StateName": PackageState.name_of(state)}
                    for guid, state in s.states.items()
                },
            }
            for s in overview.hierarchy_states(conn)
        ]
    # One row per folder: HMAN's CFD has two contract entries (CMU files; ESC and CME).
    patterns: dict[str, tuple[str, tuple[str, ...]]] = {}
    for entry in load_contract():
        component, files = patterns.get(entry.folder, (entry.component, ()))
        patterns[entry.folder] = (component, files + entry.files)
    inboxes = []
    for name, (component, files) in patterns.items():
        folder = config.root.joinpath(*name.split("/"))
        waiting = bad = 0
        if folder.is_dir():
            waiting = sum(1 for n in os.listdir(folder) if matches_any(n, files))
            bad_dir = folder / "BAD"
            if bad_dir.is_dir():
                bad = sum(1 for n in os.listdir(bad_dir) if not n.endswith(".reason"))
        inboxes.append(
            {
                "inbox": name,
                "component": component,
                "files": list(files),
                "backlog": waiting,
                "bad": bad,
            }
        )
    return {
        "site": config.site_code,
        "role": config.role,
        "folder": str(config.root),
        "daemon_running": daemon_running(config.root),
        "site_version": version,
        "packages": packages,
        "sites": sites,
        "to_download": to_download,
        "last_sync": None
        if last_sync is None
        else {
            "id": last_sync.id,
            "reason": last_sync.reason,
            "requested": last_sync.requested,
            "finished": last_sync.finished,
            "result": last_sync.result,
        },
        "inboxes": inboxes,
    }


def print_status(status: dict[str, Any]) -> None:
    running = "running" if status["daemon_running"] else "not running"
    print(
        f"Site {status['site']} ({status['role']}), version {status['site_version']}, "
        f"daemon {running}"
    )
    print(f"  {status['folder']}")
    sync = status["last_sync"]
    if sync:
        print(
            f"Last synchronization: #{sync['id']} ({sync['reason']}) {sync['requested']} -> "
            f"{sync['result'] or 'in progress'}"
        )
    print()
    if status["packages"]:
        print(f"{'PackageGuid':38} {'State':36} Name")
        for p in status["packages"]:
            state = f"{p['StateName']} ({p['State']})"
            print(f"{p['PackageGuid']:38} {state:36} {p['Name']}")
    else:
        print("No update packages yet: run `cmlab sync`.")
    if len(status["sites"]) > 1:
        print()
        print(f"{'Site':5} {'Role':10} {'Parent':7} {'Version':15} Update states")
        for site in status["sites"]:
            states = ", ".join(
                f"{guid[:8]}: {v['StateName']} ({v['State']})" for guid, v in site["States"].items()
            )
            print(
                f"{site['SiteCode']:5} {site['Role']:10} {site['Parent'] or '-':7} "
                f"{site['Version'] or '?':15} {states or '-'}"
            )
    print()
    print(f"{'Inbox':46} {'Component':34} backlog  BAD")
    for i in status["inboxes"]:
        print(f"{i['inbox']:46} {i['component']:34} {i['backlog']:7}  {i['bad']:3}")
