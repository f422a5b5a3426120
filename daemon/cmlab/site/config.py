"""site.toml: the site's identity, hierarchy, SCP mode, intervals, trust, logs, service windows
and `[facts]`."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmlab.core.errors import ConfigError
from cmlab.core.fs import write_atomic
from cmlab.site.paths import SitePaths
from cmlab.site.service_windows import ServiceWindow, parse_service_windows

ROLES = ("cas", "primary", "secondary")


class SiteNotFound(ConfigError):
    """No site.toml in the folder: it is not a site made by `cmlab init` (the command line's
    "not found", where an invalid site.toml is refused)."""


@dataclass(frozen=True)
class Intervals:
    sync: float = 86400.0  # DMPDownloader's check for updates: every 24 hours
    rescan: float = 5.0  # inbox safety-net rescan
    cmupdate_poll: float = 600.0  # CMUpdate also polls every 10 minutes
    smsdbmon_poll: float = 1.0  # SMSDBMon safety-net poll of TableChangeNotifications
    settle: float = 0.25  # a file with no close/rename event is taken once unchanged this long


@dataclass(frozen=True)
class Replication:
    """Intersite replication (docs/hierarchy.md)."""

    # The CMUpdates replication group sends this site's update status to its parent, and the
    # update rows to its children, once a minute (the guide: "one time per minute").
    cmupdates_interval: float = 60.0
    # The Sender's retries of one send request before the job fails (ConfigMgr's sender
    # defaults: 2 retries, 1 minute apart).
    sender_retries: int = 2
    sender_retry_delay: float = 60.0


@dataclass(frozen=True)
class Facts:
    """The emulated environment the site reports and the prerequisite checker reads."""

    build: int = 9135
    minor_build: int = 6
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteConfig:
    root: Path
    site_code: str
    role: str = "cas"
    parent: str = ""
    server: str = ""
    display_root: str = ""
    scp_mode: str = "online"
    scp_remote: bool = False
    content_source: Path | None = None
    auto_download: bool = True
    intervals: Intervals = field(default_factory=Intervals)
    trust_roots: tuple[Path, ...] = ()
    microsoft_roots: tuple[Path, ...] = ()
    signing_key: Path | None = None
    signing_cert: Path | None = None
    signing_chain: Path | None = None
    log_max_size: int = 2_621_440  # ConfigMgr's default 2.5 MB before `.lo_`
    log_verbose: bool = True
    log_json_stdout: bool = True
    durability: str = "process"  # "process": survives a killed process; "power": fsync commits
    client_piloting: bool = False  # [client] piloting: HMAN fills PilotingUpgrade on 196612.ESC
    service_windows: tuple[ServiceWindow, ...] = ()  # none: CMUpdate installs at once
    replication: Replication = field(default_factory=Replication)
    facts: Facts = field(default_factory=Facts)

    @property
    def paths(self) -> SitePaths:
        return SitePaths(self.root, self.display_root)

    @property
    def fqdn(self) -> str:
        return self.server or f"{self.site_code.lower()}.cmlab.local"


def _path(root: Path, value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"site.toml: {key} must be a non-empty path string")
    p = Path(value)
    return p if p.is_absolute() else (root / p)


def _table(doc: dict[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"site.toml: [{name}] must be a table")
    return value


def _number(table: dict[str, Any], key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"site.toml: {where}.{key} must be a non-negative number")
    return float(value)


def load_config(root: Path) -> SiteConfig:
    root = root.resolve()
    toml_path = root / "site.toml"
    try:
        doc = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise SiteNotFound(
            f"{toml_path} not found: is {root} a site made by `cmlab init`?"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{toml_path}: {exc}") from exc

    site = _table(doc, "site")
    code = site.get("code")
    if not isinstance(code, str) or not (len(code) == 3 and code.isalnum()):
        raise ConfigError("site.toml: site.code must be three letters or digits, e.g. CAS")
    role = site.get("role", "cas")
    if role not in ROLES:
        raise ConfigError(f"site.toml: site.role must be one of {', '.join(ROLES)}")

    scp = _table(doc, "scp")
    mode = scp.get("mode", "online")
    if mode not in ("online", "offline"):
        raise ConfigError("site.toml: scp.mode must be online or offline")
    content_source = scp.get("content_source")

    iv = _table(doc, "intervals")
    intervals = Intervals(
        sync=_number(iv, "sync", Intervals.sync, "intervals"),
        rescan=_number(iv, "rescan", Intervals.rescan, "intervals"),
        cmupdate_poll=_number(iv, "cmupdate_poll", Intervals.cmupdate_poll, "intervals"),
        smsdbmon_poll=_number(iv, "smsdbmon_poll", Intervals.smsdbmon_poll, "intervals"),
        settle=_number(iv, "settle", Intervals.settle, "intervals"),
    )

    trust = _table(doc, "trust")
    roots = tuple(_path(root, r, "trust.roots") for r in trust.get("roots", []))
    ms_roots = tuple(
        _path(root, r, "trust.microsoft_roots") for r in trust.get("microsoft_roots", [])
    )

    def opt_path(key: str) -> Path | None:
        v = trust.get(key)
        return None if v in (None, "") else _path(root, v, f"trust.{key}")

    logs = _table(doc, "logs")
    facts_doc = dict(_table(doc, "facts"))
    build = facts_doc.pop("build", Facts.build)
    minor = facts_doc.pop("minor_build", Facts.minor_build)
    if not isinstance(build, int) or not isinstance(minor, int):
        raise ConfigError("site.toml: facts.build and facts.minor_build must be integers")

    piloting = _table(doc, "client").get("piloting", False)
    if not isinstance(piloting, bool):
        raise ConfigError("site.toml: client.piloting must be true or false")

    rp = _table(doc, "replication")
    retries = rp.get("sender_retries", Replication.sender_retries)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError("site.toml: replication.sender_retries must be a non-negative integer")
    replication = Replication(
        cmupdates_interval=_number(
            rp, "cmupdates_interval", Replication.cmupdates_interval, "replication"
        ),
        sender_retries=retries,
        sender_retry_delay=_number(
            rp, "sender_retry_delay", Replication.sender_retry_delay, "replication"
        ),
    )

    durability = doc.get("database", {}).get("durability", "process")
    if durability not in ("process", "power"):
        raise ConfigError("site.toml: database.durability must be process or power")

    return SiteConfig(
        root=root,
        site_code=code.upper(),
        role=role,
        parent=str(site.get("parent", "")),
        server=str(site.get("server", "")),
        display_root=str(site.get("display_root", "")),
        scp_mode=mode,
        scp_remote=bool(scp.get("remote", False)),
        content_source=_path(root, content_source, "scp.content_source")
        if content_source
        else None,
        auto_download=bool(scp.get("auto_download", True)),
        intervals=intervals,
        trust_roots=roots,
        microsoft_roots=ms_roots,
        signing_key=opt_path("signing_key"),
        signing_cert=opt_path("signing_cert"),
        signing_chain=opt_path("signing_chain"),
        log_max_size=int(_number(logs, "max_size", 2_621_440, "logs")),
        log_verbose=bool(logs.get("verbose", True)),
        log_json_stdout=bool(logs.get("json_stdout", True)),
        durability=durability,
        client_piloting=piloting,
        service_windows=parse_service_windows(doc.get("service_window")),
        replication=replication,
        facts=Facts(build=build, minor_build=minor, values=facts_doc),
    )


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def render_toml(doc: dict[str, dict[str, object]], comments: dict[str, str] | None = None) -> str:
    """A minimal TOML writer for site.toml's flat tables (keeps us off another dependency)."""
    out: list[str] = []
    for table, values in doc.items():
        if comments and table in comments:
            out.append(f"# {comments[table]}")
        out.append(f"[{table}]")
        for key, value in values.items():
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def render_toml_array_entry(table: str, values: dict[str, object], comment: str = "") -> str:
    """One `[[table]]` entry, to append to a site.toml."""
    out = ["", f"# {comment}"] if comment else [""]
    out.append(f"[[{table}]]")
    out.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    return "\n".join(out) + "\n"


def set_value(root: Path, table: str, key: str, value: object) -> None:
    """Set `key` of `[table]` in a site's site.toml, keeping every other line (its comments
    too): what an administrator does with an editor. The key must exist (site.toml as `cmlab
    init` writes it has every key), so a misspelt name fails here rather than being ignored."""
    path = root / "site.toml"
    lines = path.read_text(encoding="utf-8").splitlines()
    current = ""
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            current = stripped.strip("[]")
        elif current == table and stripped.split("=", 1)[0].strip() == key and "=" in stripped:
            lines[i] = f"{key} = {_toml_value(value)}"
            break
    else:
        raise ConfigError(f"site.toml of {root} has no key {key} in [{table}]")
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
