"""`cmlab init`: the site tree, site.toml, the lab CA, the site database and the lab's content
source ("the Microsoft cloud"), ready for `cmlab run`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cmlab.admin.installation_layout import create_installation
from cmlab.core.errors import ConfigError
from cmlab.site.config import (
    ROLES,
    Facts,
    SiteConfig,
    load_config,
    render_toml,
    render_toml_array_entry,
)
from cmlab.site.paths import SitePaths
from cmlab.site.prereq.facts import DEFAULT_FACTS
from cmlab.site.sitedb import SITE_TYPES, create_site_db


@dataclass(frozen=True)
class InitOptions:
    site_dir: Path
    site_code: str
    role: str = "cas"
    parent: Path | None = None
    # How the parent site reaches this site's folder (a mount point or share path on the
    # parent's host); this folder itself by default.
    address: Path | None = None
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
    from cmlab.admin.lab_cloud import MANIFEST_CAB, build_content_source
    from cmlab.site.trust import create_lab_ca, load_lab_ca

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
    parent_config = None
    if opts.parent is not None:
        parent_config = load_config(opts.parent)
        parent_code = parent_config.site_code
        wanted = {"primary": "cas", "secondary": "primary"}[opts.role]
        if parent_config.role != wanted:
            raise ConfigError(
                f"a {opts.role} site's parent must be a {wanted} site; {parent_code} is a "
                f"{parent_config.role} site"
            )
        if parent_code == code:
            raise ConfigError(f"the site code {code} is the parent's own")

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

    doc: dict[str, dict[str, object]] = {
        "site": {
            "code": code,
            "role": opts.role,
            # As given (made absolute, not resolved): a mount point or share path stays one.
            "parent": os.path.abspath(opts.parent) if opts.parent else "",
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
        "replication": {
            "cmupdates_interval": 60.0,
            "sender_retries": 2,
            "sender_retry_delay": 60.0,
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
        "replication": "seconds; the CMUpdates replication group's interval, and the Sender's "
        "retries of a send to a child site (docs/hierarchy.md)",
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
    if parent_config is not None and opts.parent is not None:
        address = os.path.abspath(opts.address) if opts.address else str(root)
        join_hierarchy(config, parent_config, Path(os.path.abspath(opts.parent)), address)
    return root


def join_hierarchy(
    child: SiteConfig, parent: SiteConfig, parent_address: Path, child_address: str
) -> None:
    """Record the child in both site databases (ServerData and Sites, each with the other's
    address) and in the parent's site.toml: what installing a child site under a parent does.
    The parent's daemon may be running: this is one short transaction in its database."""
    from cmlab.site.sitedb import hierarchy, one_transaction

    child_type = SITE_TYPES[child.role]
    with one_transaction(parent.paths.db_file, parent.site_code) as parent_conn:
        if hierarchy.site_by_code(parent_conn, child.site_code) is not None:
            raise ConfigError(f"{parent.site_code} already has a site {child.site_code}")
        p = hierarchy.local_site(parent_conn)
        p_version = hierarchy.site_version(parent_conn, parent.site_code)
        hierarchy.ensure_site(
            parent_conn,
            child.site_code,
            parent=parent.site_code,
            site_type=child_type,
            server=child.fqdn,
            folder=child_address,
        )
        hierarchy.set_site_version(
            parent_conn,
            child.site_code,
            version=f"5.00.{child.facts.build}.1000",
            full_version=f"5.00.{child.facts.build}.10{child.facts.minor_build:02d}",
            build=child.facts.build,
            reporting_site=parent.site_code,
            server=child.fqdn,
            site_type=child_type,
        )
    if p_version is None:
        raise ConfigError(f"the site database of {parent.site_code} has no Sites row for it")
    with one_transaction(child.paths.db_file, child.site_code) as conn:
        hierarchy.ensure_site(
            conn,
            parent.site_code,
            parent=p.parent,
            site_type=p.site_type,
            server=parent.fqdn,
            folder=str(parent_address),
        )
        hierarchy.set_site_version(
            conn,
            parent.site_code,
            version=p_version.version,
            full_version=p_version.full_version,
            build=p_version.build,
            reporting_site=p.parent,
            server=parent.fqdn,
            site_type=p.site_type,
        )
    entry = render_toml_array_entry(
        "child_site",
        {"code": child.site_code, "role": child.role, "address": child_address},
        comment="a child site (cmlab init --parent); its address is how this site reaches it",
    )
    with open(parent.root / "site.toml", "a", encoding="utf-8") as f:
        f.write(entry)
