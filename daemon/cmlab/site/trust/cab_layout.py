"""Byte layout of an Authenticode-signed Microsoft cabinet (CAB) file.

A signed CAB carries its PKCS#7 blob after the cabinet data; a 20-byte per-cabinet
reserve in the header (cbCFHeader = 20) holds the blob's offset and length. The
Authenticode digest skips the header fields a signer has to rewrite after hashing. The
exact byte ranges below follow osslsigncode's cab.c so that cmlab and osslsigncode
agree on every digest:

    offset  size  field                                   hashed
    0       4     signature "MSCF"                        yes
    4       4     reserved1                               no (must be 0)
    8       26    cbCabinet .. setID                      yes
    34      2     iCabinet                                no
    36      4     cbCFHeader(2) cbCFFolder(1) cbCFData(1) no
    40      4     abReserve magic 0x00100000              no
    44      4     signature offset                        no
    48      4     signature length (DER + zero padding)   no
    52      4     zero                                    no
    56      4     zero                                    yes
    60      ...   optional cabinet names, CFFOLDER table  yes
    coffFiles ... CFFILE entries and CFDATA blocks        yes, up to the signature offset

The unhashed fields are pinned to their only legitimate values here, so that flipping any
byte outside the signature blob is caught (osslsigncode itself leaves iCabinet and bytes
52..55 unchecked).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cmlab.core.errors import CabError, SignatureFormatError

CHUNK_SIZE = 1 << 20
CFHEADER_SIZE = 36
SIGNED_HEADER_SIZE = 60
SIGNATURE_RESERVE_SIZE = 20
# Adding the reserve inserts cbCFHeader/cbCFFolder/cbCFData (4 bytes) and abReserve (20).
RESERVE_GROWTH = 4 + SIGNATURE_RESERVE_SIZE
RESERVE_MAGIC = 0x00100000
SIGNATURE_LENGTH_OFFSET = 48
# A real Authenticode blob is a few KiB (tens with timestamps and nested signatures); the
# cap keeps a hostile length field from making the verifier allocate gigabytes.
MAX_SIGNATURE_SIZE = 16 << 20

FLAG_PREV_CABINET = 0x0001
FLAG_NEXT_CABINET = 0x0002
FLAG_RESERVE_PRESENT = 0x0004

_MAX_NAME = 255
_U32_MAX = 0xFFFFFFFF
_FIXED_HEADER = struct.Struct("<4sIIIIIBBHHHHH")


class NotACabError(CabError):
    """The bytes are not a Microsoft cabinet file (bad magic, truncated or corrupt header)."""


@dataclass(frozen=True)
class CabHeader:
    """The CFHEADER and CFFOLDER table of a cabinet, as read from disk."""

    file_size: int
    cb_cabinet: int
    coff_files: int
    folder_count: int
    file_count: int
    flags: int
    set_id: int
    cabinet_index: int
    reserve_header_size: int
    reserve_folder_size: int
    reserve_data_size: int
    reserve: bytes
    names_start: int
    folders_start: int
    raw: bytes
    """Every header byte from offset 0 to the end of the CFFOLDER table."""

    @property
    def folders_end(self) -> int:
        return len(self.raw)

    @property
    def has_signature_reserve(self) -> bool:
        return (
            bool(self.flags & FLAG_RESERVE_PRESENT)
            and self.reserve_header_size == SIGNATURE_RESERVE_SIZE
        )

    def folder_data_offsets(self) -> list[int]:
        """coffCabStart of every folder: where its first CFDATA block starts."""
        step = 8 + self.reserve_folder_size
        return [
            struct.unpack_from("<I", self.raw, self.folders_start + i * step)[0]
            for i in range(self.folder_count)
        ]


@dataclass(frozen=True)
class SignatureLocation:
    offset: int
    length: int


@dataclass(frozen=True)
class ReservedLayout:
    """How to turn a source cabinet into a signed one.

    The signed file is `header` followed by source bytes [body_start, body_end) and then the
    signature blob at `signature_offset`; `header` already points at that offset and has a
    zero signature length, to be patched at SIGNATURE_LENGTH_OFFSET once the blob exists.
    """

    header: bytes
    body_start: int
    body_end: int

    @property
    def signature_offset(self) -> int:
        return len(self.header) + self.body_end - self.body_start


def _read_exact(f: BinaryIO, offset: int, size: int, file_size: int, what: str) -> bytes:
    if offset + size > file_size:
        raise NotACabError(f"truncated CAB: the {what} runs past the end of the file")
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise NotACabError(f"truncated CAB: short read of the {what}")
    return data


def read_header(f: BinaryIO, file_size: int) -> CabHeader:
    """Parse CFHEADER, its optional reserve and names, and the CFFOLDER table.

    Raises NotACabError when the bytes are not a well-formed cabinet header.
    """
    if file_size < CFHEADER_SIZE:
        raise NotACabError(
            f"file is {file_size} bytes, shorter than the {CFHEADER_SIZE}-byte CAB header"
        )
    fixed = _read_exact(f, 0, CFHEADER_SIZE, file_size, "CAB header")
    (
        magic,
        reserved1,
        cb_cabinet,
        _reserved2,
        coff_files,
        _reserved3,
        _minor,
        _major,
        folder_count,
        file_count,
        flags,
        set_id,
        cabinet_index,
    ) = _FIXED_HEADER.unpack(fixed)
    if magic != b"MSCF":
        raise NotACabError("file does not start with the CAB signature 'MSCF'")
    if reserved1 != 0:
        raise NotACabError("CAB header field reserved1 is not zero")

    parts = [fixed]
    pos = CFHEADER_SIZE
    cb_header = cb_folder = cb_data = 0
    reserve = b""
    if flags & FLAG_RESERVE_PRESENT:
        sizes = _read_exact(f, pos, 4, file_size, "reserve sizes")
        cb_header, cb_folder, cb_data = struct.unpack("<HBB", sizes)
        pos += 4
        reserve = _read_exact(f, pos, cb_header, file_size, "header reserve")
        pos += cb_header
        parts += [sizes, reserve]
    names_start = pos
    name_count = 2 * (bool(flags & FLAG_PREV_CABINET) + bool(flags & FLAG_NEXT_CABINET))
    for _ in range(name_count):
        if pos >= file_size:
            raise NotACabError("truncated CAB: the header ends inside the cabinet names")
        window = _read_exact(f, pos, min(_MAX_NAME + 1, file_size - pos), file_size, "name")
        end = window.find(b"\0")
        if end < 0:
            raise NotACabError("CAB header cabinet/disk name is not NUL-terminated")
        parts.append(window[: end + 1])
        pos += end + 1
    folders_start = pos
    folders = _read_exact(f, pos, folder_count * (8 + cb_folder), file_size, "CFFOLDER table")
    parts.append(folders)
    return CabHeader(
        file_size=file_size,
        cb_cabinet=cb_cabinet,
        coff_files=coff_files,
        folder_count=folder_count,
        file_count=file_count,
        flags=flags,
        set_id=set_id,
        cabinet_index=cabinet_index,
        reserve_header_size=cb_header,
        reserve_folder_size=cb_folder,
        reserve_data_size=cb_data,
        reserve=reserve,
        names_start=names_start,
        folders_start=folders_start,
        raw=b"".join(parts),
    )


def locate_signature(header: CabHeader) -> SignatureLocation | None:
    """Where the signature blob is, or None when the cabinet carries no signature.

    Raises SignatureFormatError when the reserve claims a signature but is inconsistent
    (bad magic, pointer beyond the end of the file, trailing bytes after the blob...).
    """
    if not header.has_signature_reserve:
        return None
    if header.reserve_folder_size or header.reserve_data_size:
        raise SignatureFormatError(
            "the CAB has per-folder or per-data reserves, which an Authenticode reserve never has"
        )
    magic, offset, length, pad = struct.unpack_from("<IIII", header.reserve)
    if offset == 0 and length == 0 and magic in (0, RESERVE_MAGIC) and pad == 0:
        return None
    if magic != RESERVE_MAGIC:
        raise SignatureFormatError(
            f"the signature reserve starts with 0x{magic:08X}, not 0x{RESERVE_MAGIC:08X}"
        )
    if pad != 0:
        raise SignatureFormatError("unsigned bytes 52-55 of the signature reserve are not zero")
    if header.cabinet_index != 0 and not header.flags & FLAG_PREV_CABINET:
        raise SignatureFormatError(
            "iCabinet, which the digest does not cover, is not 0 in a first cabinet"
        )
    if offset == 0 or length == 0:
        raise SignatureFormatError(
            f"the signature reserve has offset {offset} and length {length}; both or neither "
            "must be zero"
        )
    if offset >= header.file_size or offset + length > header.file_size:
        raise SignatureFormatError(
            f"the signature ({length} bytes at offset {offset}) extends beyond the end of the "
            f"{header.file_size}-byte file"
        )
    if offset + length != header.file_size:
        raise SignatureFormatError(
            f"{header.file_size - offset - length} bytes follow the signature; a signed CAB "
            "must end with its signature"
        )
    if offset < header.folders_end:
        raise SignatureFormatError("the signature offset points inside the CAB header")
    if length > MAX_SIGNATURE_SIZE:
        raise SignatureFormatError(f"the signature is implausibly large ({length} bytes)")
    return SignatureLocation(offset=offset, length=length)


def hashed_header_parts(raw: bytes) -> Iterator[bytes]:
    """The header byte ranges covered by the digest, for a header with the 20-byte reserve."""
    yield raw[0:4]
    yield raw[8:34]
    yield raw[56:]


def authenticode_digest(f: BinaryIO, header: CabHeader, end: int, algorithm: str) -> bytes:
    """Stream the Authenticode digest of a cabinet whose data ends (and signature starts) at end.

    Raises NotACabError when the header is inconsistent with the file (coffFiles not right
    after the CFFOLDER table, which osslsigncode also refuses).
    """
    if not header.has_signature_reserve:
        raise NotACabError("the CAB has no 20-byte signature reserve to digest")
    if header.coff_files != header.folders_end:
        raise NotACabError(
            f"corrupt CAB header: coffFiles is {header.coff_files} but the CFFOLDER table ends "
            f"at {header.folders_end}"
        )
    if end < header.folders_end or end > header.file_size:
        raise NotACabError("the cabinet data range is outside the file")
    h = hashlib.new(algorithm)
    for part in hashed_header_parts(header.raw):
        h.update(part)
    f.seek(header.folders_end)
    remaining = end - header.folders_end
    while remaining:
        chunk = f.read(min(CHUNK_SIZE, remaining))
        if not chunk:
            raise NotACabError("the file shrank while it was being hashed")
        h.update(chunk)
        remaining -= len(chunk)
    return h.digest()


def plan_reserved_layout(header: CabHeader) -> ReservedLayout:
    """Plan the signed form of a cabinet: add the reserve (or reuse it) and drop any old blob.

    Adding the reserve shifts everything after byte 36 by 24 bytes, so cbCabinet, coffFiles
    and every folder's coffCabStart grow by 24, exactly as osslsigncode does. Raises CabError
    for cabinets that cannot be signed (multi-cabinet sets, foreign reserves).
    """
    if header.flags & (FLAG_PREV_CABINET | FLAG_NEXT_CABINET):
        raise CabError("signing a cabinet that is part of a multi-cabinet set is not supported")
    reserved = bool(header.flags & FLAG_RESERVE_PRESENT)
    if reserved and (
        not header.has_signature_reserve or header.reserve_folder_size or header.reserve_data_size
    ):
        raise CabError("the CAB has a reserve area that is not an Authenticode signature reserve")
    if header.coff_files != header.folders_end:
        raise CabError(
            f"corrupt CAB header: coffFiles is {header.coff_files} but the CFFOLDER table ends "
            f"at {header.folders_end}"
        )
    if reserved:
        try:
            location = locate_signature(header)
        except SignatureFormatError as exc:
            raise CabError(f"cannot replace the existing signature: {exc}") from exc
        body_end = location.offset if location else header.file_size
        raw = bytearray(header.raw)
        struct.pack_into("<I", raw, 8, body_end)
        struct.pack_into("<HH", raw, 34, 0, SIGNATURE_RESERVE_SIZE)
        struct.pack_into("<IIIII", raw, 40, RESERVE_MAGIC, body_end, 0, 0, 0)
        return ReservedLayout(header=bytes(raw), body_start=header.folders_end, body_end=body_end)

    signature_offset = header.file_size + RESERVE_GROWTH
    if signature_offset > _U32_MAX:
        raise CabError("the CAB is too large to sign (offsets are 32-bit)")
    fixed = bytearray(header.raw[:CFHEADER_SIZE])
    struct.pack_into("<I", fixed, 8, signature_offset)
    struct.pack_into("<I", fixed, 16, header.coff_files + RESERVE_GROWTH)
    struct.pack_into("<H", fixed, 30, header.flags | FLAG_RESERVE_PRESENT)
    struct.pack_into("<H", fixed, 34, 0)
    reserve = struct.pack(
        "<HBBIIIII", SIGNATURE_RESERVE_SIZE, 0, 0, RESERVE_MAGIC, signature_offset, 0, 0, 0
    )
    folders = bytearray(header.raw[header.folders_start :])
    for i, start in enumerate(header.folder_data_offsets()):
        if start + RESERVE_GROWTH > _U32_MAX:
            raise CabError("a CFFOLDER data offset overflows once the reserve is added")
        struct.pack_into("<I", folders, i * 8, start + RESERVE_GROWTH)
    return ReservedLayout(
        header=bytes(fixed) + reserve + bytes(folders),
        body_start=header.folders_end,
        body_end=header.file_size,
    )
