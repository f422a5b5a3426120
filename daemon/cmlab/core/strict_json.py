"""JSON from other sites (instructions, CMUpdates messages) read strictly: a key given twice
or NaN/Infinity is an error, not a silent last-one-wins or a float no peer meant."""

from __future__ import annotations

import json
from typing import Any


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key[:80]!r} is given twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def strict_loads(data: str | bytes) -> Any:
    """json.loads, refusing duplicate keys and NaN/Infinity; every failure (bad UTF-8, bad
    JSON, nesting too deep for the parser) is a ValueError that says what."""
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
