"""Where the shipped data lives: `cmlab/_data/<name>` in a wheel, the repository's top-level
folder (`inboxes/`, `payloads/`, `systemd/`) in a source checkout or editable install."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # cmlab/


def data_dir(name: str) -> Path:
    packaged = _PACKAGE / "_data" / name
    if packaged.is_dir():
        return packaged
    checkout = _PACKAGE.parent.parent / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"cmlab data folder {name!r} is missing from this installation")
