"""SetupDL (setupdl.exe): the redist downloader DMPDownloader engages for an update.

It fetches the two signed manifest CABs (`ConfigMgr.LN.Manifest.cab`, `ConfigMgr.Manifest.cab`),
extracts and parses their XML, then downloads every file they list, checking size and SHA-256
before accepting it. It writes `ConfigMgrSetup.log`, as the real one does, with the guide's
`INFO:` lines. Downloads go into a folder the caller chose (DMPDownloader's staging folder);
paths in the log are shown as the final `EasySetupPayload\\<GUID>\\redist` ones."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from cmlab.core.errors import CabError, ManifestError, WorkFailed
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import copy_hashing, make_tmp_dir
from cmlab.site.formats.redist_manifest import (
    LN_MANIFEST_CAB,
    LN_MANIFEST_XML,
    REDIST_MANIFEST_CAB,
    REDIST_MANIFEST_XML,
    RedistManifest,
    parse_redist_manifest,
)
from cmlab.site.paths import ShowPath
from cmlab.site.sms_log import SmsLog

if TYPE_CHECKING:
    from cmlab.site.trust import TrustStore

LOG_FILE = "ConfigMgrSetup.log"
COMPONENT = "Configuration Manager Setup"
MAX_MANIFEST_CAB = 16 * 1024 * 1024


class RedistError(WorkFailed):
    """A redist or redist manifest could not be downloaded or failed verification. `bad` is the
    downloaded file that failed (to quarantine), if any."""

    def __init__(self, message: str, bad: Path | None = None) -> None:
        super().__init__(message)
        self.bad = bad


@dataclass(frozen=True)
class RedistManifestLocation:
    """Where one update's redist manifests are, relative to the content source."""

    content_source: Path
    redist_manifest_url: str
    language_pack_manifest_url: str


def _inside(base: Path, rel: str, what: str) -> Path:
    """`rel` (posix, from a manifest) as a path under `base`; anything climbing out is refused
    even though the parsers already refuse it, because a redist path decides where we write."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or any(p in ("..", "", ".") for p in parts):
        raise RedistError(f"{what}: {rel!r} is not a safe relative path")
    return base.joinpath(*parts)


def copy_checked(src: Path, dst: Path, *, max_size: int) -> str:
    """Stream `src` to `dst`, refusing more than `max_size` bytes; returns the SHA-256."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        # What was read up to the cap is kept: the quarantined file shows what came down.
        sha256, size = copy_hashing(fin.fileno(), fout.fileno(), max_size)
    if size > max_size:
        raise RedistError(f"{src.name} is larger than the {max_size} bytes expected", dst)
    return sha256


class SetupDownloader:
    def __init__(
        self,
        log: SmsLog,
        trust: TrustStore,
        show: ShowPath,
        *,
        thread: int = 0,
    ) -> None:
        self.log = log
        self.trust = trust
        self.show = show
        self.thread = thread

    def say(self, message: str, *, level: str = "info") -> None:
        self.log.write(message, thread=self.thread, level=level)

    def run(self, source: RedistManifestLocation, dest: Path, shown_dest: Path) -> int:
        """Download the redists into `dest` (logged as `shown_dest`); returns the file count.
        Raises RedistError; the log says why."""
        self.say("INFO: Attempting to load resource DLL...")
        self.say("INFO: Setup downloader setupdl.exe: STARTED")
        try:
            count = self._run(source, dest, shown_dest)
        except RedistError as exc:
            self.say(f"ERROR: {exc}", level="error")
            self.say("ERROR: Setup downloader setupdl.exe: FAILED", level="error")
            raise
        self.say("INFO: Setup downloader setupdl.exe: FINISHED")
        return count

    def _run(self, source: RedistManifestLocation, dest: Path, shown_dest: Path) -> int:
        self.say(f"INFO: Downloading files to {self.show(shown_dest)}")
        dest.mkdir(parents=True, exist_ok=True)
        self.say("INFO: Downloading component manifest...")
        manifests: list[RedistManifest] = []
        fetched: list[tuple[Path, str, str]] = []
        for url, cab_name, xml_name in (
            (source.language_pack_manifest_url, LN_MANIFEST_CAB, LN_MANIFEST_XML),
            (source.redist_manifest_url, REDIST_MANIFEST_CAB, REDIST_MANIFEST_XML),
        ):
            if not url:
                continue
            src = _inside(source.content_source, url, "manifest URL")
            self.say(f"INFO: Downloading {self.show(src)} as {cab_name}")
            cab = dest / cab_name
            try:
                copy_checked(src, cab, max_size=MAX_MANIFEST_CAB)
            except OSError as exc:
                raise RedistError(f"Failed to download {self.show(src)}: {exc}") from exc
            fetched.append((cab, xml_name, url))
        # Inside the site (and named so the daemon's start-up sweep finds it after a crash).
        tmp = make_tmp_dir(dest.parent / "setupdl", "setupdl")
        try:
            for cab, xml_name, _url in fetched:
                manifests.append(self._open_manifest(cab, xml_name, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        count = 0
        folders: dict[Path, None] = {}
        for manifest, (_, _, url) in zip(manifests, fetched, strict=True):
            base = _inside(source.content_source, url, "manifest URL").parent
            for _group, f in manifest.files():
                target = _inside(dest, f.url, f"redist {f.name}")
                src = _inside(base, f.url, f"redist {f.name}")
                self.say(f"INFO: Downloading {f.display_url or self.show(src)} as {f.name}")
                try:
                    actual = copy_checked(src, target, max_size=f.size)
                except OSError as exc:
                    raise RedistError(
                        f"Failed to download {f.name} from {self.show(src)}: {exc}"
                    ) from exc
                if target.stat().st_size != f.size:
                    raise RedistError(
                        f"File size check failed for {f.name}: expected {f.size} bytes, got "
                        f"{target.stat().st_size}",
                        target,
                    )
                if f.algorithm.upper() != "SHA256" or actual != f.hash.upper():
                    raise RedistError(
                        f"File hash check failed for {f.name}: expected {f.hash.upper()}, "
                        f"actual {actual}",
                        target,
                    )
                crashpoint("setupdl.after_file")
                count += 1
                folders.setdefault(target.parent)
        for folder in folders:
            shown = shown_dest / folder.relative_to(dest)
            self.say(f"INFO: Verify directory {self.show(shown, trailing_sep=True)}")
        return count

    def _open_manifest(self, cab: Path, xml_name: str, tmp: Path) -> RedistManifest:
        from cmlab.site.cab import extract_cab
        from cmlab.site.trust import verify_cab

        verdict = verify_cab(cab, self.trust)
        if not verdict.trusted:
            raise RedistError(
                f"{cab.name} failed the trust check ({verdict.status.name}): {verdict.reason}",
                cab,
            )
        out = tmp / cab.stem
        try:
            extract_cab(cab, out)
        except CabError as exc:
            raise RedistError(f"Cannot extract {cab.name}: {exc}", cab) from exc
        xml = out / xml_name
        if not xml.is_file():
            raise RedistError(f"{cab.name} holds no {xml_name}", cab)
        shown_xml = tmp / xml_name
        shutil.copyfile(xml, shown_xml)
        self.say(f"INFO: Extracted file {shown_xml}")
        try:
            return parse_redist_manifest(xml.read_bytes())
        except ManifestError as exc:
            raise RedistError(f"{xml_name} in {cab.name}: {exc}", cab) from exc
