"""cmlab.admin.payload: the sample update package builds deterministically and lists what it
built."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from cmlab.admin.payload import (
    build_cab_from_dir,
    build_payload_tree,
    build_redists,
    load_package,
)
from cmlab.core.errors import CabPathError, CmlabError, UpdateMapError
from cmlab.core.hashing import EMPTY_SHA256, folder_hash, sha256_file
from cmlab.site.cab import extract_cab, list_cab
from cmlab.site.formats.install_map import parse_install_map
from cmlab.site.formats.payload_layout import AUTO_UPGRADE_SCRIPTS_CAB
from cmlab.site.formats.redist_manifest import (
    LN_MANIFEST_CAB,
    LN_MANIFEST_XML,
    REDIST_MANIFEST_CAB,
    REDIST_MANIFEST_XML,
    parse_redist_manifest,
)
from cmlab.site.formats.sample_binary import read_sample_header, sample_build_number
from cmlab.site.formats.update_map import parse_update_map

SOURCE = Path(__file__).resolve().parents[2] / "payloads" / "updates" / "cm2509"
GUID = "420E3E18-73C5-4BE9-88B0-6F1E30A012CA"

# The guide's 16 install steps, in its order and words.
GUIDE_STEPS = [
    "Unpack and run the pre-upgrade SQL scripts",
    "Turn off SQL Server Service Broker",
    "Stop the Configuration Manager services",
    "Unload the WMI providers",
    "Delete the SMSDBMON triggers",
    "Save the site control settings",
    "Update the Configuration Manager database",
    "Update the SQL registry entries",
    "Update the RCM registry entries",
    "Install files, language packs, components, and controls",
    "Update the site control settings",
    "Configure SQL Server Service Broker",
    "Start WMI, and then install services",
    "Update the site table",
    "Update the Admin console binaries",
    "Turn on SQL Server Service Broker",
]


def files_of(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_update_map(tree: Path, tmp: Path) -> str:
    extract_cab(tree / "SMSSetup" / "update.map.cab", tmp / "um")
    return (tmp / "um" / "update.map").read_text(encoding="utf-8")


def test_package_info() -> None:
    info = load_package(SOURCE)
    assert info.guid == GUID
    assert info.name == "Configuration Manager 2509"
    assert (info.build, info.full_version) == (9141, "5.00.9141.1000")


def test_build_is_deterministic(tmp_path: Path) -> None:
    one = build_payload_tree(SOURCE, tmp_path / "one")
    two = build_payload_tree(SOURCE, tmp_path / "two")
    assert one == tmp_path / "one" / GUID
    assert files_of(one) == files_of(two)
    assert folder_hash(one) == folder_hash(two)
    build_cab_from_dir(one, tmp_path / "one.cab", None)
    build_cab_from_dir(two, tmp_path / "two.cab", None)
    assert (tmp_path / "one.cab").read_bytes() == (tmp_path / "two.cab").read_bytes()
    r1 = build_redists(SOURCE, tmp_path / "r1", None)
    r2 = build_redists(SOURCE, tmp_path / "r2", None)
    assert files_of(r1) == files_of(r2)


def test_rebuild_replaces_the_tree(tmp_path: Path) -> None:
    tree = build_payload_tree(SOURCE, tmp_path)
    (tree / "stray.txt").write_text("left over")
    again = build_payload_tree(SOURCE, tmp_path)
    assert again == tree and not (tree / "stray.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [GUID]


def test_payload_layout(tmp_path: Path) -> None:
    tree = build_payload_tree(SOURCE, tmp_path)
    files = files_of(tree)
    for name in (
        "splash.hta",
        "SMSSetup/update.map.cab",
        "SMSSetup/install.map",
        "SMSSetup/bin/x64/cmupdate.exe",
        "SMSSetup/bin/x64/prereqcore.dll",
        "SMSSetup/bin/x64/setupcore.dll",
        "SMSSetup/bin/x64/smsexec.exe",
        "CMUClient/ccmsetup.exe",
        "CMUClient/client.msi",
    ):
        assert name in files, name
    for placeholder in (
        "NDP462-KB3151800-x86-x64-AllOS-ENU.exe",
        "sqlncli.msi",
        "msodbcsql.msi",
    ):
        assert files[f"SMSSetup/bin/x64/{placeholder}"] == b""
    assert [e.name for e in list_cab(tree / "SMSSetup" / "update.map.cab")] == ["update.map"]
    cmupdate = tree / "SMSSetup" / "bin" / "x64" / "cmupdate.exe"
    assert cmupdate.read_bytes().startswith(b"cmlab-build: 9141\n")
    assert sample_build_number(cmupdate) == 9141
    assert read_sample_header(cmupdate)["version"] == "5.00.9141.1000"
    with pytest.raises(CmlabError):
        sample_build_number(tree / "splash.hta")


def test_update_map_lists_exactly_the_built_files(tmp_path: Path) -> None:
    tree = build_payload_tree(SOURCE, tmp_path / "p")
    redist = build_redists(SOURCE, tmp_path / "redist", None)
    m = parse_update_map(read_update_map(tree, tmp_path))

    cmu = m.component("CONFIGURATION_MANAGER_UPDATE")
    assert cmu is not None and cmu.units == ("SMS",)
    assert [(d.path, d.attrs) for d in cmu.directories] == [("bin\\x64", ("5", "AMD64", ""))]
    assert {f.name for f in cmu.directories[0].files} == {
        "cmupdate.exe",
        "prereqcore.dll",
        "setupcore.dll",
    }
    assert {f.name: f.flag for f in cmu.directories[0].files}["cmupdate.exe"] == 1

    site = m.component("SITE_SERVER")
    assert site is not None
    bin64 = tree / "SMSSetup" / "bin" / "x64"
    listed = {f.name: f for d in site.directories for f in d.files}
    assert set(listed) == {p.name for p in bin64.iterdir()}  # every file the install copies
    for component in m.components:
        for d in component.directories:
            for f in d.files:
                path = tree / "SMSSetup" / d.path.replace("\\", "/") / f.name
                assert f.algorithm == "SHA256"
                if sha256_file(path) == EMPTY_SHA256 and f.hash != EMPTY_SHA256:
                    # a 0-byte placeholder: the map carries the real redist's size and hash
                    real = redist / f.name
                    assert (f.size, f.hash) == (real.stat().st_size, sha256_file(real))
                else:
                    assert (f.size, f.hash) == (path.stat().st_size, sha256_file(path)), path
                    assert f.hash == hashlib.sha256(path.read_bytes()).hexdigest().upper()
    placeholders = [f for f in listed.values() if (bin64 / f.name).stat().st_size == 0]
    assert len(placeholders) == 3


def test_install_map_has_the_guides_16_steps(tmp_path: Path) -> None:
    tree = build_payload_tree(SOURCE, tmp_path)
    steps = parse_install_map((tree / "SMSSetup" / "install.map").read_text(encoding="utf-8"))
    assert [s.title for s in steps] == GUIDE_STEPS
    assert [s.id for s in steps] == list(range(1, 17))
    assert all(s.state.startswith("INSTALL_") for s in steps)
    assert steps[0].param("cab") == "redist\\ConfigMgr.AutoUpgradeScripts.cab"
    assert steps[9].state == "INSTALL_INSTALLFILES"
    assert steps[9].param("component") == "SITE_SERVER"
    assert steps[15].state == "INSTALL_SSB_ACTIVATION_ON"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "no steps"),
        ("STEP <1><A><INSTALL_IN_PROGRESS><t><>\nSTEP <3><B><INSTALL_IN_PROGRESS><t><>", "line 2"),
        ("STEP <1><A><INSTALL_NOPE><t><>", "unknown state"),
        ("STEP <1><A><INSTALL_IN_PROGRESS><t><x>", "bad parameter"),
        ("STEP 1 A", "line 1"),
    ],
)
def test_install_map_errors(text: str, match: str) -> None:
    with pytest.raises(UpdateMapError, match=match):
        parse_install_map(text)


def test_redists_and_their_manifests(tmp_path: Path) -> None:
    out = build_redists(SOURCE, tmp_path / "redist", None)
    assert out == tmp_path / "redist"
    for cab in (REDIST_MANIFEST_CAB, LN_MANIFEST_CAB, AUTO_UPGRADE_SCRIPTS_CAB):
        assert (out / cab).is_file()
    extract_cab(out / REDIST_MANIFEST_CAB, tmp_path / "m")
    manifest = parse_redist_manifest((tmp_path / "m" / REDIST_MANIFEST_XML).read_bytes())
    assert manifest.kind == "Redist" and manifest.build == 9141
    names = {f.name for _, f in manifest.files()}
    assert {"NDP462-KB3151800-x86-x64-AllOS-ENU.exe", "sqlncli.msi", "msodbcsql.msi"} <= names
    assert AUTO_UPGRADE_SCRIPTS_CAB in names
    for group, f in manifest.files():
        target = out / f.url
        assert (f.size, f.hash) == (target.stat().st_size, sha256_file(target)), group.name
    ndp = next(f for _, f in manifest.files() if f.name.startswith("NDP462"))
    assert ndp.display_url == "https://go.microsoft.com/fwlink/?LinkID=2171070"
    assert ndp.description == ".NET Framework Extended 4.6.2 RTM"

    extract_cab(out / LN_MANIFEST_CAB, tmp_path / "ln")
    ln = parse_redist_manifest((tmp_path / "ln" / LN_MANIFEST_XML).read_bytes())
    assert ln.kind == "LanguagePack"
    for _, f in ln.files():
        assert sha256_file(out / f.url) == f.hash

    scripts = extract_cab(out / AUTO_UPGRADE_SCRIPTS_CAB, tmp_path / "sql")
    sql = (tmp_path / "sql" / scripts[0].path).read_text(encoding="utf-8")
    assert "CREATE TABLE IF NOT EXISTS CM_UpgradeHistory" in sql
    import sqlite3

    with sqlite3.connect(":memory:") as db:  # the script is valid SQLite and idempotent
        db.executescript(sql)
        db.executescript(sql)


@pytest.mark.parametrize(
    "xml",
    [
        b"not xml",
        b"<Other/>",
        b'<!DOCTYPE x [<!ENTITY a "b">]><ConfigMgrRedistManifest Kind="Redist" Build="1"/>',
        b'<ConfigMgrRedistManifest Kind="Redist" Build="1"><FileGroup Name="g">'
        b'<File Name="a" Url="../a" CopyAs="a" Size="1"><Hash Algorithm="SHA256">'
        + b"A" * 64
        + b"</Hash></File></FileGroup></ConfigMgrRedistManifest>",
        b'<ConfigMgrRedistManifest Kind="Redist" Build="1"><FileGroup Name="g">'
        b'<File Name="a" Url="a" CopyAs="a" Size="x"><Hash Algorithm="SHA256">AB</Hash>'
        b"</File></FileGroup></ConfigMgrRedistManifest>",
    ],
)
def test_redist_manifest_rejects_bad_input(xml: bytes) -> None:
    from cmlab.core.errors import ManifestError

    with pytest.raises(ManifestError):
        parse_redist_manifest(xml)


def test_cab_from_dir_roundtrip_and_links(tmp_path: Path) -> None:
    tree = build_payload_tree(SOURCE, tmp_path / "p")
    cab = tmp_path / f"{GUID}.cab"
    build_cab_from_dir(tree, cab, None)
    names = [e.name for e in list_cab(cab)]
    assert "SMSSetup\\bin\\x64\\cmupdate.exe" in names
    assert all("/" not in n for n in names)
    extract_cab(cab, tmp_path / "x")
    assert files_of(tmp_path / "x") == files_of(tree)
    assert folder_hash(tmp_path / "x") == folder_hash(tree)
    (tree / "link").symlink_to(tree / "splash.hta")
    with pytest.raises(CabPathError):
        build_cab_from_dir(tree, tmp_path / "bad.cab", None)
    assert not (tmp_path / "bad.cab").exists()


def test_bad_package_sources(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(SOURCE, src)
    toml = (src / "package.toml").read_text(encoding="utf-8")
    (src / "package.toml").write_text(toml.replace("build = 9141", "build = 9999"))
    with pytest.raises(CmlabError, match="build"):
        build_payload_tree(src, tmp_path / "out")
    (src / "package.toml").write_text(
        toml.replace('path = "CMUClient/client.msi"', 'path = "..\\\\client.msi"')
    )
    with pytest.raises(CmlabError):
        build_payload_tree(src, tmp_path / "out")
    (src / "package.toml").write_text(toml)
    (src / "files" / "SMSSetup" / "install.map").write_text("STEP nonsense\n")
    with pytest.raises(UpdateMapError):
        build_payload_tree(src, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_signed_build(tmp_path: Path) -> None:
    trust = pytest.importorskip("cmlab.site.trust")
    ca = trust.create_lab_ca(tmp_path / "ca")
    signer = ca.signer()
    store = trust.TrustStore.from_pem_files([ca.root_cert], [ca.root_cert])

    tree = build_payload_tree(SOURCE, tmp_path / "p", signer=signer)
    update_map_cab = tree / "SMSSetup" / "update.map.cab"
    verdict = trust.verify_cab(update_map_cab, store)
    assert verdict.trusted, verdict.reason
    # a signed CAB (reserved header area) still extracts, and the map is the same
    unsigned = build_payload_tree(SOURCE, tmp_path / "u")
    assert read_update_map(tree, tmp_path / "a") == read_update_map(unsigned, tmp_path / "b")

    payload_cab = tmp_path / f"{GUID}.cab"
    build_cab_from_dir(tree, payload_cab, signer)
    assert trust.verify_cab(payload_cab, store).trusted
    extract_cab(payload_cab, tmp_path / "x")
    assert files_of(tmp_path / "x") == files_of(tree)

    redist = build_redists(SOURCE, tmp_path / "redist", signer)
    for cab in (REDIST_MANIFEST_CAB, LN_MANIFEST_CAB, AUTO_UPGRADE_SCRIPTS_CAB):
        assert trust.verify_cab(redist / cab, store).trusted, cab

    data = bytearray(update_map_cab.read_bytes())
    signature_offset = int.from_bytes(data[44:48], "little")  # the reserved header area
    data[signature_offset - 5] ^= 0xFF  # one byte of the MSZIP data, before the signature
    update_map_cab.write_bytes(bytes(data))
    assert not trust.verify_cab(update_map_cab, store).trusted
    assert not [p for p in tmp_path.rglob("*") if ".~cmlab-" in p.name]
