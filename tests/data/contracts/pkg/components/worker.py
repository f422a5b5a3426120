"""A component."""

from __future__ import annotations

from pkg.core import util


def work() -> int:
    return util.BASE + 1
