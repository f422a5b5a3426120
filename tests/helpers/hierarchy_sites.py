"""A hierarchy of real lab sites for end-to-end tests: a CAS copied from the downloaded
template, child primaries and a secondary made by `cmlab init --parent`, each run by its own
daemon process. Sites reach each other only through their recorded addresses."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cmlab.admin.init import InitOptions, init_site
from cmlab.site.state_codes import PackageState
from tests.helpers.sites import GUID_2509, Daemon, copy_site, inbox_files, query, set_toml


@dataclass
class Hierarchy:
    sites: dict[str, Path]  # site code -> its real folder
    daemons: dict[str, Daemon] = field(default_factory=dict)

    def __getitem__(self, code: str) -> Path:
        return self.sites[code]

    @contextmanager
    def running(self, *codes: str, **env: str) -> Iterator[Hierarchy]:
        with ExitStack() as stack:
            for code in codes or tuple(self.sites):
                daemon = stack.enter_context(self.daemons[code])
                daemon.start(**env)
            yield self
            for code in codes or tuple(self.sites):
                if self.daemons[code].alive():
                    assert self.daemons[code].stop() == 0, self.daemons[code].stderr()


def bind_mounts_work() -> bool:
    """Unprivileged bind mounts (a user and mount namespace): Linux with user namespaces on."""
    try:
        proc = subprocess.run(
            ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$0"', "/tmp"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def bind_mount_prefix(mounts: list[tuple[Path, Path]]) -> list[str]:
    """Run the daemon in its own mount namespace where each `mnt` shows `real` (a bind mount
    nobody else sees): the daemon can reach those sites only through `mnt`."""
    script = " && ".join(f'mount --bind "{real}" "{mnt}"' for real, mnt in mounts)
    return ["unshare", "-rm", "sh", "-c", f'{script} && exec "$@"', "sh"]


def make_hierarchy(
    root: Path,
    cas_template: Path,
    *,
    primaries: tuple[str, ...] = ("PR1", "PR2"),
    secondary: tuple[str, str] | None = ("SEC", "PR1"),
    via: str = "",
    interval: float = 0.2,
    retry_delay: float = 0.3,
) -> Hierarchy:
    """`via`: "" (sites use each other's real folders), "symlink" (every site reaches every
    other through a second path, `root/net/<CODE>`, a symlink farm), or "bind" (the same
    paths, but empty folders that only each daemon's own mount namespace binds to the real
    ones: see `bind_mount_prefix`)."""
    real = root / "sites"
    real.mkdir(parents=True)
    net = root / "net"
    sites = {"CAS": copy_site(cas_template, real / "CAS")}

    def address(code: str) -> Path:
        return net / code if via else real / code

    if via:
        net.mkdir()
    codes = ["CAS", *primaries, *([secondary[0]] if secondary else [])]
    for code in codes:
        if via:
            # `cmlab init` reads the parent's site.toml through the address, so a bind-mount
            # hierarchy is made through symlinks, then the links become empty mount points.
            os.symlink(real / code, net / code)
    common = {
        "ca_dir": sites["CAS"] / "trust",
        "content_source": sites["CAS"] / "cloud",
        "sync_interval": 0.0,
        "rescan_interval": 0.5,
        "auto_download": False,
    }
    for code in primaries:
        sites[code] = init_site(
            InitOptions(
                site_dir=real / code,
                site_code=code,
                role="primary",
                parent=address("CAS"),
                address=address(code),
                **common,  # type: ignore[arg-type]
            )
        )
    if secondary:
        code, parent = secondary
        sites[code] = init_site(
            InitOptions(
                site_dir=real / code,
                site_code=code,
                role="secondary",
                parent=address(parent),
                address=address(code),
                **common,  # type: ignore[arg-type]
            )
        )
    if via == "bind":
        for code in codes:
            (net / code).unlink()
            (net / code).mkdir()
    for site in sites.values():
        set_toml(site, "replication", "cmupdates_interval", repr(interval))
        set_toml(site, "replication", "sender_retry_delay", repr(retry_delay))
    h = Hierarchy(sites)
    for code, site in sites.items():
        prefix: list[str] = []
        if via == "bind":
            prefix = bind_mount_prefix([(real / c, net / c) for c in codes if c != code])
        h.daemons[code] = Daemon(site, prefix=prefix)
    return h


def site_states(site: Path, guid: str) -> dict[str, int]:
    """`CM_UpdatePackageSiteStatus` joined to `ServerData`, as this site knows it: site code ->
    state (the guide's Installation-stage query)."""
    return {
        str(code): int(state)
        for code, state in query(
            site,
            "select ServerData.SiteCode, cmupss.State from CM_UpdatePackageSiteStatus cmupss "
            "Left join serverdata on cmupss.SiteNumber=ServerData.ID "
            "where cmupss.PackageGuid = ?",
            [guid],
        )
    }


def installed_everywhere(h: Hierarchy, guid: str, codes: tuple[str, ...]) -> bool:
    cas = site_states(h["CAS"], guid)
    return all(cas.get(c) == PackageState.INSTALL_SUCCESS for c in codes) and all(
        site_states(h[c], guid).get(c) == PackageState.INSTALL_SUCCESS for c in codes
    )


def own_history(
    site: Path, code: str, guid: str = "420E3E18-73C5-4BE9-88B0-6F1E30A012CA"
) -> list[int]:
    """Every state the site's own status row passed through, in order (`sites.site_history`
    has the rows of every site this database knows, replicated ones too)."""
    return [
        int(r[0])
        for r in query(
            site,
            "SELECT h.State FROM CM_UpdatePackageSiteStatus_HIST h "
            "JOIN ServerData s ON s.ID = h.SiteNumber "
            "WHERE h.PackageGuid = ? AND s.SiteCode = ? ORDER BY h.ID",
            [guid, code],
        )
    ]


def own_state(site: Path, code: str, guid: str = GUID_2509) -> int | None:
    """Site `code`'s state for `guid` as the database of `site` knows it."""
    return site_states(site, guid).get(code)


def drained(h: Hierarchy) -> bool:
    """No drop file in any site's inboxes and no change SMSDBMon has still to turn into one,
    looking at the inboxes on both sides of that."""
    return all(
        not inbox_files(site)
        and not query(site, "SELECT 1 FROM TableChangeNotifications LIMIT 1")
        and not inbox_files(site)
        for site in h.sites.values()
    )
