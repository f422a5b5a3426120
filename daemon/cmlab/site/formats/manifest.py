"""Manifest.xml: the update manifest inside ConfigMgr.Update.Manifest.cab.

The format (docs/manifest.md) is modelled on the guide's fragment: one `<Manifest>` element per
update package, with the guide's `Update`, `MinCMVersion`, `MaxCMVersion`, `MoreInfoLink`,
`Content ContentUrl` + `Hash Algorithm="SHA256"`, `Redist ManifestUrl` and
`LanguagePack ManifestUrl`, wrapped in a `<ConfigMgrUpdates>` root so one CAB carries many.

Interface: `parse_manifest(data) -> Manifest` (ManifestError naming the package and the
element that is wrong), `render_manifest(manifest) -> bytes` (what the lab cloud publishes),
`applicability_path(staging, package)` (where HMAN finds a package's applicability SQL after
extracting the CAB). The package GUIDs it returns are upper case."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from cmlab.core.errors import ManifestError
from cmlab.core.safe_xml import MAX_XML_BYTES, parse_xml
from cmlab.site.formats.ids import GUID_RE, is_guid, is_sha256

__all__ = [
    "GUID_RE",
    "MAX_MANIFEST_BYTES",
    "PACKAGE_TYPES",
    "SQL_NAME_RE",
    "VERSION_RE",
    "Manifest",
    "ManifestPackage",
    "applicability_path",
    "parse_manifest",
    "render_manifest",
]

MAX_MANIFEST_BYTES = MAX_XML_BYTES
# GUID_RE is cmlab.site.formats.ids's, named here too for the modules that import it from
# here (rcm's message validator); new code imports it from ids.
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
SQL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.sql$")
PACKAGE_TYPES = {"Update": 0, "Hotfix": 1}


@dataclass(frozen=True)
class ManifestPackage:
    guid: str
    name: str
    package_type: str
    update: str
    full_version: str
    min_cm_version: str
    max_cm_version: str
    more_info_link: str
    description: str
    date_released: str
    applicability_file: str
    applicability_hash: str
    content_url: str
    content_hash: str
    redist_manifest_url: str
    language_pack_manifest_url: str
    # Folder hash (cmlab.core.hashing.folder_hash) of the whole downloaded package, payload and
    # redist: DMPDownloader's `expected hash` in IsPayloadLocal. Empty: not given.
    payload_hash: str = ""


@dataclass(frozen=True)
class Manifest:
    version: str
    packages: tuple[ManifestPackage, ...]


def _text(el: ET.Element, tag: str, *, required: bool = True, where: str) -> str:
    child = el.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise ManifestError(f"{where}: <{tag}> is missing or empty")
        return ""
    return child.text.strip()


def _hash(el: ET.Element | None, where: str, tag: str = "Hash", *, required: bool = True) -> str:
    h = None if el is None else el.find(tag)
    if h is None and not required:
        return ""
    if h is None or (h.text or "").strip() == "":
        raise ManifestError(f'{where}: <Hash Algorithm="SHA256"> is missing')
    if h.get("Algorithm", "").upper() != "SHA256":
        raise ManifestError(
            f"{where}: only SHA256 hashes are supported, not {h.get('Algorithm')!r}"
        )
    value = (h.text or "").strip()
    if not is_sha256(value):
        raise ManifestError(f"{where}: {value!r} is not a SHA-256 hex digest")
    return value.upper()


def _relative_url(value: str, where: str) -> str:
    """Content-source URLs are relative names inside the content source: never absolute,
    never climbing out of it."""
    parts = value.replace("\\", "/").split("/")
    if not value or value.startswith(("/", "\\")) or ":" in value or ".." in parts or "" in parts:
        raise ManifestError(f"{where}: {value!r} must be a relative path inside the content source")
    return value


def parse_manifest(data: bytes) -> Manifest:
    root = parse_xml(
        data,
        what="Manifest.xml",
        root="ConfigMgrUpdates",
        error=ManifestError,
        max_bytes=MAX_MANIFEST_BYTES,
    )
    packages: list[ManifestPackage] = []
    seen: set[str] = set()
    for i, m in enumerate(root.findall("Manifest"), start=1):
        where = f"Manifest.xml package #{i}"
        guid = m.get("PackageGuid", "")
        if not is_guid(guid):
            raise ManifestError(f"{where}: PackageGuid {guid!r} is not a GUID")
        guid = guid.upper()
        where = f"Manifest.xml package {guid}"
        if guid in seen:
            raise ManifestError(f"{where}: listed twice")
        seen.add(guid)
        name = m.get("Name", "").strip()
        if not name:
            raise ManifestError(f"{where}: Name is missing")
        ptype = m.get("PackageType", "Update")
        if ptype not in PACKAGE_TYPES:
            raise ManifestError(f"{where}: PackageType must be Update or Hotfix, not {ptype!r}")
        versions = {}
        for tag in ("FullVersion", "MinCMVersion", "MaxCMVersion"):
            v = _text(m, tag, where=where)
            if not VERSION_RE.match(v):
                raise ManifestError(f"{where}: <{tag}> {v!r} is not a version like 5.00.9135.1000")
            versions[tag] = v
        check = m.find("ApplicabilityCheck")
        if check is None:
            raise ManifestError(f"{where}: <ApplicabilityCheck> is missing")
        check_file = check.get("File", "")
        if not SQL_NAME_RE.match(check_file):
            raise ManifestError(
                f"{where}: ApplicabilityCheck File {check_file!r} is not a .sql name"
            )
        content = m.find("Content")
        if content is None:
            raise ManifestError(f"{where}: <Content> is missing")
        content_url = _relative_url(content.get("ContentUrl", ""), f"{where} ContentUrl")
        redist = content.find("Redist")
        lang = content.find("LanguagePack")
        packages.append(
            ManifestPackage(
                guid=guid,
                name=name,
                package_type=ptype,
                update=_text(m, "Update", where=where),
                full_version=versions["FullVersion"],
                min_cm_version=versions["MinCMVersion"],
                max_cm_version=versions["MaxCMVersion"],
                more_info_link=_text(m, "MoreInfoLink", required=False, where=where),
                description=_text(m, "Description", required=False, where=where),
                date_released=_text(m, "DateReleased", required=False, where=where),
                applicability_file=check_file,
                applicability_hash=_hash(check, f"{where} ApplicabilityCheck"),
                content_url=content_url,
                content_hash=_hash(content, f"{where} Content"),
                payload_hash=_hash(
                    content, f"{where} Content PayloadHash", "PayloadHash", required=False
                ),
                redist_manifest_url=(
                    _relative_url(redist.get("ManifestUrl", ""), f"{where} Redist")
                    if redist is not None
                    else ""
                ),
                language_pack_manifest_url=(
                    _relative_url(lang.get("ManifestUrl", ""), f"{where} LanguagePack")
                    if lang is not None
                    else ""
                ),
            )
        )
    if not packages:
        raise ManifestError("Manifest.xml lists no <Manifest> package")
    return Manifest(version=root.get("ManifestVersion", ""), packages=tuple(packages))


def render_manifest(manifest: Manifest) -> bytes:
    root = ET.Element("ConfigMgrUpdates", {"ManifestVersion": manifest.version})
    for p in manifest.packages:
        m = ET.SubElement(
            root, "Manifest", {"PackageGuid": p.guid, "Name": p.name, "PackageType": p.package_type}
        )
        ET.SubElement(m, "Update").text = p.update
        ET.SubElement(m, "FullVersion").text = p.full_version
        ET.SubElement(m, "MinCMVersion").text = p.min_cm_version
        ET.SubElement(m, "MaxCMVersion").text = p.max_cm_version
        ET.SubElement(m, "MoreInfoLink").text = p.more_info_link
        ET.SubElement(m, "Description").text = p.description
        ET.SubElement(m, "DateReleased").text = p.date_released
        check = ET.SubElement(m, "ApplicabilityCheck", {"File": p.applicability_file})
        ET.SubElement(check, "Hash", {"Algorithm": "SHA256"}).text = p.applicability_hash
        content = ET.SubElement(m, "Content", {"ContentUrl": p.content_url})
        ET.SubElement(content, "Hash", {"Algorithm": "SHA256"}).text = p.content_hash
        if p.payload_hash:
            ET.SubElement(content, "PayloadHash", {"Algorithm": "SHA256"}).text = p.payload_hash
        if p.redist_manifest_url:
            ET.SubElement(content, "Redist", {"ManifestUrl": p.redist_manifest_url})
        if p.language_pack_manifest_url:
            ET.SubElement(content, "LanguagePack", {"ManifestUrl": p.language_pack_manifest_url})
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return ('<?xml version="1.0" encoding="utf-8"?>\n' + body + "\n").encode("utf-8")


def applicability_path(staging: Path, package: ManifestPackage) -> Path:
    return staging / "ApplicabilityChecks" / package.applicability_file
