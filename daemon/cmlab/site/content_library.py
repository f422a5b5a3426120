"""SCCMContentLib, the single-instance content library: DistMgr stores a package snapshot of
`EasySetupPayload/<GUID>` in it, and CMUpdate later extracts that content to
`CMUStaging/<GUID>`.

The two never talk except through these files and the site database, so the layout is their
contract and it is ConfigMgr's own (docs/contentlib.md): PkgLib says which content version of
a package is current, DataLib describes each version's folder tree file by file, FileLib holds
each distinct file content once, named by its SHA-256.

A process may be killed at any instant, and a reader (CMUpdate, `cmlab`) may look at any
instant, so every change is built under a temporary name and committed by a rename, in an
order where a version exists only once everything it needs is durable: FileLib data, the
DataLib tree, the DataLib definition (`<id>.INI`, the commit point), PkgLib last. Durability
is batched per phase, not per file: a phase writes everything, flushes it in one pass (one
syncfs where Linux has it, as cmlab.site.cab does for its extraction) and only then makes it
reachable by a rename. Nothing a library file says is trusted on the way out: extraction
re-hashes every byte, takes names only from the DataLib directory tree (never from a file's
content) and builds the copy beside its destination, which it appears under only once whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cmlab.core.errors import CmlabError, ContentLibError
from cmlab.core.failpoints import crashpoint
from cmlab.core.flush import make_durable, start_writeback
from cmlab.core.fs import (
    DIR,
    READ,
    WRITE_NEW,
    copy_hashing,
    fsync_dir,
    make_tmp_dir,
    open_nofollow,
    remove_path,
    tmp_name_for,
    write_atomic,
)
from cmlab.core.hashing import folder_hash, folder_hash_of_records, folder_records
from cmlab.site.formats.ids import PACKAGE_ID, is_package_id, is_upper_sha256

__all__ = ["ContentLibrary", "Snapshot"]

_CONTENT_ID_RE = re.compile(rf"({PACKAGE_ID})\.([1-9][0-9]{{0,9}})")
_SIZE_RE = re.compile(r"[0-9]{1,19}")
_MAX_VERSION = 2**31 - 1  # a SQL int, as SMSPackages.SourceVersion
# Files from this size on are handed to the kernel's writeback as soon as they are written
# (cmlab.core.flush.start_writeback), so the phase's flush finds little left: 200 MB in five files
# stored 13-15% faster (extraction: within the noise). Below it, the extra open costs more
# than it saves (the 24-file sample stored 2-3 ms slower with it).
_WRITEBACK_MIN = 1024 * 1024
_INI_MAX = 1024 * 1024  # library INIs are a few lines; a Links list of 60,000 versions fits
_DEF = b".INI"  # a DataLib tree describes file <name> in <name>.INI
_NAME_MAX = 255


@dataclass(frozen=True)
class Snapshot:
    """One stored content version, as DataLib/<content_id>.INI records it."""

    pkg_id: str
    version: int
    content_id: str  # f"{pkg_id}.{version}"
    hash: str  # the folder hash (docs/formats.md) of the stored tree
    files: int
    size: int  # total bytes of its files


@dataclass
class _Batch:
    """What a store has written and not yet flushed. Data is renamed to its FileLib name
    only after the flush that makes it and its Links durable."""

    new: dict[str, Path] = field(default_factory=dict)  # SHA-256 -> data at a temporary name
    seen: set[str] = field(default_factory=set)  # every SHA-256 of the snapshot so far
    files: list[Path] = field(default_factory=list)  # Links, reused data, DataLib .INIs
    folders: set[Path] = field(default_factory=set)  # FileLib prefix folders used


@dataclass(frozen=True)
class _Entry:
    """A DataLib tree record: a file (sha set) or an empty folder (sha None)."""

    rel: bytes
    sha: str | None
    size: int


def _content_id(pkg_id: str, version: int) -> str:
    if not isinstance(pkg_id, str) or not is_package_id(pkg_id):
        raise ContentLibError(
            f"{pkg_id!r} is not a package ID (three letters or digits, then 5 hex)"
        )
    # bool is an int; True is not a version.
    if type(version) is not int or not 1 <= version <= _MAX_VERSION:
        raise ContentLibError(f"{version!r} is not a content version (1 to {_MAX_VERSION})")
    return f"{pkg_id}.{version}"


def _cid_key(content_id: str) -> tuple[str, int]:
    pkg, _, ver = content_id.rpartition(".")
    return pkg, int(ver)


def _show(rel: bytes) -> str:
    return os.fsdecode(rel)


# ---------------------------------------------------------------------------------------
# INI files: one section, key=value lines, written by us in exactly one form; read strictly
# because anything else means someone edited or damaged the library.


def _render_ini(section: str, items: list[tuple[str, str]]) -> bytes:
    return (f"[{section}]\n" + "".join(f"{k}={v}\n" for k, v in items)).encode("ascii")


def _read_small(path: Path | str) -> bytes | None:
    try:
        fd = open_nofollow(path, READ)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symbolic link where a definition should be
        raise ContentLibError(f"{path}: cannot be read ({exc.strerror})") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ContentLibError(f"{path}: not a regular file")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(_INI_MAX + 1)
    finally:
        os.close(fd)
    if len(data) > _INI_MAX:
        raise ContentLibError(f"{path}: larger than {_INI_MAX} bytes")
    return data


def _parse_ini(path: Path | str, section: str, keys: set[str] | None) -> dict[str, str] | None:
    """The pairs of `path`'s one section; None when the file does not exist. `keys` None
    accepts any key (PkgLib's keys are content IDs)."""
    data = _read_small(path)
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContentLibError(f"{path}: not UTF-8 text") from exc
    pairs: dict[str, str] = {}
    seen_section = False
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        if not seen_section:
            if line != f"[{section}]":
                raise ContentLibError(f"{path}: line {number}: expected [{section}]")
            seen_section = True
            continue
        key, eq, value = line.partition("=")
        if not eq or (keys is not None and key not in keys):
            raise ContentLibError(f"{path}: line {number}: unexpected {line[:80]!r}")
        if key in pairs:
            raise ContentLibError(f"{path}: line {number}: {key} given twice")
        pairs[key] = value
    if not seen_section:
        raise ContentLibError(f"{path}: empty or truncated (no [{section}])")
    if keys is not None and (missing := keys - pairs.keys()):
        raise ContentLibError(f"{path}: truncated: no {', '.join(sorted(missing))}")
    return pairs


def _size_value(path: Path | str, value: str, key: str) -> int:
    if not _SIZE_RE.fullmatch(value):
        raise ContentLibError(f"{path}: {key}={value[:80]!r} is not a number")
    return int(value)


def _hash_value(path: Path | str, value: str) -> str:
    if not is_upper_sha256(value):
        raise ContentLibError(f"{path}: Hash={value[:80]!r} is not 64 upper-case hex digits")
    return value


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` with `data`; not flushed (the caller's batch flush does that)."""
    fd = open_nofollow(path, WRITE_NEW)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _folders_of(top: Path, records: Iterable[tuple[bytes, bool]]) -> list[Path]:
    """The folders of the tree below `top` that `records` (relpath, is a file) describe,
    `top` excluded: what the fsync fallback of a flush must fsync, without a walk."""
    found: set[bytes] = set()
    for rel, is_file in records:
        parts = rel.split(b"/")
        found.update(b"/".join(parts[:i]) for i in range(1, len(parts)))
        if not is_file:
            found.add(rel)
    return [top / _show(rel) for rel in found]


def _check_storable(source: Path, records: list[tuple[bytes, bool]]) -> None:
    """DataLib describes file `x` as `x.INI`: a folder `x.INI` beside a file `x` cannot be
    described, nor a file name too long to take the suffix."""
    folders: set[bytes] = set()
    for rel, is_file in records:
        parts = rel.split(b"/")
        folders.update(b"/".join(parts[:i]) for i in range(1, len(parts)))
        if not is_file:
            folders.add(rel)
    for rel, is_file in records:
        if not is_file:
            continue
        if rel + _DEF in folders:
            raise ContentLibError(
                f"{source}: the file {_show(rel)} and the folder {_show(rel)}.INI cannot both "
                "be stored (DataLib describes a file <name> as <name>.INI)"
            )
        if len(rel.rsplit(b"/", 1)[-1]) + len(_DEF) > _NAME_MAX:
            raise ContentLibError(f"{source}: {_show(rel)}: the name is too long to store")


class ContentLibrary:
    """SITE/SCCMContentLib. Every method may run in a worker thread; store_snapshot and
    remove_old_versions take an exclusive lock (flock on the library folder, so it holds
    across threads and processes and dies with its holder); readers take none."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.pkglib = self.root / "PkgLib"
        self.datalib = self.root / "DataLib"
        self.filelib = self.root / "FileLib"

    # -- paths ----------------------------------------------------------------------------

    def _pkg_ini(self, pkg_id: str) -> Path:
        return self.pkglib / f"{pkg_id}.INI"

    def _content_ini(self, content_id: str) -> Path:
        return self.datalib / f"{content_id}.INI"

    def _blob(self, sha: str) -> Path:
        return self.filelib / sha[:4] / sha

    def _links_ini(self, sha: str) -> Path:
        return self.filelib / sha[:4] / f"{sha}.INI"

    # -- reading --------------------------------------------------------------------------

    def current_version(self, pkg_id: str) -> int | None:
        """The version PkgLib/<PkgID>.INI names; None when the package was never stored."""
        _content_id(pkg_id, 1)
        path = self._pkg_ini(pkg_id)
        pairs = _parse_ini(path, "Packages", None)
        if pairs is None:
            return None
        if len(pairs) != 1:
            raise ContentLibError(f"{path}: expected one content version, found {len(pairs)}")
        ((key, value),) = pairs.items()
        match = _CONTENT_ID_RE.fullmatch(key)
        if match is None or match[1] != pkg_id or value != "":
            raise ContentLibError(f"{path}: {key[:80]!r} is not a content version of {pkg_id}")
        return int(match[2])

    def snapshot_info(self, pkg_id: str, version: int) -> Snapshot | None:
        """The version's DataLib definition; None when it is not (completely) stored."""
        content_id = _content_id(pkg_id, version)
        path = self._content_ini(content_id)
        pairs = _parse_ini(path, "Content", {"Hash", "Size", "Files", "Version"})
        if pairs is None:
            return None
        if pairs["Version"] != str(version):
            raise ContentLibError(f"{path}: Version={pairs['Version'][:80]!r}, not {version}")
        return Snapshot(
            pkg_id=pkg_id,
            version=version,
            content_id=content_id,
            hash=_hash_value(path, pairs["Hash"]),
            files=_size_value(path, pairs["Files"], "Files"),
            size=_size_value(path, pairs["Size"], "Size"),
        )

    def content_hash(self, pkg_id: str, version: int) -> str:
        return self._stored(pkg_id, version).hash

    def _stored(self, pkg_id: str, version: int) -> Snapshot:
        info = self.snapshot_info(pkg_id, version)
        if info is None:
            raise ContentLibError(f"content {pkg_id}.{version} is not in the content library")
        return info

    def _read_tree(self, info: Snapshot) -> list[_Entry]:
        """The DataLib tree of a stored version, sorted as the folder hash sorts. Names come
        from the directory entries alone; no link or special file is accepted."""
        top = self.datalib / info.content_id
        try:
            st = os.lstat(top)
        except FileNotFoundError:
            raise ContentLibError(
                f"{top}: missing (the DataLib tree of {info.content_id})"
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise ContentLibError(f"{top}: not a folder (the DataLib tree of {info.content_id})")
        entries: list[_Entry] = []
        pending: list[tuple[bytes, str]] = [(b"", os.fspath(top))]
        while pending:
            rel, folder = pending.pop()
            with os.scandir(folder) as it:
                children = list(it)
            if not children and rel:
                entries.append(_Entry(rel, None, 0))
            for child in children:
                name = os.fsencode(child.name)
                child_rel = rel + b"/" + name if rel else name
                if b"\n" in name or b"\r" in name:
                    raise ContentLibError(f"{child.path}: a name with a line break in DataLib")
                mode = child.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    pending.append((child_rel, child.path))
                elif stat.S_ISREG(mode) and name.endswith(_DEF) and name != _DEF:
                    pairs = _parse_ini(child.path, "File", {"Size", "Hash"})
                    if pairs is None:
                        raise ContentLibError(f"{child.path}: vanished while being read")
                    entries.append(
                        _Entry(
                            child_rel[: -len(_DEF)],
                            _hash_value(child.path, pairs["Hash"]),
                            _size_value(child.path, pairs["Size"], "Size"),
                        )
                    )
                else:
                    raise ContentLibError(
                        f"{child.path}: not a folder or a file definition (<name>.INI)"
                    )
        entries.sort(key=lambda e: e.rel)
        folders = {e.rel for e in entries if e.sha is None}
        for e in entries:
            parts = e.rel.split(b"/")
            folders.update(b"/".join(parts[:i]) for i in range(1, len(parts)))
        for e in entries:
            if e.sha is not None and e.rel in folders:
                raise ContentLibError(
                    f"{top}: {_show(e.rel)} is described both as a file and as a folder"
                )
        return entries

    def _check_tree(self, info: Snapshot, entries: list[_Entry]) -> str:
        digest = folder_hash_of_records((e.rel, e.sha) for e in entries)
        files = [e for e in entries if e.sha is not None]
        if (digest, len(files), sum(e.size for e in files)) != (info.hash, info.files, info.size):
            raise ContentLibError(
                f"DataLib/{info.content_id}: the tree (hash {digest}, {len(files)} files, "
                f"{sum(e.size for e in files)} bytes) does not match its definition (hash "
                f"{info.hash}, {info.files} files, {info.size} bytes)"
            )
        return digest

    def _open_blob(self, info: Snapshot, entry: _Entry) -> int:
        assert entry.sha is not None
        blob = self._blob(entry.sha)
        try:
            fd = open_nofollow(blob, READ)
        except FileNotFoundError:
            raise ContentLibError(
                f"{info.content_id}: {_show(entry.rel)}: its FileLib data {blob} is missing"
            ) from None
        except OSError as exc:
            raise ContentLibError(
                f"{info.content_id}: {_show(entry.rel)}: its FileLib data {blob} cannot be "
                f"read ({exc.strerror})"
            ) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ContentLibError(
                f"{info.content_id}: {_show(entry.rel)}: its FileLib data {blob} is not a file"
            )
        return fd

    @staticmethod
    def _check_blob(info: Snapshot, entry: _Entry, sha: str, size: int) -> None:
        if (sha, size) != (entry.sha, entry.size):
            raise ContentLibError(
                f"{info.content_id}: {_show(entry.rel)}: its FileLib data is corrupt (SHA-256 "
                f"{sha}, {size} bytes; expected {entry.sha}, {entry.size} bytes)"
            )

    def verify(self, pkg_id: str, version: int) -> str:
        """Re-hash every FileLib blob of a version against its DataLib tree and the tree
        against its definition; the folder hash, or ContentLibError naming the first missing
        or corrupt file (in folder hash order)."""
        info = self._stored(pkg_id, version)
        entries = self._read_tree(info)
        digest = self._check_tree(info, entries)
        for entry in entries:
            if entry.sha is None:
                continue
            fd = self._open_blob(info, entry)
            try:
                sha, size = copy_hashing(fd, None, entry.size)
            finally:
                os.close(fd)
            self._check_blob(info, entry, sha, size)
        return digest

    def extract(
        self,
        pkg_id: str,
        version: int,
        dest: Path,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> str:
        """Copy a stored version to `dest` (which must not exist); returns its folder hash.

        Built in a temporary folder beside `dest`, every byte verified as it is copied,
        renamed to `dest` only when whole. Independent copies, never hard links: the staging
        copy must not change if the library does. `progress(done_bytes, total_bytes)`."""
        dest = Path(dest)
        info = self._stored(pkg_id, version)
        if os.path.lexists(dest):
            raise ContentLibError(f"{dest}: already exists; content is extracted to a new folder")
        entries = self._read_tree(info)
        digest = self._check_tree(info, entries)
        total = info.size
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        try:
            tmp = make_tmp_dir(dest, "extract")
        except FileNotFoundError:
            raise ContentLibError(
                f"{dest.parent}: the destination's folder does not exist"
            ) from None
        try:
            if progress is not None:
                progress(0, total)
            written: list[Path] = []
            for entry in entries:
                target = tmp / _show(entry.rel)
                if entry.sha is None:
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(target.parent, exist_ok=True)
                fd = self._open_blob(info, entry)
                try:
                    out = open_nofollow(target, WRITE_NEW)
                    try:
                        sha, size = copy_hashing(fd, out, entry.size, on_chunk=advance)
                    finally:
                        os.close(out)
                finally:
                    os.close(fd)
                self._check_blob(info, entry, sha, size)
                if size >= _WRITEBACK_MIN:
                    start_writeback(target)
                written.append(target)
            os.chmod(tmp, 0o755)  # make_tmp_dir's 0700 is for the building only
            # One flush for the whole copy before it appears under its name.
            make_durable(
                tmp, written, _folders_of(tmp, ((e.rel, e.sha is not None) for e in entries))
            )
            if os.path.lexists(dest):
                raise ContentLibError(f"{dest}: appeared while the content was extracted")
            os.rename(tmp, dest)
            fsync_dir(dest.parent)
        except BaseException:
            remove_path(tmp)
            raise
        return digest

    # -- writing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root.parent)
        for folder in (self.pkglib, self.datalib, self.filelib):
            if not folder.is_dir():
                folder.mkdir(exist_ok=True)
                fsync_dir(self.root)
        fd = os.open(self.root, DIR)  # a link to the library folder is followed
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def store_snapshot(
        self,
        pkg_id: str,
        version: int,
        source: Path,
        *,
        on_file: Callable[[str], None] | None = None,
    ) -> Snapshot:
        """Store the folder `source` as content version `version` of `pkg_id`, and make it
        the package's current version. Its hash is the folder hash of the bytes stored: each
        file is hashed as it is copied, read once.

        Idempotent: a version already stored from the same content is left as it is (the
        source is only hashed). Called again after a crash at any point, it completes the
        store. A source the folder hash refuses (link, FIFO, name with a line break) raises
        ContentLibError before anything is written. `on_file(relpath)` after each file is
        copied and hashed (it is part of the library once the store returns).

        Durability is batched (docs/contentlib.md, "Storing: the write order"): one flush
        for all new data, its Links and the DataLib tree, one for the renames that put them
        in place, then the definition (the commit point) and PkgLib, fsynced each."""
        content_id = _content_id(pkg_id, version)
        source = Path(source)
        try:
            records = folder_records(source)
        except FileNotFoundError as exc:
            raise ContentLibError(f"{source}: the source folder does not exist") from exc
        except ContentLibError:
            raise
        except CmlabError as exc:
            raise ContentLibError(f"{exc} (not stored)") from exc
        _check_storable(source, records)
        with self._locked():
            info = self.snapshot_info(pkg_id, version)
            if info is not None:
                try:
                    same = folder_hash(source) == info.hash
                except CmlabError as exc:
                    raise ContentLibError(f"{exc} (not stored)") from exc
                if same:
                    self._make_current(pkg_id, version)
                    return info
            info = self._copy_in(pkg_id, version, content_id, source, records, on_file)
            self._make_current(pkg_id, version)
            return info

    def _copy_in(
        self,
        pkg_id: str,
        version: int,
        content_id: str,
        source: Path,
        records: list[tuple[bytes, bool]],
        on_file: Callable[[str], None] | None,
    ) -> Snapshot:
        tree = make_tmp_dir(self.datalib / content_id, "store")
        batch = _Batch()
        try:
            # Phase 1: write everything, flush nothing, make nothing reachable. New data
            # stays at temporary names, so no FileLib name can hold data whose Links are
            # not durable yet.
            stored: list[tuple[bytes, str | None]] = []
            files = size = 0
            for rel, is_file in records:
                target = tree / _show(rel)
                if not is_file:
                    os.makedirs(target, exist_ok=True)
                    stored.append((rel, None))
                    continue
                os.makedirs(target.parent, exist_ok=True)
                sha, n = self._put_file(source, rel, content_id, batch)
                definition = target.with_name(target.name + ".INI")
                _write_new(definition, _render_ini("File", [("Size", str(n)), ("Hash", sha)]))
                batch.files.append(definition)
                stored.append((rel, sha))
                files += 1
                size += n
                crashpoint("contentlib.after_file")
                if on_file is not None:
                    on_file(_show(rel))
            info = Snapshot(
                pkg_id, version, content_id, folder_hash_of_records(stored), files, size
            )
            os.chmod(tree, 0o755)
            # Flush 1: the new data (at its temporary names), every Links file naming this
            # version, the data it reuses, the DataLib tree.
            make_durable(
                self.filelib,
                [*batch.new.values(), *batch.files],
                [*batch.folders, *_folders_of(tree, records), tree],
            )
            # Only now can data be reached by its FileLib name: its link is on disk.
            for sha in list(batch.new):
                os.replace(batch.new[sha], self._blob(sha))  # absent, or damaged: repaired
                del batch.new[sha]
                crashpoint("contentlib.after_data")
            self._commit(info, tree, batch.folders)
        except BaseException:
            remove_path(tree)
            for tmp in batch.new.values():
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        return info

    def _put_file(
        self, source: Path, rel: bytes, content_id: str, batch: _Batch
    ) -> tuple[str, int]:
        """Copy one source file to a temporary name in FileLib and link it to `content_id`;
        its SHA-256 and size as copied. Data already stored (or already copied in this
        batch) is reused and the copy deleted: single instance. New data is left in
        `batch.new` for _copy_in to rename into place after the flush."""
        path = source / _show(rel)
        try:
            src = open_nofollow(path, READ)
        except OSError as exc:
            raise ContentLibError(f"{path}: cannot be read ({exc.strerror})") from exc
        tmp = tmp_name_for(self.filelib / content_id, "blob")
        kept = False
        try:
            if not stat.S_ISREG(os.fstat(src).st_mode):
                raise ContentLibError(f"{path}: no longer a regular file")
            out = open_nofollow(tmp, WRITE_NEW)
            try:
                sha, size = copy_hashing(src, out)
            finally:
                os.close(out)
            if sha in batch.seen:
                return sha, size  # the same content earlier in this snapshot: linked already
            blob = self._blob(sha)
            if not blob.parent.is_dir():
                blob.parent.mkdir(exist_ok=True)
            batch.folders.add(blob.parent)
            # The link is written before the data can be reached by its name (after the
            # flush), so no data ever exists without a Links entry naming who needs it, and
            # remove_old_versions can always account for it.
            self._add_link(sha, content_id)
            batch.files.append(self._links_ini(sha))
            if self._blob_is(blob, sha, size):
                batch.files.append(blob)  # reused; flushed too, in case a crash left it dirty
            else:
                if size >= _WRITEBACK_MIN:
                    start_writeback(tmp)
                batch.new[sha] = tmp
                kept = True
            batch.seen.add(sha)
        finally:
            os.close(src)
            if not kept:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return sha, size

    @staticmethod
    def _blob_is(blob: Path, sha: str, size: int) -> bool:
        try:
            fd = open_nofollow(blob, READ)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if os.path.islink(blob):
                return False  # replaced (the link itself, never its target)
            raise ContentLibError(f"{blob}: cannot be read ({exc.strerror})") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ContentLibError(f"{blob}: FileLib data is not a regular file")
            return st.st_size == size and copy_hashing(fd, None) == (sha, size)
        finally:
            os.close(fd)

    def _read_links(self, sha: str) -> list[str]:
        path = self._links_ini(sha)
        pairs = _parse_ini(path, "File", {"Links"})
        if pairs is None:
            return []
        links = pairs["Links"].split(",") if pairs["Links"] else []
        for link in links:
            if not _CONTENT_ID_RE.fullmatch(link):
                raise ContentLibError(f"{path}: {link[:80]!r} is not a content ID")
        return links

    def _write_links(self, sha: str, links: list[str], *, durable: bool = True) -> None:
        ordered = sorted(set(links), key=_cid_key)
        write_atomic(
            self._links_ini(sha),
            _render_ini("File", [("Links", ",".join(ordered))]),
            durable=durable,
        )

    def _add_link(self, sha: str, content_id: str) -> None:
        """Add `content_id` to the data's Links, whole (by rename), not flushed: the store's
        flush makes it durable before the data is renamed into place."""
        links = self._read_links(sha)
        if content_id not in links:
            self._write_links(sha, [*links, content_id], durable=False)

    def _commit(self, info: Snapshot, tree: Path, filelib_folders: Iterable[Path]) -> None:
        """Rename the flushed tree into place, flush the renames (the tree's, and the data's
        into `filelib_folders`), then write the definition: the commit point."""
        final = self.datalib / info.content_id
        definition = self._content_ini(info.content_id)
        # Re-taking a version whose content changed: it stops existing first (a reader sees
        # it absent, never the old definition over the new tree).
        if remove_path(definition):
            fsync_dir(self.datalib)
        # Left by an interrupted store or the version just withdrawn; no definition names it.
        remove_path(final)
        os.rename(tree, final)
        # Flush 2: every rename so far (data into FileLib, the tree into DataLib) is on disk
        # before the definition can be.
        make_durable(self.datalib, [], [*filelib_folders, self.filelib])
        crashpoint("contentlib.after_tree")
        write_atomic(
            definition,
            _render_ini(
                "Content",
                [
                    ("Hash", info.hash),
                    ("Size", str(info.size)),
                    ("Files", str(info.files)),
                    ("Version", str(info.version)),
                ],
            ),
        )
        crashpoint("contentlib.after_content_ini")

    def _make_current(self, pkg_id: str, version: int) -> None:
        if self.current_version(pkg_id) != version:
            write_atomic(
                self._pkg_ini(pkg_id), _render_ini("Packages", [(f"{pkg_id}.{version}", "")])
            )

    def remove_old_versions(self, pkg_id: str, keep: int) -> None:
        """Delete every DataLib version of `pkg_id` but `keep` (which must be the current
        one), then the package's Links to content it no longer uses, and FileLib data nobody
        links to any more. Safe to repeat after a crash at any point."""
        content_id = _content_id(pkg_id, keep)
        with self._locked():
            current = self.current_version(pkg_id)
            if current != keep:
                raise ContentLibError(
                    f"{pkg_id}: PkgLib names version {current}, not {keep}; "
                    "only the current version can be kept"
                )
            info = self._stored(pkg_id, keep)
            used = {e.sha for e in self._read_tree(info) if e.sha is not None}
            own = re.compile(re.escape(pkg_id) + r"\.([1-9][0-9]{0,9})(\.INI)?")
            names = [(m, name) for name in os.listdir(self.datalib) if (m := own.fullmatch(name))]
            old = [(m, name) for m, name in names if int(m[1]) != keep]
            # Definitions first: the version stops existing before its tree goes.
            for m, name in old:
                if m[2]:
                    remove_path(self.datalib / name)
            fsync_dir(self.datalib)
            for m, name in old:
                if not m[2]:
                    remove_path(self.datalib / name)
            self._prune_links(pkg_id, content_id, used)

    def _prune_links(self, pkg_id: str, keep_id: str, used: set[str]) -> None:
        """Drop the package's links other than `keep_id`'s to data it uses; delete data left
        without links. The whole FileLib is scanned, so data an interrupted store linked
        but never recorded in a DataLib tree is found too."""
        with os.scandir(self.filelib) as it:
            folders = [e for e in it if e.is_dir(follow_symlinks=False)]
        for folder in sorted(folders, key=lambda e: e.name):
            if not re.fullmatch(r"[0-9A-F]{4}", folder.name):
                continue
            with os.scandir(folder.path) as it:
                names = sorted(e.name for e in it)
            for name in names:
                sha = name.removesuffix(".INI")
                if sha == name or not is_upper_sha256(sha) or sha[:4] != folder.name:
                    continue
                links = self._read_links(sha)
                kept = [
                    link
                    for link in links
                    if _cid_key(link)[0] != pkg_id or (link == keep_id and sha in used)
                ]
                if kept == links:
                    continue
                if kept:
                    self._write_links(sha, kept)
                else:
                    # Data before its Links file: a crash in between leaves a Links file
                    # that the next pass deletes, never data nobody accounts for.
                    remove_path(self._blob(sha))
                    remove_path(self._links_ini(sha))
            with contextlib.suppress(OSError):
                os.rmdir(folder.path)  # only when empty
