"""A lab certificate authority: root, optional intermediate and a code-signing leaf, as PEM files.

The lab root stands in for the Microsoft root in a lab site, so cmlab-built CABs go
through the same trust checks as real update CABs.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cmlab.core.errors import BadInput
from cmlab.site.trust.authenticode import Signer

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

ROOT_CERT, ROOT_KEY = "root.pem", "root.key"
INTERMEDIATE_CERT, INTERMEDIATE_KEY = "intermediate.pem", "intermediate.key"
SIGNING_CERT, SIGNING_KEY = "signing.pem", "signing.key"
KEY_TYPES = ("rsa", "ecdsa")
# Backdating absorbs clock skew between the machine that builds the lab and the one that
# verifies, so a freshly made CA is never "not yet valid".
_BACKDATE = dt.timedelta(hours=1)


class LabCAError(BadInput):
    """A lab CA directory that is incomplete or unreadable, or a bad CA parameter."""


@dataclass(frozen=True)
class LabCA:
    root_cert: Path
    root_key: Path
    intermediate_cert: Path | None
    intermediate_key: Path | None
    signing_cert: Path
    signing_key: Path

    def signer(self, digest: str = "sha256") -> Signer:
        """A Signer for the code-signing leaf that embeds the intermediate, if any."""
        return Signer.from_pem_files(
            self.signing_key, self.signing_cert, self.intermediate_cert, digest=digest
        )


def new_key(key_type: str = "rsa") -> PrivateKey:
    """RSA-2048 or ECDSA P-256: the smallest keys the chain validator accepts (fast to make)."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    raise LabCAError(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cmlab"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def issue_certificate(
    common_name: str,
    key: PrivateKey,
    *,
    issuer_cert: x509.Certificate | None = None,
    issuer_key: PrivateKey | None = None,
    ca: bool,
    not_before: dt.datetime,
    not_after: dt.datetime,
    extended_key_usage: Sequence[x509.ObjectIdentifier] | None = None,
    path_length: int | None = None,
) -> x509.Certificate:
    """Issue one certificate; self-signed when no issuer is given.

    CAs get critical basicConstraints and keyCertSign, leaves digitalSignature. The EKU
    extension defaults to codeSigning for leaves and to none for CAs; an explicit sequence
    replaces that, and an empty one leaves the extension out.
    """
    if extended_key_usage is None:
        extended_key_usage = () if ca else (ExtendedKeyUsageOID.CODE_SIGNING,)
    if (issuer_cert is None) != (issuer_key is None):
        raise LabCAError("issuer_cert and issuer_key go together")
    subject = _name(common_name)
    signing_key = issuer_key or key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if extended_key_usage:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256())


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write an unencrypted PKCS#8 PEM key readable only by its owner (mode 0600)."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 rather than chmod-ed afterwards, so the key is never briefly world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def create_lab_ca(
    directory: Path,
    *,
    common_name: str = "cmlab Lab Root",
    key_type: str = "rsa",
    intermediate: bool = True,
    valid_days: int = 3650,
) -> LabCA:
    """Create root (+ intermediate) + code-signing leaf in directory, overwriting old files."""
    if key_type not in KEY_TYPES:
        raise LabCAError(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")
    if valid_days < 1:
        raise LabCAError("valid_days must be at least 1")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - _BACKDATE, now + dt.timedelta(days=valid_days)

    root_key = new_key(key_type)
    root = issue_certificate(
        common_name, root_key, ca=True, not_before=not_before, not_after=not_after
    )
    issuer_cert, issuer_key = root, root_key
    inter_paths: tuple[Path | None, Path | None] = (None, None)
    if intermediate:
        inter_key = new_key(key_type)
        inter = issue_certificate(
            f"{common_name} Intermediate CA",
            inter_key,
            issuer_cert=root,
            issuer_key=root_key,
            ca=True,
            not_before=not_before,
            not_after=not_after,
            path_length=0,
        )
        inter_paths = (directory / INTERMEDIATE_CERT, directory / INTERMEDIATE_KEY)
        write_certificate(directory / INTERMEDIATE_CERT, inter)
        write_private_key(directory / INTERMEDIATE_KEY, inter_key)
        issuer_cert, issuer_key = inter, inter_key
    else:
        for stale in (INTERMEDIATE_CERT, INTERMEDIATE_KEY):
            (directory / stale).unlink(missing_ok=True)
    leaf_key = new_key(key_type)
    leaf = issue_certificate(
        f"{common_name} Code Signing",
        leaf_key,
        issuer_cert=issuer_cert,
        issuer_key=issuer_key,
        ca=False,
        not_before=not_before,
        not_after=not_after,
    )
    write_certificate(directory / ROOT_CERT, root)
    write_private_key(directory / ROOT_KEY, root_key)
    write_certificate(directory / SIGNING_CERT, leaf)
    write_private_key(directory / SIGNING_KEY, leaf_key)
    return LabCA(
        root_cert=directory / ROOT_CERT,
        root_key=directory / ROOT_KEY,
        intermediate_cert=inter_paths[0],
        intermediate_key=inter_paths[1],
        signing_cert=directory / SIGNING_CERT,
        signing_key=directory / SIGNING_KEY,
    )


def load_lab_ca(directory: Path) -> LabCA:
    """Find a lab CA written by create_lab_ca; checks that the files exist and parse."""
    directory = Path(directory)
    required = [ROOT_CERT, ROOT_KEY, SIGNING_CERT, SIGNING_KEY]
    missing = [n for n in required if not (directory / n).is_file()]
    if missing:
        raise LabCAError(f"{directory} is not a lab CA: missing {', '.join(missing)}")
    has_cert = (directory / INTERMEDIATE_CERT).is_file()
    has_key = (directory / INTERMEDIATE_KEY).is_file()
    if has_cert != has_key:
        raise LabCAError(f"{directory}: intermediate certificate and key must both be present")
    for name in [*required, *([INTERMEDIATE_CERT, INTERMEDIATE_KEY] if has_cert else [])]:
        path = directory / name
        data = path.read_bytes()
        try:
            if name.endswith(".pem"):
                x509.load_pem_x509_certificate(data)
            else:
                serialization.load_pem_private_key(data, None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise LabCAError(f"{path}: unreadable PEM ({exc})") from exc
    return LabCA(
        root_cert=directory / ROOT_CERT,
        root_key=directory / ROOT_KEY,
        intermediate_cert=directory / INTERMEDIATE_CERT if has_cert else None,
        intermediate_key=directory / INTERMEDIATE_KEY if has_cert else None,
        signing_cert=directory / SIGNING_CERT,
        signing_key=directory / SIGNING_KEY,
    )
