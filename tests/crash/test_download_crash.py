"""SIGKILL during the Download stage: the payload copy, its extraction, SetupDL, the moment the
package is in place, and HMAN between the MCM drop and its CMU. A restart converges to
DOWNLOAD_SUCCESS with the package hash-correct, resumes a half-copied payload where it stopped,
and never reports a package as downloaded before the whole of it is in place and verified."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmlab.admin.lab_cloud import build_content_source
from cmlab.components.dmpdownloader.dmpdownloader import COPY_CHUNK
from cmlab.core.hashing import folder_hash
from cmlab.site.resources import data_dir
from cmlab.site.trust import create_lab_ca
from cmlab.testing import SAMPLE_UPDATE, SYNCED_STATES, LabSite, State
from tests.helpers.site_files import temporaries

G = SAMPLE_UPDATE
g = G.lower()
# An incompressible file in the sample payload, so the payload CAB spans several copy chunks
# and a kill at the second chunk really interrupts the copy half-way.
BIG_FILE = "SMSSetup/bin/x64/cmlab-big.dll"
BIG_SIZE = 2 * COPY_CHUNK + 500_000


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site whose cloud offers a 2.5 MiB 2509 payload, synced (2509 is APPLICABILITY_SUCCESS),
    the daemon stopped: each test works on a copy."""
    base = tmp_path_factory.mktemp("dl-crash")
    payloads = base / "payloads"
    shutil.copytree(data_dir("payloads"), payloads)
    spec = payloads / "updates" / "cm2509" / "package.toml"
    spec.write_text(
        spec.read_text() + f'\n[[binary]]\npath = "{BIG_FILE}"\nsize = {BIG_SIZE}\n',
        encoding="utf-8",
    )
    path = base / "CAS"
    ca = create_lab_ca(path / "trust", common_name="cmlab Lab Root (CAS)")
    build_content_source(path / "cloud", ca.signer(), payloads=payloads)
    assert (path / "cloud" / f"{G}.cab").stat().st_size > 2 * COPY_CHUNK
    # Made and synchronized in this process (no kill here): only the tests' copies need a
    # daemon of their own to kill.
    with LabSite(path, ca_dir=path / "trust") as site:
        site.sync(wait=True)
        site.wait_idle()
        assert site.states() == SYNCED_STATES
    return path


@pytest.fixture
def site(synced: Path, tmp_path: Path) -> Iterator[LabSite]:
    """A copy of the synced site; its daemon a child process the test starts and kills."""
    site = LabSite(tmp_path / "CAS", template=synced, mode="subprocess").create()
    yield site
    site.kill()  # a test that failed with its daemon running leaves none behind


def folder(site: LabSite) -> Path:
    return site.path / "EasySetupPayload" / g


def payload_hash(site: LabSite) -> str:
    """The manifest's PayloadHash, as HMAN stored it in CM_UpdatePackages."""
    rows = site.query("SELECT PayloadHash FROM CM_UpdatePackages WHERE PackageGuid = ?", [G])
    return str(rows[0][0])


def assert_never_reported_early(site: LabSite) -> None:
    """Whenever CM_UpdatePackages says DOWNLOAD_SUCCESS, the whole package is in place."""
    if site.state(G) == State.DOWNLOAD_SUCCESS:
        assert folder(site).is_dir(), "DOWNLOAD_SUCCESS without EasySetupPayload\\<guid>"
        assert folder_hash(folder(site)) == payload_hash(site), "DOWNLOAD_SUCCESS, bad content"


def converged(site: LabSite) -> bool:
    assert_never_reported_early(site)
    queued = site.query("SELECT 1 FROM CM_UpdatePackagesToDownload WHERE PackageGuid = ?", [G])
    return site.state(G) == State.DOWNLOAD_SUCCESS and not queued and not site.waiting_files()


def assert_success_only_after_complete(runs: list[list[str]], cab: Path) -> None:
    """Each `State="262146"` MCM was written, in the run that wrote it, after that attempt
    extracted the payload and downloaded the redists, or found the finished folder with the
    manifest's hash (PayloadExist = 1)."""
    success = f'outerxml is <ConfigurationManagerUpdateContent Guid="{g}" State="262146" '
    written = 0
    for run in runs:
        start: int | None = None
        for i, line in enumerate(run):
            if line == f"EasySetupDownloadSinglePackage downloading {g}. ~~":
                start = i
            elif line.startswith(success):
                written += 1
                assert start is not None, "262146 written outside a download attempt"
                attempt = run[start:i]
                fetched = (
                    f"File {cab} has been extracted with 0~~" in attempt
                    and f"Successfully download redist for {g}.~~" in attempt
                )
                local = (
                    "PayloadExist = 1~~" in attempt
                    and f"Content for {g} exists locally. Skip downloading~~" in attempt
                )
                assert fetched or local, "\n".join(attempt)
    assert written >= 1


CRASHPOINTS = [
    "dmp.during_payload_copy:2",
    "dmp.during_extract:3",
    "dmp.after_payload_in_place",
    "setupdl.after_file:2",
    "hman.after_forward",
    "hman.before_cmu_delete",
]


@pytest.mark.parametrize("point", CRASHPOINTS)
def test_sigkill_during_download_then_restart_converges(site: LabSite, point: str) -> None:
    easy = site.path / "EasySetupPayload"
    partial = easy / f"{g}.cab.partial"
    cfd_cmu = site.inbox("hman.box/CFD") / f"{g}.CMU"
    total = (site.path / "cloud" / f"{G}.cab").stat().st_size
    site.start(CMLAB_CRASHPOINTS=point)
    site.download(G)
    rc = site.wait_exit(timeout=60)
    assert rc == -signal.SIGKILL, f"the daemon did not reach {point}: {site.daemon_stderr()}"
    killed = site.log("dmpdownloader.log")
    assert_never_reported_early(site)
    left = partial.stat().st_size if partial.exists() else None

    # The kill landed where the test says.
    name = point.split(":")[0]
    if name == "dmp.during_payload_copy":
        assert left == 2 * COPY_CHUNK < total
        assert not (easy / f"{g}.cab").exists()
    elif name == "dmp.during_extract":
        assert sum(line.endswith(" is being extracted~~") for line in killed) == 3
        assert not folder(site).exists() and temporaries(site.path)
    elif name == "dmp.after_payload_in_place":
        assert folder_hash(folder(site)) == payload_hash(site)
    elif name == "setupdl.after_file":
        assert "INFO: Setup downloader setupdl.exe: FINISHED" not in site.log("ConfigMgrSetup.log")
        assert not folder(site).exists() and temporaries(site.path)
    elif name == "hman.before_cmu_delete":
        assert cfd_cmu.is_file(), "HMAN was killed before it deleted the CMU"
    # (hman.after_forward: the CMU may already be consumed, as the forwarding thread's
    # fsyncs can outlast the CMU handler; the kill lands wherever the download got to.)
    if name.startswith("dmp.") or name.startswith("setupdl."):
        assert not any('State="262146"' in line for line in killed)

    site.start()
    site.wait_for(lambda: converged(site), timeout=60, what=f"convergence after {point}")
    assert site.stop() == 0

    lines = site.log("dmpdownloader.log")
    restarted = lines[len(killed) :]
    assert lines[: len(killed)] == killed
    assert_success_only_after_complete([killed, restarted], easy / f"{g}.cab")
    # A copy the kill interrupted (where the test aims, or wherever HMAN's kill found it) is
    # resumed from the bytes it had, never started over or skipped.
    resumed = [line for line in restarted if line.startswith("Resuming the download")]
    assert resumed == ([] if not left else [f"Resuming the download at byte {left} of {total}~~"])
    if name == "dmp.after_payload_in_place":
        # The restart found the finished package and did not fetch it again.
        assert "PayloadExist = 1~~" in restarted
        assert not any(line.endswith(" is being extracted~~") for line in restarted)

    # Converged, clean, hash-correct.
    assert site.states()[G] == State.DOWNLOAD_SUCCESS
    assert folder_hash(folder(site)) == payload_hash(site)
    assert (folder(site) / BIG_FILE).stat().st_size == BIG_SIZE
    assert not partial.exists()
    assert site.waiting_files() == []
    assert not list(site.path.rglob("BAD")), "nothing may be quarantined because of a crash"
    assert temporaries(site.path) == []
    ((done,),) = site.query(
        "SELECT COUNT(*) FROM StateMessages WHERE TopicID = ? AND StateID = 13", [g]
    )
    assert done >= 1
