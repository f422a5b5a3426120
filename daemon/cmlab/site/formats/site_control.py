"""The site control file (`SITE/inboxes/sitectrl.box/sitectrl.ct0`): the writer, the reader of
the site definition's properties, and the edit the install makes (docs/installation.md, "The
site control file").

Why it is here: `cmlab init`, a secondary site's reinstallation (the despooler) and install
step 11 (UPDATE_SITE_CONTROL) write the file and steps 6 and 11 read it; like every format it
lives in site/formats, below all of them, not in one of its users.

The layout is ConfigMgr's block layout reduced to what the lab shows:

    BEGIN_SITE_CONTROL_FILE
        <FileType><2>
        BEGIN_SITE_DEFINITION
            <CAS>
            <cas.cmlab.local>
            PROPERTY <Build Number><><9135><0>
            ...
        END_SITE_DEFINITION
        BEGIN_COMPONENT
            ...
        END_COMPONENT
    END_SITE_CONTROL_FILE

What it promises: `render_site_control` writes the same text for the same arguments (lines
joined by `\\n`, one final newline); `set_site_control_properties` changes only the
`PROPERTY` lines it is asked to (a trainee's edits elsewhere survive) and returns the text
unchanged when every value is already there. Reading is lenient by design (the file is the
trainee's to edit): a line that is not a well-formed `PROPERTY` is kept and ignored, and a
file without a site definition is reported (None), not an error.
"""

from __future__ import annotations

import re

__all__ = [
    "render_site_control",
    "set_site_control_properties",
    "site_control_properties",
]

_COMPONENTS = ("SMS_SITE_COMPONENT_MANAGER", "SMS_HIERARCHY_MANAGER", "SMS_DMP_DOWNLOADER")
_PROPERTY_RE = re.compile(r"^(\s*)PROPERTY <([^<>]*)><([^<>]*)><([^<>]*)><([^<>]*)>\s*$")
_BEGIN_DEFINITION = "BEGIN_SITE_DEFINITION"
_END_DEFINITION = "END_SITE_DEFINITION"


def render_site_control(
    site_code: str, server: str, build: int, full_version: str, install_dir: str
) -> str:
    """sitectrl.ct0 in the site control file's block layout, reduced to what the lab shows:
    UPDATE_SITE_CONTROL changes the Build Number and Full Version properties of the site
    definition and keeps every other line (a trainee's edits included)."""
    lines = [
        "BEGIN_SITE_CONTROL_FILE",
        "    <FileType><2>",
        f"    {_BEGIN_DEFINITION}",
        f"        <{site_code}>",
        f"        <{server}>",
        f"        PROPERTY <Site Code><><{site_code}><0>",
        f"        PROPERTY <Site Server Name><><{server}><0>",
        f"        PROPERTY <Installation Directory><><{install_dir}><0>",
        f"        PROPERTY <Build Number><><{build}><0>",
        f"        PROPERTY <Full Version><><{full_version}><0>",
        f"    {_END_DEFINITION}",
    ]
    for component in _COMPONENTS:
        lines += [
            "    BEGIN_COMPONENT",
            f"        <{component}>",
            f"        <{server}>",
            "        PROPERTY <Enabled><><TRUE><1>",
            "    END_COMPONENT",
        ]
    lines.append("END_SITE_CONTROL_FILE")
    return "\n".join(lines) + "\n"


def site_control_properties(text: str) -> dict[str, str]:
    """The site definition's properties, name -> value (the third field of a PROPERTY line);
    empty when the file has no site definition."""
    props: dict[str, str] = {}
    inside = False
    for line in text.split("\n"):
        if line.strip() == _BEGIN_DEFINITION:
            inside = True
        elif line.strip() == _END_DEFINITION:
            inside = False
        elif inside and (m := _PROPERTY_RE.match(line)):
            props[m.group(2)] = m.group(4)
    return props


def set_site_control_properties(text: str, values: dict[str, str]) -> str | None:
    """`text` with the site definition's properties set to `values` (added before
    END_SITE_DEFINITION when missing); None if the file has no site definition."""
    lines = text.split("\n")
    inside = False
    done: set[str] = set()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped == _BEGIN_DEFINITION:
            inside = True
        elif stripped == _END_DEFINITION and inside:
            indent = line[: len(line) - len(line.lstrip())] + "    "
            missing = [
                f"{indent}PROPERTY <{k}><><{v}><0>" for k, v in values.items() if k not in done
            ]
            return "\n".join(lines[:i] + missing + lines[i:])
        elif inside and (m := _PROPERTY_RE.match(line)) and m.group(2) in values:
            name = m.group(2)
            lines[i] = f"{m.group(1)}PROPERTY <{name}><{m.group(3)}><{values[name]}><{m.group(5)}>"
            done.add(name)
    return None
