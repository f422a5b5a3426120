"""cmlab.components.cmupdate.redist_media: CMUpdate's redist processing (install step 2) and the
replacement of
0-byte placeholders from the redist folder (step 3), on a real staging folder built from the
lab cloud with real signatures."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path, PureWindowsPath

import pytest

from cmlab.admin.lab_cloud import build_content_source
from cmlab.components.cmupdate.redist_media import (
    MediaError,
    MediaResult,
    RedistPlan,
    check_media,
    process_redists,
    shown_separator,
)
from cmlab.core.errors import CmlabError
from cmlab.core.hashing import EMPTY_SHA256, sha256_file
from cmlab.site import trust
from cmlab.site.cab import create_cab, extract_cab, extract_cab_into
from cmlab.site.formats.redist_manifest import (
    RedistFile,
    RedistGroup,
    RedistManifest,
    render_redist_manifest,
)
from cmlab.site.formats.update_map import UpdateMap, decode_update_map, parse_update_map

GUID = "420E3E18-73C5-4BE9-88B0-6F1E30A012CA"
ROOT = r"E:\ConfigMgr"
STAGE = rf"{ROOT}\CMUStaging\{GUID}"
REDIST = rf"{STAGE}\redist"
TEMP = r"C:\Windows\TEMP"
NDP = "NDP462-KB3151800-x86-x64-AllOS-ENU.exe"
PLACEHOLDERS = ("msodbcsql.msi", NDP, "sqlncli.msi")  # update.map order (by name, no case)
DAEMON = Path(__file__).resolve().parents[2] / "daemon"


# ---------------------------------------------------------------------------------------
# A site folder with CMUStaging/<GUID> as CMUpdate leaves it after step 2's first half


@dataclasses.dataclass
class Lab:
    ca: trust.LabCA
    store: trust.TrustStore
    template: Path  # a site folder: CMUStaging/<GUID>/... (update.map extracted)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    base = tmp_path_factory.mktemp("redistmedia")
    ca = trust.create_lab_ca(base / "ca")
    store = trust.TrustStore.from_pem_files([ca.root_cert], [ca.root_cert])
    cloud = build_content_source(base / "cloud", ca.signer()).folder
    # What a download leaves in EasySetupPayload/<guid>, then CMUpdate's copy in CMUStaging.
    staging = base / "site" / "CMUStaging" / GUID
    extract_cab(cloud / f"{GUID}.cab", staging)
    shutil.copytree(cloud / GUID / "redist", staging / "redist")
    extract_cab_into(staging / "SMSSetup" / "update.map.cab", staging / "SMSSetup")
    return Lab(ca, store, base / "site")


@dataclasses.dataclass
class Site:
    root: Path
    staging: Path
    tmp: Path
    update_map: UpdateMap
    lines: list[str]

    def say(self, line: str) -> None:
        self.lines.append(line)

    def show(self, path: Path) -> str:
        """As a site with display_root E:\\ConfigMgr shows it; TEMP as on Windows."""
        for base, shown in ((self.root, ROOT), (self.tmp, TEMP)):
            try:
                rel = Path(path).relative_to(base)
            except ValueError:
                continue
            return str(PureWindowsPath(shown, *rel.parts))
        return str(path)

    def process(self, store: trust.TrustStore) -> RedistPlan:
        return process_redists(self.staging, store, self.say, self.show, tmp_dir=self.tmp)

    def check(self, plan: RedistPlan, **kw: object) -> MediaResult:
        return check_media(
            self.staging, self.update_map, plan, self.root, self.say, self.show, **kw
        )

    def files(self) -> dict[str, bytes]:
        return {
            p.relative_to(self.root).as_posix(): p.read_bytes()
            for p in sorted(self.root.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }


@pytest.fixture
def site(lab: Lab, tmp_path: Path) -> Site:
    root = tmp_path / "site"
    shutil.copytree(lab.template, root, symlinks=True)
    staging = root / "CMUStaging" / GUID
    text = decode_update_map((staging / "SMSSetup" / "update.map").read_bytes())
    return Site(root, staging, tmp_path / "TEMP", parse_update_map(text), [])


def x64(site: Site, name: str) -> Path:
    return site.staging / "SMSSetup" / "bin" / "x64" / name


def map_hash(site: Site, name: str) -> str:
    component = site.update_map.component("SITE_SERVER")
    assert component is not None
    return next(f.hash for d in component.directories for f in d.files if f.name == name)


def temporaries(root: Path) -> list[Path]:
    return list(root.rglob(".~cmlab-*"))


# ---------------------------------------------------------------------------------------
# Step 2: process_redists


def test_process_redists_logs_the_guides_lines(lab: Lab, site: Site) -> None:
    plan = site.process(lab.store)
    assert plan.manifest_cab == site.staging / "redist" / "ConfigMgr.Manifest.cab"
    assert plan.redist_dir == site.staging / "redist"
    assert site.lines == [
        rf"Found redist manifest {REDIST}\ConfigMgr.Manifest.cab and set redist folder to "
        rf"{REDIST}.",
        rf"INFO: Extracted file {TEMP}\ConfigMgr.Manifest.xml",
        'INFO: Processing file group "Dot_Net_Framework"',
        f'INFO: Processing file "{NDP}"',
        "INFO: File will be downloaded from https://go.microsoft.com/fwlink/?LinkID=2171070.",
        f"INFO: File for {NDP} [.NET Framework Extended 4.6.2 RTM] will be copied with file "
        f"name: {NDP}.",
        'INFO: Processing file group "SQL_Native_Client"',
        'INFO: Processing file "sqlncli.msi"',
        "INFO: File will be downloaded from https://redist.cmlab.invalid/sqlncli.msi.",
        "INFO: File for sqlncli.msi [Microsoft SQL Server 2012 Native Client (lab sample)] will "
        "be copied with file name: sqlncli.msi.",
        'INFO: Processing file group "SQL_ODBC_Driver"',
        'INFO: Processing file "msodbcsql.msi"',
        "INFO: File will be downloaded from https://redist.cmlab.invalid/msodbcsql.msi.",
        "INFO: File for msodbcsql.msi [Microsoft ODBC Driver 18 for SQL Server (lab sample)] "
        "will be copied with file name: msodbcsql.msi.",
        'INFO: Processing file group "ConfigMgr_AutoUpgradeScripts"',
        'INFO: Processing file "ConfigMgr.AutoUpgradeScripts.cab"',
        # No DisplayUrl: the file's place is shown, as SetupDL does.
        rf"INFO: File will be downloaded from {REDIST}\ConfigMgr.AutoUpgradeScripts.cab.",
        "INFO: File for ConfigMgr.AutoUpgradeScripts.cab [Configuration Manager pre-upgrade SQL "
        "scripts] will be copied with file name: ConfigMgr.AutoUpgradeScripts.cab.",
    ]
    ndp = plan.entries[0]
    assert (ndp.group, ndp.name, ndp.copy_as, ndp.size) == ("Dot_Net_Framework", NDP, NDP, 8192)
    assert ndp.path == site.staging / "redist" / NDP
    assert ndp.hash == sha256_file(ndp.path) == map_hash(site, NDP)
    assert [e.name for e in plan.entries][1:] == [
        "sqlncli.msi",
        "msodbcsql.msi",
        "ConfigMgr.AutoUpgradeScripts.cab",
    ]
    # The XML stays where the log line says; the private copy of the CAB does not.
    assert sorted(p.name for p in site.tmp.iterdir()) == ["ConfigMgr.Manifest.xml"]


@pytest.mark.parametrize("how", ["flip a byte", "unsigned", "another root"])
def test_untrusted_redist_manifest_is_refused(
    lab: Lab, site: Site, tmp_path: Path, how: str
) -> None:
    cab = site.staging / "redist" / "ConfigMgr.Manifest.cab"
    if how == "flip a byte":
        data = bytearray(cab.read_bytes())
        data[len(data) // 3] ^= 0x01
        cab.write_bytes(bytes(data))
    else:
        extract_cab(cab, tmp_path / "xml")
        xml = tmp_path / "xml" / "ConfigMgr.Manifest.xml"
        if how == "unsigned":
            create_cab({"ConfigMgr.Manifest.xml": xml}, cab)
        else:
            other = trust.create_lab_ca(tmp_path / "other", common_name="Not the lab root")
            create_cab({"ConfigMgr.Manifest.xml": xml}, tmp_path / "u.cab")
            trust.sign_cab(tmp_path / "u.cab", cab, other.signer())
    with pytest.raises(MediaError, match="not trusted"):
        site.process(lab.store)
    assert site.lines == []  # not even "Found redist manifest"
    assert not site.tmp.exists() or list(site.tmp.iterdir()) == []


def signed_manifest(lab: Lab, site: Site, tmp_path: Path, files: list[RedistFile]) -> None:
    xml = render_redist_manifest(
        RedistManifest("Redist", 9141, (RedistGroup("Evil", tuple(files)),))
    )
    create_cab({"ConfigMgr.Manifest.xml": xml}, tmp_path / "u.cab")
    trust.sign_cab(
        tmp_path / "u.cab", site.staging / "redist" / "ConfigMgr.Manifest.cab", lab.ca.signer()
    )


@pytest.mark.parametrize(
    "url", ["../../../bin/x64/evil.exe", "..\\evil.exe", "/etc/passwd", "C:/evil.exe"]
)
def test_manifest_with_an_escaping_url_is_refused(
    lab: Lab, site: Site, tmp_path: Path, url: str
) -> None:
    # Signed by the lab's own (trusted) signer: the parser must refuse it all the same.
    bad = RedistFile(NDP, "x", url, "", NDP, 8192, "SHA256", map_hash(site, NDP))
    signed_manifest(lab, site, tmp_path, [bad])
    before = site.files()
    with pytest.raises(MediaError, match="bad Url"):
        site.process(lab.store)
    after = site.files()
    assert after == before  # nothing written in the site
    assert [p.name for p in site.tmp.iterdir()] == ["ConfigMgr.Manifest.xml"]


def test_manifest_that_is_not_a_redist_manifest(lab: Lab, site: Site, tmp_path: Path) -> None:
    xml = render_redist_manifest(RedistManifest("LanguagePack", 9141, ()))
    create_cab({"ConfigMgr.Manifest.xml": xml, "extra.txt": b"x"}, tmp_path / "u.cab")
    trust.sign_cab(
        tmp_path / "u.cab", site.staging / "redist" / "ConfigMgr.Manifest.cab", lab.ca.signer()
    )
    with pytest.raises(MediaError, match=r"must hold only ConfigMgr\.Manifest\.xml"):
        site.process(lab.store)
    create_cab({"ConfigMgr.Manifest.xml": xml}, tmp_path / "u.cab")
    trust.sign_cab(
        tmp_path / "u.cab", site.staging / "redist" / "ConfigMgr.Manifest.cab", lab.ca.signer()
    )
    with pytest.raises(MediaError, match="LanguagePack manifest"):
        site.process(lab.store)


def test_redist_manifest_that_is_a_link_is_not_followed(
    lab: Lab, site: Site, tmp_path: Path
) -> None:
    cab = site.staging / "redist" / "ConfigMgr.Manifest.cab"
    shutil.copy(cab, tmp_path / "real.cab")
    cab.unlink()
    cab.symlink_to(tmp_path / "real.cab")
    with pytest.raises(MediaError, match="symbolic link"):
        site.process(lab.store)
    cab.unlink()
    with pytest.raises(MediaError, match="does not exist"):
        site.process(lab.store)


# ---------------------------------------------------------------------------------------
# Step 3: check_media, the happy path


def media_lines(name: str, expected: str) -> list[str]:
    """The guide's sequence for one placeholder (names upper-cased as the guide shows them)."""
    up = name.upper()
    staged = rf"{STAGE}\SMSSetup\bin\x64\{up}"
    return [
        f"INFO: Checking media: {staged}",
        f"INFO: Verifying hash for file '{staged}'",
        f"Expected hash:{expected}, Actual hash:{EMPTY_SHA256}",
        f"WARNING: File hash mismatch for {staged}",
        rf"INFO: Checking alternate path: {REDIST}\{up}",
        rf"INFO: Verifying hash for file '{REDIST}\{up}'",
        rf"INFO: Verifying signature for file '{REDIST}\{up}'",
        rf"INFO: Found valid source in folder: '{REDIST}\'",
        rf"INFO: Found valid source for external dependency file '{up}' at '{REDIST}\'",
        rf"This file {REDIST}\{up} will be copied from redist.",
    ]


def test_placeholders_are_replaced_with_the_guides_lines(lab: Lab, site: Site) -> None:
    plan = site.process(lab.store)
    for name in PLACEHOLDERS:
        assert x64(site, name).stat().st_size == 0
    site.lines.clear()
    result = site.check(plan)
    expected: list[str] = []
    for name in PLACEHOLDERS:
        expected += media_lines(name, map_hash(site, name))
    assert site.lines == expected
    assert result.replaced == tuple(f"SMSSetup/bin/x64/{n}" for n in PLACEHOLDERS)
    assert result.skipped == ()
    component = site.update_map.component("SITE_SERVER")
    assert component is not None
    assert result.checked == sum(len(d.files) for d in component.directories) == 12
    for name in PLACEHOLDERS:
        assert x64(site, name).read_bytes() == (site.staging / "redist" / name).read_bytes()
        assert sha256_file(x64(site, name)) == map_hash(site, name)
    assert temporaries(site.root) == []


def test_guide_example_line_by_line(lab: Lab, site: Site) -> None:
    """The NDP lines are the guide's, but for the GUID and the hashes of the lab's files."""
    plan = site.process(lab.store)
    site.lines.clear()
    site.check(plan)
    ndp = site.lines[10:20]
    guide = [
        r"INFO: Checking media: E:\ConfigMgr\CMUStaging\{G}\SMSSetup\bin\x64\NDP462-KB3151800-X86-X64-ALLOS-ENU.EXE",  # noqa: E501
        r"INFO: Verifying hash for file 'E:\ConfigMgr\CMUStaging\{G}\SMSSetup\bin\x64\NDP462-KB3151800-X86-X64-ALLOS-ENU.EXE'",  # noqa: E501
        r"Expected hash:{H}, Actual hash:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",  # noqa: E501
        r"WARNING: File hash mismatch for E:\ConfigMgr\CMUStaging\{G}\SMSSetup\bin\x64\NDP462-KB3151800-X86-X64-ALLOS-ENU.EXE",  # noqa: E501
        r"INFO: Checking alternate path: E:\ConfigMgr\CMUStaging\{G}\redist\NDP462-KB3151800-X86-X64-ALLOS-ENU.EXE",  # noqa: E501
        r"INFO: Verifying hash for file 'E:\ConfigMgr\CMUStaging\{G}\redist\NDP462-KB3151800-X86-X64-ALLOS-ENU.EXE'",  # noqa: E501
        r"INFO: Verifying signature for file 'E:\ConfigMgr\CMUStaging\{G}\redist\NDP462-KB3151800-X86-X64-ALLOS-ENU.EXE'",  # noqa: E501
        r"INFO: Found valid source in folder: 'E:\ConfigMgr\CMUStaging\{G}\redist\'",
        r"INFO: Found valid source for external dependency file 'NDP462-KB3151800-X86-X64-ALLOS-ENU.EXE' at 'E:\ConfigMgr\CMUStaging\{G}\redist\'",  # noqa: E501
        r"This file E:\ConfigMgr\CMUStaging\{G}\redist\NDP462-KB3151800-X86-X64-ALLOS-ENU.EXE will be copied from redist.",  # noqa: E501
    ]  # fmt: skip
    assert ndp == [g.replace("{G}", GUID).replace("{H}", map_hash(site, NDP)) for g in guide]


def test_rerun_is_idempotent(lab: Lab, site: Site) -> None:
    plan = site.process(lab.store)
    first = site.check(plan)
    state = site.files()
    site.lines.clear()
    second = site.check(plan)
    assert site.lines == []  # every file matches update.map now
    assert second == MediaResult(replaced=(), skipped=first.skipped, checked=first.checked)
    assert site.files() == state


def test_local_paths_use_the_local_separator(lab: Lab, site: Site) -> None:
    lines: list[str] = []
    plan = process_redists(site.staging, lab.store, lines.append, str, tmp_dir=site.tmp)
    lines.clear()
    check_media(site.staging, site.update_map, plan, site.root, lines.append, str)
    redist = f"{site.staging}/redist/"
    assert f"INFO: Found valid source in folder: '{redist}'" in lines
    assert f"INFO: Checking alternate path: {redist}{NDP.upper()}" in lines
    assert shown_separator(r"E:\ConfigMgr\x") == "\\"
    assert shown_separator("/srv/lab/x") == "/"
    # A name without separators: the local one.
    assert shown_separator("plain") == os.sep


# ---------------------------------------------------------------------------------------
# The installed copy: "same hash, skipped"


def install(site: Site, name: str, data: bytes, *, older: bool) -> Path:
    installed = site.root / "bin" / "x64" / name
    installed.parent.mkdir(parents=True, exist_ok=True)
    installed.write_bytes(data)
    redist_mtime = (site.staging / "redist" / name).stat().st_mtime
    when = redist_mtime - 3600 if older else redist_mtime + 3600
    os.utime(installed, (when, when))
    return installed


def test_same_hash_as_the_installed_copy_is_skipped(lab: Lab, site: Site) -> None:
    redist = site.staging / "redist"
    install(site, NDP, (redist / NDP).read_bytes(), older=True)
    install(site, "msodbcsql.msi", (redist / "msodbcsql.msi").read_bytes(), older=False)
    install(site, "sqlncli.msi", b"an older sqlncli.msi", older=True)  # differs: installed
    plan = site.process(lab.store)
    site.lines.clear()
    result = site.check(plan)
    assert result.skipped == ("SMSSetup/bin/x64/msodbcsql.msi", f"SMSSetup/bin/x64/{NDP}")
    assert result.replaced == tuple(f"SMSSetup/bin/x64/{n}" for n in PLACEHOLDERS)
    up = NDP.upper()
    guide_skip = (
        rf"File {REDIST}\{up} has newer modification time than "
        rf"({ROOT}\bin\x64\{NDP.lower()}) but they have the same hash. It will be skipped."
    )
    # Right after the NDP copy line, as in the guide.
    at = site.lines.index(rf"This file {REDIST}\{up} will be copied from redist.")
    assert site.lines[at + 1] == guide_skip
    # Not newer: cmlab does not claim it is; it says only what it checked.
    assert (
        rf"File {REDIST}\MSODBCSQL.MSI has the same hash as ({ROOT}\bin\x64\msodbcsql.msi). "
        "It will be skipped." in site.lines
    )
    assert not any("SQLNCLI.MSI has" in line for line in site.lines)
    # Idempotent: a rerun finds the same skips (and logs them again), replaces nothing.
    site.lines.clear()
    again = site.check(plan)
    assert (again.replaced, again.skipped) == ((), result.skipped)
    assert site.lines == [
        rf"File {REDIST}\MSODBCSQL.MSI has the same hash as ({ROOT}\bin\x64\msodbcsql.msi). "
        "It will be skipped.",
        guide_skip,
    ]


def test_installed_copy_that_is_a_link_is_not_read(lab: Lab, site: Site, tmp_path: Path) -> None:
    shutil.copy(site.staging / "redist" / NDP, tmp_path / "real")
    link = site.root / "bin" / "x64" / NDP
    link.parent.mkdir(parents=True)
    link.symlink_to(tmp_path / "real")
    plan = site.process(lab.store)
    assert site.check(plan).skipped == ()


# ---------------------------------------------------------------------------------------
# Hostile and broken media


def test_truncated_redist(lab: Lab, site: Site) -> None:
    plan = site.process(lab.store)
    redist = site.staging / "redist" / NDP
    redist.write_bytes(redist.read_bytes()[:3000])
    truncated = sha256_file(redist)
    site.lines.clear()
    with pytest.raises(MediaError) as caught:
        site.check(plan)
    message = str(caught.value)
    expected = map_hash(site, NDP)
    for part in (
        rf"{STAGE}\SMSSetup\bin\x64\{NDP}",
        rf"{REDIST}\{NDP}",
        EMPTY_SHA256,
        truncated,
        expected,
        "either path",
    ):
        assert part in message
    up = NDP.upper()
    assert site.lines[-3:] == [
        rf"INFO: Verifying hash for file '{REDIST}\{up}'",
        f"Expected hash:{expected}, Actual hash:{truncated}",
        rf"WARNING: File hash mismatch for {REDIST}\{up}",
    ]
    assert not any("Verifying signature" in line for line in site.lines[10:])
    assert x64(site, NDP).stat().st_size == 0  # the placeholder is untouched
    assert temporaries(site.root) == []


def test_oversized_redist_is_not_copied_beyond_its_size(lab: Lab, site: Site) -> None:
    plan = site.process(lab.store)
    redist = site.staging / "redist" / NDP
    with redist.open("ab") as f:
        f.write(b"\0" * (4 * 1024 * 1024))
    with pytest.raises(MediaError, match=sha256_file(redist)):
        site.check(plan)
    assert x64(site, NDP).stat().st_size == 0
    assert temporaries(site.root) == []


def test_placeholder_whose_redist_is_missing(lab: Lab, site: Site) -> None:
    plan = site.process(lab.store)
    (site.staging / "redist" / "sqlncli.msi").unlink()
    site.lines.clear()
    with pytest.raises(MediaError, match="is missing") as caught:
        site.check(plan)
    assert rf"{REDIST}\sqlncli.msi" in str(caught.value)
    assert rf"{STAGE}\SMSSetup\bin\x64\sqlncli.msi has hash {EMPTY_SHA256}" in str(caught.value)
    assert site.lines[-2:] == [
        rf"INFO: Checking alternate path: {REDIST}\SQLNCLI.MSI",
        rf"WARNING: File {REDIST}\SQLNCLI.MSI is missing",
    ]
    assert x64(site, "sqlncli.msi").stat().st_size == 0


def test_redist_missing_and_staging_copy_missing(lab: Lab, site: Site) -> None:
    plan = site.process(lab.store)
    x64(site, "sqlncli.msi").unlink()
    (site.staging / "redist" / "sqlncli.msi").unlink()
    site.lines.clear()
    with pytest.raises(MediaError, match=r"has hash \(missing\) and .* is missing"):
        site.check(plan)
    assert rf"WARNING: File {STAGE}\SMSSetup\bin\x64\SQLNCLI.MSI is missing" in site.lines


def test_missing_staging_copy_is_restored_from_redist(lab: Lab, site: Site) -> None:
    plan = site.process(lab.store)
    x64(site, "sqlncli.msi").unlink()
    result = site.check(plan)
    assert "SMSSetup/bin/x64/sqlncli.msi" in result.replaced
    assert sha256_file(x64(site, "sqlncli.msi")) == map_hash(site, "sqlncli.msi")


def test_changed_file_that_is_not_a_redist(lab: Lab, site: Site) -> None:
    plan = site.process(lab.store)
    hman = x64(site, "hman.dll")
    hman.write_bytes(hman.read_bytes() + b"patched")
    site.lines.clear()
    with pytest.raises(MediaError, match="no redist") as caught:
        site.check(plan)
    assert rf"{STAGE}\SMSSetup\bin\x64\hman.dll has hash {sha256_file(hman)}" in str(caught.value)
    assert map_hash(site, "hman.dll") in str(caught.value)
    assert site.lines[-1] == rf"WARNING: File hash mismatch for {STAGE}\SMSSetup\bin\x64\HMAN.DLL"


def test_redist_the_signed_manifest_does_not_vouch_for(lab: Lab, site: Site) -> None:
    """update.map's hash matches, but the signed manifest lists another: the signature line
    is logged because that check is made, and it fails."""
    plan = site.process(lab.store)
    entries = tuple(
        dataclasses.replace(e, hash="0" * 64) if e.name == NDP else e for e in plan.entries
    )
    site.lines.clear()
    with pytest.raises(MediaError, match="signed redist manifest"):
        site.check(dataclasses.replace(plan, entries=entries))
    assert site.lines[-1] == rf"INFO: Verifying signature for file '{REDIST}\{NDP.upper()}'"
    assert x64(site, NDP).stat().st_size == 0
    assert temporaries(site.root) == []


@pytest.mark.parametrize("where", ["redist file", "redist folder", "placeholder", "x64 folder"])
def test_links_are_never_followed(lab: Lab, site: Site, tmp_path: Path, where: str) -> None:
    plan = site.process(lab.store)
    redist = site.staging / "redist"
    target = {
        "redist file": redist / NDP,
        "redist folder": redist,
        "placeholder": x64(site, NDP),
        "x64 folder": x64(site, NDP).parent,
    }[where]
    # The link points at a perfectly good copy: it must still not be used.
    real = tmp_path / "elsewhere" / target.name
    real.parent.mkdir()
    if target.is_dir():
        shutil.copytree(target, real)
        shutil.rmtree(target)
    else:
        shutil.copy(redist / NDP, real)
        target.unlink()
    target.symlink_to(real)
    outside = {p: p.read_bytes() for p in real.parent.rglob("*") if p.is_file()}
    with pytest.raises(MediaError, match="symbolic link"):
        site.check(plan)
    assert {p: p.read_bytes() for p in real.parent.rglob("*") if p.is_file()} == outside
    assert temporaries(site.root) == [] and temporaries(real.parent) == []


def test_plan_pointing_outside_the_staging_folder(lab: Lab, site: Site, tmp_path: Path) -> None:
    plan = site.process(lab.store)
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(site.staging / "redist" / NDP, evil / NDP)
    entries = tuple(
        dataclasses.replace(e, path=evil / NDP) if e.name == NDP else e for e in plan.entries
    )
    with pytest.raises(MediaError, match="is not in"):
        site.check(dataclasses.replace(plan, entries=entries))
    assert x64(site, NDP).stat().st_size == 0


def test_unknown_component(lab: Lab, site: Site) -> None:
    plan = site.process(lab.store)
    with pytest.raises(MediaError, match="no NOPE component"):
        site.check(plan, component="NOPE")
    assert issubclass(MediaError, CmlabError)


def test_other_component(lab: Lab, site: Site) -> None:
    plan = site.process(lab.store)
    result = site.check(plan, component="CONFIGURATION_MANAGER_UPDATE")
    assert result == MediaResult(replaced=(), skipped=(), checked=3)
    assert site.lines[-1].startswith("INFO: File for ConfigMgr.AutoUpgradeScripts.cab")


# ---------------------------------------------------------------------------------------
# Killed mid-way: the next run ends in the same state as an uninterrupted one

CHILD = """
import sys
from pathlib import Path
from cmlab.site import trust
from cmlab.components.cmupdate.redist_media import check_media, process_redists
from cmlab.site.formats.update_map import decode_update_map, parse_update_map
root, ca_root = Path(sys.argv[1]), Path(sys.argv[2])
staging = next((root / "CMUStaging").iterdir())
store = trust.TrustStore.from_pem_files([ca_root], [ca_root])
m = parse_update_map(decode_update_map((staging / "SMSSetup" / "update.map").read_bytes()))
plan = process_redists(staging, store, print, str, tmp_dir=root.parent / "TEMP")
check_media(staging, m, plan, root, print, str)
"""


@pytest.mark.parametrize(
    "point",
    [
        "redistmedia.after_copy:1",
        "redistmedia.after_copy:2",
        "redistmedia.after_replace:1",
        "redistmedia.after_replace:3",
    ],
)
def test_killed_then_rerun(lab: Lab, site: Site, tmp_path: Path, point: str) -> None:
    clean = Site(
        tmp_path / "clean",
        tmp_path / "clean" / "CMUStaging" / GUID,
        tmp_path / "T2",
        site.update_map,
        [],
    )
    shutil.copytree(site.root, clean.root, symlinks=True)
    clean.check(clean.process(lab.store))

    env = {**os.environ, "PYTHONPATH": str(DAEMON), "CMLAB_CRASHPOINTS": point}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(site.root), str(lab.ca.root_cert)],
        env=env,
        timeout=120,
        capture_output=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    if point.startswith("redistmedia.after_copy"):
        assert len(temporaries(site.root)) == 1  # the copy in the making, never renamed in
    done = sum(1 for n in PLACEHOLDERS if x64(site, n).stat().st_size)
    assert done == int(point[-1]) - (1 if "after_copy" in point else 0)

    result = site.check(site.process(lab.store))
    assert len(result.replaced) == 3 - done
    assert temporaries(site.root) == []
    assert site.files() == clean.files()
