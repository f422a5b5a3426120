"""CMUpdate's redist processing and 0-byte placeholder replacement (the guide's Installation
stage, process steps 2 and 3), as a library CMUpdate calls on `CMUStaging/<GUID>/`.

`process_redists` verifies `redist/ConfigMgr.Manifest.cab`, extracts `ConfigMgr.Manifest.xml`
into a temporary folder and lists its files (step 2). `check_media` then walks one component
of update.map, and every staging file whose hash differs from update.map (a 0-byte
placeholder shows `E3B0C442…B855`) is replaced by the redist of the same name, once that
redist's hash matches both update.map and the signed redist manifest (step 3). The log lines
and every decision are described in docs/formats.md, "Redist media check".

Nothing here follows a symbolic link: every file under the staging folder, the redist folder
and the installation folder is opened component by component with O_NOFOLLOW, relative to
the folder above it, and a placeholder is replaced by a rename inside that folder's own
descriptor. A replacement is written to a temporary sibling, fsynced, re-hashed and renamed
over the placeholder, so a crash leaves either the placeholder or the whole file, and running
`check_media` again finishes the job.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cmlab.core.errors import CabPathError, CmlabError, WorkFailed
from cmlab.core.failpoints import crashpoint
from cmlab.core.fs import (
    DIR,
    READ,
    WRITE_NEW,
    copy_hashing,
    is_stale_tmp,
    open_nofollow,
    tmp_name_for,
)
from cmlab.core.hashing import sha256_fd
from cmlab.site.cab import ExtractLimits, extract_cab_into, list_cab, normalize_member_name
from cmlab.site.formats.payload_layout import MAP_ROOT
from cmlab.site.formats.redist_manifest import (
    REDIST_MANIFEST_CAB,
    REDIST_MANIFEST_XML,
    parse_redist_manifest,
)
from cmlab.site.formats.update_map import MapComponent, UpdateMap
from cmlab.site.trust import TrustStore, verify_cab

__all__ = [
    "MAX_REDIST_MANIFEST",
    "MediaError",
    "MediaResult",
    "RedistEntry",
    "RedistPlan",
    "check_media",
    "process_redists",
    "shown_separator",
]

REDIST_FOLDER = "redist"
# ConfigMgr.Manifest.cab and the XML inside it are a few KB; refuse anything absurd.
MAX_REDIST_MANIFEST = 16 * 1024 * 1024
_CHUNK = 1024 * 1024


class MediaError(WorkFailed):
    """The redist manifest or a media file cannot be trusted or repaired: an untrusted or
    malformed ConfigMgr.Manifest.cab, a link where a file should be, a redist missing from
    both paths, or a file whose hash does not match update.map and that no redist provides."""


@dataclass(frozen=True)
class RedistEntry:
    """One file of the redist manifest (ConfigMgr.Manifest.xml)."""

    group: str
    name: str
    description: str
    display_url: str
    copy_as: str
    size: int
    hash: str  # SHA-256, upper-case hex, from the signed manifest
    path: Path  # staging/redist/<Url>


@dataclass(frozen=True)
class RedistPlan:
    manifest_cab: Path
    redist_dir: Path
    entries: tuple[RedistEntry, ...]


@dataclass(frozen=True)
class MediaResult:
    replaced: tuple[str, ...]  # staging-relative posix paths of placeholders replaced from redist
    skipped: tuple[str, ...]  # staging-relative posix paths whose installed copy has the same hash
    checked: int  # files of the component checked


# ---------------------------------------------------------------------------------------
# Showing paths as the guide does


def shown_separator(shown: str) -> str:
    """The separator a shown path uses: the last of `\\` or `/` in it (os.sep if neither).

    A site with `display_root` shows `E:\\ConfigMgr\\...`, one without shows the local path."""
    back, slash = shown.rfind("\\"), shown.rfind("/")
    if back < 0 and slash < 0:
        return os.sep
    return "\\" if back > slash else "/"


def _shown_name_case(shown: str, name: str, upper: bool) -> str:
    """The shown path with its file name part upper- (or lower-) cased, as the guide prints
    `...\\bin\\x64\\NDP462-KB3151800-X86-X64-ALLOS-ENU.EXE`; the folders keep their case."""
    if not name or not shown.endswith(name):
        return shown
    return shown[: -len(name)] + (name.upper() if upper else name.lower())


# ---------------------------------------------------------------------------------------
# Link-safe file access


def _is_link_error(exc: OSError) -> bool:
    return exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR)


def _open_dir(root: Path, parts: Sequence[str]) -> int:
    """A descriptor of root/parts..., each component opened without following a link.

    FileNotFoundError if a component is missing; MediaError if one is a link or not a folder.
    """
    try:
        fd = open_nofollow(root, DIR)
    except OSError as exc:
        if _is_link_error(exc):
            raise MediaError(f"{root} is a symbolic link or not a folder; not followed") from None
        raise
    try:
        for i, part in enumerate(parts):
            try:
                child = open_nofollow(part, DIR, dir_fd=fd)
            except OSError as exc:
                if _is_link_error(exc):
                    where = root.joinpath(*parts[: i + 1])
                    raise MediaError(
                        f"{where} is a symbolic link or not a folder; not followed"
                    ) from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_file(dir_fd: int, name: str, where: str) -> int | None:
    """A read descriptor of the regular file `name` in `dir_fd`; None if it does not exist.
    MediaError for a link (never followed) or anything else that is not a regular file."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise MediaError(f"{where} is a symbolic link; not followed")
    if not stat.S_ISREG(st.st_mode):
        raise MediaError(f"{where} is not a regular file")
    try:
        fd = open_nofollow(name, READ, dir_fd=dir_fd)  # READ: a planted FIFO cannot hang
    except FileNotFoundError:
        return None
    except OSError as exc:
        if _is_link_error(exc):
            raise MediaError(f"{where} is a symbolic link; not followed") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MediaError(f"{where} is not a regular file")
    return fd


@contextlib.contextmanager
def _closing(fd: int | None) -> Iterator[int | None]:
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _sweep_stale(dir_fd: int) -> None:
    """Remove temporaries a killed check_media left in this folder (cmlab.core.fs's naming)."""
    with os.scandir(dir_fd) as it:
        stale = [e.name for e in it if is_stale_tmp(e.name) and e.is_file(follow_symlinks=False)]
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)


def _rel_parts(path: str, what: str) -> list[str]:
    if not path:
        return []
    try:
        return normalize_member_name(path).split("/")
    except CabPathError as exc:
        raise MediaError(f"{what}: {exc}") from None


# ---------------------------------------------------------------------------------------
# Step 2: the redist manifest


def _read_capped(fd: int, cap: int, where: str) -> bytes:
    if os.fstat(fd).st_size > cap:
        raise MediaError(f"{where} is larger than {cap} bytes")
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(fd, _CHUNK):
        total += len(chunk)
        if total > cap:
            raise MediaError(f"{where} is larger than {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def process_redists(
    staging: Path,
    trust: TrustStore,
    say: Callable[[str], None],
    show: Callable[[Path], str],
    *,
    tmp_dir: Path,
) -> RedistPlan:
    """Verify `staging/redist/ConfigMgr.Manifest.cab`, extract its XML into `tmp_dir`, log the
    guide's step-2 lines for every file group and file, and return the plan check_media uses.

    Raises MediaError (the cab missing, a link, untrusted, not holding exactly
    ConfigMgr.Manifest.xml, or a manifest that parse_redist_manifest refuses)."""
    staging, tmp_dir = Path(staging), Path(tmp_dir)
    redist_dir = staging / REDIST_FOLDER
    cab = redist_dir / REDIST_MANIFEST_CAB
    try:
        dir_fd = _open_dir(staging, [REDIST_FOLDER])
    except FileNotFoundError:
        raise MediaError(f"the redist folder {show(redist_dir)} does not exist") from None
    except OSError as exc:
        raise MediaError(f"cannot open the redist folder {show(redist_dir)}: {exc}") from None
    try:
        tmp_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        os.close(dir_fd)
        raise MediaError(f"cannot create the temporary folder {show(tmp_dir)}: {exc}") from exc
    # Verify and extract a private copy read through a no-follow descriptor: what is checked
    # is what is extracted, whatever happens to the staging folder meanwhile.
    copy = tmp_name_for(tmp_dir / REDIST_MANIFEST_CAB, "verify")
    try:
        with _closing(dir_fd):
            src = _open_file(dir_fd, REDIST_MANIFEST_CAB, show(cab))
            if src is None:
                raise MediaError(f"the redist manifest {show(cab)} does not exist")
            with _closing(src):
                data = _read_capped(src, MAX_REDIST_MANIFEST, show(cab))
        fd = open_nofollow(copy, WRITE_NEW, 0o600)
        try:
            _write_all(fd, memoryview(data))
        finally:
            os.close(fd)
        verdict = verify_cab(copy, trust)
        if not verdict.trusted:
            raise MediaError(f"the redist manifest {show(cab)} is not trusted: {verdict.reason}")
        say(f"Found redist manifest {show(cab)} and set redist folder to {show(redist_dir)}.")
        members = list_cab(copy)
        if len(members) != 1 or members[0].path.lower() != REDIST_MANIFEST_XML.lower():
            names = ", ".join(m.name for m in members[:5]) or "nothing"
            raise MediaError(
                f"the redist manifest {show(cab)} must hold only {REDIST_MANIFEST_XML}, "
                f"it holds {names}"
            )
        limits = ExtractLimits(
            max_files=1, max_file_size=MAX_REDIST_MANIFEST, max_total_size=MAX_REDIST_MANIFEST
        )
        extract_cab_into(copy, tmp_dir, limits=limits)
        xml_path = tmp_dir / members[0].path
        say(f"INFO: Extracted file {show(xml_path)}")
        xml_fd = open_nofollow(xml_path, READ)
        with _closing(xml_fd):
            manifest = parse_redist_manifest(
                _read_capped(xml_fd, MAX_REDIST_MANIFEST, str(xml_path))
            )
    except CmlabError as exc:
        if isinstance(exc, MediaError):
            raise
        raise MediaError(f"the redist manifest {show(cab)}: {exc}") from exc
    except OSError as exc:
        raise MediaError(f"the redist manifest {show(cab)}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(copy)
    if manifest.kind != "Redist":
        raise MediaError(f"{show(cab)} is a {manifest.kind} manifest, not the redist manifest")

    entries: list[RedistEntry] = []
    seen: dict[str, str] = {}
    for group in manifest.groups:
        say(f'INFO: Processing file group "{group.name}"')
        for f in group.files:
            parts = _rel_parts(f.url, f"redist manifest file {f.name!r}")
            path = redist_dir.joinpath(*parts)
            key = f.copy_as.lower()
            if key in seen:
                raise MediaError(
                    f"{show(cab)} lists two files copied as {f.copy_as}: {seen[key]} and {f.name}"
                )
            seen[key] = f.name
            say(f'INFO: Processing file "{f.name}"')
            say(f"INFO: File will be downloaded from {f.display_url or show(path)}.")
            say(
                f"INFO: File for {f.name} [{f.description}] will be copied with file name: "
                f"{f.copy_as}."
            )
            entries.append(
                RedistEntry(
                    group=group.name,
                    name=f.name,
                    description=f.description,
                    display_url=f.display_url,
                    copy_as=f.copy_as,
                    size=f.size,
                    hash=f.hash.upper(),
                    path=path,
                )
            )
    return RedistPlan(manifest_cab=cab, redist_dir=redist_dir, entries=tuple(entries))


# ---------------------------------------------------------------------------------------
# Step 3: checking the media, replacing placeholders


@dataclass(frozen=True)
class _Checker:
    staging: Path
    plan: RedistPlan
    installed_root: Path
    say: Callable[[str], None]
    show: Callable[[Path], str]
    sep: str

    def upper(self, path: Path) -> str:
        return _shown_name_case(self.show(path), path.name, upper=True)

    def folder(self, path: Path) -> str:
        shown = self.show(path)
        return shown if shown.endswith(self.sep) else shown + self.sep

    def redist_parts(self, entry: RedistEntry) -> list[str]:
        """The redist's path below the staging folder, component by component."""
        try:
            rel = entry.path.relative_to(self.staging / REDIST_FOLDER)
        except ValueError:
            raise MediaError(
                f"redist {entry.name}: {entry.path} is not in {self.staging / REDIST_FOLDER}"
            ) from None
        return [REDIST_FOLDER, *_rel_parts(rel.as_posix(), f"redist {entry.name}")]

    def staged_hash(self, dir_fd: int | None, name: str, staged: Path) -> str | None:
        """The staging copy's SHA-256; None if it (or its folder) does not exist."""
        if dir_fd is None:
            return None
        fd = _open_file(dir_fd, name, self.show(staged))
        if fd is None:
            return None
        with _closing(fd):
            return sha256_fd(fd)

    def replace(
        self,
        dir_fd: int,
        name: str,
        staged: Path,
        actual: str | None,
        expected: str,
        size: int,
        entry: RedistEntry,
    ) -> None:
        """Replace the staging file `name` in `dir_fd` (hash `actual`, None when missing) by
        the redist `entry` once it proves to be the file update.map expects; else MediaError.
        """
        redist = entry.path
        shown = self.upper(redist)
        self.say(f"INFO: Checking alternate path: {shown}")
        parts = self.redist_parts(entry)

        def missing_from_both(found: str) -> MediaError:
            return MediaError(
                f"no valid source for {name} in either path: {self.show(staged)} has hash "
                f"{actual or '(missing)'} and {self.show(redist)} {found}; update.map expects "
                f"{expected}"
            )

        try:
            redist_dir_fd = _open_dir(self.staging, parts[:-1])
        except FileNotFoundError:
            self.say(f"WARNING: File {shown} is missing")
            raise missing_from_both("is missing") from None
        with _closing(redist_dir_fd):
            src = _open_file(redist_dir_fd, parts[-1], self.show(redist))
            if src is None:
                self.say(f"WARNING: File {shown} is missing")
                raise missing_from_both("is missing")
            with _closing(src):
                # Copy first, then judge the bytes copied: what is checked is what lands.
                tmp = tmp_name_for(Path(name), "redist").name
                try:
                    # At most `size` bytes land (a longer source must not fill the disk);
                    # the hash is the whole source's, as the log line shows it.
                    out = open_nofollow(tmp, WRITE_NEW, dir_fd=dir_fd)
                    try:
                        got = copy_hashing(src, out, size, hash_all=True, fsync=True).sha256
                    finally:
                        os.close(out)
                    self.say(f"INFO: Verifying hash for file '{shown}'")
                    if got != expected:
                        self.say(f"Expected hash:{expected}, Actual hash:{got}")
                        self.say(f"WARNING: File hash mismatch for {shown}")
                        raise missing_from_both(f"has hash {got}")
                    # A lab redist is not a signed PE file: its trust is its SHA-256 in the
                    # signed ConfigMgr.Manifest.cab that process_redists verified.
                    self.say(f"INFO: Verifying signature for file '{shown}'")
                    if got != entry.hash:
                        raise MediaError(
                            f"{self.show(redist)} has hash {got}, which update.map expects, but "
                            f"the signed redist manifest {self.show(self.plan.manifest_cab)} "
                            f"lists {entry.hash} for {entry.name}"
                        )
                    folder = self.folder(redist.parent)
                    self.say(f"INFO: Found valid source in folder: '{folder}'")
                    self.say(
                        "INFO: Found valid source for external dependency file "
                        f"'{name.upper()}' at '{folder}'"
                    )
                    self.say(f"This file {shown} will be copied from redist.")
                    crashpoint("redistmedia.after_copy")
                    check = open_nofollow(tmp, READ, dir_fd=dir_fd)
                    with _closing(check):
                        copied = sha256_fd(check)
                    if copied != expected:
                        raise MediaError(
                            f"the copy of {self.show(redist)} over {self.show(staged)} has hash "
                            f"{copied}, not {expected}"
                        )
                    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dir_fd)
                    raise
        os.fsync(dir_fd)
        crashpoint("redistmedia.after_replace")

    def redist_mtime(self, entry: RedistEntry) -> int | None:
        parts = self.redist_parts(entry)
        try:
            dir_fd = _open_dir(self.staging, parts[:-1])
        except (FileNotFoundError, MediaError):
            return None
        with _closing(dir_fd):
            try:
                st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
        return st.st_mtime_ns if stat.S_ISREG(st.st_mode) else None

    def skip_check(
        self, dir_parts: list[str], name: str, expected: str, entry: RedistEntry
    ) -> bool:
        """The guide's "same hash, skipped" case: the installed copy already has this content.
        A missing installed copy, a link or anything else is simply not skipped."""
        installed = self.installed_root.joinpath(*dir_parts, name)
        try:
            dir_fd = _open_dir(self.installed_root, dir_parts)
        except (FileNotFoundError, MediaError):
            return False
        with _closing(dir_fd):
            try:
                fd = _open_file(dir_fd, name, str(installed))
            except MediaError:
                return False  # never read through a link; the install overwrites it
            if fd is None:
                return False
            with _closing(fd):
                if sha256_fd(fd) != expected:
                    return False
                installed_mtime = os.fstat(fd).st_mtime_ns
        redist_mtime = self.redist_mtime(entry)
        shown = self.upper(entry.path)
        shown_installed = _shown_name_case(self.show(installed), name, upper=False)
        if redist_mtime is not None and redist_mtime > installed_mtime:
            self.say(
                f"File {shown} has newer modification time than ({shown_installed}) but they "
                "have the same hash. It will be skipped."
            )
        else:
            self.say(f"File {shown} has the same hash as ({shown_installed}). It will be skipped.")
        return True


def check_media(
    staging: Path,
    update_map: UpdateMap,
    plan: RedistPlan,
    installed_root: Path,
    say: Callable[[str], None],
    show: Callable[[Path], str],
    *,
    component: str = "SITE_SERVER",
    sep: str | None = None,
) -> MediaResult:
    """Check every file update.map lists for `component` in `staging/SMSSetup`, replace each
    one whose hash differs (a 0-byte placeholder) by its redist, and find the redists whose
    installed copy under `installed_root` already has the same content (docs/formats.md,
    "Redist media check"). `sep` is the separator ending the folders shown in the
    `Found valid source ...` lines; by default the one `show(plan.redist_dir)` uses.

    Idempotent: files already replaced match update.map and are left alone, so running it
    again after a crash ends in the same state. Raises MediaError, and nothing else for bad
    content; filesystem trouble (a full disk, a permission) also comes as MediaError."""
    staging = Path(staging)
    found = update_map.component(component)
    if found is None:
        raise MediaError(f"update.map has no {component} component")
    by_name: dict[str, RedistEntry] = {}
    for entry in plan.entries:
        key = entry.copy_as.lower()
        if key in by_name:
            raise MediaError(f"two redists are copied as {entry.copy_as}")
        by_name[key] = entry
    checker = _Checker(
        staging=staging,
        plan=plan,
        installed_root=Path(installed_root),
        say=say,
        show=show,
        sep=sep or shown_separator(show(plan.redist_dir)),
    )
    try:
        return _check_all(checker, found, by_name)
    except OSError as exc:
        raise MediaError(f"checking the media in {show(staging)} failed: {exc}") from exc


def _check_all(
    checker: _Checker, found: MapComponent, by_name: dict[str, RedistEntry]
) -> MediaResult:
    staging, say, show, plan = checker.staging, checker.say, checker.show, checker.plan
    replaced: list[str] = []
    skipped: list[str] = []
    checked = 0
    for directory in found.directories:
        dir_parts = _rel_parts(directory.path.replace("\\", "/"), "update.map directory")
        parts = [MAP_ROOT, *dir_parts]
        try:
            dir_fd: int | None = _open_dir(staging, parts)
        except FileNotFoundError:
            dir_fd = None
        with _closing(dir_fd):
            if dir_fd is not None:
                _sweep_stale(dir_fd)
            for f in directory.files:
                if f.algorithm != "SHA256":
                    raise MediaError(
                        f"update.map lists {f.name} with {f.algorithm}; cmlab checks SHA256"
                    )
                _rel_parts(f.name, "update.map file name")
                staged = staging.joinpath(*parts, f.name)
                rel = "/".join([*parts, f.name])
                entry = by_name.get(f.name.lower())
                actual = checker.staged_hash(dir_fd, f.name, staged)
                checked += 1
                if actual != f.hash:
                    shown = checker.upper(staged)
                    say(f"INFO: Checking media: {shown}")
                    if actual is None:
                        say(f"WARNING: File {shown} is missing")
                    else:
                        say(f"INFO: Verifying hash for file '{shown}'")
                        say(f"Expected hash:{f.hash}, Actual hash:{actual}")
                        say(f"WARNING: File hash mismatch for {shown}")
                    if entry is None:
                        raise MediaError(
                            f"{show(staged)} has hash {actual or '(missing)'}, update.map "
                            f"expects {f.hash}, and no redist in {show(plan.manifest_cab)} "
                            f"provides {f.name}"
                        )
                    if dir_fd is None:
                        raise MediaError(
                            f"no valid source for {f.name}: the folder {show(staged.parent)} "
                            "does not exist"
                        )
                    checker.replace(dir_fd, f.name, staged, actual, f.hash, f.size, entry)
                    replaced.append(rel)
                if entry is not None and checker.skip_check(dir_parts, f.name, f.hash, entry):
                    skipped.append(rel)
    return MediaResult(replaced=tuple(replaced), skipped=tuple(skipped), checked=checked)
