"""cmlab.site.formats: one pattern per identifier, and every format that has a writer and a
parser gives back what was written (a malformed input raises the format's own error)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import cmlab
from cmlab.site.formats.ids import (
    is_guid,
    is_job_id,
    is_package_id,
    is_sha256,
    is_site_code,
    is_upper_sha256,
)
from cmlab.site.formats.state_message import (
    StateMessage,
    StateMessageError,
    parse_state_message,
    random_smx_name,
    render_state_message,
)

GUID = "3B1E0A8D-5C2F-4E6A-9D7B-B3C1F2E6A9D0"
HASH = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"

# -- ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [GUID, GUID.lower(), "00000000-0000-0000-0000-000000000000"])
def test_a_guid_is_accepted_in_either_case(text: str) -> None:
    assert is_guid(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        GUID + "\n",  # `^...$` with match let this through
        "\n" + GUID,
        GUID + "0",
        GUID[:-1],
        "{" + GUID + "}",
        GUID.replace("-", ""),
        GUID.replace("B", "G"),
        GUID.replace("3", "\uff13"),  # a full-width digit
    ],
)
def test_anything_but_a_whole_guid_is_refused(text: str) -> None:
    assert not is_guid(text)


def test_site_codes_package_ids_and_job_ids_are_upper_case_ascii() -> None:
    assert is_site_code("CAS") and is_site_code("PR1") and is_site_code("123")
    for bad in ("cas", "CA", "CASX", "CAS\n", "\u212aAS", "C-S"):
        assert not is_site_code(bad), bad
    assert is_package_id("CAS10001") and is_package_id("PR1000AF")
    for bad in ("cas10001", "CAS1000G", "CAS1000", "CAS100011", "CAS10001\n", "\u212aAS10001"):
        assert not is_package_id(bad), bad
    assert is_job_id("00000391") and is_job_id("ABCDEF01") and is_job_id("00000000")
    for bad in ("00000391\n", "abcdef01", "391", "0000039G", "000003911"):
        assert not is_job_id(bad), bad


def test_sha256_either_case_or_upper_only() -> None:
    assert is_sha256(HASH) and is_sha256(HASH.lower())
    assert is_upper_sha256(HASH) and not is_upper_sha256(HASH.lower())
    for bad in (HASH + "\n", HASH[:-1], HASH + "0", HASH.replace("E", "G")):
        assert not is_sha256(bad) and not is_upper_sha256(bad), bad


def test_no_module_keeps_its_own_guid_pattern() -> None:
    """The GUID pattern is written once, in cmlab.site.formats.ids."""
    root = Path(cmlab.__file__).parent
    owners = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "{8}-" in path.read_text(encoding="utf-8")
    )
    assert owners == ["site/formats/ids.py"]


# -- .SMX state message ------------------------------------------------------------------------


def test_a_state_message_name_is_cmu_and_eight_random_characters() -> None:
    names = {random_smx_name() for _ in range(50)}
    assert len(names) == 50
    assert all(re.fullmatch(r"___CMU[a-z0-9]{8}\.SMX", n) for n in names)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty"),
        (b"<StateMessage Component='C' TopicID='x' StateID='1'/>", "TopicID 'x' is not a GUID"),
        (f"<StateMessage Component='C' TopicID='{GUID}' StateID='one'/>".encode(), "StateID"),
        (f"<StateMessage TopicID='{GUID}' StateID='1'/>".encode(), "Component is missing"),
        (f"<Other Component='C' TopicID='{GUID}' StateID='1'/>".encode(), "StateMessage"),
    ],
)
def test_a_malformed_state_message_raises_state_message_error(body: bytes, reason: str) -> None:
    with pytest.raises(StateMessageError, match=reason):
        parse_state_message(body)


def test_a_state_message_round_trips_with_its_topic_in_lower_case() -> None:
    msg = StateMessage("SMS_DMP_DOWNLOADER", "cas.lab", GUID, 25, "", "2026-11-21T00:00:00")
    back = parse_state_message(render_state_message(msg))
    assert back == StateMessage(
        "SMS_DMP_DOWNLOADER", "cas.lab", GUID.lower(), 25, "", "2026-11-21T00:00:00"
    )
