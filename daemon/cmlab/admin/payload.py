"""The sample update packages: from sources in payloads/updates/<name>/ to the payload tree,
its CAB, and the redist folder. Formats are in docs/formats.md, the layout in
payloads/README.md; the formats' writers and parsers, which the site reads too, are in
cmlab.site.formats (install_map, payload_layout, redist_manifest, sample_binary,
update_map).

Everything is deterministic: binaries are generated from their name and the build number,
every CAB gets the same timestamp, and update.map lists the sizes and SHA-256 of the files
actually built. Only signatures (which carry a signing time) differ between two builds.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmlab.core.errors import BadInput, CabPathError
from cmlab.core.fs import WRITE_NEW, open_nofollow, put_in_place, tmp_name_for, write_atomic
from cmlab.core.hashing import sha256_bytes, sha256_file
from cmlab.site.cab import create_cab, normalize_member_name
from cmlab.site.formats.ids import is_guid
from cmlab.site.formats.install_map import parse_install_map
from cmlab.site.formats.payload_layout import (
    AUTO_UPGRADE_SCRIPTS_CAB,
    AUTO_UPGRADE_SCRIPTS_GROUP,
    INSTALL_MAP,
    MAP_ROOT,
    UPDATE_MAP_CAB,
)
from cmlab.site.formats.redist_manifest import (
    LN_MANIFEST_CAB,
    LN_MANIFEST_XML,
    REDIST_MANIFEST_CAB,
    REDIST_MANIFEST_XML,
    RedistFile,
    RedistGroup,
    RedistManifest,
    render_redist_manifest,
)
from cmlab.site.formats.sample_binary import sample_binary, sample_redist
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
    "PackageInfo",
    "build_cab_from_dir",
    "build_payload_tree",
    "build_redists",
    "load_package",
]

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


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
        raise BadInput(f"{where}: '{key}' must be a {kind.__name__}")
    return value


def _safe_rel(path: str, where: str) -> str:
    try:
        return normalize_member_name(path)
    except CabPathError as exc:
        raise BadInput(f"{where}: {exc}") from None


def load_package(src: Path) -> PackageInfo:
    """Read and check `src/package.toml` (BadInput if anything is off)."""
    where = str(Path(src) / "package.toml")
    try:
        doc = tomllib.loads((Path(src) / "package.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{where}: {exc}") from None
    pkg = doc.get("package")
    if not isinstance(pkg, dict):
        raise BadInput(f"{where}: missing [package]")
    guid = _get(pkg, "guid", str, where).upper()
    if not is_guid(guid):
        raise BadInput(f"{where}: guid {guid!r} is not a GUID")
    version = _get(pkg, "full_version", str, where)
    build = _get(pkg, "build", int, where)
    if not _VERSION_RE.match(version) or version.split(".")[2] != str(build):
        raise BadInput(f"{where}: full_version {version!r} does not carry build {build}")
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
            raise BadInput(f"{where}: placeholder {p} has no [[redist]] of the same name")
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
        raise BadInput(f"{where}: a path is declared twice")
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
                    raise BadInput(f"{path}: not a regular file")
                out.append((path.relative_to(root).as_posix(), path))
        dirs.sort()
    return sorted(out)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_nofollow(path, WRITE_NEW)
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
    return {r.path: sample_redist(Path(r.path).name, r.description, r.size) for r in info.redists}


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
            raise BadInput(f"{where}: update.map lists {path}, which the build did not make")
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
        put_in_place(tmp, final)
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
