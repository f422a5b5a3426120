"""The lab's sample binaries and redists (docs/formats.md, "Sample binaries"): stand-ins for
Microsoft's files that the sample builder generates and the install stages read back, to know
which build a site's files are.

A sample binary is a text header, then noise up to its declared size:

    cmlab-build: 9141
    cmlab-version: 5.00.9141.1000
    cmlab sample binary cmupdate.exe build 9141

    <pseudo-random bytes>

A sample redist is `cmlab sample redist <name>: <description>`, a blank line, then noise. The
noise is SHA-256 in counter mode seeded by the name (and, for a binary, the build), so a build
is byte-identical everywhere and a redist is the same file in every update that ships it.

Interface: `sample_binary(name, build, version, size) -> bytes`,
`sample_redist(name, description, size) -> bytes` (BadInput when `size` is smaller than
the header), `read_sample_header(path) -> dict[str, str]` (the `cmlab-<key>: <value>` lines;
{} for any other file), `sample_build_number(path) -> int` (BadInput when the file has no
`cmlab-build:` line).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cmlab.core.errors import BadInput

__all__ = ["read_sample_header", "sample_binary", "sample_build_number", "sample_redist"]


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
        raise BadInput(f"sample binary {name}: size {size} is smaller than its header")
    return header + _stream(f"cmlab:binary:{name}:{build}", size - len(header))


def sample_redist(name: str, description: str, size: int) -> bytes:
    # Seeded by the name alone: a redist is the same file in every update that ships it.
    header = f"cmlab sample redist {name}: {description}\n\n".encode()
    if size < len(header):
        raise BadInput(f"sample redist {name}: size {size} is smaller than its header")
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
        raise BadInput(f"{path}: not a cmlab sample binary (no 'cmlab-build:' line)")
    return int(value)
