"""`LabHierarchy`: every site of a hierarchy spec (cmlab.admin.hierarchy_spec, the file
`cmlab init-hierarchy` takes), each a LabSite with its own daemon.

    spec = HierarchySpec.from_toml(SPEC)      # or HierarchySpec.from_dict({...}), or a file
    with LabHierarchy(tmp_path, spec) as h:
        h.top.sync(wait=True)
        h.top.download(SAMPLE_UPDATE, wait=True)
        h.top.install(SAMPLE_UPDATE)
        h.wait_installed(SAMPLE_UPDATE)

The sites reach each other only through their recorded addresses, as ConfigMgr's do through
their shares; in-process, each daemon runs on a thread of its own with its own event loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

from cmlab.admin.hierarchy_spec import HierarchySpec, create_hierarchy
from cmlab.site.state_codes import PackageState
from cmlab.testing.lifecycle import StartStop
from cmlab.testing.modes import DEFAULT_TIMEOUT, Mode
from cmlab.testing.site import TEST_INIT_DEFAULTS, LabSite


class LabHierarchy(StartStop):
    """The sites of `spec` in `root/<CODE>`, made the first time it starts (or found there).
    `top_from`: a site folder to copy as the top site (a template made with the spec's top
    options: the pytest plugin's downloaded CAS); `address_of(code)`: how the other sites
    reach site `code`; `command_prefix(code)`: a command each subprocess daemon runs under."""

    def __init__(
        self,
        root: Path | str,
        spec: HierarchySpec,
        *,
        mode: Mode = "inprocess",
        top_from: Path | None = None,
        address_of: Callable[[str], Path] | None = None,
        command_prefix: Callable[[str], Sequence[str]] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.root = Path(root).absolute()
        # A test hierarchy syncs and downloads on request, as a test site does, unless the
        # spec's defaults say otherwise.
        self.spec = HierarchySpec(
            sites=spec.sites, defaults={**TEST_INIT_DEFAULTS, **spec.defaults}
        )
        self.mode: Mode = mode
        self.top_from = top_from
        self.address_of = address_of
        self.timeout = timeout
        self.sites: dict[str, LabSite] = {
            s.code: LabSite(
                self.root / s.code,
                site_code=s.code,
                mode=mode,
                timeout=timeout,
                command_prefix=command_prefix(s.code) if command_prefix else (),
            )
            for s in self.spec.sites
        }
        self._stack: ExitStack | None = None

    def __getitem__(self, code: str) -> LabSite:
        return self.sites[code.upper()]

    def __iter__(self) -> Iterator[LabSite]:
        return iter(self.sites.values())

    @property
    def top(self) -> LabSite:
        """The top-level site (the CAS), where updates are installed from."""
        return self.sites[self.spec.top.code]

    def create(self) -> LabHierarchy:
        """Make every site now if the root holds none (to change site.toml first)."""
        if not (self.root / self.spec.top.code / "site.toml").exists():
            create_hierarchy(
                self.spec, self.root, top_from=self.top_from, address_of=self.address_of
            )
        return self

    def start(self, *codes: str, **env: str) -> LabHierarchy:
        """Start the daemons of `codes` (every site's by default), top first."""
        self.create()
        for code in codes or tuple(self.sites):
            site = self[code]
            if not site.running:
                site.start(**env)
        return self

    def stop(self, *codes: str) -> None:
        """Stop the daemons of `codes` (every running one by default), leaves first."""
        for code in reversed(codes or tuple(self.sites)):
            if self[code].running:
                self[code].stop()

    # -- waiting on the whole hierarchy ------------------------------------------------------

    def wait_site_states(
        self,
        guid: str,
        want: Mapping[str, int],
        timeout: float | None = None,
    ) -> None:
        """Wait until each site of `want` is at its state, both in the top site's database
        (what the console there shows) and in the site's own."""

        def reached() -> bool:
            at_top = self.top.site_states(guid)
            return all(
                at_top.get(code) == state and self[code].site_states(guid).get(code) == state
                for code, state in want.items()
            )

        def seen() -> str:
            return "; ".join(
                f"{site.site_code} knows "
                + ", ".join(
                    f"{c}={PackageState.name_of(int(s))}" for c, s in site.site_states(guid).items()
                )
                for site in self
            )

        wanted = ", ".join(f"{c}={PackageState.name_of(int(s))}" for c, s in want.items())
        self.top.wait_for(
            reached,
            self.timeout if timeout is None else timeout,
            what=f"{guid} at {wanted}",
            seen=seen,
        )

    def wait_installed(
        self, guid: str, codes: Iterable[str] = (), timeout: float | None = None
    ) -> None:
        """Wait until `guid` is INSTALL_SUCCESS at every site of `codes` (all by default)."""
        self.wait_site_states(
            guid,
            {c.upper(): PackageState.INSTALL_SUCCESS for c in (codes or self.sites)},
            timeout,
        )

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until every site is idle at once (a site that hands work on makes another
        busy: checked until a pass finds all of them idle)."""
        self.top.wait_for(
            lambda: all(site._idle() for site in self),
            self.timeout if timeout is None else timeout,
            what="every site to be idle",
            seen=lambda: "; ".join(f"{site.site_code}: {site.waiting_files()}" for site in self),
        )
