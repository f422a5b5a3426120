"""Safe CAB listing, extraction and creation.

Extraction runs libmspack in-process (the copy pylibmspack ships). pylibmspack's own
`extract()` reopens the cabinet for every member, and libmspack then decompresses the
member's folder from its first block each time: O(n²) for n files in one MSZIP/LZX folder
(2,000 small files took 35 s). So the cabinet is opened once through libmspack's C API
(ctypes) and members are extracted in folder/offset order: libmspack keeps the folder's
decompression state between members, and every folder is decompressed exactly once. Only
if that library cannot be located does extraction fall back to pylibmspack's per-member
API, which is correct but quadratic.

Every extraction is guarded: names are validated before anything is written, declared
counts and sizes are checked against `ExtractLimits`, output goes to a private temporary
folder that is fsynced and then renamed into place, and nothing is ever written through a
link.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as dt
import errno
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmlab.core.errors import CabError, CabLimitError, CabPathError
from cmlab.core.flush import make_durable, start_writeback
from cmlab.core.fs import (
    READ,
    fsync_dir,
    make_tmp_dir,
    open_nofollow,
    put_in_place,
    remove_path,
    write_atomic,
)

__all__ = [
    "CAB_MAX_DATA",
    "CAB_MAX_FILES",
    "DEFAULT_CAB_MTIME",
    "CabEntry",
    "ExtractLimits",
    "create_cab",
    "extract_cab",
    "extract_cab_into",
    "list_cab",
    "normalize_member_name",
]

# The format's own ceilings: CFHEADER counts files in 16 bits and a folder holds at most
# 65535 blocks of 32 KiB (libmspack's CAB_LENGTHMAX).
CAB_MAX_FILES = 0xFFFF
CAB_MAX_DATA = 0x7FFF8000

# Fixed so that building the same sources twice gives byte-identical cabinets.
DEFAULT_CAB_MTIME = dt.datetime(2000, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class ExtractLimits:
    max_files: int = 100_000
    max_file_size: int = 4 * 1024**3
    max_total_size: int = 8 * 1024**3  # generous enough for a 2 GB payload


@dataclass(frozen=True)
class CabEntry:
    name: str  # as stored, with backslashes
    path: str  # normalised relative posix path
    size: int


_DEFAULT_LIMITS = ExtractLimits()
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_COMPRESSION = {0: "none", 1: "MSZIP", 2: "Quantum", 3: "LZX"}
_ATTRIB_UTF_NAME = 0x80
_HDR_PREV_CABINET = 0x01
_HDR_NEXT_CABINET = 0x02
_MAX_NAME_COMPONENT = 255
_MAX_PATH = 4096

# ---------------------------------------------------------------------------------------
# Names


def normalize_member_name(name: str) -> str:
    """The safe relative posix path for a CAB member name, or CabPathError.

    Rejects what could escape or confuse a destination folder on Linux or on Windows:
    empty names, NUL and control characters, absolute and UNC paths, drive letters and
    any other `:` (alternate data streams), and empty, `.` or `..` components.
    """
    if not name:
        raise CabPathError("empty entry name")
    if "\x00" in name:
        raise CabPathError(f"entry name {name!r} contains NUL")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        raise CabPathError(f"entry name {name!r} contains control characters")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise CabPathError(f"entry name {name!r} is not valid Unicode")
    posix = name.replace("\\", "/")
    if posix.startswith("/"):
        raise CabPathError(f"entry name {name!r} is an absolute path")
    if _DRIVE_RE.match(posix):
        raise CabPathError(f"entry name {name!r} has a drive letter")
    if ":" in posix:
        raise CabPathError(f"entry name {name!r} contains ':' (drive or alternate stream)")
    parts = posix.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise CabPathError(f"entry name {name!r} has an empty, '.' or '..' component")
        if len(part.encode("utf-8")) > _MAX_NAME_COMPONENT:
            raise CabPathError(f"entry name {name!r} has a component longer than 255 bytes")
    if len(posix.encode("utf-8")) > _MAX_PATH:
        raise CabPathError(f"entry name {name[:80]!r}... is longer than {_MAX_PATH} bytes")
    return posix


def _check_unique_paths(paths: Iterable[str]) -> None:
    """Reject duplicates and file/folder clashes, case-insensitively as Windows sees them."""
    files: dict[str, str] = {}
    dirs: dict[str, str] = {}
    for path in paths:
        key = path.lower()
        if key in files:
            raise CabPathError(f"duplicate entry {path!r} (same as {files[key]!r})")
        if key in dirs:
            raise CabPathError(f"entry {path!r} is also a folder of {dirs[key]!r}")
        files[key] = path
        parts = key.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in files:
                raise CabPathError(f"entry {path!r} lies under file {files[prefix]!r}")
            dirs.setdefault(prefix, path)


def _decode_name(raw: bytes, attribs: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if attribs & _ATTRIB_UTF_NAME:
            raise CabPathError(f"entry name {raw!r} is flagged UTF-8 but is not") from None
        # Without the UTF flag a name is in some 8-bit code page; 437 maps every byte.
        return raw.decode("cp437")


# ---------------------------------------------------------------------------------------
# libmspack through ctypes (the public mspack.h structures, which are stable ABI)


class _MsFolder(ctypes.Structure):
    pass


# Links are plain addresses: walking them with from_address() avoids the keep-alive chains
# that ctypes pointers build (which made a 20,000-file walk quadratic).
_MsFolder._fields_ = [
    ("next", ctypes.c_void_p),
    ("comp_type", ctypes.c_int),
    ("num_blocks", ctypes.c_uint),
]


class _MsFile(ctypes.Structure):
    pass


_MsFile._fields_ = [
    ("next", ctypes.c_void_p),
    ("filename", ctypes.c_char_p),
    ("length", ctypes.c_uint),
    ("attribs", ctypes.c_int),
    ("time_h", ctypes.c_ubyte),
    ("time_m", ctypes.c_ubyte),
    ("time_s", ctypes.c_ubyte),
    ("date_d", ctypes.c_ubyte),
    ("date_m", ctypes.c_ubyte),
    ("date_y", ctypes.c_int),
    ("folder", ctypes.c_void_p),
    ("offset", ctypes.c_uint),
]


class _MsCabinet(ctypes.Structure):
    pass


_MsCabinet._fields_ = [
    ("next", ctypes.POINTER(_MsCabinet)),
    ("filename", ctypes.c_char_p),
    ("base_offset", ctypes.c_int64),  # off_t; checked with mspack_sys_selftest_internal
    ("length", ctypes.c_uint),
    ("prevcab", ctypes.POINTER(_MsCabinet)),
    ("nextcab", ctypes.POINTER(_MsCabinet)),
    ("prevname", ctypes.c_char_p),
    ("nextname", ctypes.c_char_p),
    ("previnfo", ctypes.c_char_p),
    ("nextinfo", ctypes.c_char_p),
    ("files", ctypes.c_void_p),
    ("folders", ctypes.c_void_p),
    ("set_id", ctypes.c_ushort),
    ("set_index", ctypes.c_ushort),
    ("header_resv", ctypes.c_ushort),
    ("flags", ctypes.c_int),
]


class _MsDecompressor(ctypes.Structure):
    pass


_OPEN = ctypes.CFUNCTYPE(
    ctypes.POINTER(_MsCabinet), ctypes.POINTER(_MsDecompressor), ctypes.c_char_p
)
_CLOSE = ctypes.CFUNCTYPE(None, ctypes.POINTER(_MsDecompressor), ctypes.POINTER(_MsCabinet))
_EXTRACT = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(_MsDecompressor), ctypes.c_void_p, ctypes.c_char_p
)
_SET_PARAM = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(_MsDecompressor), ctypes.c_int, ctypes.c_int
)
_LAST_ERROR = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_MsDecompressor))

_MsDecompressor._fields_ = [
    ("open", _OPEN),
    ("close", _CLOSE),
    ("search", ctypes.c_void_p),
    ("append", ctypes.c_void_p),
    ("prepend", ctypes.c_void_p),
    ("extract", _EXTRACT),
    ("set_param", _SET_PARAM),
    ("last_error", _LAST_ERROR),
]

_ERR_OPEN = 2
_ERR_WRITE = 4
_MSPACK_ERRORS = {
    1: "bad arguments",
    2: "cannot open",
    3: "truncated (read past the end of the file)",
    4: "write failed",
    5: "truncated (seek past the end of the file)",
    6: "out of memory",
    7: "not a cabinet (no MSCF signature)",
    8: "corrupt cabinet structure",
    9: "data block checksum mismatch",
    10: "compression error",
    11: "corrupt or missing compressed data",
}

# None: decide on first use; tests set False to exercise the pylibmspack fallback.
_USE_LIBMSPACK_DIRECT: bool | None = None
_mspack_lib: ctypes.CDLL | None = None
_mspack_probed = False
_mspack_lock = threading.Lock()


def _load_libmspack() -> ctypes.CDLL | None:
    """libmspack as pylibmspack loaded it, else a system copy; None if neither is usable."""
    with _mspack_lock:
        return _probe_libmspack()


def _probe_libmspack() -> ctypes.CDLL | None:
    global _mspack_lib, _mspack_probed
    if _mspack_probed:
        return _mspack_lib
    candidates: list[str] = []
    try:
        from pylibmspack import _cab

        # dlsym on the extension's handle also searches the libraries it links against,
        # so this finds the bundled libmspack wherever the wheel put it.
        candidates.append(_cab.__file__)
    except (ImportError, AttributeError):
        pass
    system = ctypes.util.find_library("mspack")
    if system:
        candidates.append(system)
    for candidate in candidates:
        try:
            lib = ctypes.CDLL(candidate)
            create = lib.mspack_create_cab_decompressor
            destroy = lib.mspack_destroy_cab_decompressor
            selftest = lib.mspack_sys_selftest_internal
        except (OSError, AttributeError):
            continue
        selftest.argtypes = [ctypes.c_int]
        selftest.restype = ctypes.c_int
        if selftest(ctypes.sizeof(ctypes.c_int64)) != 0:
            continue  # a 32-bit off_t build: our structure layout would be wrong
        create.argtypes = [ctypes.c_void_p]
        create.restype = ctypes.POINTER(_MsDecompressor)
        destroy.argtypes = [ctypes.POINTER(_MsDecompressor)]
        destroy.restype = None
        _quiet_system(lib)
        _mspack_lib = lib
        break
    _mspack_probed = True
    return _mspack_lib


# libmspack's default I/O system prints warnings ("cabinet version is not 1.3") straight
# to stderr, which would land in the daemon's journal. Use a copy of it whose `message`
# does nothing; our own errors say what went wrong.
_MESSAGE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_char_p)
_silent_message = _MESSAGE(lambda _file, _fmt: None)
_SYSTEM_SLOTS = 11  # struct mspack_system: ten function pointers and null_ptr
_SYSTEM_MESSAGE_SLOT = 6
_quiet_system_struct: ctypes.Array[ctypes.c_void_p] | None = None


def _quiet_system(lib: ctypes.CDLL) -> None:
    global _quiet_system_struct
    try:
        default = ctypes.c_void_p.in_dll(lib, "mspack_default_system").value
    except ValueError:
        return
    if not default:
        return
    system = (ctypes.c_void_p * _SYSTEM_SLOTS).from_buffer_copy(
        (ctypes.c_void_p * _SYSTEM_SLOTS).from_address(default)
    )
    system[_SYSTEM_MESSAGE_SLOT] = ctypes.cast(_silent_message, ctypes.c_void_p).value
    _quiet_system_struct = system


def _system_pointer() -> int | None:
    if _quiet_system_struct is None:
        return None
    return ctypes.addressof(_quiet_system_struct)


# A member's stored date and time: year, month, day, hour, minute, second.
DosTime = tuple[int, int, int, int, int, int]


@dataclass
class _Member:
    index: int  # position in the cabinet's file list
    name: str
    path: str
    size: int
    folder: int
    offset: int
    comp: int
    when: DosTime
    handle: object  # backend's way to name the member


def _cab_error(where: str, err: int) -> CabError:
    return CabError(f"{where}: {_MSPACK_ERRORS.get(err, f'libmspack error {err}')}")


def _fallback_error(where: str, exc: Exception) -> CabError:
    """pylibmspack only says "libmspack error N": translate N like the direct reader does."""
    found = re.search(r"libmspack error (-?\d+)", str(exc))
    if found:
        return _cab_error(where, int(found.group(1)))
    return CabError(f"{where}: {exc}")


class _DirectReader:
    """One libmspack decompressor and one open cabinet for the whole extraction."""

    def __init__(self, lib: ctypes.CDLL, path: bytes, display: str) -> None:
        self._lib = lib
        # libmspack keeps this pointer (not a copy) and reopens it per folder: keep it alive.
        self._path = ctypes.create_string_buffer(path)
        self._display = display
        self._decomp = lib.mspack_create_cab_decompressor(_system_pointer())
        if not self._decomp:
            raise MemoryError("libmspack could not create a CAB decompressor")
        self._cab: ctypes._Pointer[_MsCabinet] | None = None
        try:
            ops = self._decomp.contents
            self._extract_fn = ops.extract
            cab = ops.open(self._decomp, ctypes.cast(self._path, ctypes.c_char_p))
            if not cab:
                raise _cab_error(f"{display}: cannot read cabinet", ops.last_error(self._decomp))
            self._cab = cab
            self.flags = cab.contents.flags
            self.members = self._walk(cab.contents)
        except BaseException:
            self.close()
            raise

    def _walk(self, cab: _MsCabinet) -> list[_Member]:
        folders: dict[int, tuple[int, int]] = {}
        addr = cab.folders
        while addr and len(folders) <= CAB_MAX_FILES:
            fol = _MsFolder.from_address(addr)
            folders[addr] = (len(folders), fol.comp_type)
            addr = fol.next
        members: list[_Member] = []
        addr = cab.files
        while addr:
            if len(members) >= CAB_MAX_FILES:
                raise CabError(f"{self._display}: more than {CAB_MAX_FILES} files")
            f = _MsFile.from_address(addr)
            fidx, comp = folders.get(f.folder or 0, (-1, -1))
            members.append(
                _Member(
                    index=len(members),
                    name=_decode_name(f.filename or b"", f.attribs),
                    path="",
                    size=f.length,
                    folder=fidx,
                    offset=f.offset,
                    comp=comp,
                    when=(f.date_y, f.date_m, f.date_d, f.time_h, f.time_m, f.time_s),
                    handle=addr,
                )
            )
            addr = f.next
        return members

    def extract(self, member: _Member, out: Path) -> None:
        err = self._extract_fn(self._decomp, member.handle, os.fsencode(out))
        if err in (_ERR_OPEN, _ERR_WRITE):
            raise OSError(errno.EIO, f"cannot write {out} ({_MSPACK_ERRORS[err]})")
        if err:
            raise _cab_error(f"{self._display}: cannot extract {member.name!r}", err)

    def close(self) -> None:
        if self._decomp:
            if self._cab:
                self._decomp.contents.close(self._decomp, self._cab)
                self._cab = None
            self._lib.mspack_destroy_cab_decompressor(self._decomp)
            self._decomp = None


class _PylibmspackReader:
    """Fallback through pylibmspack's public API: one cabinet reopen per member."""

    def __init__(self, path: str, display: str) -> None:
        import pylibmspack

        self._archive = pylibmspack.CabArchive(path)
        self._display = display
        try:
            info = self._archive.info()
            files = self._archive.files()
        except pylibmspack.MspackError as exc:
            raise _fallback_error(f"{display}: cannot read cabinet", exc) from None
        self.flags = int(info.get("flags", 0))
        comp_codes = {v.lower(): k for k, v in _COMPRESSION.items()}
        self.members = []
        for i, f in enumerate(files):
            name = f.get("name") or ""
            if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
                raw = name.encode("utf-8", "surrogateescape")
                name = _decode_name(raw, int(f.get("attrs", 0)))
            self.members.append(
                _Member(
                    index=i,
                    name=name,
                    path="",
                    size=int(f["size"]),
                    folder=int(f.get("folder_index", -1)),
                    offset=int(f.get("offset", 0)),
                    comp=comp_codes.get(str(f.get("compression", "")).lower(), -1),
                    when=_dos_time(f),
                    handle=f.get("name"),
                )
            )

    def extract(self, member: _Member, out: Path) -> None:
        import pylibmspack

        root = out.parents[len(Path(member.path).parts) - 1]
        try:
            written = self._archive.extract(
                str(member.handle), str(root), safe=True, max_size=max(member.size, 1)
            )
        except pylibmspack.MspackError as exc:
            raise _fallback_error(f"{self._display}: cannot extract {member.name!r}", exc) from None
        if Path(written) != out:
            raise CabPathError(f"{self._display}: {member.name!r} was written to {written}")

    def close(self) -> None:
        pass


_WHEN_KEYS = ("date_y", "date_m", "date_d", "time_h", "time_m", "time_s")


def _dos_time(f: Mapping[str, Any]) -> DosTime:
    """A member's stored date and time from pylibmspack's file dict (0 where a key is missing:
    an impossible date, which `_set_mtime` leaves alone)."""
    year, month, day, hour, minute, second = (int(f.get(k, 0)) for k in _WHEN_KEYS)
    return (year, month, day, hour, minute, second)


_Reader = _DirectReader | _PylibmspackReader


@contextlib.contextmanager
def _open_cab(path: Path) -> Iterator[_Reader]:
    """Open the cabinet without following a link; yields a validated reader."""
    display = str(path)
    try:
        fd = open_nofollow(path, READ)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CabPathError(f"{display}: is a symbolic link; not followed") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CabError(f"{display}: not a regular file")
        # Reading through our descriptor pins the file we checked, even if the name is
        # swapped afterwards.
        fd_path = f"/proc/self/fd/{fd}"
        target = fd_path if os.path.exists(fd_path) else os.fspath(path)
        use_direct = _USE_LIBMSPACK_DIRECT
        lib = _load_libmspack() if use_direct is not False else None
        reader: _Reader
        if lib is not None:
            reader = _DirectReader(lib, os.fsencode(target), display)
        else:
            reader = _PylibmspackReader(target, display)
        try:
            _validate(reader, display)
            yield reader
        finally:
            reader.close()
    finally:
        os.close(fd)


def _validate(reader: _Reader, display: str) -> None:
    if reader.flags & (_HDR_PREV_CABINET | _HDR_NEXT_CABINET):
        raise CabError(f"{display}: part of a multi-cabinet set; only single cabinets are read")
    for m in reader.members:
        m.path = normalize_member_name(m.name)
        if m.folder < 0:
            raise CabError(f"{display}: entry {m.name!r} has no valid folder")
        method = m.comp & 0x0F
        if m.comp < 0 or method not in _COMPRESSION:
            raise CabError(f"{display}: entry {m.name!r} uses unknown compression {m.comp:#x}")
    _check_unique_paths(m.path for m in reader.members)
    # Members of a folder must not overlap: libmspack would restart the folder's
    # decompression for each overlap, which a hostile cabinet could repeat to burn CPU.
    by_folder: dict[int, list[_Member]] = {}
    for m in reader.members:
        if m.size:
            by_folder.setdefault(m.folder, []).append(m)
    for members in by_folder.values():
        members.sort(key=lambda m: (m.offset, m.size))
        end = 0
        for m in members:
            if m.offset < end:
                raise CabError(f"{display}: entry {m.name!r} overlaps another entry's data")
            end = m.offset + m.size
            if end > CAB_MAX_DATA:
                raise CabError(f"{display}: entry {m.name!r} lies beyond what a folder can hold")


def _check_limits(members: list[_Member], limits: ExtractLimits, display: str) -> int:
    if len(members) > limits.max_files:
        raise CabLimitError(
            f"{display}: {len(members)} files exceed the limit of {limits.max_files}"
        )
    total = 0
    spans: dict[int, int] = {}
    for m in members:
        if m.size > limits.max_file_size:
            raise CabLimitError(
                f"{display}: {m.name!r} declares {m.size} bytes, "
                f"over the per-file limit of {limits.max_file_size}"
            )
        total += m.size
        if m.size:
            spans[m.folder] = max(spans.get(m.folder, 0), m.offset + m.size)
    if total > limits.max_total_size:
        raise CabLimitError(
            f"{display}: declares {total} bytes in all, over the limit of {limits.max_total_size}"
        )
    decompressed = sum(spans.values())
    if decompressed > limits.max_total_size:
        raise CabLimitError(
            f"{display}: its folders decompress to {decompressed} bytes, "
            f"over the limit of {limits.max_total_size}"
        )
    return total


# ---------------------------------------------------------------------------------------
# Filesystem helpers


def _set_mtime(path: Path, when: DosTime) -> None:
    try:
        stamp = dt.datetime(*when, tzinfo=dt.UTC).timestamp()
    except (ValueError, TypeError, OverflowError):
        return  # an impossible date in the header: keep the extraction time
    os.utime(path, (stamp, stamp), follow_symlinks=False)


def _extract_tree(
    reader: _Reader,
    root: Path,
    on_file: Callable[[CabEntry], None] | None,
) -> list[CabEntry]:
    members = reader.members
    made: dict[str, Path] = {}
    for m in members:
        parts = m.path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            if folder not in made:
                made[folder] = root / folder
                os.mkdir(made[folder], 0o755)
    entries = [CabEntry(m.name, m.path, m.size) for m in members]
    written: list[Path] = []
    # Folder and offset order lets libmspack carry on decoding instead of restarting.
    for m in sorted(members, key=lambda m: (m.folder, m.offset, m.size, m.index)):
        out = root / m.path
        reader.extract(m, out)
        written.append(out)
        st = os.lstat(out)
        if not stat.S_ISREG(st.st_mode) or st.st_size != m.size:
            raise CabError(f"{m.name!r}: extracted {st.st_size} bytes, header says {m.size}")
        _set_mtime(out, m.when)
        start_writeback(out)
        if on_file is not None:
            on_file(entries[m.index])
    make_durable(root, written, list(made.values()))
    return entries


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OSError(
            errno.ENOSPC, f"extraction needs {needed} bytes, {free} free", os.fspath(folder)
        )


# ---------------------------------------------------------------------------------------
# Public API


def list_cab(path: Path) -> list[CabEntry]:
    """The cabinet's entries in stored order; CabError/CabPathError if it is unusable."""
    with _open_cab(Path(path)) as reader:
        return [CabEntry(m.name, m.path, m.size) for m in reader.members]


def extract_cab(
    path: Path,
    dest: Path,
    *,
    limits: ExtractLimits = _DEFAULT_LIMITS,
    on_file: Callable[[CabEntry], None] | None = None,
) -> list[CabEntry]:
    """Extract the whole cabinet as the folder `dest`, replacing any previous `dest`.

    The tree is built in a temporary sibling (cmlab.core.fs.make_tmp_dir), fsynced, and renamed to
    `dest` only when complete (an existing `dest` is renamed aside first and removed
    after). On any failure the temporary folder is removed and `dest` is untouched.
    `on_file` is called for each entry right after it is written. Raises CabError,
    CabLimitError or CabPathError for bad cabinets, OSError for filesystem trouble.
    """
    path, dest = Path(path), Path(dest)
    with _open_cab(path) as reader:
        total = _check_limits(reader.members, limits, str(path))
        dest.parent.mkdir(parents=True, exist_ok=True)
        _check_space(dest.parent, total)
        tmp = make_tmp_dir(dest, "extract")
        try:
            entries = _extract_tree(reader, tmp, on_file)
            os.chmod(tmp, 0o755)
            put_in_place(tmp, dest)
            fsync_dir(dest.parent)
        except BaseException:
            remove_path(tmp)
            raise
    return entries


def extract_cab_into(
    path: Path,
    dest_dir: Path,
    *,
    limits: ExtractLimits = _DEFAULT_LIMITS,
    on_file: Callable[[CabEntry], None] | None = None,
) -> list[CabEntry]:
    """Extract into an existing folder that holds other content (e.g. CMUStaging/).

    Everything is extracted to a temporary folder inside `dest_dir` first; then each
    top-level entry of the cabinet (file or folder) is renamed into `dest_dir`, replacing
    an existing entry of the same name. Siblings not in the cabinet are left alone.
    """
    path, dest_dir = Path(path), Path(dest_dir)
    with _open_cab(path) as reader:
        total = _check_limits(reader.members, limits, str(path))
        dest_dir.mkdir(parents=True, exist_ok=True)
        _check_space(dest_dir, total)
        tmp = make_tmp_dir(dest_dir / "cab", "extract")
        try:
            entries = _extract_tree(reader, tmp, on_file)
            tops: dict[str, None] = {}
            for entry in entries:
                tops.setdefault(entry.path.split("/", 1)[0])
            for top in tops:
                put_in_place(tmp / top, dest_dir / top)
            fsync_dir(dest_dir)
        finally:
            remove_path(tmp)
    return entries


def _source_date() -> dt.datetime:
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    if epoch.isdigit():
        with contextlib.suppress(ValueError, OverflowError, OSError):
            when = dt.datetime.fromtimestamp(int(epoch), dt.UTC).replace(tzinfo=None)
            if 1980 <= when.year <= 2107:
                return when
    return DEFAULT_CAB_MTIME


def _read_source(src: Path) -> bytes:
    fd = open_nofollow(src, READ)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise CabError(f"{src}: not a regular file")
        return f.read()


def create_cab(
    files: Mapping[str, Path | bytes],
    dst: Path,
    *,
    mtime: dt.datetime | None = None,
) -> None:
    """Write an MSZIP cabinet of `files` (name -> content or source file) to `dst`.

    Names may use "/" or "\\" and are stored with "\\". Every member gets the same
    timestamp (`mtime`, else $SOURCE_DATE_EPOCH, else DEFAULT_CAB_MTIME) so that equal
    inputs give byte-identical cabinets. Written to a temporary sibling, fsynced and
    renamed over `dst`. cabarchive builds the whole cabinet in memory: expect peak memory
    of about three times the input size (measured: 152 MB for 50 MB of incompressible input;
    fine for the payload builder).
    """
    from cabarchive import CabArchive, CabFile

    dst = Path(dst)
    if not files:
        raise CabError(f"{dst}: a cabinet needs at least one file")
    if len(files) > CAB_MAX_FILES:
        raise CabLimitError(f"{dst}: {len(files)} files; a cabinet holds at most {CAB_MAX_FILES}")
    paths = {name: normalize_member_name(name) for name in files}
    _check_unique_paths(paths.values())
    when = mtime or _source_date()
    if not 1980 <= when.year <= 2107:
        raise CabError(f"{dst}: {when} cannot be stored as a CAB (DOS) timestamp")
    archive = CabArchive()
    total = 0
    for name, source in files.items():
        data = source if isinstance(source, bytes | bytearray) else _read_source(Path(source))
        total += len(data)
        if total > CAB_MAX_DATA:
            raise CabLimitError(f"{dst}: more than {CAB_MAX_DATA} bytes for one cabinet folder")
        archive[paths[name].replace("/", "\\")] = CabFile(bytes(data), mtime=when)
    try:
        blob = archive.save(compress=True)
    except Exception as exc:  # cabarchive raises assorted errors on inputs it cannot store
        raise CabError(f"{dst}: cannot build cabinet: {exc}") from exc
    del archive
    write_atomic(dst, blob)
