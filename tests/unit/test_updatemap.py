"""cmlab.site.formats.update_map: the guide's update.map grammar, strictly."""

# ruff: noqa: E501  (the guide's example is kept verbatim, long lines and all)

from __future__ import annotations

import contextlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmlab.core.errors import UpdateMapError
from cmlab.site.formats.update_map import (
    MapComponent,
    MapDirectory,
    MapFile,
    UpdateMap,
    decode_update_map,
    parse_update_map,
    render_update_map,
)

# Copied verbatim from the guide ("Process step 4: CMUpdate starts the check").
GUIDE_EXAMPLE = r"""
BEGIN_COMPONENT_FILELIST
    <CONFIGURATION_MANAGER_UPDATE>
    <268436008>
    BEGIN_DIRECTORY
        <bin\x64>
        <5><AMD64><>
        FILEEX <cmupdate.exe><1><26699848><SHA256><6953438BE14562E2E2A2860195BC7308FE3647ABF803F98269F8976A145063AC>
        FILEEX <setupcore.dll><0><28034624><SHA256><A335EE6EDF6593AF9F1498B1F6297C0B9E49E58BF3C472929AFEA38F09F51C85>
        FILEEX <prereqcore.dll><0><4464648><SHA256><48899098998C712DDF097638B281D5620D8C511FB9B51E2391119281E0ECA43E>
        FILEEX <DcmDigest.xsd><0><73022><SHA256><91E264E70863EC00DAFDE0B2EAC36B7CBA9BC73A4C3CA2520BE9337C4FFB88B7>
        FILEEX <appmgmtdigest.xsd><0><25916><SHA256><F0F2A3880D57E930EAF4A13285F3EDC56EF7032AFF656B2C31833099D15426C7>
        FILEEX <Rules.xsd><0><27433><SHA256><1665E3AF74BFF8BCD5DFD3E71BE869475A53BC60A712BF009D828AEF8C176C3D>
        FILEEX <SecuredRoles.xsd><0><1588><SHA256><3F400C0DC1590CF2A2332741D1D801CC242A6A46FDD6B7CD9A439D16059568EA>
        FILEEX <SoftwareCenterCustomization.xsd><0><4658><SHA256><4B6AD4CDCAF88204961ACC8D563021F9C962A74BBDB270DCF2ED6095D10362C6>
    END_DIRECTORY
    BEGIN_DIRECTORY
        <AI>
        <517><AMD64><>
        FILEEX <LUTables.enc><0><212980419><SHA256><9D43DE730D74B335F77AB2264EE450B233698E94407C6491D136761EEBCFEDE7>
    END_DIRECTORY
    UNIT <SMS>
END_COMPONENT_FILELIST
"""


def test_parses_the_guides_example() -> None:
    m = parse_update_map(GUIDE_EXAMPLE)
    assert len(m.components) == 1
    cmu = m.component("CONFIGURATION_MANAGER_UPDATE")
    assert cmu is not None
    assert cmu.id == 268436008
    assert cmu.units == ("SMS",)
    assert [d.path for d in cmu.directories] == ["bin\\x64", "AI"]
    bin64, ai = cmu.directories
    assert bin64.attrs == ("5", "AMD64", "")
    assert ai.attrs == ("517", "AMD64", "")
    assert len(bin64.files) == 8
    assert bin64.files[0] == MapFile(
        "cmupdate.exe",
        1,
        26699848,
        "SHA256",
        "6953438BE14562E2E2A2860195BC7308FE3647ABF803F98269F8976A145063AC",
    )
    prereq = next(f for f in bin64.files if f.name == "prereqcore.dll")
    assert prereq.hash == "48899098998C712DDF097638B281D5620D8C511FB9B51E2391119281E0ECA43E"
    assert ai.files == (
        MapFile(
            "LUTables.enc",
            0,
            212980419,
            "SHA256",
            "9D43DE730D74B335F77AB2264EE450B233698E94407C6491D136761EEBCFEDE7",
        ),
    )
    assert m.component("SITE_SERVER") is None


def test_render_parse_round_trip_and_layout() -> None:
    m = parse_update_map(GUIDE_EXAMPLE)
    text = render_update_map(m)
    assert parse_update_map(text) == m
    # the rendering is the guide's own layout, line for line
    assert text == GUIDE_EXAMPLE.lstrip("\n")


def test_several_components_crlf_bom_and_utf16() -> None:
    m = UpdateMap(
        (
            MapComponent(
                "CONFIGURATION_MANAGER_UPDATE",
                268436008,
                (
                    MapDirectory(
                        "bin\\x64",
                        ("5", "AMD64", ""),
                        (MapFile("a.exe", 1, 3, "SHA256", "A" * 64),),
                    ),
                ),
                ("SMS",),
            ),
            MapComponent(
                "SITE_SERVER",
                268436009,
                (
                    MapDirectory("", ("0",), ()),
                    MapDirectory(
                        "bin\\x64\\00000409",
                        ("5", "AMD64", ""),
                        (MapFile("b.dll", 0, 0, "SHA1", "B" * 40),),
                    ),
                ),
                ("SMS", "SITE"),
            ),
        )
    )
    text = render_update_map(m)
    assert parse_update_map(text) == m
    crlf = text.replace("\n", "\r\n")
    assert parse_update_map(crlf) == m
    assert parse_update_map(decode_update_map(b"\xef\xbb\xbf" + crlf.encode())) == m
    assert parse_update_map(decode_update_map(crlf.encode("utf-16"))) == m
    with pytest.raises(UpdateMapError):
        decode_update_map(b"\xff\xfe\x00\xd8")  # UTF-16 with a lone surrogate
    with pytest.raises(UpdateMapError):
        decode_update_map(b"BEGIN\xff")


def test_hash_case_is_normalised() -> None:
    text = GUIDE_EXAMPLE.replace("6953438BE14562E2", "6953438be14562e2").replace(
        "<SHA256>", "<sha256>", 1
    )
    f = parse_update_map(text).components[0].directories[0].files[0]
    assert f.algorithm == "SHA256"
    assert f.hash.startswith("6953438BE14562E2")


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.split("\n"), 1) if needle in line)


def _break(old: str, new: str) -> tuple[str, int]:
    text = GUIDE_EXAMPLE.replace(old, new, 1)
    return text, _line_of(text, new.strip().split("\n")[0] or old)


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        # bad FILEEX field count
        ("<cmupdate.exe><1><26699848>", "<cmupdate.exe><26699848>", "5 fields"),
        ("<prereqcore.dll><0>", "<prereqcore.dll><0><0>", "5 fields"),
        # non-numeric size, negative and signed numbers
        ("<26699848>", "<26,699,848>", "decimal"),
        ("<28034624>", "<-1>", "decimal"),
        ("<4464648>", "<+4464648>", "decimal"),
        ("<268436008>", "<0x10000328>", "decimal"),
        # bad hash hex and length
        ("6953438BE14562E2", "6953438BE14562EG", "hex"),
        (
            "<48899098998C712DDF097638B281D5620D8C511FB9B51E2391119281E0ECA43E>",
            "<48899098>",
            "64 hex",
        ),
        ("<SHA256><91E264E7", "<CRC32><91E264E7", "algorithm"),
        # names and paths that would escape
        ("<setupcore.dll>", "<..\\setupcore.dll>", "file name"),
        ("<Rules.xsd>", "<sub/Rules.xsd>", "file name"),
        ("<bin\\x64>", "<..\\..\\Windows>", "directory path"),
        ("<AI>", "<C:\\AI>", "directory path"),
        # structure
        ("FILEEX <Rules.xsd>", "FILE <Rules.xsd>", "FILEEX or END_DIRECTORY"),
        ("    UNIT <SMS>", "    UNIT SMS", "unit name"),
        (
            "    <CONFIGURATION_MANAGER_UPDATE>",
            "    CONFIGURATION_MANAGER_UPDATE",
            "component name",
        ),
        ("<5><AMD64><>", "<5><AMD64>>", "malformed"),
        ("<517><AMD64><>", "517 AMD64", "attributes"),
        ("FILEEX <DcmDigest.xsd>", "FILEEX <DcmDigest.xsd>\x00", "malformed"),
        ("<cmupdate.exe>", "<cmupdate.exe><1><2><SHA256><" + "A" * 64 + ">", "twice|5 fields"),
    ],
)
def test_malformed_maps_raise_with_line_number(old: str, new: str, match: str) -> None:
    assert old in GUIDE_EXAMPLE
    text = GUIDE_EXAMPLE.replace(old, new, 1)
    lineno = _line_of(text, new.split("\n")[0])
    with pytest.raises(UpdateMapError, match=match) as info:
        parse_update_map(text)
    assert f"line {lineno}:" in str(info.value)


def test_missing_end_directory() -> None:
    text = GUIDE_EXAMPLE.replace("    END_DIRECTORY\n    BEGIN_DIRECTORY", "    BEGIN_DIRECTORY", 1)
    with pytest.raises(UpdateMapError, match=r"line \d+: expected FILEEX or END_DIRECTORY"):
        parse_update_map(text)
    truncated = GUIDE_EXAMPLE[: GUIDE_EXAMPLE.index("    END_DIRECTORY")]
    with pytest.raises(
        UpdateMapError,
        match="end of file, expected END_DIRECTORY for the directory opened at line 5",
    ):
        parse_update_map(truncated)


def test_missing_end_component_and_stray_lines() -> None:
    with pytest.raises(UpdateMapError, match="END_COMPONENT_FILELIST"):
        parse_update_map(GUIDE_EXAMPLE.replace("END_COMPONENT_FILELIST", ""))
    with pytest.raises(UpdateMapError, match="line 1: expected BEGIN_COMPONENT_FILELIST"):
        parse_update_map("hello\n" + GUIDE_EXAMPLE)
    with pytest.raises(UpdateMapError, match="appears twice"):
        parse_update_map(GUIDE_EXAMPLE + GUIDE_EXAMPLE)
    with pytest.raises(UpdateMapError, match="listed twice"):
        parse_update_map(GUIDE_EXAMPLE.replace("<SecuredRoles.xsd>", "<RULES.XSD>"))
    assert parse_update_map("") == UpdateMap(())
    assert parse_update_map("\n  \r\n") == UpdateMap(())


def test_hostile_input_is_refused_quickly() -> None:
    started = time.perf_counter()
    for text in (
        "\x00\xff" * 1_000_000,
        "BEGIN_COMPONENT_FILELIST\n<" + "<>" * 1_000_000 + ">\n",
        "BEGIN_COMPONENT_FILELIST\n<A>\n<1>\n"
        + "BEGIN_DIRECTORY\n<d>\n<1>\n" * 1
        + "FILEEX <"
        + "x><" * 300_000
        + ">\n",
        "BEGIN_COMPONENT_FILELIST\n<A>\n<" + "9" * 100_000 + ">\n",
    ):
        with pytest.raises(UpdateMapError):
            parse_update_map(text)
    with pytest.raises(UpdateMapError, match="larger"):
        parse_update_map(" " * (64 * 1024 * 1024 + 1))
    with pytest.raises(UpdateMapError):
        parse_update_map(b"BEGIN_COMPONENT_FILELIST")  # type: ignore[arg-type]
    assert time.perf_counter() - started < 10


_tokens = st.sampled_from(
    [
        "BEGIN_COMPONENT_FILELIST",
        "END_COMPONENT_FILELIST",
        "BEGIN_DIRECTORY",
        "END_DIRECTORY",
        "FILEEX ",
        "UNIT ",
        "<",
        ">",
        "><",
        "<SHA256>",
        "<bin\\x64>",
        "<1>",
        "<" + "A" * 64 + ">",
        "\n",
        "\r\n",
        " ",
        "..\\",
        "\x00",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=400), st.lists(_tokens, max_size=80).map("".join)))
def test_fuzz_random_text_only_raises_update_map_error(text: str) -> None:
    try:
        m = parse_update_map(text)
    except UpdateMapError:
        return
    assert parse_update_map(render_update_map(m)) == m


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_decode_only_raises_update_map_error(data: bytes) -> None:
    with contextlib.suppress(UpdateMapError):
        parse_update_map(decode_update_map(data))


_name = st.text("abcXYZ019_.-", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@st.composite
def _maps(draw: st.DrawFn) -> UpdateMap:
    comps = []
    for cname in draw(
        st.lists(st.text("ABCDEFGHIJ_", min_size=1, max_size=10), unique=True, max_size=3)
    ):
        dirs = []
        for dpath in draw(st.lists(_name, unique_by=str.lower, max_size=3)):
            files = tuple(
                MapFile(
                    n,
                    draw(st.integers(0, 9)),
                    draw(st.integers(0, 2**40)),
                    "SHA256",
                    draw(st.text("0123456789ABCDEF", min_size=64, max_size=64)),
                )
                for n in draw(st.lists(_name, unique_by=str.lower, max_size=4))
            )
            attrs = tuple(
                draw(st.lists(st.text("0123456789AMD", max_size=5), min_size=1, max_size=3))
            )
            dirs.append(MapDirectory("bin\\" + dpath, attrs, files))
        units = tuple(draw(st.lists(st.text("SMITE", min_size=1, max_size=4), max_size=2)))
        comps.append(MapComponent(cname, draw(st.integers(0, 2**32)), tuple(dirs), units))
    return UpdateMap(tuple(comps))


@settings(max_examples=150, deadline=None)
@given(_maps())
def test_round_trip_property(m: UpdateMap) -> None:
    assert parse_update_map(render_update_map(m)) == m
