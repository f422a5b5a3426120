"""The site tree: every folder of DESIGN.md's "The site tree", and how paths are shown in logs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Protocol


class ShowPath(Protocol):
    """`SitePaths.show`'s signature, for code that is handed it (a component's `show`)."""

    def __call__(self, path: Path | str, *, trailing_sep: bool = False) -> str: ...


@dataclass(frozen=True)
class SitePaths:
    root: Path
    display_root: str = ""

    # inboxes
    @property
    def inboxes(self) -> Path:
        return self.root / "inboxes"

    @property
    def hman_box(self) -> Path:
        return self.inboxes / "hman.box"

    @property
    def hman_cfd(self) -> Path:
        return self.hman_box / "CFD"

    @property
    def hman_forwarding(self) -> Path:
        return self.hman_box / "ForwardingMsg"

    @property
    def cmupdate_box(self) -> Path:
        return self.inboxes / "cmupdate.box"

    @property
    def despoolr_receive(self) -> Path:
        return self.inboxes / "despoolr.box" / "receive"

    @property
    def distmgr_box(self) -> Path:
        return self.inboxes / "distmgr.box"

    @property
    def schedule_box(self) -> Path:
        """The Scheduler's inbox: `<JobID>.JOB` from SMSDBMon (a SchedulerJobs row)."""
        return self.inboxes / "schedule.box"

    @property
    def schedule_tosend(self) -> Path:
        """Instruction files (`<JobID>.Idb`) the Scheduler writes for the Sender."""
        return self.schedule_box / "tosend"

    @property
    def sender_outbox(self) -> Path:
        """Send requests (`<JobID>.SRQ`) the Scheduler queues for the LAN Sender."""
        return self.schedule_box / "outboxes" / "LAN"

    @property
    def rcm_receive(self) -> Path:
        """CMUpdates replication group messages from the parent and child sites (`*.RPL`)."""
        return self.inboxes / "rcm.box" / "receive"

    @property
    def smspkg(self) -> Path:
        """Compressed packages for file-based replication (`<PkgID>.PCK.<version>`)."""
        return self.root / "SMSPKG"

    @property
    def statesys_high(self) -> Path:
        return self.inboxes / "auth" / "statesys.box" / "incoming" / "high"

    @property
    def mcm_outbox(self) -> Path:
        return self.root / "MP" / "OUTBOXES" / "MCM.box"

    # content
    @property
    def easysetup_payload(self) -> Path:
        return self.root / "EasySetupPayload"

    def payload_folder(self, guid: str) -> Path:
        """`EasySetupPayload/<guid>`, the downloaded package, named in lower case as
        DMPDownloader writes it (Windows would not care; the share path shows it upper-case)."""
        return self.easysetup_payload / guid.lower()

    @property
    def cmu_staging(self) -> Path:
        return self.root / "CMUStaging"

    @property
    def content_lib(self) -> Path:
        return self.root / "SCCMContentLib"

    @property
    def logs(self) -> Path:
        return self.root / "Logs"

    @property
    def db_dir(self) -> Path:
        return self.root / "db"

    @property
    def db_file(self) -> Path:
        return self.db_dir / "site.db"

    @property
    def trust_dir(self) -> Path:
        return self.root / "trust"

    def all_folders(self) -> list[Path]:
        r = self.root
        return [
            self.hman_box,
            self.hman_cfd,
            self.hman_forwarding,
            self.cmupdate_box,
            self.despoolr_receive,
            self.distmgr_box,
            self.schedule_box,
            self.schedule_tosend,
            self.sender_outbox,
            self.rcm_receive,
            self.smspkg,
            self.statesys_high,
            self.mcm_outbox,
            self.easysetup_payload,
            self.cmu_staging,
            self.content_lib,
            r / "cd.latest",
            r / "CMUClient",
            r / "Client",
            r / "ClientUpgrade",
            r / "PilotingUpgrade",
            self.logs,
            self.db_dir,
            self.trust_dir,
        ]

    def show(self, path: Path | str, *, trailing_sep: bool = False) -> str:
        """A path as it appears in this site's logs.

        With `display_root` (e.g. `E:\\ConfigMgr`) paths under the site are shown the way the
        guide prints them on a Windows site server; otherwise the real local path is shown."""
        p = Path(path)
        text: str
        if self.display_root:
            try:
                rel = p.relative_to(self.root)
            except ValueError:
                text = str(p)
            else:
                text = str(PureWindowsPath(self.display_root, *rel.parts))
            sep = "\\"
        else:
            text = str(p)
            sep = "/"
        if trailing_sep and not text.endswith(sep):
            text += sep
        return text
