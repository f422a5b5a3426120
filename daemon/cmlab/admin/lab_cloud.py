"""The lab's "Microsoft cloud": a local folder of signed CABs that DMPDownloader downloads from.

Built from `payloads/` by `cmlab init` (or `cmlab payload cloud`):

    CONTENT/ConfigMgr.Update.Manifest.cab   Manifest.xml + ApplicabilityChecks/*.sql, signed
    CONTENT/<GUID>.cab                       each package's payload, signed
    CONTENT/<GUID>/redist/...                its redist manifests and redists

Every hash in Manifest.xml is computed from the files actually built."""

from __future__ import annotations

import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cmlab.core.hashing import folder_hash, sha256_file
from cmlab.site.formats.manifest import Manifest, ManifestPackage, render_manifest
from cmlab.site.resources import data_dir

if TYPE_CHECKING:
    from cmlab.site.trust import Signer

MANIFEST_CAB = "ConfigMgr.Update.Manifest.cab"


@dataclass(frozen=True)
class BuiltCloud:
    folder: Path
    manifest: Manifest


def _payload_source(payloads: Path, entry: dict[str, object]) -> Path | None:
    rel = entry.get("payload")
    return None if not rel else payloads / str(rel)


def _downloaded_folder_hash(payload_cab: Path, redist: Path | None, scratch: Path) -> str:
    """The folder DMPDownloader will end up with (the payload extracted, the redist folder in
    `redist/`), hashed the way IsPayloadLocal and CMUpdate hash it. Built, not predicted, so
    the manifest's PayloadHash is right by construction."""
    from cmlab.site.cab import extract_cab

    extract_cab(payload_cab, scratch)
    if redist is not None:
        shutil.copytree(redist, scratch / "redist", symlinks=True)
    try:
        return folder_hash(scratch)
    finally:
        shutil.rmtree(scratch)


def build_content_source(
    out: Path,
    signer: Signer | None,
    *,
    payloads: Path | None = None,
    mutate: dict[str, str] | None = None,
) -> BuiltCloud:
    """Build the content source into `out` (created or refreshed). `mutate` replaces the text
    of applicability scripts by file name, for labs that break a site on purpose."""
    from cmlab.admin.payload import build_cab_from_dir, build_payload_tree, build_redists

    payloads = payloads or data_dir("payloads")
    spec = tomllib.loads((payloads / "manifest" / "packages.toml").read_text(encoding="utf-8"))
    out.mkdir(parents=True, exist_ok=True)
    packages: list[ManifestPackage] = []
    with tempfile.TemporaryDirectory(prefix="cmlab-cloud-") as tmp_name:
        tmp = Path(tmp_name)
        manifest_dir = tmp / "manifest"
        checks = manifest_dir / "ApplicabilityChecks"
        checks.mkdir(parents=True)
        for entry in spec["package"]:
            guid = str(entry["guid"]).upper()
            sql_name = str(entry["applicability"])
            sql_src = payloads / "manifest" / "ApplicabilityChecks" / sql_name
            sql_text = (mutate or {}).get(sql_name, sql_src.read_text(encoding="utf-8"))
            (checks / sql_name).write_text(sql_text, encoding="utf-8")

            payload_cab = out / f"{guid}.cab"
            source = _payload_source(payloads, entry)
            redist_url = ""
            lang_url = ""
            if source is not None:
                tree = build_payload_tree(source, tmp / f"payload-{guid}", signer=signer)
                build_cab_from_dir(tree, payload_cab, signer)
                redist_dir = out / guid / "redist"
                if redist_dir.exists():
                    shutil.rmtree(redist_dir)
                build_redists(source, redist_dir, signer)
                redist_url = f"{guid}/redist/ConfigMgr.Manifest.cab"
                lang_url = f"{guid}/redist/ConfigMgr.LN.Manifest.cab"
            else:
                # A hotfix the lab never installs still has real, signed content.
                stub = tmp / f"stub-{guid}"
                stub.mkdir()
                (stub / "README.txt").write_text(
                    f"{entry['name']}: lab sample content.\n", encoding="utf-8"
                )
                build_cab_from_dir(stub, payload_cab, signer)
            packages.append(
                ManifestPackage(
                    guid=guid,
                    name=str(entry["name"]),
                    package_type=str(entry.get("type", "Update")),
                    update=str(entry["update"]),
                    full_version=str(entry["full_version"]),
                    min_cm_version=str(entry["min_cm_version"]),
                    max_cm_version=str(entry["max_cm_version"]),
                    more_info_link=str(entry.get("more_info_link", "")),
                    description=str(entry.get("description", "")),
                    date_released=str(entry.get("date_released", "")),
                    applicability_file=sql_name,
                    applicability_hash=sha256_file(checks / sql_name),
                    content_url=f"{guid}.cab",
                    content_hash=sha256_file(payload_cab),
                    payload_hash=_downloaded_folder_hash(
                        payload_cab, out / guid / "redist" if source else None, tmp / f"dl-{guid}"
                    ),
                    redist_manifest_url=redist_url,
                    language_pack_manifest_url=lang_url,
                )
            )
        manifest = Manifest(version=str(spec.get("manifest_version", "")), packages=tuple(packages))
        (manifest_dir / "Manifest.xml").write_bytes(render_manifest(manifest))
        build_cab_from_dir(manifest_dir, out / MANIFEST_CAB, signer)
    return BuiltCloud(folder=out, manifest=manifest)
