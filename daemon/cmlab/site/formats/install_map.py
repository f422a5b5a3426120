"""install.map: the steps CMUpdate's installer runs, in order (`SMSSetup\\install.map` in the
payload, cmlab.site.formats.payload_layout.INSTALL_MAP; grammar in docs/formats.md):

    STEP <n><ACTION><INSTALL_STATE><title><key=value;key=value>

one step a line, numbered 1, 2, 3... without gaps; blank lines and `#` comments are skipped.
It is written by hand in payloads/ (no renderer); the sample builder checks it when it builds
a payload, and the installer reads it.

Interface: `parse_install_map(text) -> tuple[InstallStep, ...]`, raising UpdateMapError that
names the line; `InstallStep.param(key, default)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cmlab.core.errors import UpdateMapError
from cmlab.site.state_codes import PackageState

__all__ = ["MAX_INSTALL_MAP_CHARS", "InstallStep", "parse_install_map"]

MAX_INSTALL_MAP_CHARS = 1024 * 1024


@dataclass(frozen=True)
class InstallStep:
    id: int
    action: str
    state: str  # the INSTALL_* state name reported while the step runs
    title: str
    params: tuple[tuple[str, str], ...]

    def param(self, key: str, default: str = "") -> str:
        return dict(self.params).get(key, default)


_STEP_RE = re.compile(
    r"^STEP\s+<(\d{1,4})><([A-Z][A-Z0-9_]*)><(INSTALL_[A-Z_]+)><([^<>]+)><([^<>]*)>$"
)
_PARAM_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)=([^;<>]*)$")


def parse_install_map(text: str) -> tuple[InstallStep, ...]:
    """Parse install.map; UpdateMapError with the line number on any deviation."""
    if len(text) > MAX_INSTALL_MAP_CHARS:
        raise UpdateMapError("install.map is larger than 1 MiB")
    steps: list[InstallStep] = []
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        found = _STEP_RE.match(line)
        if not found:
            raise UpdateMapError(
                f"install.map line {lineno}: expected STEP <id><ACTION><INSTALL_STATE>"
                f"<title><key=value;...>, found {line[:60]!r}"
            )
        ident, action, state, title, params_text = found.groups()
        if state not in PackageState.__members__:
            raise UpdateMapError(f"install.map line {lineno}: unknown state {state}")
        if int(ident) != len(steps) + 1:
            raise UpdateMapError(
                f"install.map line {lineno}: step {ident} out of order (expected {len(steps) + 1})"
            )
        params = []
        for part in params_text.split(";") if params_text else []:
            pm = _PARAM_RE.match(part)
            if not pm:
                raise UpdateMapError(f"install.map line {lineno}: bad parameter {part!r}")
            params.append((pm.group(1), pm.group(2)))
        steps.append(InstallStep(int(ident), action, state, title.strip(), tuple(params)))
    if not steps:
        raise UpdateMapError("install.map has no steps")
    return tuple(steps)
