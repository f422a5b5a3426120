"""update.map: the list of files an update replaces or adds, with their sizes and hashes.

The grammar (docs/formats.md, "update.map") is the guide's example made strict:

    BEGIN_COMPONENT_FILELIST
        <CONFIGURATION_MANAGER_UPDATE>
        <268436008>
        BEGIN_DIRECTORY
            <bin\\x64>
            <5><AMD64><>
            FILEEX <cmupdate.exe><1><26699848><SHA256><6953...63AC>
        END_DIRECTORY
        UNIT <SMS>
    END_COMPONENT_FILELIST

Parsing is one pass over the lines with no backtracking, so hostile input (huge, binary)
costs time linear in its size and fails at its first bad line with UpdateMapError.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from cmlab.core.errors import CabPathError, UpdateMapError
from cmlab.site.cab import normalize_member_name

__all__ = [
    "HASH_HEX_LENGTHS",
    "MAX_MAP_CHARS",
    "MapComponent",
    "MapDirectory",
    "MapFile",
    "UpdateMap",
    "decode_update_map",
    "parse_update_map",
    "render_update_map",
]

# Known algorithms and the length of their hex digests.
HASH_HEX_LENGTHS = {"SHA256": 64, "SHA1": 40, "SHA384": 96, "SHA512": 128, "MD5": 32}
# A real map lists a few thousand files (well under 1 MB); refuse absurd input up front.
MAX_MAP_CHARS = 64 * 1024 * 1024
_MAX_NUMBER_DIGITS = 19  # fits a signed 64-bit integer; also keeps int() cheap
_HEX = frozenset("0123456789abcdefABCDEF")


@dataclass(frozen=True)
class MapFile:
    name: str
    flag: int
    size: int
    algorithm: str
    hash: str


@dataclass(frozen=True)
class MapDirectory:
    path: str  # as written (backslashes); "" is the component's root
    attrs: tuple[str, ...]
    files: tuple[MapFile, ...]


@dataclass(frozen=True)
class MapComponent:
    name: str
    id: int
    directories: tuple[MapDirectory, ...]
    units: tuple[str, ...]


@dataclass(frozen=True)
class UpdateMap:
    components: tuple[MapComponent, ...]

    def component(self, name: str) -> MapComponent | None:
        for component in self.components:
            if component.name == name:
                return component
        return None


def decode_update_map(data: bytes) -> str:
    """Text of an update.map file: UTF-8 (with or without BOM) or BOM-marked UTF-16."""
    try:
        if data.startswith(codecs.BOM_UTF8):
            return data[len(codecs.BOM_UTF8) :].decode("utf-8")
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return data.decode("utf-16")
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UpdateMapError(f"update.map is not valid UTF-8 or UTF-16 text: {exc}") from None


class _Lines:
    """The meaningful lines, numbered from 1; blank lines are skipped."""

    def __init__(self, text: str) -> None:
        self._lines = text.split("\n")
        self._i = 0

    def next(self) -> tuple[int, str] | None:
        while self._i < len(self._lines):
            self._i += 1
            line = self._lines[self._i - 1].strip(" \t\r")
            if line:
                return self._i, line
        return None

    def expect(self, what: str) -> tuple[int, str]:
        found = self.next()
        if found is None:
            raise UpdateMapError(f"update.map: unexpected end of file, expected {what}")
        return found


def _fail(lineno: int, message: str) -> UpdateMapError:
    return UpdateMapError(f"update.map line {lineno}: {message}")


def _fields(lineno: int, text: str, what: str) -> list[str]:
    """Split `<a><b><c>` into its fields; no field may contain `<` or `>`."""
    if not (text.startswith("<") and text.endswith(">")) or len(text) < 2:
        raise _fail(lineno, f"expected {what} as <...>, found {text[:60]!r}")
    fields = text[1:-1].split("><")
    for field in fields:
        if "<" in field or ">" in field:
            raise _fail(lineno, f"malformed {what}: {text[:60]!r}")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in field):
            raise _fail(lineno, f"control character in {what}")
    return fields


def _number(lineno: int, text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_NUMBER_DIGITS:
        raise _fail(lineno, f"{what} must be a non-negative decimal number, found {text[:40]!r}")
    return int(text)


def _name(lineno: int, text: str, what: str) -> str:
    if not text:
        raise _fail(lineno, f"empty {what}")
    return text


def _parse_file(lineno: int, line: str) -> MapFile:
    rest = line[len("FILEEX") :]
    if not rest[:1].isspace():
        raise _fail(lineno, "expected FILEEX <name><flag><size><algorithm><hash>")
    fields = _fields(lineno, rest.strip(), "FILEEX fields")
    if len(fields) != 5:
        raise _fail(
            lineno, f"FILEEX needs 5 fields (name, flag, size, algorithm, hash), has {len(fields)}"
        )
    name, flag, size, algorithm, digest = fields
    try:
        if "/" in name or "\\" in name:
            raise CabPathError("must be a plain file name, not a path")
        normalize_member_name(name)
    except CabPathError as exc:
        raise _fail(lineno, f"bad file name {name!r}: {exc}") from None
    expected = HASH_HEX_LENGTHS.get(algorithm.upper())
    if expected is None:
        raise _fail(lineno, f"unknown hash algorithm {algorithm!r}")
    if len(digest) != expected or not set(digest) <= _HEX:
        raise _fail(
            lineno, f"{algorithm} hash must be {expected} hex digits, found {digest[:80]!r}"
        )
    return MapFile(
        name=name,
        flag=_number(lineno, flag, "FILEEX flag"),
        size=_number(lineno, size, "FILEEX size"),
        algorithm=algorithm.upper(),
        hash=digest.upper(),
    )


def _parse_directory(lines: _Lines, start: int) -> MapDirectory:
    lineno, text = lines.expect("the directory path <...>")
    (path,) = _single(lineno, text, "directory path")
    if path:
        try:
            normalize_member_name(path)
        except CabPathError as exc:
            raise _fail(lineno, f"bad directory path {path!r}: {exc}") from None
    lineno, text = lines.expect("the directory attributes <...><...>")
    attrs = tuple(_fields(lineno, text, "directory attributes"))
    files: list[MapFile] = []
    seen: set[str] = set()
    while True:
        lineno, line = lines.expect(f"END_DIRECTORY for the directory opened at line {start}")
        if line == "END_DIRECTORY":
            return MapDirectory(path=path, attrs=attrs, files=tuple(files))
        if line.startswith("FILEEX"):
            entry = _parse_file(lineno, line)
            if entry.name.lower() in seen:
                raise _fail(lineno, f"file {entry.name!r} listed twice in {path!r}")
            seen.add(entry.name.lower())
            files.append(entry)
            continue
        raise _fail(lineno, f"expected FILEEX or END_DIRECTORY, found {line[:60]!r}")


def _single(lineno: int, text: str, what: str) -> tuple[str]:
    fields = _fields(lineno, text, what)
    if len(fields) != 1:
        raise _fail(lineno, f"expected a single <{what}>, found {len(fields)} fields")
    return (fields[0],)


def _parse_component(lines: _Lines, start: int) -> MapComponent:
    lineno, text = lines.expect("the component name <...>")
    name = _name(lineno, _single(lineno, text, "component name")[0], "component name")
    lineno, text = lines.expect("the component id <...>")
    ident = _number(lineno, _single(lineno, text, "component id")[0], "component id")
    directories: list[MapDirectory] = []
    units: list[str] = []
    dirs_seen: set[str] = set()
    while True:
        lineno, line = lines.expect(f"END_COMPONENT_FILELIST for the component at line {start}")
        if line == "END_COMPONENT_FILELIST":
            return MapComponent(name, ident, tuple(directories), tuple(units))
        if line == "BEGIN_DIRECTORY":
            directory = _parse_directory(lines, lineno)
            key = directory.path.lower()
            if key in dirs_seen:
                raise _fail(lineno, f"directory {directory.path!r} listed twice in {name}")
            dirs_seen.add(key)
            directories.append(directory)
            continue
        if line.startswith("UNIT") and line[4:5].isspace():
            (unit,) = _single(lineno, line[4:].strip(), "unit name")
            units.append(_name(lineno, unit, "unit name"))
            continue
        raise _fail(
            lineno, f"expected BEGIN_DIRECTORY, UNIT or END_COMPONENT_FILELIST, found {line[:60]!r}"
        )


def parse_update_map(text: str) -> UpdateMap:
    """Parse update.map text; UpdateMapError (with the line number) on any deviation."""
    if not isinstance(text, str):
        raise UpdateMapError("update.map must be given as text; use decode_update_map()")
    if len(text) > MAX_MAP_CHARS:
        raise UpdateMapError(f"update.map is larger than {MAX_MAP_CHARS} characters")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _Lines(text)
    components: list[MapComponent] = []
    names: set[str] = set()
    while (found := lines.next()) is not None:
        lineno, line = found
        if line != "BEGIN_COMPONENT_FILELIST":
            raise _fail(lineno, f"expected BEGIN_COMPONENT_FILELIST, found {line[:60]!r}")
        component = _parse_component(lines, lineno)
        if component.name in names:
            raise _fail(lineno, f"component {component.name!r} appears twice")
        names.add(component.name)
        components.append(component)
    return UpdateMap(tuple(components))


def render_update_map(m: UpdateMap) -> str:
    """The text form, in the guide's layout (4-space indents, LF line ends).

    parse_update_map(render_update_map(m)) == m for any map whose hashes and algorithm
    names are upper-case (the parser normalises them so).
    """
    out: list[str] = []
    for component in m.components:
        out.append("BEGIN_COMPONENT_FILELIST")
        out.append(f"    <{component.name}>")
        out.append(f"    <{component.id}>")
        for directory in component.directories:
            out.append("    BEGIN_DIRECTORY")
            out.append(f"        <{directory.path}>")
            out.append("        " + "".join(f"<{a}>" for a in directory.attrs))
            for f in directory.files:
                out.append(
                    f"        FILEEX <{f.name}><{f.flag}><{f.size}><{f.algorithm}><{f.hash}>"
                )
            out.append("    END_DIRECTORY")
        for unit in component.units:
            out.append(f"    UNIT <{unit}>")
        out.append("END_COMPONENT_FILELIST")
    text = "\n".join(out) + "\n"
    # What we write must be what we accept: catches e.g. a '<' in a name before shipping.
    parse_update_map(text)
    return text
