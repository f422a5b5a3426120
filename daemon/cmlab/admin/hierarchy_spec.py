"""A hierarchy described once, as data: which sites, their roles and parents, and their
settings. `cmlab init-hierarchy SPEC ROOT` and cmlab.testing's `LabHierarchy` both build from
it, and so will the training scenarios and the full-size hierarchy: one way to make a
hierarchy, not one per feature.

The file is TOML:

    # every site gets these; a dotted name is a site.toml key ([table] key)
    [defaults]
    sync_interval = 0
    auto_download = false
    "replication.cmupdates_interval" = 0.2

    [[site]]
    code = "CAS"                  # the first site is the top of the hierarchy

    [[site]]
    code = "PR1"                  # role: cas, primary or secondary; inferred from the parent
    parent = "CAS"

    [[site]]
    code = "SEC"
    parent = "PR1"
    settings = { "facts.pending_restart" = true }

A plain name is an option of `cmlab init` (the keys of INIT_OPTIONS); a dotted one sets that
key of the site's site.toml after `cmlab init` wrote it. A site's own settings win over the
defaults. Every site reaches the others through their folders under ROOT (`ROOT/<CODE>`), or
through the addresses the caller gives (a mount point, a symlink farm)."""

from __future__ import annotations

import shutil
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cmlab.admin.init import InitOptions, init_site
from cmlab.core.errors import ConfigError
from cmlab.site.config import ROLES, load_config, set_value

# The options of `cmlab init` a spec may set, with the type each takes.
INIT_OPTIONS: Mapping[str, type | tuple[type, ...]] = MappingProxyType(
    {
        "sync_interval": (int, float),
        "rescan_interval": (int, float),
        "auto_download": bool,
        "display_root": str,
        "key_type": str,
        "scp_remote": bool,
        "build": int,
        "minor_build": int,
    }
)
# Every role's parent role: a primary under a CAS, a secondary under a primary.
PARENT_ROLE = MappingProxyType({"primary": "cas", "secondary": "primary"})
CHILD_ROLE = MappingProxyType({"cas": "primary", "primary": "secondary"})
# A spec is a handful of sites; a file much larger than this is not one.
MAX_SPEC_BYTES = 256 * 1024
MAX_SITES = 1000


def _check_settings(where: str, settings: object) -> dict[str, object]:
    if not isinstance(settings, dict):
        raise ConfigError(f"hierarchy spec: {where}: settings must be a table")
    for key, value in settings.items():
        if "." in key:
            table, _, name = key.partition(".")
            if not table or not name or "." in name:
                raise ConfigError(f"hierarchy spec: {where}: {key!r} is not a site.toml key")
            if not isinstance(value, bool | int | float | str | list):
                raise ConfigError(f"hierarchy spec: {where}: {key} = {value!r} is not a value")
            continue
        kind = INIT_OPTIONS.get(key)
        if kind is None:
            known = ", ".join(INIT_OPTIONS)
            raise ConfigError(
                f"hierarchy spec: {where}: unknown setting {key!r} (the options of cmlab init "
                f"are {known}; a site.toml key is written table.key)"
            )
        # bool is an int in Python: an interval of `true` is refused all the same.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"hierarchy spec: {where}: {key} = {value!r} is the wrong type")
    return dict(settings)


@dataclass(frozen=True)
class SiteSpec:
    code: str
    role: str
    parent: str | None = None
    settings: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class HierarchySpec:
    sites: tuple[SiteSpec, ...]
    defaults: Mapping[str, object] = field(default_factory=dict)

    @property
    def top(self) -> SiteSpec:
        return self.sites[0]

    def codes(self) -> tuple[str, ...]:
        return tuple(s.code for s in self.sites)

    def settings_of(self, code: str) -> dict[str, object]:
        site = next(s for s in self.sites if s.code == code)
        return {**self.defaults, **site.settings}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> HierarchySpec:
        """Check a spec read from TOML or written in Python: codes, roles, parents, settings."""
        unknown = set(doc) - {"defaults", "site"}
        if unknown:
            raise ConfigError(f"hierarchy spec: unknown table {sorted(unknown)[0]!r}")
        defaults = _check_settings("[defaults]", doc.get("defaults", {}))
        entries = doc.get("site")
        if not isinstance(entries, list) or not entries:
            raise ConfigError("hierarchy spec: no [[site]]: a hierarchy needs at least one site")
        if len(entries) > MAX_SITES:
            raise ConfigError(f"hierarchy spec: {len(entries)} sites; at most {MAX_SITES}")
        sites: list[SiteSpec] = []
        roles: dict[str, str] = {}
        for n, entry in enumerate(entries, 1):
            if not isinstance(entry, dict):
                raise ConfigError(f"hierarchy spec: site {n} is not a table")
            extra = set(entry) - {"code", "role", "parent", "settings"}
            if extra:
                raise ConfigError(f"hierarchy spec: site {n}: unknown key {sorted(extra)[0]!r}")
            code = entry.get("code")
            if not isinstance(code, str) or len(code) != 3 or not code.isalnum():
                raise ConfigError(
                    f"hierarchy spec: site {n}: the code must be three letters or digits, "
                    f"e.g. CAS or PR1 (got {code!r})"
                )
            code = code.upper()
            where = f"site {code}"
            if code in roles:
                raise ConfigError(f"hierarchy spec: {where} appears twice")
            parent = entry.get("parent")
            if parent is not None:
                if not isinstance(parent, str) or parent.upper() not in roles:
                    raise ConfigError(
                        f"hierarchy spec: {where}: its parent {parent!r} must be a site listed "
                        "before it"
                    )
                parent = parent.upper()
            if n == 1 and parent is not None:
                raise ConfigError(f"hierarchy spec: {where}: the first site is the top one")
            if n > 1 and parent is None:
                raise ConfigError(
                    f"hierarchy spec: {where} has no parent: a hierarchy has one top site, the "
                    "first"
                )
            role = entry.get("role")
            if role is None:
                role = "cas" if parent is None else CHILD_ROLE.get(roles[parent], "")
            if role not in ROLES:
                raise ConfigError(
                    f"hierarchy spec: {where}: the role must be one of {', '.join(ROLES)} "
                    f"(got {role!r})"
                )
            if parent is not None and PARENT_ROLE.get(role) != roles[parent]:
                raise ConfigError(
                    f"hierarchy spec: {where}: a {role} site cannot be under {parent}, a "
                    f"{roles[parent]} site"
                )
            if parent is None and role != "cas":
                raise ConfigError(
                    f"hierarchy spec: {where}: the top site must be a cas (a standalone primary "
                    "is not emulated yet)"
                )
            roles[code] = role
            settings = _check_settings(where, entry.get("settings", {}))
            sites.append(SiteSpec(code=code, role=role, parent=parent, settings=settings))
        return cls(sites=tuple(sites), defaults=defaults)

    @classmethod
    def from_toml(cls, text: str) -> HierarchySpec:
        if len(text.encode("utf-8")) > MAX_SPEC_BYTES:
            raise ConfigError(f"hierarchy spec: larger than {MAX_SPEC_BYTES} bytes")
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"hierarchy spec: not TOML: {exc}") from exc
        return cls.from_dict(doc)

    @classmethod
    def load(cls, path: Path) -> HierarchySpec:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SPEC_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"hierarchy spec: cannot read {path}: {exc.strerror}") from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"hierarchy spec: {path} is not UTF-8 text") from exc
        return cls.from_toml(text)


def _init_options(settings: Mapping[str, object]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if "." not in k}


def apply_settings(site_dir: Path, settings: Mapping[str, object]) -> None:
    """Write a spec's dotted settings into a site's site.toml."""
    for key, value in settings.items():
        if "." in key:
            table, _, name = key.partition(".")
            set_value(site_dir, table, name, value)


def create_hierarchy(
    spec: HierarchySpec,
    root: Path,
    *,
    top_from: Path | None = None,
    address_of: Callable[[str], Path] | None = None,
) -> dict[str, Path]:
    """Make every site of `spec` in `root/<CODE>`, top first, each joined to its parent as
    `cmlab init --parent` joins it. The children share the top site's lab CA and cloud (one
    Microsoft for the whole hierarchy). `top_from`: a site folder to copy as the top site
    instead of running `cmlab init` for it (a template made with the same options);
    `address_of(code)`: how the other sites reach site `code` (its folder by default)."""
    root = root.absolute()
    root.mkdir(parents=True, exist_ok=True)
    sites: dict[str, Path] = {}

    def address(code: str) -> Path:
        return address_of(code) if address_of is not None else root / code

    top = spec.top
    if top_from is not None:
        shutil.copytree(top_from, root / top.code, symlinks=True)
        sites[top.code] = root / top.code
        if load_config(sites[top.code]).site_code != top.code:
            raise ConfigError(f"{top_from} is not a site {top.code}")
    else:
        sites[top.code] = init_site(
            InitOptions(
                site_dir=root / top.code,
                site_code=top.code,
                role=top.role,
                **_init_options(spec.settings_of(top.code)),
            )
        )
    apply_settings(sites[top.code], spec.settings_of(top.code))
    top_config = load_config(sites[top.code])
    for site in spec.sites[1:]:
        assert site.parent is not None  # from_dict: only the first site has none
        sites[site.code] = init_site(
            InitOptions(
                site_dir=root / site.code,
                site_code=site.code,
                role=site.role,
                parent=address(site.parent),
                address=address(site.code),
                ca_dir=top_config.root / "trust",
                content_source=top_config.content_source,
                **_init_options(spec.settings_of(site.code)),
            )
        )
        apply_settings(sites[site.code], spec.settings_of(site.code))
    return sites
