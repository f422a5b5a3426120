"""A site made by an earlier release keeps working.

`tests/data/site-0.1.0-downloaded.tar.gz` is a lab site made by cmlab 0.1.0 (b70c3d8, the last
commit before the package moved into layers): `cmlab init` with the test sites' options, then
synchronized and its sample update 2509 downloaded by that release's daemon, which was then
stopped. It was made in `/tmp/oldsite/CAS`, a path it keeps in `ServerData` and the site
control file: the folder below is somewhere else, as an operator's moved or restored site is.
The current release's daemon takes it from "Ready to install" to INSTALL_SUCCESS.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from cmlab.site.state_codes import PackageState
from tests.helpers.sites import (
    GUID_2509,
    Daemon,
    cmlab,
    query,
    settled_at,
    site_history,
    site_version,
    states,
)
from tests.helpers.waiting import wait_until

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "site-0.1.0-downloaded.tar.gz"


def unpack_old_site(dest: Path) -> Path:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(dest, filter="data")
    return dest / "CAS"


def test_a_site_made_by_0_1_0_installs_the_update_with_this_release(tmp_path: Path) -> None:
    site = unpack_old_site(tmp_path)
    # What 0.1.0 left: the update downloaded, the site at its old build.
    assert states(site)[GUID_2509] == PackageState.DOWNLOAD_SUCCESS
    assert site_version(site) == "5.00.9135.1000"
    assert query(site, "SELECT SiteFolder FROM ServerData WHERE SiteCode = 'CAS'") == [
        ("/tmp/oldsite/CAS",)
    ]

    with Daemon(site) as daemon:
        daemon.start()
        assert "ENABLED (2)" in cmlab("install", str(site), GUID_2509).stdout
        wait_until(
            lambda: settled_at(site, PackageState.INSTALL_SUCCESS),
            timeout=120,
            what="INSTALL_SUCCESS on the 0.1.0 site",
        )
        assert daemon.stop() == 0

    assert states(site)[GUID_2509] == PackageState.INSTALL_SUCCESS
    assert site_version(site) == "5.00.9141.1000"
    assert site_history(site)[-1] == PackageState.INSTALL_SUCCESS
