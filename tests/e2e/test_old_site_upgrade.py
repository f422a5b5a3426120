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

from cmlab.testing import SAMPLE_UPDATE, LabSite, State

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "site-0.1.0-downloaded.tar.gz"


def unpack_old_site(dest: Path) -> Path:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(dest, filter="data")
    return dest / "CAS"


def site_version(site: LabSite) -> str:
    """What fnCurrentSiteVersion() returns."""
    ((version,),) = site.query("SELECT dbo.fnCurrentSiteVersion()")
    return str(version)


def test_a_site_made_by_0_1_0_installs_the_update_with_this_release(tmp_path: Path) -> None:
    site = LabSite(unpack_old_site(tmp_path))
    # What 0.1.0 left: the update downloaded, the site at its old build.
    assert site.states()[SAMPLE_UPDATE] == State.DOWNLOAD_SUCCESS
    assert site_version(site) == "5.00.9135.1000"
    assert site.query("SELECT SiteFolder FROM ServerData WHERE SiteCode = 'CAS'") == [
        ("/tmp/oldsite/CAS",)
    ]

    with site:
        assert site.install(SAMPLE_UPDATE) == State.DOWNLOAD_SUCCESS
        site.wait_state(SAMPLE_UPDATE, State.INSTALL_SUCCESS, timeout=120)
        site.wait_settled(SAMPLE_UPDATE, State.INSTALL_SUCCESS)
        assert site.stop() == 0

    assert site.states()[SAMPLE_UPDATE] == State.INSTALL_SUCCESS
    assert site_version(site) == "5.00.9141.1000"
    assert site.history(SAMPLE_UPDATE)[-1] == State.INSTALL_SUCCESS
