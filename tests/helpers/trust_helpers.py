"""Shared helpers and session fixtures for the trust tests (CAs with odd properties, CABs).

Test modules load this file as a plugin (pytest_plugins = ["tests.helpers.trust_helpers"]),
so its session fixtures exist once and each CA's keys are generated once per run. They also import
helpers from it before pytest registers the plugin, hence PYTEST_DONT_REWRITE: assertion
rewriting could not apply anyway, and nothing here asserts test outcomes.
"""

from __future__ import annotations

import datetime as dt
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cabarchive
import pytest
from cryptography import x509

from cmlab.site.trust import LabCA, TrustStore, create_lab_ca, sign_cab
from cmlab.site.trust.lab_ca import (
    INTERMEDIATE_CERT,
    INTERMEDIATE_KEY,
    ROOT_CERT,
    ROOT_KEY,
    SIGNING_CERT,
    SIGNING_KEY,
    issue_certificate,
    new_key,
    write_certificate,
    write_private_key,
)

OSSLSIGNCODE = shutil.which("osslsigncode")
needs_osslsigncode = pytest.mark.skipif(OSSLSIGNCODE is None, reason="osslsigncode not installed")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_unsigned_cab(path: Path, files: dict[str, bytes] | None = None) -> Path:
    """An unsigned, compressed CAB made with cabarchive (no reserve area)."""
    arc = cabarchive.CabArchive()
    for name, data in (files or {"a.txt": b"hello cmlab\n" * 50, "b.txt": b"second"}).items():
        arc[name] = cabarchive.CabFile(data)
    path.write_bytes(arc.save(compress=True))
    return path


def make_multi_folder_cab(path: Path, folders: list[dict[str, bytes]]) -> Path:
    """An uncompressed CAB with one CFFOLDER per dict, built by hand (cabarchive always writes
    a single folder), so that the per-folder coffCabStart shift is exercised."""
    entries = b""
    file_count = 0
    for index, folder in enumerate(folders):
        offset = 0
        for name, data in folder.items():
            entries += struct.pack("<IIHHHH", len(data), offset, index, 0x5A21, 0x6000, 0x20)
            entries += name.encode() + b"\0"
            offset += len(data)
            file_count += 1
    coff_files = 36 + 8 * len(folders)
    position = coff_files + len(entries)
    table, blocks = b"", b""
    for folder in folders:
        payload = b"".join(folder.values())
        chunks = [payload[i : i + 0x8000] for i in range(0, len(payload), 0x8000)] or [b""]
        table += struct.pack("<IHH", position + len(blocks), len(chunks), 0)
        for chunk in chunks:
            # csum 0 means "no checksum" in the CAB format.
            blocks += struct.pack("<IHH", 0, len(chunk), len(chunk)) + chunk
    size = coff_files + len(entries) + len(blocks)
    header = struct.pack(
        "<4sIIIIIBBHHHHH",
        b"MSCF",
        0,
        size,
        0,
        coff_files,
        0,
        3,
        1,
        len(folders),
        file_count,
        0,
        0x1234,
        0,
    )
    path.write_bytes(header + table + entries + blocks)
    return path


def make_odd_ca(
    directory: Path,
    *,
    key_type: str = "rsa",
    intermediate: bool = True,
    common_name: str = "Odd Root",
    leaf_not_before: dt.datetime | None = None,
    leaf_not_after: dt.datetime | None = None,
    leaf_eku: Sequence[x509.ObjectIdentifier] | None = None,
    intermediate_eku: Sequence[x509.ObjectIdentifier] | None = None,
) -> LabCA:
    """A lab CA with odd properties: a leaf that is expired or not yet valid, EKUs that
    leave out codeSigning (an empty sequence: no EKU extension at all)."""
    directory.mkdir(parents=True, exist_ok=True)
    start, end = now() - dt.timedelta(days=30), now() + dt.timedelta(days=365)
    root_key = new_key(key_type)
    root = issue_certificate(common_name, root_key, ca=True, not_before=start, not_after=end)
    write_certificate(directory / ROOT_CERT, root)
    write_private_key(directory / ROOT_KEY, root_key)
    issuer, issuer_key = root, root_key
    if intermediate:
        inter_key = new_key(key_type)
        inter = issue_certificate(
            f"{common_name} Intermediate",
            inter_key,
            issuer_cert=root,
            issuer_key=root_key,
            ca=True,
            not_before=start,
            not_after=end,
            extended_key_usage=intermediate_eku,
        )
        write_certificate(directory / INTERMEDIATE_CERT, inter)
        write_private_key(directory / INTERMEDIATE_KEY, inter_key)
        issuer, issuer_key = inter, inter_key
    leaf_key = new_key(key_type)
    leaf = issue_certificate(
        f"{common_name} Signer",
        leaf_key,
        issuer_cert=issuer,
        issuer_key=issuer_key,
        ca=False,
        not_before=leaf_not_before or start,
        not_after=leaf_not_after or end,
        extended_key_usage=leaf_eku,
    )
    write_certificate(directory / SIGNING_CERT, leaf)
    write_private_key(directory / SIGNING_KEY, leaf_key)
    return LabCA(
        root_cert=directory / ROOT_CERT,
        root_key=directory / ROOT_KEY,
        intermediate_cert=directory / INTERMEDIATE_CERT if intermediate else None,
        intermediate_key=directory / INTERMEDIATE_KEY if intermediate else None,
        signing_cert=directory / SIGNING_CERT,
        signing_key=directory / SIGNING_KEY,
    )


def trust_for(*cas: LabCA, microsoft: tuple[LabCA, ...] = ()) -> TrustStore:
    return TrustStore.from_pem_files([c.root_cert for c in cas], [c.root_cert for c in microsoft])


def root_of(ca: LabCA) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.root_cert.read_bytes())


def chain_file(ca: LabCA, path: Path) -> Path:
    """Leaf followed by the intermediate, the -certs bundle osslsigncode signs with."""
    parts = [ca.signing_cert.read_bytes()]
    if ca.intermediate_cert:
        parts.append(ca.intermediate_cert.read_bytes())
    path.write_bytes(b"".join(parts))
    return path


def osslsigncode_sign(ca: LabCA, src: Path, dst: Path, digest: str = "sha256") -> None:
    assert OSSLSIGNCODE is not None
    dst.unlink(missing_ok=True)
    bundle = chain_file(ca, dst.with_name(dst.name + ".chain.pem"))
    command = [OSSLSIGNCODE, "sign", "-certs", str(bundle), "-key", str(ca.signing_key)]
    command += ["-h", digest, "-in", str(src), "-out", str(dst)]
    subprocess.run(command, check=True, capture_output=True)


def osslsigncode_verify(root_cert: Path, path: Path) -> subprocess.CompletedProcess[str]:
    """osslsigncode 2.9 verifies an untimestamped signature against -CAfile at the current time."""
    assert OSSLSIGNCODE is not None
    return subprocess.run(
        [OSSLSIGNCODE, "verify", "-CAfile", str(root_cert), "-in", str(path)],
        capture_output=True,
        text=True,
    )


@dataclass(frozen=True)
class Signed:
    """A CAB signed by cmlab with a given CA, and the trust store that accepts it."""

    path: Path
    ca: LabCA
    trust: TrustStore


@pytest.fixture(scope="session")
def rsa_ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return create_lab_ca(tmp_path_factory.mktemp("rsa-ca"))


@pytest.fixture(scope="session")
def ecdsa_ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return create_lab_ca(
        tmp_path_factory.mktemp("ecdsa-ca"), common_name="cmlab EC Root", key_type="ecdsa"
    )


@pytest.fixture(scope="session")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return create_lab_ca(
        tmp_path_factory.mktemp("other-ca"),
        common_name="Other Root",
        key_type="ecdsa",
        intermediate=False,
    )


@pytest.fixture(scope="session")
def unsigned_cab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_unsigned_cab(tmp_path_factory.mktemp("cab") / "unsigned.cab")


@pytest.fixture(scope="session")
def signed_cab(
    tmp_path_factory: pytest.TempPathFactory, rsa_ca: LabCA, unsigned_cab: Path
) -> Signed:
    path = tmp_path_factory.mktemp("signed") / "signed.cab"
    sign_cab(unsigned_cab, path, rsa_ca.signer())
    return Signed(path=path, ca=rsa_ca, trust=trust_for(rsa_ca, microsoft=(rsa_ca,)))
