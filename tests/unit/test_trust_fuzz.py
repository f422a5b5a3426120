"""Hostile inputs: verify_cab returns a Verdict for any mutation of a signed CAB."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmlab.site.trust import LabCA, Verdict, VerdictStatus, sign_cab, verify_cab
from tests.helpers.trust_helpers import Signed, trust_for

Mutation = tuple[str, int, bytes]

# Session fixtures (CAs, CABs) shared by all trust tests.
pytest_plugins = ["tests.helpers.trust_helpers"]


@pytest.fixture(scope="module")
def ecdsa_signed(
    tmp_path_factory: pytest.TempPathFactory, ecdsa_ca: LabCA, unsigned_cab: Path
) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "ecdsa.cab"
    sign_cab(unsigned_cab, path, ecdsa_ca.signer("sha384"))
    assert verify_cab(path, trust_for(ecdsa_ca)).trusted
    return path


mutation = st.tuples(
    st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]),
    st.integers(min_value=0, max_value=1 << 16),
    st.binary(min_size=1, max_size=16),
)


def apply(data: bytes, mutations: list[Mutation]) -> bytes:
    out = bytearray(data)
    for kind, where, payload in mutations:
        at = where % (len(out) + 1)
        if kind == "flip" and out:
            out[at % len(out)] ^= payload[0] or 0x01
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = payload
        elif kind == "delete":
            del out[at : at + len(payload)]
        elif kind == "overwrite":
            out[at : at + len(payload)] = payload
    return bytes(out)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(mutations=st.lists(mutation, min_size=1, max_size=4), use_ecdsa=st.booleans())
def test_mutated_signed_cab_always_gets_a_verdict(
    tmp_path: Path,
    signed_cab: Signed,
    ecdsa_signed: Path,
    mutations: list[Mutation],
    use_ecdsa: bool,
) -> None:
    source = ecdsa_signed if use_ecdsa else signed_cab.path
    original = source.read_bytes()
    mutated = apply(original, mutations)
    target = tmp_path / "mutated.cab"
    target.write_bytes(mutated)
    verdict = verify_cab(target, signed_cab.trust)
    assert isinstance(verdict, Verdict)
    assert isinstance(verdict.status, VerdictStatus) and verdict.reason
    # No "never trusted" claim here: PKCS#7 has unsigned fields (the outer digestAlgorithms
    # set, certificate order) that may change harmlessly. Changes to the signed bytes are
    # covered exhaustively by the byte-flip tests.


@given(data=st.binary(max_size=512))
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_arbitrary_bytes_get_a_verdict(tmp_path: Path, signed_cab: Signed, data: bytes) -> None:
    target = tmp_path / "any.cab"
    target.write_bytes(data)
    assert not verify_cab(target, signed_cab.trust).trusted
