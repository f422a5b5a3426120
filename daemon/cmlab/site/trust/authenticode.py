"""Authenticode signing and verification of CAB files, in-process.

The signature is a PKCS#7 SignedData whose encapsulated content is an
SpcIndirectDataContent (1.3.6.1.4.1.311.2.1.4) holding the CAB digest. The structures,
signed attributes and digest rules match osslsigncode 2.9 so either tool verifies what
the other signs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import hashlib
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from cmlab.core.errors import BadInput, CabError, SignatureFormatError
from cmlab.core.fs import fsync_dir
from cmlab.site.trust.cab_layout import (
    CHUNK_SIZE,
    SIGNATURE_LENGTH_OFFSET,
    CabHeader,
    NotACabError,
    authenticode_digest,
    hashed_header_parts,
    locate_signature,
    plan_reserved_layout,
    read_header,
)

SPC_INDIRECT_DATA_OID = "1.3.6.1.4.1.311.2.1.4"
SPC_STATEMENT_TYPE_OID = "1.3.6.1.4.1.311.2.1.11"
SPC_SP_OPUS_INFO_OID = "1.3.6.1.4.1.311.2.1.12"
SPC_INDIVIDUAL_SP_KEY_PURPOSE_OID = "1.3.6.1.4.1.311.2.1.21"
SPC_CAB_DATA_OID = "1.3.6.1.4.1.311.2.1.25"
_ATTR_CONTENT_TYPE = "1.2.840.113549.1.9.3"
_ATTR_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
_ATTR_SIGNING_TIME = "1.2.840.113549.1.9.5"
# osslsigncode puts this placeholder SpcLink in the SpcIndirectDataContent of a CAB
# signature. The verifier ignores it; writing the same keeps the blobs byte-comparable.
_OBSOLETE_LINK = "<<<Obsolete>>>"

SIGNING_DIGESTS = ("sha256", "sha384", "sha1")
_VERIFY_DIGESTS = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_RSA_SIGNATURE_ALGORITHMS = {
    "rsassa_pkcs1v15",
    "sha1_rsa",
    "sha256_rsa",
    "sha384_rsa",
    "sha512_rsa",
}
_ECDSA_SIGNATURE_ALGORITHMS = {
    "ecdsa",
    "sha1_ecdsa",
    "sha256_ecdsa",
    "sha384_ecdsa",
    "sha512_ecdsa",
}
# Anything asn1crypto or cryptography raises while decoding hostile DER.
_DECODE_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    UnsupportedAlgorithm,
)


class SigningError(BadInput):
    """A signer (key, certificate, digest) that cannot produce an Authenticode signature."""


class TrustStoreError(BadInput):
    """A trust-store PEM file that holds no usable certificate."""


# --- ASN.1 structures of Authenticode (Microsoft "Windows Authenticode Portable Executable
# Signature Format"), declared for asn1crypto.


class SpcString(core.Choice):
    _alternatives: ClassVar[list[tuple[Any, ...]]] = [
        ("unicode", core.BMPString, {"implicit": 0}),
        ("ascii", core.IA5String, {"implicit": 1}),
    ]


class SpcSerializedObject(core.Sequence):
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("class_id", core.OctetString),
        ("serialized_data", core.OctetString),
    ]


class SpcLink(core.Choice):
    _alternatives: ClassVar[list[tuple[Any, ...]]] = [
        ("url", core.IA5String, {"implicit": 0}),
        ("moniker", SpcSerializedObject, {"implicit": 1}),
        ("file", SpcString, {"explicit": 2}),
    ]


class SpcAttributeTypeAndOptionalValue(core.Sequence):
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("type", core.ObjectIdentifier),
        ("value", core.Any, {"optional": True}),
    ]


class SpcIndirectDataContent(core.Sequence):
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("data", SpcAttributeTypeAndOptionalValue),
        ("message_digest", algos.DigestInfo),
    ]


class SpcSpOpusInfo(core.Sequence):
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("program_name", SpcString, {"explicit": 0, "optional": True}),
        ("more_info", SpcLink, {"explicit": 1, "optional": True}),
    ]


class SpcStatementType(core.SequenceOf):
    _child_spec = core.ObjectIdentifier


# --- Public data types


def _load_pem_certificates(path: Path) -> list[x509.Certificate]:
    data = path.read_bytes()
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TrustStoreError(f"{path}: no readable PEM certificate ({exc})") from exc


def _fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


@dataclass(frozen=True)
class TrustStore:
    """Roots a signature may chain to; microsoft_roots marks the ones that count as "MS root".

    A certificate listed only in microsoft_roots is trusted too: being a Microsoft root
    implies being a root.
    """

    roots: tuple[x509.Certificate, ...]
    microsoft_roots: tuple[x509.Certificate, ...] = ()

    @classmethod
    def from_pem_files(cls, roots: Iterable[Path], microsoft_roots: Iterable[Path]) -> TrustStore:
        root_certs = [c for p in roots for c in _load_pem_certificates(Path(p))]
        ms_certs = [c for p in microsoft_roots for c in _load_pem_certificates(Path(p))]
        return cls(roots=_dedupe(root_certs + ms_certs), microsoft_roots=_dedupe(ms_certs))

    def anchors(self) -> list[x509.Certificate]:
        return list(_dedupe([*self.roots, *self.microsoft_roots]))

    def is_microsoft_root(self, cert: x509.Certificate) -> bool:
        return _fingerprint(cert) in {_fingerprint(c) for c in self.microsoft_roots}


def _dedupe(certs: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    seen: set[bytes] = set()
    out = []
    for cert in certs:
        fp = _fingerprint(cert)
        if fp not in seen:
            seen.add(fp)
            out.append(cert)
    return tuple(out)


class VerdictStatus(enum.Enum):
    TRUSTED = "trusted"
    NOT_SIGNED = "not_signed"
    DIGEST_MISMATCH = "digest_mismatch"
    BAD_SIGNER_SIGNATURE = "bad_signer_signature"
    UNTRUSTED_ROOT = "untrusted_root"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    MISSING_CODE_SIGNING_EKU = "missing_code_signing_eku"
    MALFORMED_SIGNATURE = "malformed_signature"
    NOT_A_CAB = "not_a_cab"


@dataclass(frozen=True)
class Verdict:
    status: VerdictStatus
    reason: str
    digest_algorithm: str | None = None
    signer_subject: str | None = None
    chain: tuple[x509.Certificate, ...] = ()
    root_subject: str | None = None
    signing_time: dt.datetime | None = None
    ms_root: bool = False

    @property
    def trusted(self) -> bool:
        return self.status is VerdictStatus.TRUSTED


@dataclass(frozen=True)
class Signer:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()
    digest: str = "sha256"

    def __post_init__(self) -> None:
        if self.digest not in SIGNING_DIGESTS:
            raise SigningError(
                f"unsupported digest {self.digest!r}; use one of {', '.join(SIGNING_DIGESTS)}"
            )
        if not isinstance(self.key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise SigningError("only RSA and ECDSA signing keys are supported")
        if not _same_public_key(self.key, self.cert):
            raise SigningError("the signing key does not match the signing certificate")

    @classmethod
    def from_pem_files(
        cls, key: Path, cert: Path, chain: Path | None = None, digest: str = "sha256"
    ) -> Signer:
        """Load a signer; cert may be a bundle (leaf plus chain), as osslsigncode -certs takes."""
        try:
            private_key = serialization.load_pem_private_key(Path(key).read_bytes(), None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise SigningError(f"{key}: not an unencrypted PEM private key ({exc})") from exc
        if not isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise SigningError(f"{key}: only RSA and ECDSA signing keys are supported")
        certs = _load_pem_certificates(Path(cert))
        leaf = next((c for c in certs if _same_public_key(private_key, c)), None)
        if leaf is None:
            raise SigningError(f"{cert}: no certificate matches the key in {key}")
        extra = [c for c in certs if c is not leaf]
        if chain is not None:
            extra += _load_pem_certificates(Path(chain))
        return cls(key=private_key, cert=leaf, chain=tuple(extra), digest=digest)


def _same_public_key(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    try:
        return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
    except (ValueError, UnsupportedAlgorithm):
        return False


# --- Signing


def _digest_algorithm(name: str) -> algos.DigestAlgorithm:
    # OpenSSL writes an explicit NULL parameter; doing the same keeps blobs byte-comparable.
    return algos.DigestAlgorithm({"algorithm": name, "parameters": core.Null()})


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def _signing_time_value(moment: dt.datetime) -> cms.Time:
    # RFC 5652: UTCTime for 1950..2049, GeneralizedTime otherwise.
    if 1950 <= moment.year < 2050:
        return cms.Time({"utc_time": moment})
    return cms.Time({"generalized_time": moment})


def build_signature(digest: bytes, signer: Signer, signing_time: dt.datetime) -> bytes:
    """DER of a SignedData over a CAB digest, with osslsigncode's signed attributes."""
    indirect = SpcIndirectDataContent(
        {
            "data": {
                "type": SPC_CAB_DATA_OID,
                "value": SpcLink({"file": SpcString({"unicode": _OBSOLETE_LINK})}),
            },
            "message_digest": {
                "digest_algorithm": _digest_algorithm(signer.digest),
                "digest": digest,
            },
        }
    )
    indirect_der = indirect.dump()
    # Authenticode hashes the content octets of the SEQUENCE, without its tag and length.
    content_octets = SpcIndirectDataContent.load(indirect_der).contents
    content_hash = hashlib.new(signer.digest, content_octets).digest()
    attrs = cms.CMSAttributes(
        [
            {"type": "content_type", "values": [SPC_INDIRECT_DATA_OID]},
            {"type": "signing_time", "values": [_signing_time_value(signing_time)]},
            # Empty opus info (no program name or URL), as signtool writes without /d or /du.
            {"type": SPC_SP_OPUS_INFO_OID, "values": [SpcSpOpusInfo.load(b"\x30\x00")]},
            {
                "type": SPC_STATEMENT_TYPE_OID,
                "values": [SpcStatementType([SPC_INDIVIDUAL_SP_KEY_PURPOSE_OID])],
            },
            {"type": "message_digest", "values": [content_hash]},
        ]
    )
    to_sign = attrs.dump()
    hash_algorithm = _HASHES[signer.digest]()
    if isinstance(signer.key, rsa.RSAPrivateKey):
        signature = signer.key.sign(to_sign, padding.PKCS1v15(), hash_algorithm)
        signature_algorithm = algos.SignedDigestAlgorithm(
            {"algorithm": "rsassa_pkcs1v15", "parameters": core.Null()}
        )
    else:
        signature = signer.key.sign(to_sign, ec.ECDSA(hash_algorithm))
        signature_algorithm = algos.SignedDigestAlgorithm({"algorithm": f"{signer.digest}_ecdsa"})
    # asn1crypto drops the [0] EXPLICIT wrapper when it encodes a content type it does not
    # know, so the PKCS#7 ContentInfo around the SpcIndirectDataContent is assembled by hand.
    content_type_der = core.ObjectIdentifier(SPC_INDIRECT_DATA_OID).dump()
    explicit = _der_tlv(0xA0, indirect_der)
    encap_content = _der_tlv(0x30, content_type_der + explicit)
    leaf = asn1_x509.Certificate.load(signer.cert.public_bytes(serialization.Encoding.DER))
    embedded = [leaf] + [
        asn1_x509.Certificate.load(c.public_bytes(serialization.Encoding.DER)) for c in signer.chain
    ]
    signer_info = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": {
                        "issuer": leaf.issuer,
                        "serial_number": leaf.serial_number,
                    }
                }
            ),
            "digest_algorithm": _digest_algorithm(signer.digest),
            "signed_attrs": attrs,
            "signature_algorithm": signature_algorithm,
            "signature": signature,
        }
    )
    signed_data = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [_digest_algorithm(signer.digest)],
            "encap_content_info": cms.ContentInfo.load(encap_content),
            "certificates": [cms.CertificateChoices({"certificate": c}) for c in embedded],
            "signer_infos": [signer_info],
        }
    )
    der: bytes = cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump()
    return der


def sign_cab(
    src: Path, dst: Path, signer: Signer, *, signing_time: dt.datetime | None = None
) -> None:
    """Sign src into dst (atomically), replacing any signature src already has.

    Raises CabError (NotACabError) for sources that are not signable cabinets.
    """
    src, dst = Path(src), Path(dst)
    moment = _utc(signing_time or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    tmp = dst.with_name(dst.name + ".tmp")
    with src.open("rb") as f:
        header = read_header(f, os.fstat(f.fileno()).st_size)
        layout = plan_reserved_layout(header)
        try:
            with tmp.open("wb") as out:
                h = hashlib.new(signer.digest)
                out.write(layout.header)
                for part in hashed_header_parts(layout.header):
                    h.update(part)
                f.seek(layout.body_start)
                remaining = layout.body_end - layout.body_start
                while remaining:
                    chunk = f.read(min(CHUNK_SIZE, remaining))
                    if not chunk:
                        raise CabError(f"{src} shrank while it was being signed")
                    h.update(chunk)
                    out.write(chunk)
                    remaining -= len(chunk)
                blob = build_signature(h.digest(), signer, moment)
                # osslsigncode pads the blob to 8 bytes and records the padded length.
                blob += b"\0" * (-len(blob) % 8)
                out.write(blob)
                out.seek(SIGNATURE_LENGTH_OFFSET)
                out.write(struct.pack("<I", len(blob)))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    # Makes the rename durable; some filesystems refuse to open directories, which is fine.
    with contextlib.suppress(OSError):
        fsync_dir(dst.parent)


# --- Parsing a signature


@dataclass(frozen=True)
class ParsedSignature:
    digest_algorithm: str
    digest: bytes
    content_octets: bytes
    signer_cert: x509.Certificate
    certificates: tuple[x509.Certificate, ...]
    signer_digest_algorithm: str
    signature_algorithm: str
    signature: bytes
    signed_attrs_der: bytes
    content_type: str | None
    message_digest: bytes | None
    signing_time: dt.datetime | None


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


def _der_end(blob: bytes) -> int:
    """Offset just past the first DER element, so the zero padding after it can be checked."""
    if len(blob) < 2 or blob[0] != 0x30:
        raise SignatureFormatError("the signature is not a DER SEQUENCE")
    first = blob[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if count == 0 or count > 4 or len(blob) < 2 + count:
        raise SignatureFormatError("the signature has an unsupported DER length")
    return 2 + count + int.from_bytes(blob[2 : 2 + count], "big")


def parse_signature(blob: bytes) -> ParsedSignature:
    """Decode an Authenticode blob (with optional zero padding); raises SignatureFormatError."""
    end = _der_end(blob)
    if end > len(blob):
        raise SignatureFormatError("the signature DER is longer than the signature area")
    if blob[end:].strip(b"\0"):
        raise SignatureFormatError("non-zero bytes follow the signature DER")
    try:
        return _parse_signed_data(blob[:end])
    except SignatureFormatError:
        raise
    except _DECODE_ERRORS as exc:
        raise SignatureFormatError(f"the signature is not valid PKCS#7 ({exc})") from exc


def _parse_signed_data(der: bytes) -> ParsedSignature:
    info = cms.ContentInfo.load(der, strict=True)
    if info["content_type"].native != "signed_data":
        raise SignatureFormatError("the signature is not a PKCS#7 SignedData")
    signed = info["content"]
    encap = signed["encap_content_info"]
    if encap["content_type"].dotted != SPC_INDIRECT_DATA_OID:
        raise SignatureFormatError(
            f"the signed content type is {encap['content_type'].dotted}, not "
            f"SpcIndirectDataContent ({SPC_INDIRECT_DATA_OID})"
        )
    content = encap["content"]
    if not isinstance(content, core.Any):
        raise SignatureFormatError("the SpcIndirectDataContent is not a SEQUENCE")
    indirect = content.parse(SpcIndirectDataContent)
    content_octets = indirect.contents
    digest_info = indirect["message_digest"]
    digest_algorithm = digest_info["digest_algorithm"]["algorithm"].native
    digest = digest_info["digest"].native
    if digest_algorithm not in _VERIFY_DIGESTS:
        raise SignatureFormatError(f"unsupported CAB digest algorithm {digest_algorithm!r}")
    if len(digest) != _VERIFY_DIGESTS[digest_algorithm]:
        raise SignatureFormatError(
            f"the signed {digest_algorithm} digest is {len(digest)} bytes long"
        )

    signer_infos = signed["signer_infos"]
    if len(signer_infos) != 1:
        raise SignatureFormatError(
            f"Authenticode requires exactly one signer, found {len(signer_infos)}"
        )
    signer_info = signer_infos[0]
    certs: list[tuple[asn1_x509.Certificate, x509.Certificate]] = []
    for choice in signed["certificates"] or []:
        if choice.name == "certificate":
            cert = _load_certificate(choice.chosen.dump())
            if cert is not None:
                certs.append((choice.chosen, cert))
    sid = signer_info["sid"]
    signer_cert = next((c for a, c in certs if _matches_sid(a, sid)), None)
    if signer_cert is None:
        raise SignatureFormatError("the signer's certificate is not included in the signature")

    signer_digest = signer_info["digest_algorithm"]["algorithm"].native
    if signer_digest not in _HASHES:
        raise SignatureFormatError(f"unsupported signer digest algorithm {signer_digest!r}")
    attrs = signer_info["signed_attrs"]
    if not attrs:
        raise SignatureFormatError("the signer has no signed attributes, which Authenticode needs")
    content_type = message_digest = signing_time = None
    seen: set[str] = set()
    for attr in attrs:
        kind = attr["type"].dotted
        values = attr["values"]
        if kind in (_ATTR_CONTENT_TYPE, _ATTR_MESSAGE_DIGEST, _ATTR_SIGNING_TIME):
            # RFC 5652 5.3: these attributes occur once, with exactly one value.
            if kind in seen or len(values) != 1:
                raise SignatureFormatError(f"signed attribute {kind} is repeated or multi-valued")
            seen.add(kind)
        if kind == _ATTR_CONTENT_TYPE:
            content_type = values[0].dotted
        elif kind == _ATTR_MESSAGE_DIGEST:
            message_digest = values[0].native
        elif kind == _ATTR_SIGNING_TIME:
            signing_time = _utc(values[0].native)
    # The signature covers the attributes DER-encoded as a SET, not as the [0] field.
    attrs_der = _der_tlv(0x31, attrs.contents)
    return ParsedSignature(
        digest_algorithm=digest_algorithm,
        digest=digest,
        content_octets=content_octets,
        signer_cert=signer_cert,
        certificates=tuple(c for _, c in certs),
        signer_digest_algorithm=signer_digest,
        signature_algorithm=signer_info["signature_algorithm"]["algorithm"].native,
        signature=signer_info["signature"].native,
        signed_attrs_der=attrs_der,
        content_type=content_type,
        message_digest=message_digest,
        signing_time=signing_time,
    )


def _load_certificate(der: bytes) -> x509.Certificate | None:
    """Load a certificate and force every lazily-decoded part, so a corrupt one fails here
    rather than in the middle of chain validation; None when it does not decode."""
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.public_key()
        _ = (cert.subject, cert.issuer, cert.extensions, cert.not_valid_after_utc)
        _ = cert.not_valid_before_utc
    # cryptography signals bad certificates with several unrelated exception types
    # (InvalidVersion, DuplicateExtension, ValueError...); any of them means "unusable".
    except Exception:
        return None
    return cert


def _matches_sid(cert: asn1_x509.Certificate, sid: cms.SignerIdentifier) -> bool:
    if sid.name == "issuer_and_serial_number":
        ias = sid.chosen
        return bool(
            cert.serial_number == ias["serial_number"].native and cert.issuer == ias["issuer"]
        )
    return bool(cert.key_identifier is not None and cert.key_identifier == sid.chosen.native)


# --- Verification


def _subject(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except ValueError:
        return "<unparseable subject>"


def _eku(cert: x509.Certificate) -> x509.ExtendedKeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _ca_eku_allows_code_signing(
    _policy: Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None
) -> None:
    # A CA's EKU, when present, constrains what it may issue (Windows enforces the nesting).
    if eku is not None and not {
        ExtendedKeyUsageOID.CODE_SIGNING,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    } & set(eku):
        raise ValueError(f"CA {_subject(cert)} has an EKU that excludes code signing")


def _ca_basic_constraints(
    _policy: Policy, cert: x509.Certificate, bc: x509.BasicConstraints
) -> None:
    if not bc.ca:
        raise ValueError(f"{_subject(cert)} is not a CA")


def _ca_key_usage(_policy: Policy, cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not ku.key_cert_sign:
        raise ValueError(f"CA {_subject(cert)} may not sign certificates (keyUsage)")


def _extension_policies() -> tuple[ExtensionPolicy, ExtensionPolicy]:
    """Web-PKI checks relaxed where code-signing PKIs legitimately differ.

    Code-signing leaves have no subjectAltName and carry codeSigning (checked separately,
    to report it precisely) rather than clientAuth; deployed code-signing CAs do not all
    mark basicConstraints critical or carry keyUsage and authorityKeyIdentifier.
    """
    agnostic = Criticality.AGNOSTIC
    ca_policy = (
        ExtensionPolicy.webpki_defaults_ca()
        .require_present(x509.BasicConstraints, agnostic, _ca_basic_constraints)
        .may_be_present(x509.KeyUsage, agnostic, _ca_key_usage)
        .may_be_present(x509.AuthorityKeyIdentifier, agnostic, None)
        .may_be_present(x509.ExtendedKeyUsage, agnostic, _ca_eku_allows_code_signing)
    )
    ee_policy = (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, agnostic, None)
        .may_be_present(x509.AuthorityKeyIdentifier, agnostic, None)
        .may_be_present(x509.ExtendedKeyUsage, agnostic, None)
    )
    return ca_policy, ee_policy


@dataclass(frozen=True)
class _ChainOutcome:
    status: VerdictStatus
    reason: str
    chain: tuple[x509.Certificate, ...]


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (*_DECODE_ERRORS, InvalidSignature):
        return False
    return True


def _find_path(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
) -> tuple[list[x509.Certificate], bool]:
    """A best-effort leaf-to-root path, used only to explain why validation failed."""
    anchor_fps = {_fingerprint(a) for a in anchors}
    path = [leaf]
    while len(path) <= 10:
        current = path[-1]
        if _fingerprint(current) in anchor_fps:
            return path, True
        used = {_fingerprint(c) for c in path}
        issuer = next(
            (
                c
                for c in [*anchors, *intermediates]
                if _fingerprint(c) not in used and _issued_by(current, c)
            ),
            None,
        )
        if issuer is None:
            return path, False
        path.append(issuer)
    return path, False


def _validate_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    trust: TrustStore,
    moment: dt.datetime,
) -> _ChainOutcome:
    anchors = trust.anchors()
    if not anchors:
        return _ChainOutcome(
            VerdictStatus.UNTRUSTED_ROOT, "the trust store holds no root certificates", (leaf,)
        )
    ca_policy, ee_policy = _extension_policies()
    verifier = (
        PolicyBuilder()
        .store(Store(anchors))
        .time(moment)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        chain = tuple(verifier.verify(leaf, list(intermediates)).chain)
    except (VerificationError, *_DECODE_ERRORS) as exc:
        return _diagnose_chain(leaf, intermediates, anchors, moment, str(exc))
    eku = _eku(leaf)
    if eku is None or ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        what = "has no extendedKeyUsage" if eku is None else "has an extendedKeyUsage without"
        return _ChainOutcome(
            VerdictStatus.MISSING_CODE_SIGNING_EKU,
            f"the signing certificate {_subject(leaf)} {what} codeSigning (1.3.6.1.5.5.7.3.3)",
            chain,
        )
    return _ChainOutcome(VerdictStatus.TRUSTED, "", chain)


def _diagnose_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    moment: dt.datetime,
    error: str,
) -> _ChainOutcome:
    path, anchored = _find_path(leaf, intermediates, anchors)
    chain = tuple(path)
    if not anchored:
        return _ChainOutcome(
            VerdictStatus.UNTRUSTED_ROOT,
            f"the certificate chain ends at {_subject(path[-1])}, which is not a trusted root "
            "and was not issued by one",
            chain,
        )
    when = moment.isoformat()
    for cert in path:
        if cert.not_valid_after_utc < moment:
            return _ChainOutcome(
                VerdictStatus.EXPIRED,
                f"certificate {_subject(cert)} expired on "
                f"{cert.not_valid_after_utc.isoformat()}, before the signing time {when}",
                chain,
            )
        if cert.not_valid_before_utc > moment:
            return _ChainOutcome(
                VerdictStatus.NOT_YET_VALID,
                f"certificate {_subject(cert)} is valid only from "
                f"{cert.not_valid_before_utc.isoformat()}, after the signing time {when}",
                chain,
            )
    for cert in path[1:]:
        eku = _eku(cert)
        if eku is not None and not {
            ExtendedKeyUsageOID.CODE_SIGNING,
            ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
        } & set(eku):
            return _ChainOutcome(
                VerdictStatus.MISSING_CODE_SIGNING_EKU,
                f"CA certificate {_subject(cert)} restricts its extendedKeyUsage to purposes "
                "other than codeSigning",
                chain,
            )
    return _ChainOutcome(
        VerdictStatus.UNTRUSTED_ROOT,
        f"the chain to trusted root {_subject(path[-1])} does not validate: {error}",
        chain,
    )


def _check_signer_signature(parsed: ParsedSignature) -> str | None:
    """None when the signer's signature and messageDigest hold, else the reason they do not."""
    if parsed.content_type != SPC_INDIRECT_DATA_OID:
        return "the signed contentType attribute is missing or not SpcIndirectDataContent"
    expected = hashlib.new(parsed.signer_digest_algorithm, parsed.content_octets).digest()
    if parsed.message_digest != expected:
        return (
            "the signed messageDigest attribute does not match the SpcIndirectDataContent "
            "(the signed content was altered)"
        )
    public_key = parsed.signer_cert.public_key()
    hash_algorithm = _HASHES[parsed.signer_digest_algorithm]()
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            if parsed.signature_algorithm not in _RSA_SIGNATURE_ALGORITHMS:
                return f"signature algorithm {parsed.signature_algorithm} does not fit an RSA key"
            public_key.verify(
                parsed.signature, parsed.signed_attrs_der, padding.PKCS1v15(), hash_algorithm
            )
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            if parsed.signature_algorithm not in _ECDSA_SIGNATURE_ALGORITHMS:
                return f"signature algorithm {parsed.signature_algorithm} does not fit an EC key"
            public_key.verify(parsed.signature, parsed.signed_attrs_der, ec.ECDSA(hash_algorithm))
        else:
            return "the signer's key type is not supported (only RSA and ECDSA are)"
    except (InvalidSignature, *_DECODE_ERRORS):
        return "the signer's signature over the signed attributes is invalid"
    return None


def verify_cab(path: Path, trust: TrustStore, *, at: dt.datetime | None = None) -> Verdict:
    """Verify the Authenticode signature of a CAB; never raises for bad content.

    The chain is validated at the signed signingTime when present, else at `at`, else now.
    Raises only OSError, when the path cannot be read.
    """
    with Path(path).open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            header = read_header(f, size)
        except NotACabError as exc:
            return Verdict(VerdictStatus.NOT_A_CAB, f"not a CAB file: {exc}")
        try:
            location = locate_signature(header)
        except SignatureFormatError as exc:
            return Verdict(VerdictStatus.MALFORMED_SIGNATURE, f"malformed signature area: {exc}")
        if location is None:
            return Verdict(VerdictStatus.NOT_SIGNED, _unsigned_reason(header))
        f.seek(location.offset)
        blob = f.read(location.length)
        try:
            parsed = parse_signature(blob)
        except SignatureFormatError as exc:
            return Verdict(VerdictStatus.MALFORMED_SIGNATURE, f"malformed signature: {exc}")
        found = Verdict(
            VerdictStatus.MALFORMED_SIGNATURE,
            "",
            digest_algorithm=parsed.digest_algorithm,
            signer_subject=_subject(parsed.signer_cert),
            signing_time=parsed.signing_time,
        )
        try:
            actual = authenticode_digest(f, header, location.offset, parsed.digest_algorithm)
        except NotACabError as exc:
            return replace(
                found, status=VerdictStatus.NOT_A_CAB, reason=f"not a valid CAB file: {exc}"
            )
    if actual != parsed.digest:
        return replace(
            found,
            status=VerdictStatus.DIGEST_MISMATCH,
            reason="the CAB digest does not match the signed digest "
            "(file was modified after signing)",
        )
    problem = _check_signer_signature(parsed)
    if problem is not None:
        return replace(found, status=VerdictStatus.BAD_SIGNER_SIGNATURE, reason=problem)

    moment = parsed.signing_time or _utc(at or dt.datetime.now(dt.UTC))
    intermediates = [c for c in parsed.certificates if c is not parsed.signer_cert]
    outcome = _validate_chain(parsed.signer_cert, intermediates, trust, moment)
    root = outcome.chain[-1]
    anchored = _fingerprint(root) in {_fingerprint(a) for a in trust.anchors()}
    ms_root = anchored and trust.is_microsoft_root(root)
    reason = outcome.reason
    if outcome.status is VerdictStatus.TRUSTED:
        kind = "Microsoft root" if ms_root else "trusted root"
        reason = f"signed by {found.signer_subject} with a valid chain to {kind} {_subject(root)}"
    return replace(
        found,
        status=outcome.status,
        reason=reason,
        chain=outcome.chain,
        root_subject=_subject(root) if anchored else None,
        ms_root=ms_root,
    )


def _unsigned_reason(header: CabHeader) -> str:
    if not header.has_signature_reserve:
        return "the CAB has no Authenticode signature (no 20-byte header reserve)"
    return "the CAB has a signature reserve but no signature in it"
