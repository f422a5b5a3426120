"""Authenticode trust for CAB files: sign, verify, and a lab CA to sign with."""

from cmlab.site.trust.authenticode import (
    Signer,
    SigningError,
    TrustStore,
    TrustStoreError,
    Verdict,
    VerdictStatus,
    sign_cab,
    verify_cab,
)
from cmlab.site.trust.cab_layout import NotACabError
from cmlab.site.trust.lab_ca import LabCA, LabCAError, create_lab_ca, load_lab_ca

__all__ = [
    "LabCA",
    "LabCAError",
    "NotACabError",
    "Signer",
    "SigningError",
    "TrustStore",
    "TrustStoreError",
    "Verdict",
    "VerdictStatus",
    "create_lab_ca",
    "load_lab_ca",
    "sign_cab",
    "verify_cab",
]
