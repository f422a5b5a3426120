"""The inbox contract (`inboxes/contract.toml`): which folder each component owns, which drop
files wake it and which handler takes them. Data, so tools and docs read the same table."""

from __future__ import annotations

import fnmatch
import os
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from cmlab.core.fs import TMP_PREFIX
from cmlab.site.resources import data_dir


@dataclass(frozen=True)
class InboxEntry:
    component: str
    folder: str
    files: tuple[str, ...]
    handler: str
    purpose: str
    workers: int = 1  # files of this inbox handled at once (one claim per file name)


@cache
def load_contract() -> tuple[InboxEntry, ...]:
    doc = tomllib.loads((data_dir("inboxes") / "contract.toml").read_text(encoding="utf-8"))
    return tuple(
        InboxEntry(
            component=e["component"],
            folder=e["folder"],
            files=tuple(e["files"]),
            handler=e["handler"],
            purpose=e.get("purpose", ""),
            workers=int(e.get("workers", 1)),
        )
        for e in doc["inbox"]
    )


def entries_for(component: str) -> list[InboxEntry]:
    return [e for e in load_contract() if e.component == component]


def folder_of(entry: InboxEntry, site_root: Path) -> Path:
    return site_root.joinpath(*entry.folder.split("/"))


def matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    """Drop-file names match case-insensitively: the guide writes both 2.esc and 2.ESC."""
    if name.startswith(TMP_PREFIX) or name.startswith("."):
        return False
    upper = name.upper()
    return any(fnmatch.fnmatchcase(upper, p.upper()) for p in patterns)


def waiting_drop_files(site_root: Path) -> list[str]:
    """The drop files waiting in a site's inboxes (site-relative, sorted): every file of a
    contract folder that matches that folder's patterns. BAD/ and other subfolders are not
    inboxes; other files (the site control file in sitectrl.box, a stray note) are not drop
    files and never wake anyone."""
    patterns: dict[str, tuple[str, ...]] = {}
    for entry in load_contract():
        patterns[entry.folder] = patterns.get(entry.folder, ()) + entry.files
    out: list[str] = []
    for folder, files in patterns.items():
        base = site_root.joinpath(*folder.split("/"))
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            continue
        out.extend(f"{folder}/{name}" for name in names if matches_any(name, files))
    return sorted(out)
