"""The installed site that `cmlab init` lays out: `bin/x64` (the SITE_SERVER file set and the
redists), the Admin console, the site control file, and the rows of a working site server
(docs/installation.md, "The emulated site").

Why it is in the top layer: the sample package's redists are built by the lab's sample
builder (`cmlab.admin.payload`), which nothing below `commands/` may import; the sample
binaries' format is `cmlab.site.formats.sample_binary`. The runtime side
(cmlab.site.installation: the paths of the installation, the install steps,
`installed_build`) reads and changes what is laid out here.

What it promises: every file is written atomically, no link in the site's folders is
followed, and running it again rewrites the same installation.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from cmlab.admin.payload import build_redists, load_package
from cmlab.core.fs import write_atomic
from cmlab.site.config import load_config
from cmlab.site.formats.payload_layout import MAP_ROOT
from cmlab.site.formats.sample_binary import sample_binary
from cmlab.site.formats.site_control import render_site_control
from cmlab.site.installation.files import safe_dir
from cmlab.site.installation.layout import (
    CONSOLE_DIR,
    CONSOLE_EXE,
    CONSOLE_SIZE,
    INSTALL_DIR,
    SITE_CONTROL,
)
from cmlab.site.installation.server_state import seed_site_state
from cmlab.site.resources import data_dir
from cmlab.site.sitedb import connect, migrate, transaction

__all__ = ["SITE_SERVER_BINARIES", "create_installation"]

# The SITE_SERVER file set of an installed site, with the sizes of
# payloads/updates/cm2509/package.toml (a test checks they agree).
SITE_SERVER_BINARIES: tuple[tuple[str, int], ...] = (
    ("cmupdate.exe", 12288),
    ("prereqcore.dll", 8192),
    ("setupcore.dll", 10240),
    ("smsexec.exe", 6144),
    ("hman.dll", 5120),
    ("smsdbmon.dll", 4096),
    ("distmgr.dll", 4096),
    ("dmpdownloader.dll", 4096),
    ("baseutil.dll", 3072),
)
SAMPLE_PACKAGE = ("updates", "cm2509")  # under payloads/: where the installed redists come from


@functools.lru_cache(maxsize=1)
def _installed_redists() -> tuple[tuple[str, bytes], ...]:
    """The redists an installed site has in bin/x64 (a redist is the same file in every
    update that ships it, so the update's copy is found "same hash, skipped")."""
    src = data_dir("payloads").joinpath(*SAMPLE_PACKAGE)
    info = load_package(src)
    by_name = {Path(r.path).name.lower(): r.path for r in info.redists}
    out: list[tuple[str, bytes]] = []
    with tempfile.TemporaryDirectory(prefix="cmlab-redists-") as tmp:
        folder = build_redists(src, Path(tmp), None)
        for placeholder in info.placeholders:
            rel = Path(placeholder)
            if rel.parent.as_posix().lower() != "/".join((MAP_ROOT, *INSTALL_DIR)).lower():
                continue
            out.append((rel.name, (folder / by_name[rel.name.lower()]).read_bytes()))
    return tuple(out)


def create_installation(
    site_root: Path,
    build: int,
    full_version: str,
    *,
    site_code: str | None = None,
    server: str | None = None,
) -> None:
    """Lay out the installation of a site at `build`: `bin/x64` with the SITE_SERVER file
    set (sample binaries and the redists), `AdminConsole/bin/Microsoft.ConfigurationManagement.exe`,
    `inboxes/sitectrl.box/sitectrl.ct0`, and, when the site database exists, the rows of a
    working site server (seed_site_state). Every file is written atomically; running it
    again rewrites the same installation. `site_code` and `server` default to site.toml's."""
    root = Path(site_root).resolve()
    if site_code is None or server is None:
        config = load_config(root)
        site_code = site_code or config.site_code
        server = server or config.fqdn
    show = str
    bin_dir = safe_dir(root, INSTALL_DIR, show)
    for name, size in SITE_SERVER_BINARIES:
        write_atomic(bin_dir / name, sample_binary(name, build, full_version, size))
    for name, data in _installed_redists():
        write_atomic(bin_dir / name, data)
    console_dir = safe_dir(root, CONSOLE_DIR, show)
    write_atomic(
        console_dir / CONSOLE_EXE, sample_binary(CONSOLE_EXE, build, full_version, CONSOLE_SIZE)
    )
    ctrl_dir = safe_dir(root, SITE_CONTROL[:-1], show)
    write_atomic(
        ctrl_dir / SITE_CONTROL[-1],
        render_site_control(site_code.upper(), server, build, full_version, str(root)),
    )
    db_file = root / "db" / "site.db"
    if db_file.is_file():
        conn = connect(db_file, site_code)
        try:
            migrate(conn)
            with transaction(conn):
                seed_site_state(conn, site_code.upper())
        finally:
            conn.close()
