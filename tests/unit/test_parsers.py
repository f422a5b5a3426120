"""Every parser of cmlab input (Manifest.xml, .SMX state messages, site.toml) returns a value or
raises the project's own error on malformed, truncated and hostile input, never anything else."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmlab.core.errors import CmlabError, ConfigError, ManifestError
from cmlab.site.config import load_config
from cmlab.site.formats.manifest import Manifest, ManifestPackage, parse_manifest, render_manifest
from cmlab.site.formats.state_message import (
    StateMessage,
    parse_state_message,
    render_state_message,
)

PKG = ManifestPackage(
    guid="420E3E18-73C5-4BE9-88B0-6F1E30A012CA",
    name="Configuration Manager 2509",
    package_type="Update",
    update="2509",
    full_version="5.00.9141.1000",
    min_cm_version="5.00.9128.1000",
    max_cm_version="5.00.9135.1999",
    more_info_link="https://go.microsoft.com/fwlink/?LinkID=2298746",
    description="sample",
    date_released="2025-10-06",
    applicability_file="CM2509-KB35360093_AppCheck_420E3E18.sql",
    applicability_hash="A" * 64,
    content_url="420E3E18-73C5-4BE9-88B0-6F1E30A012CA.cab",
    content_hash="B" * 64,
    redist_manifest_url="420E3E18-73C5-4BE9-88B0-6F1E30A012CA/redist/ConfigMgr.Manifest.cab",
    language_pack_manifest_url="420E3E18-73C5-4BE9-88B0-6F1E30A012CA/redist/ConfigMgr.LN.Manifest.cab",
)
GOOD = render_manifest(Manifest(version="1", packages=(PKG,)))


def test_manifest_round_trip() -> None:
    assert parse_manifest(GOOD) == Manifest(version="1", packages=(PKG,))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda s: s.replace(b'420E3E18-73C5-4BE9-88B0-6F1E30A012CA" Name', b'nope" Name'),
            "not a GUID",
        ),
        (
            lambda s: s.replace(b"<MinCMVersion>5.00.9128.1000", b"<MinCMVersion>latest"),
            "MinCMVersion",
        ),
        (lambda s: s.replace(b"A" * 64, b"A" * 63), "SHA-256"),
        (lambda s: s.replace(b'Algorithm="SHA256">B', b'Algorithm="MD5">B'), "only SHA256"),
        (lambda s: s.replace(b'ContentUrl="420E', b'ContentUrl="../../etc/420E'), "relative path"),
        (lambda s: s.replace(b'ContentUrl="420E', b'ContentUrl="C:\\420E'), "relative path"),
        (lambda s: s.replace(b'File="CM2509', b'File="../CM2509'), "not a .sql name"),
        (lambda s: s.replace(b"ConfigMgrUpdates", b"Other"), "root"),
        (lambda s: s[: len(s) // 2], "not well-formed"),
        (lambda s: b"", "not well-formed"),
        (lambda s: s.replace(b'encoding="utf-8"', b'encoding="utf-9"'), "not well-formed"),
        (
            lambda s: s.replace(
                b"</ConfigMgrUpdates>",
                s[s.index(b"<Manifest ") : s.index(b"</ConfigMgrUpdates>")]
                + b"</ConfigMgrUpdates>",
            ),
            "listed twice",
        ),
        (lambda s: b'<?xml version="1.0"?><ConfigMgrUpdates/>', "no <Manifest>"),
        (
            lambda s: (
                b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                b"<ConfigMgrUpdates>&e;</ConfigMgrUpdates>"
            ),
            "refused",
        ),
    ],
)
def test_malformed_manifests_name_the_problem(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ManifestError, match=message):
        parse_manifest(mutate(GOOD))


def test_oversized_manifest_is_refused_before_parsing() -> None:
    with pytest.raises(ManifestError, match="limit"):
        parse_manifest(b" " * (16 * 1024 * 1024 + 1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_manifest_parser_fuzz(data: st.DataObject) -> None:
    blob = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if op == "flip" and blob:
            blob[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del blob[pos : pos + data.draw(st.integers(1, 64))]
        else:
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=32))
    with contextlib.suppress(CmlabError):
        parse_manifest(bytes(blob))


STATE = StateMessage(
    component="SMS_DMP_DOWNLOADER",
    machine="cas.cmlab.local",
    topic_id="00000000-0000-0000-0000-000000000000",
    state_id=4,
    state_name="MANIFEST_DOWNLOADED",
    message_time="2026-11-21T13:00:00",
)


def test_state_message_round_trip() -> None:
    assert parse_state_message(render_state_message(STATE)) == STATE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_state_message_parser_fuzz(blob: bytes) -> None:
    with contextlib.suppress(CmlabError):
        parse_state_message(blob)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_state_message_mutations(pos: int, junk: bytes) -> None:
    good = render_state_message(STATE)
    with contextlib.suppress(CmlabError):
        parse_state_message(good[:pos] + junk + good[pos + len(junk) :])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "site.code"),
        ("[site]\ncode = 'TOOLONG'\n", "three letters"),
        ("[site]\ncode = 'CAS'\nrole = 'king'\n", "role"),
        ("[site]\ncode = 'CAS'\n[scp]\nmode = 'carrier pigeon'\n", "online or offline"),
        ("[site]\ncode = 'CAS'\n[intervals]\nsync = -1\n", "non-negative"),
        ("[site]\ncode = 'CAS'\n[intervals]\nsync = 'daily'\n", "non-negative"),
        ("[site]\ncode = 'CAS'\nthis is not toml\n", "site.toml"),
        ("site = 3\n", "must be a table"),
        ("[site]\ncode = 'CAS'\n[facts]\nbuild = 'x'\n", "integers"),
    ],
)
def test_invalid_site_toml_is_a_clear_config_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "site.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path)


def test_missing_site_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cmlab init"):
        load_config(tmp_path)
