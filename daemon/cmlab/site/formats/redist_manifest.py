"""The redist manifests: `ConfigMgr.Manifest.xml` (the redists, and the pre-upgrade scripts
CAB) and `ConfigMgr.LN.Manifest.xml` (the language packs), each alone in a signed CAB of the
same name (`ConfigMgr.Manifest.cab`, `ConfigMgr.LN.Manifest.cab`) in a package's redist
folder (docs/formats.md, "Redist manifests"). The sample builder writes them; SetupDL (the
download) and CMUpdate's redist media check read them.

    <ConfigMgrRedistManifest Kind="Redist" Build="9141">
      <FileGroup Name="Dot_Net_Framework">
        <File Name=".." Description=".." Url=".." DisplayUrl=".." CopyAs=".." Size="8192">
          <Hash Algorithm="SHA256">C82E...</Hash>
        </File>
      </FileGroup>
    </ConfigMgrRedistManifest>

Interface: `render_redist_manifest(m) -> bytes`, `parse_redist_manifest(data) ->
RedistManifest` (defusedxml, no DTDs; ManifestError on anything else: a Kind other than
Redist or LanguagePack, an unsafe Url, a CopyAs that is not a plain file name, no Size or no
SHA256 Hash). The hashes it returns are upper case.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass

from cmlab.core.errors import CabPathError, ManifestError
from cmlab.core.safe_xml import parse_xml
from cmlab.site.cab import normalize_member_name
from cmlab.site.formats.ids import is_sha256

__all__ = [
    "LN_MANIFEST_CAB",
    "LN_MANIFEST_XML",
    "REDIST_MANIFEST_CAB",
    "REDIST_MANIFEST_XML",
    "RedistFile",
    "RedistGroup",
    "RedistManifest",
    "parse_redist_manifest",
    "render_redist_manifest",
]

REDIST_MANIFEST_CAB = "ConfigMgr.Manifest.cab"
REDIST_MANIFEST_XML = "ConfigMgr.Manifest.xml"
LN_MANIFEST_CAB = "ConfigMgr.LN.Manifest.cab"
LN_MANIFEST_XML = "ConfigMgr.LN.Manifest.xml"


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
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return body + b"\n"


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
            if not size.isdigit() or algorithm != "SHA256" or not is_sha256(digest):
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
