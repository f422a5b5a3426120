"""The sample update packages: from sources in payloads/updates/<name>/ to the payload tree,
its CAB, and the redist folder. Formats are in docs/formats.md, the layout in
payloads/README.md.

Everything is deterministic: binaries are generated from their name and the build number,
every CAB gets the same timestamp, and update.map lists the sizes and SHA-256 of the files
actually built. Only signatures (which carry a signing time) differ between two builds.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmlab.core.errors import CabPathError, CmlabError, ManifestError, UpdateMapError
from cmlab.core.fs import tmp_name_for, write_atomic
from cmlab.core.hashing import sha256_bytes, sha256_file
from cmlab.core.safexml import parse_xml
from cmlab.site.cab import _put_in_place, create_cab, normalize_member_name
from cmlab.site.formats.ids import is_guid
from cmlab.site.formats.update_map import (
    MapComponent,
    MapDirectory,
    MapFile,
    UpdateMap,
    render_update_map,
)

if TYPE_CHECKING:
    from cmlab.site.trust import Signer

__all__ = [
    "AUTO_UPGRADE_SCRIPTS_CAB",
    "LN_MANIFEST_CAB",
    "LN_MANIFEST_XML",
    "REDIST_MANIFEST_CAB",
    "REDIST_MANIFEST_XML",
    "InstallStep",
    "PackageInfo",
    "RedistFile",
    "RedistGroup",
    "RedistManifest",
    "build_cab_from_dir",
    "build_payload_tree",
    "build_redists",
    "load_package",
    "parse_install_map",
    "parse_redist_manifest",
    "read_sample_header",
    "sample_binary",
    "sample_build_number",
]

REDIST_MANIFEST_CAB = "ConfigMgr.Manifest.cab"
REDIST_MANIFEST_XML = "ConfigMgr.Manifest.xml"
LN_MANIFEST_CAB = "ConfigMgr.LN.Manifest.cab"
LN_MANIFEST_XML = "ConfigMgr.LN.Manifest.xml"
AUTO_UPGRADE_SCRIPTS_CAB = "ConfigMgr.AutoUpgradeScripts.cab"
AUTO_UPGRADE_SCRIPTS_GROUP = "ConfigMgr_AutoUpgradeScripts"
UPDATE_MAP_CAB = "SMSSetup/update.map.cab"
INSTALL_MAP = "SMSSetup/install.map"
MAP_ROOT = "SMSSetup"  # update.map directory paths are relative to this folder

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


# ---------------------------------------------------------------------------------------
# Sample binaries


def _stream(seed: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes: SHA-256 in counter mode, stable across Pythons."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def sample_binary(name: str, build: int, version: str, size: int) -> bytes:
    """A stand-in for a Microsoft binary: a text header the lab can read, then noise.

    The header's first line is `cmlab-build: <build>` (see read_sample_header).
    """
    header = (
        f"cmlab-build: {build}\n"
        f"cmlab-version: {version}\n"
        f"cmlab sample binary {name} build {build}\n\n"
    ).encode()
    if size < len(header):
        raise CmlabError(f"sample binary {name}: size {size} is smaller than its header")
    return header + _stream(f"cmlab:binary:{name}:{build}", size - len(header))


def _sample_redist(name: str, description: str, size: int) -> bytes:
    # Seeded by the name alone: a redist is the same file in every update that ships it.
    header = f"cmlab sample redist {name}: {description}\n\n".encode()
    if size < len(header):
        raise CmlabError(f"sample redist {name}: size {size} is smaller than its header")
    return header + _stream(f"cmlab:redist:{name}", size - len(header))


def read_sample_header(path: Path) -> dict[str, str]:
    """The `cmlab-<key>: <value>` lines at the start of a sample binary ({} if none)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    fields: dict[str, str] = {}
    for raw in head.split(b"\n"):
        line = raw.decode("ascii", "replace")
        if not line.startswith("cmlab-") or ": " not in line:
            break
        key, value = line[len("cmlab-") :].split(": ", 1)
        fields[key] = value
    return fields


def sample_build_number(path: Path) -> int:
    """The build number a sample binary (e.g. cmupdate.exe) was made for."""
    value = read_sample_header(path).get("build", "")
    if not value.isdigit():
        raise CmlabError(f"{path}: not a cmlab sample binary (no 'cmlab-build:' line)")
    return int(value)


# ---------------------------------------------------------------------------------------
# package.toml


@dataclass(frozen=True)
class SampleBinary:
    path: str  # payload-relative posix path
    size: int


@dataclass(frozen=True)
class RedistSource:
    group: str
    path: str  # relative to the redist folder (posix)
    description: str
    display_url: str
    size: int
    language_pack: bool


@dataclass(frozen=True)
class ComponentDirectory:
    path: str  # as written in update.map (backslashes), relative to SMSSetup
    attrs: tuple[str, ...]
    files: tuple[str, ...] | None  # None: every file in the folder
    flags: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class ComponentSource:
    name: str
    id: int
    units: tuple[str, ...]
    directories: tuple[ComponentDirectory, ...]


@dataclass(frozen=True)
class PackageInfo:
    guid: str
    name: str
    build: int
    full_version: str
    binaries: tuple[SampleBinary, ...]
    placeholders: tuple[str, ...]  # payload-relative paths of 0-byte redist stand-ins
    redists: tuple[RedistSource, ...]
    components: tuple[ComponentSource, ...]


def _get(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = table.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CmlabError(f"{where}: '{key}' must be a {kind.__name__}")
    return value


def _safe_rel(path: str, where: str) -> str:
    try:
        return normalize_member_name(path)
    except CabPathError as exc:
        raise CmlabError(f"{where}: {exc}") from None


def load_package(src: Path) -> PackageInfo:
    """Read and check `src/package.toml` (CmlabError if anything is off)."""
    where = str(Path(src) / "package.toml")
    try:
        doc = tomllib.loads((Path(src) / "package.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CmlabError(f"{where}: {exc}") from None
    pkg = doc.get("package")
    if not isinstance(pkg, dict):
        raise CmlabError(f"{where}: missing [package]")
    guid = _get(pkg, "guid", str, where).upper()
    if not is_guid(guid):
        raise CmlabError(f"{where}: guid {guid!r} is not a GUID")
    version = _get(pkg, "full_version", str, where)
    build = _get(pkg, "build", int, where)
    if not _VERSION_RE.match(version) or version.split(".")[2] != str(build):
        raise CmlabError(f"{where}: full_version {version!r} does not carry build {build}")
    binaries = tuple(
        SampleBinary(_safe_rel(_get(b, "path", str, where), where), _get(b, "size", int, where))
        for b in doc.get("binary", [])
    )
    placeholders = tuple(
        _safe_rel(_get(p, "path", str, where), where) for p in doc.get("placeholder", [])
    )
    redists = []
    for table, is_lp in ((doc.get("redist", []), False), (doc.get("language_pack", []), True)):
        for r in table:
            redists.append(
                RedistSource(
                    group=_get(r, "group", str, where),
                    path=_safe_rel(_get(r, "path", str, where), where),
                    description=_get(r, "description", str, where),
                    display_url=str(r.get("display_url", "")),
                    size=_get(r, "size", int, where),
                    language_pack=is_lp,
                )
            )
    by_name = {Path(r.path).name.lower() for r in redists}
    for p in placeholders:
        if Path(p).name.lower() not in by_name:
            raise CmlabError(f"{where}: placeholder {p} has no [[redist]] of the same name")
    components = []
    for c in doc.get("component", []):
        dirs = []
        for d in c.get("directory", []):
            files = d.get("files", "*")
            dirs.append(
                ComponentDirectory(
                    path=_get(d, "path", str, where),
                    attrs=tuple(str(a) for a in d.get("attrs", [""])),
                    files=None if files == "*" else tuple(str(f) for f in files),
                    flags=tuple((str(k), int(v)) for k, v in dict(d.get("flags", {})).items()),
                )
            )
        components.append(
            ComponentSource(
                name=_get(c, "name", str, where),
                id=_get(c, "id", int, where),
                units=tuple(str(u) for u in c.get("units", [])),
                directories=tuple(dirs),
            )
        )
    all_paths = [b.path for b in binaries] + list(placeholders)
    if len({p.lower() for p in all_paths}) != len(all_paths):
        raise CmlabError(f"{where}: a path is declared twice")
    return PackageInfo(
        guid=guid,
        name=_get(pkg, "name", str, where),
        build=build,
        full_version=version,
        binaries=binaries,
        placeholders=placeholders,
        redists=tuple(redists),
        components=tuple(components),
    )


# ---------------------------------------------------------------------------------------
# install.map


@dataclass(frozen=True)
class InstallStep:
    id: int
    action: str
    state: str  # the INSTALL_* state name reported while the step runs
    title: str
    params: tuple[tuple[str, str], ...]

    def param(self, key: str, default: str = "") -> str:
        return dict(self.params).get(key, default)


_STEP_RE = re.compile(
    r"^STEP\s+<(\d{1,4})><([A-Z][A-Z0-9_]*)><(INSTALL_[A-Z_]+)><([^<>]+)><([^<>]*)>$"
)
_PARAM_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)=([^;<>]*)$")


def parse_install_map(text: str) -> tuple[InstallStep, ...]:
    """Parse install.map; UpdateMapError with the line number on any deviation."""
    from cmlab.site.statecodes import PackageState

    if len(text) > 1024 * 1024:
        raise UpdateMapError("install.map is larger than 1 MiB")
    steps: list[InstallStep] = []
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        found = _STEP_RE.match(line)
        if not found:
            raise UpdateMapError(
                f"install.map line {lineno}: expected STEP <id><ACTION><INSTALL_STATE>"
                f"<title><key=value;...>, found {line[:60]!r}"
            )
        ident, action, state, title, params_text = found.groups()
        if state not in PackageState.__members__:
            raise UpdateMapError(f"install.map line {lineno}: unknown state {state}")
        if int(ident) != len(steps) + 1:
            raise UpdateMapError(
                f"install.map line {lineno}: step {ident} out of order (expected {len(steps) + 1})"
            )
        params = []
        for part in params_text.split(";") if params_text else []:
            pm = _PARAM_RE.match(part)
            if not pm:
                raise UpdateMapError(f"install.map line {lineno}: bad parameter {part!r}")
            params.append((pm.group(1), pm.group(2)))
        steps.append(InstallStep(int(ident), action, state, title.strip(), tuple(params)))
    if not steps:
        raise UpdateMapError("install.map has no steps")
    return tuple(steps)


# ---------------------------------------------------------------------------------------
# Redist manifests (ConfigMgr.Manifest.xml, ConfigMgr.LN.Manifest.xml)


@dataclass(frozen=True)
class RedistFile:
    name: str  # file name as SetupDL logs it
    description: str
    url: str  # relative to the folder holding the manifest CAB (posix)
    display_url: str  # what "File will be downloaded from ..." shows
    copy_as: str  # name it is copied under (e.g. over a 0-byte placeholder)
    size: int
    algorithm: str
    hash: str


@dataclass(frozen=True)
class RedistGroup:
    name: str
    files: tuple[RedistFile, ...]


@dataclass(frozen=True)
class RedistManifest:
    kind: str  # "Redist" or "LanguagePack"
    build: int
    groups: tuple[RedistGroup, ...]

    def files(self) -> Iterator[tuple[RedistGroup, RedistFile]]:
        for group in self.groups:
            for f in group.files:
                yield group, f


def render_redist_manifest(m: RedistManifest) -> bytes:
    root = ET.Element("ConfigMgrRedistManifest", {"Kind": m.kind, "Build": str(m.build)})
    for group in m.groups:
        g = ET.SubElement(root, "FileGroup", {"Name": group.name})
        for f in group.files:
            el = ET.SubElement(
                g,
                "File",
                {
                    "Name": f.name,
                    "Description": f.description,
                    "Url": f.url,
                    "DisplayUrl": f.display_url,
                    "CopyAs": f.copy_as,
                    "Size": str(f.size),
                },
            )
            ET.SubElement(el, "Hash", {"Algorithm": f.algorithm}).text = f.hash
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def parse_redist_manifest(data: bytes) -> RedistManifest:
    """Parse a redist or language pack manifest; ManifestError on anything unexpected."""
    root = parse_xml(
        data, what="redist manifest", root="ConfigMgrRedistManifest", error=ManifestError
    )
    kind = root.get("Kind", "")
    build = root.get("Build", "")
    if kind not in ("Redist", "LanguagePack") or not build.isdigit():
        raise ManifestError("redist manifest needs Kind='Redist'|'LanguagePack' and a Build")
    groups = []
    for g in root.findall("FileGroup"):
        files = []
        for el in g.findall("File"):
            name = el.get("Name", "")
            where = f"redist manifest file {name!r}"
            url = el.get("Url", "")
            try:
                normalize_member_name(url)
            except CabPathError as exc:
                raise ManifestError(f"{where}: bad Url: {exc}") from None
            copy_as = el.get("CopyAs", "")
            if not name or not copy_as or "/" in copy_as or "\\" in copy_as:
                raise ManifestError(f"{where}: needs a Name and a plain CopyAs file name")
            size = el.get("Size", "")
            hash_el = el.find("Hash")
            digest = (hash_el.text or "").strip() if hash_el is not None else ""
            algorithm = hash_el.get("Algorithm", "") if hash_el is not None else ""
            if (
                not size.isdigit()
                or algorithm != "SHA256"
                or not re.fullmatch(r"[0-9A-Fa-f]{64}", digest)
            ):
                raise ManifestError(f"{where}: needs a Size and a SHA256 Hash")
            files.append(
                RedistFile(
                    name=name,
                    description=el.get("Description", ""),
                    url=url,
                    display_url=el.get("DisplayUrl", ""),
                    copy_as=copy_as,
                    size=int(size),
                    algorithm=algorithm,
                    hash=digest.upper(),
                )
            )
        groups.append(RedistGroup(g.get("Name", ""), tuple(files)))
    return RedistManifest(kind, int(build), tuple(groups))


# ---------------------------------------------------------------------------------------
# Building


def _walk_files(root: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under root; links are errors."""
    out: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                raise CabPathError(f"{path}: symbolic link in a payload source; not followed")
            if name in files:
                if not stat.S_ISREG(st.st_mode):
                    raise CmlabError(f"{path}: not a regular file")
                out.append((path.relative_to(root).as_posix(), path))
        dirs.sort()
    return sorted(out)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _cab_to(files: dict[str, Path | bytes], dst: Path, signer: Signer | None) -> None:
    """create_cab, then sign into place when a signer is given."""
    if signer is None:
        create_cab(files, dst)
        return
    from cmlab.site.trust import sign_cab

    unsigned = tmp_name_for(dst, "unsigned")
    try:
        create_cab(files, unsigned)
        sign_cab(unsigned, dst, signer)
    finally:
        unsigned.unlink(missing_ok=True)


def _redist_contents(info: PackageInfo) -> dict[str, bytes]:
    return {r.path: _sample_redist(Path(r.path).name, r.description, r.size) for r in info.redists}


def _map_directory(
    tree: Path, d: ComponentDirectory, placeholders: dict[str, bytes], where: str
) -> MapDirectory:
    folder_rel = _safe_rel(d.path, where) if d.path else ""
    folder = tree / MAP_ROOT / folder_rel if folder_rel else tree / MAP_ROOT
    if d.files is None:
        names = sorted(
            (p.name for p in folder.iterdir() if p.is_file() and not p.is_symlink()),
            key=lambda n: (n.lower(), n),
        )
    else:
        names = list(d.files)
    flags = dict(d.flags)
    files = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise CmlabError(f"{where}: update.map lists {path}, which the build did not make")
        rel = path.relative_to(tree).as_posix()
        if rel in placeholders:
            # The install finds a 0-byte file here whose hash does not match, and takes the
            # real one from the redist folder: so the map carries the redist's size and hash.
            content = placeholders[rel]
            size, digest = len(content), sha256_bytes(content)
        else:
            size, digest = path.stat().st_size, sha256_file(path)
        files.append(MapFile(name, flags.get(name, 0), size, "SHA256", digest))
    return MapDirectory(d.path, d.attrs, tuple(files))


def build_payload_tree(src: Path, out_dir: Path, *, signer: Signer | None = None) -> Path:
    """Render the package source `src` into `out_dir/<GUID>/`, the payload tree that is
    CAB'd into `<GUID>.cab`; returns that folder. `SMSSetup/update.map.cab` is signed when a
    signer is given. An existing `out_dir/<GUID>` is replaced once the new tree is complete.
    """
    src, out_dir = Path(src), Path(out_dir)
    info = load_package(src)
    where = str(src / "package.toml")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{info.guid}.tmp-", dir=out_dir))
    try:
        files_dir = src / "files"
        if files_dir.is_dir():
            for rel, path in _walk_files(files_dir):
                _write(tmp / _safe_rel(rel, where), path.read_bytes())
        for b in info.binaries:
            _write(
                tmp / b.path,
                sample_binary(Path(b.path).name, info.build, info.full_version, b.size),
            )
        for p in info.placeholders:
            _write(tmp / p, b"")
        install_map = tmp / INSTALL_MAP
        if install_map.is_file():
            parse_install_map(install_map.read_text(encoding="utf-8"))
        redists = {Path(k).name.lower(): v for k, v in _redist_contents(info).items()}
        placeholders = {p: redists[Path(p).name.lower()] for p in info.placeholders}
        update_map = UpdateMap(
            tuple(
                MapComponent(
                    c.name,
                    c.id,
                    tuple(_map_directory(tmp, d, placeholders, where) for d in c.directories),
                    c.units,
                )
                for c in info.components
            )
        )
        text = render_update_map(update_map)
        (tmp / UPDATE_MAP_CAB).parent.mkdir(parents=True, exist_ok=True)
        _cab_to({"update.map": text.encode("utf-8")}, tmp / UPDATE_MAP_CAB, signer)
        os.chmod(tmp, 0o755)
        final = out_dir / info.guid
        _put_in_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def build_cab_from_dir(src_dir: Path, dst: Path, signer: Signer | None) -> None:
    """CAB every file under `src_dir` (names relative, with "\\"), signed if `signer`.

    Empty folders are not kept (a CAB holds files only); links are refused. The cabinet is
    built in memory by cabarchive (about three times the input size at peak).
    """
    files: dict[str, Path | bytes] = {
        rel.replace("/", "\\"): path for rel, path in _walk_files(Path(src_dir))
    }
    _cab_to(files, Path(dst), signer)


def build_redists(src: Path, out_dir: Path, signer: Signer | None) -> Path:
    """Write the redist folder of package `src` into `out_dir` (created if needed):
    the redist files, ConfigMgr.AutoUpgradeScripts.cab, and the two manifest CABs
    ConfigMgr.Manifest.cab and ConfigMgr.LN.Manifest.cab, all CABs signed if `signer`.
    Returns `out_dir`.
    """
    src, out_dir = Path(src), Path(out_dir)
    info = load_package(src)
    out_dir.mkdir(parents=True, exist_ok=True)
    contents = _redist_contents(info)
    for rel, data in contents.items():
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / rel, data)

    def entry(r: RedistSource, data: bytes) -> RedistFile:
        name = Path(r.path).name
        return RedistFile(
            name=name,
            description=r.description,
            url=r.path,
            display_url=r.display_url,
            copy_as=name,
            size=len(data),
            algorithm="SHA256",
            hash=sha256_bytes(data),
        )

    def groups(language_pack: bool) -> list[RedistGroup]:
        by_group: dict[str, list[RedistFile]] = {}
        for r in info.redists:
            if r.language_pack == language_pack:
                by_group.setdefault(r.group, []).append(entry(r, contents[r.path]))
        return [RedistGroup(name, tuple(files)) for name, files in by_group.items()]

    redist_groups = groups(False)
    scripts_dir = src / "AutoUpgradeScripts"
    if scripts_dir.is_dir():
        scripts = {rel: path for rel, path in _walk_files(scripts_dir)}
        cab = out_dir / AUTO_UPGRADE_SCRIPTS_CAB
        _cab_to(dict(scripts), cab, signer)
        redist_groups.append(
            RedistGroup(
                AUTO_UPGRADE_SCRIPTS_GROUP,
                (
                    RedistFile(
                        name=AUTO_UPGRADE_SCRIPTS_CAB,
                        description="Configuration Manager pre-upgrade SQL scripts",
                        url=AUTO_UPGRADE_SCRIPTS_CAB,
                        display_url="",
                        copy_as=AUTO_UPGRADE_SCRIPTS_CAB,
                        size=cab.stat().st_size,
                        algorithm="SHA256",
                        hash=sha256_file(cab),
                    ),
                ),
            )
        )
    for kind, xml_name, cab_name, grp in (
        ("Redist", REDIST_MANIFEST_XML, REDIST_MANIFEST_CAB, redist_groups),
        ("LanguagePack", LN_MANIFEST_XML, LN_MANIFEST_CAB, groups(True)),
    ):
        xml = render_redist_manifest(RedistManifest(kind, info.build, tuple(grp)))
        _cab_to({xml_name: xml}, out_dir / cab_name, signer)
    return out_dir
