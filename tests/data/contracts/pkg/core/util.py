"""The forbidden import the contracts must catch: core reaching up into a component."""

from __future__ import annotations

from pkg.components import worker  # the forbidden import

BASE = 1


def uses_a_component() -> int:
    return worker.work()
