"""cmlab.site.formats.site_control: the site control file's writer, reader and edit agree, and
the text written is the one docs/installation.md shows."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cmlab.site.formats.site_control import (
    render_site_control,
    set_site_control_properties,
    site_control_properties,
)

# The file `cmlab init` writes for the docs' example site, byte for byte.
EXAMPLE = """\
BEGIN_SITE_CONTROL_FILE
    <FileType><2>
    BEGIN_SITE_DEFINITION
        <CAS>
        <cas.cmlab.local>
        PROPERTY <Site Code><><CAS><0>
        PROPERTY <Site Server Name><><cas.cmlab.local><0>
        PROPERTY <Installation Directory><><E:\\ConfigMgr><0>
        PROPERTY <Build Number><><9135><0>
        PROPERTY <Full Version><><5.00.9135.1006><0>
    END_SITE_DEFINITION
    BEGIN_COMPONENT
        <SMS_SITE_COMPONENT_MANAGER>
        <cas.cmlab.local>
        PROPERTY <Enabled><><TRUE><1>
    END_COMPONENT
    BEGIN_COMPONENT
        <SMS_HIERARCHY_MANAGER>
        <cas.cmlab.local>
        PROPERTY <Enabled><><TRUE><1>
    END_COMPONENT
    BEGIN_COMPONENT
        <SMS_DMP_DOWNLOADER>
        <cas.cmlab.local>
        PROPERTY <Enabled><><TRUE><1>
    END_COMPONENT
END_SITE_CONTROL_FILE
"""
NEW = {"Build Number": "9141", "Full Version": "5.00.9141.1000"}


def example() -> str:
    return render_site_control("CAS", "cas.cmlab.local", 9135, "5.00.9135.1006", r"E:\ConfigMgr")


def test_the_writer_writes_the_documented_layout() -> None:
    assert example() == EXAMPLE


def test_the_reader_reads_back_what_the_writer_wrote() -> None:
    assert site_control_properties(EXAMPLE) == {
        "Site Code": "CAS",
        "Site Server Name": "cas.cmlab.local",
        "Installation Directory": r"E:\ConfigMgr",
        "Build Number": "9135",
        "Full Version": "5.00.9135.1006",
    }


def test_the_install_edit_changes_the_two_lines_and_nothing_else() -> None:
    edited = set_site_control_properties(EXAMPLE, NEW)
    assert edited is not None
    changed = [
        (old, new)
        for old, new in zip(EXAMPLE.split("\n"), edited.split("\n"), strict=True)
        if old != new
    ]
    assert changed == [
        (
            "        PROPERTY <Build Number><><9135><0>",
            "        PROPERTY <Build Number><><9141><0>",
        ),
        (
            "        PROPERTY <Full Version><><5.00.9135.1006><0>",
            "        PROPERTY <Full Version><><5.00.9141.1000><0>",
        ),
    ]
    assert edited == render_site_control(
        "CAS", "cas.cmlab.local", 9141, "5.00.9141.1000", r"E:\ConfigMgr"
    )
    assert set_site_control_properties(edited, NEW) == edited  # run again: nothing to change


def test_a_trainees_edits_survive_and_a_missing_property_is_added_at_the_end() -> None:
    text = EXAMPLE.replace(
        "        PROPERTY <Full Version><><5.00.9135.1006><0>\n",
        "        ; a trainee's note\n        PROPERTY <Site Comment><x><y><3>\n",
    )
    edited = set_site_control_properties(text, NEW)
    assert edited is not None
    assert "        ; a trainee's note\n        PROPERTY <Site Comment><x><y><3>\n" in edited
    assert (
        "        PROPERTY <Build Number><><9141><0>\n"
        "        ; a trainee's note\n"
        "        PROPERTY <Site Comment><x><y><3>\n"
        "        PROPERTY <Full Version><><5.00.9141.1000><0>\n"
        "    END_SITE_DEFINITION\n"
    ) in edited
    assert site_control_properties(edited)["Full Version"] == "5.00.9141.1000"
    # A component's PROPERTY lines are not the site definition's.
    assert "PROPERTY <Enabled><><TRUE><1>" in edited
    assert "Enabled" not in site_control_properties(edited)


def test_a_file_without_a_site_definition_is_reported_not_rewritten() -> None:
    text = (
        "BEGIN_SITE_CONTROL_FILE\n    PROPERTY <Build Number><><9135><0>\nEND_SITE_CONTROL_FILE\n"
    )
    assert set_site_control_properties(text, NEW) is None
    assert site_control_properties(text) == {}
    assert set_site_control_properties("", NEW) is None


# A field of the block layout: anything but the brackets that delimit it and a line break.
FIELD = st.text(
    alphabet=st.characters(blacklist_characters="<>\r\n", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=20,
)


@given(
    code=FIELD,
    server=FIELD,
    folder=FIELD,
    old=st.tuples(st.integers(0, 99999), FIELD),
    new=st.tuples(st.integers(0, 99999), FIELD),
)
def test_render_read_and_edit_round_trip(
    code: str, server: str, folder: str, old: tuple[int, str], new: tuple[int, str]
) -> None:
    text = render_site_control(code, server, old[0], old[1], folder)
    assert site_control_properties(text) == {
        "Site Code": code,
        "Site Server Name": server,
        "Installation Directory": folder,
        "Build Number": str(old[0]),
        "Full Version": old[1],
    }
    edited = set_site_control_properties(
        text, {"Build Number": str(new[0]), "Full Version": new[1]}
    )
    assert edited == render_site_control(code, server, new[0], new[1], folder)
