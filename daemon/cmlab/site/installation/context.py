"""What the caller gives an installation (InstallContext) and what a failed step raises
(InstallStepError): the two types every module of the installation shares.

InstallStepError's message says what failed and what to do; the caller (CMUpdate) writes it
as the `ERROR:` line, so its text is part of the lab (docs/installation.md, "The API").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cmlab.core.errors import WorkFailed
from cmlab.site.formats.install_map import InstallStep
from cmlab.site.formats.update_map import UpdateMap
from cmlab.site.trust import TrustStore

__all__ = ["InstallContext", "InstallStepError"]


class InstallStepError(WorkFailed):
    """An install step that failed; the message says what, and how to fix it. `step` is the
    install.map step (None when the failure is not tied to one, e.g. in finish())."""

    def __init__(self, message: str, *, step: InstallStep | None = None) -> None:
        prefix = f"install step {step.id} ({step.action}) failed: " if step else ""
        super().__init__(prefix + message)
        self.step = step


@dataclass(frozen=True)
class InstallContext:
    site_root: Path
    staging: Path  # CMUStaging/<GUID>, placeholders already replaced (redist_media.check_media)
    db_file: Path
    site_code: str
    guid: str
    target_build: int  # e.g. 9141
    target_version: str  # e.g. "5.00.9141.1000"
    update_map: UpdateMap
    trust: TrustStore  # to verify ConfigMgr.AutoUpgradeScripts.cab
    say: Callable[[str], None]
    show: Callable[[Path], str]
