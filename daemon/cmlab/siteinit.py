"""`cmlab init`: the site tree, site.toml, the lab CA, the site database and the lab's content
source ("the Microsoft cloud"), ready for `cmlab run`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cmlab.config import ROLES, Facts, load_config, render_toml
from cmlab.errors import ConfigError
from cmlab.paths import SitePaths
from cmlab.prereq.facts import DEFAULT_FACTS
from cmlab.sitedb import create_site_db
from cmlab.siteinstall import create_installation


@dataclass(frozen=True)
class InitOptions:
    site_dir: Path
    site_code: str
    role: str = "cas"
    parent: Path | None = None
    content_source: Path | None = None
    display_root: str = ""
    sync_interval: float = 86400.0
    rescan_interval: float = 5.0
    ca_dir: Path | None = None
    key_type: str = "rsa"
    scp_remote: bool = False
    auto_download: bool = True
    build: int = Facts.build
    minor_build: int = Facts.minor_build


def init_site(opts: InitOptions) -> Path:
    from cmlab.labcloud import MANIFEST_CAB, build_content_source
    from cmlab.trust import create_lab_ca, load_lab_ca

    root = opts.site_dir.resolve()
    code = opts.site_code.upper()
    if len(code) != 3 or not code.isalnum():
        raise ConfigError("the site code must be three letters or digits, e.g. CAS or PR1")
    if opts.role not in ROLES:
        raise ConfigError(f"the role must be one of {', '.join(ROLES)}")
    if opts.role != "cas" and opts.parent is None:
        raise ConfigError(f"a {opts.role} site needs --parent (the parent site's folder)")
    if (root / "site.toml").exists():
        raise ConfigError(f"{root} already holds a site (site.toml exists)")
    parent_code = None
    if opts.parent is not None:
        parent_code = load_config(opts.parent).site_code

    paths = SitePaths(root)
    for folder in paths.all_folders():
        folder.mkdir(parents=True, exist_ok=True)

    ca = (
        load_lab_ca(opts.ca_dir)
        if opts.ca_dir
        else create_lab_ca(
            paths.trust_dir, common_name=f"cmlab Lab Root ({code})", key_type=opts.key_type
        )
    )
    content = opts.content_source.resolve() if opts.content_source else root / "cloud"
    if not (content / MANIFEST_CAB).exists():
        build_content_source(content, ca.signer())

    def rel(p: Path | None) -> str:
        if p is None:
            return ""
        try:
            return str(p.resolve().relative_to(root))
        except ValueError:
            return str(p.resolve())

    doc = {
        "site": {
            "code": code,
            "role": opts.role,
            "parent": str(opts.parent.resolve()) if opts.parent else "",
            "server": f"{code.lower()}.cmlab.local",
            "display_root": opts.display_root,
        },
        "scp": {
            "mode": "online",
            "remote": opts.scp_remote,
            "content_source": rel(content),
            "auto_download": opts.auto_download,
        },
        "intervals": {
            "sync": opts.sync_interval,
            "rescan": opts.rescan_interval,
            "cmupdate_poll": 600.0,
            "smsdbmon_poll": 1.0,
            "settle": 0.25,
        },
        "trust": {
            "roots": [rel(ca.root_cert)],
            "microsoft_roots": [rel(ca.root_cert)],
            "signing_key": rel(ca.signing_key),
            "signing_cert": rel(ca.signing_cert),
            "signing_chain": rel(ca.intermediate_cert),
        },
        "logs": {"max_size": 2_621_440, "verbose": True, "json_stdout": True},
        "database": {"durability": "process"},
        "facts": {"build": opts.build, "minor_build": opts.minor_build, **DEFAULT_FACTS},
    }
    comments = {
        "site": "cmlab site: the site server this folder emulates",
        "scp": "service connection point: online downloads from content_source (the lab's cloud)",
        "intervals": "seconds; sync = 0 syncs only on `cmlab sync`",
        "trust": "PEM files; microsoft_roots end in 'is signed with MS root cert.'",
        "logs": "max_size in bytes before <log>.lo_",
        "database": "durability: process (survives a killed process) or power (fsync commits)",
        "facts": "the emulated environment the prerequisite checker reads (docs/prereq.md); "
        "site build 9135 is 2503",
    }
    (root / "site.toml").write_text(render_toml(doc, comments), encoding="utf-8")
    config = load_config(root)
    create_site_db(
        config.paths.db_file,
        site_code=code,
        role=opts.role,
        server=config.fqdn,
        build=opts.build,
        minor_build=opts.minor_build,
        parent_code=parent_code,
        site_folder=str(root),
    )
    # The site server's own installation (bin/x64, the console, the site control file and
    # the rows of a running site) that an update's installation replaces.
    create_installation(root, opts.build, f"5.00.{opts.build}.1000")
    return root
