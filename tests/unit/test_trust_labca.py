"""The lab CA: files, permissions, certificate profile, reload."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from cmlab.site.trust import LabCA, LabCAError, create_lab_ca, load_lab_ca, sign_cab, verify_cab
from tests.helpers.trust_helpers import make_unsigned_cab, trust_for


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.parametrize(
    ("key_type", "key_class"), [("rsa", rsa.RSAPrivateKey), ("ecdsa", ec.EllipticCurvePrivateKey)]
)
def test_create_with_intermediate(tmp_path: Path, key_type: str, key_class: type) -> None:
    ca = create_lab_ca(tmp_path / "ca", common_name="Test Root", key_type=key_type, valid_days=30)
    assert ca.intermediate_cert is not None and ca.intermediate_key is not None
    names = sorted(p.name for p in (tmp_path / "ca").iterdir())
    assert names == [
        "intermediate.key",
        "intermediate.pem",
        "root.key",
        "root.pem",
        "signing.key",
        "signing.pem",
    ]
    for key in (ca.root_key, ca.intermediate_key, ca.signing_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    root, inter, leaf = load(ca.root_cert), load(ca.intermediate_cert), load(ca.signing_cert)
    assert root.subject == root.issuer
    assert inter.issuer == root.subject and leaf.issuer == inter.subject
    leaf.verify_directly_issued_by(inter)
    inter.verify_directly_issued_by(root)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CODE_SIGNING]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 30
    signer = ca.signer()
    assert isinstance(signer.key, key_class)
    assert signer.chain == (inter,)


def test_create_without_intermediate_and_reload(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    create_lab_ca(directory)  # with intermediate first: recreating must drop it
    ca = create_lab_ca(directory, intermediate=False, key_type="ecdsa")
    assert ca.intermediate_cert is None
    assert not (directory / "intermediate.pem").exists()
    assert load(ca.signing_cert).issuer == load(ca.root_cert).subject
    assert load_lab_ca(directory) == ca
    unsigned = make_unsigned_cab(tmp_path / "u.cab")
    signed = tmp_path / "s.cab"
    sign_cab(unsigned, signed, load_lab_ca(directory).signer("sha384"))
    verdict = verify_cab(signed, trust_for(ca))
    assert verdict.trusted and len(verdict.chain) == 2


def test_reload_with_intermediate(tmp_path: Path) -> None:
    ca = create_lab_ca(tmp_path / "ca", key_type="ecdsa")
    assert load_lab_ca(tmp_path / "ca") == ca


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(LabCAError, match="missing"):
        load_lab_ca(tmp_path)
    ca: LabCA = create_lab_ca(tmp_path / "ca", key_type="ecdsa")
    assert ca.intermediate_key is not None
    ca.intermediate_key.unlink()
    with pytest.raises(LabCAError, match="both"):
        load_lab_ca(tmp_path / "ca")
    assert ca.intermediate_cert is not None
    ca.intermediate_cert.unlink()
    ca.signing_cert.write_text("garbage")
    with pytest.raises(LabCAError, match="unreadable"):
        load_lab_ca(tmp_path / "ca")


def test_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(LabCAError, match="key type"):
        create_lab_ca(tmp_path, key_type="dsa")
    with pytest.raises(LabCAError, match="valid_days"):
        create_lab_ca(tmp_path, valid_days=0)
