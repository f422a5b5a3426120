"""Assertions on log lines, in the order the guide shows them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence


def assert_in_order(messages: Sequence[str], expected: Iterable[str | re.Pattern[str]]) -> None:
    """Every expected line appears in `messages`, in this order (other lines may come
    between): a str is a whole line's message exactly, a compiled pattern must match a whole
    line (fullmatch). The failure shows the first line not found and the whole log."""
    i = 0
    for want in expected:
        while i < len(messages):
            got = messages[i]
            i += 1
            if want.fullmatch(got) if isinstance(want, re.Pattern) else got == want:
                break
        else:
            shown = want.pattern if isinstance(want, re.Pattern) else want
            raise AssertionError(
                f"line not found in order: {shown!r}\n--- log ---\n" + "\n".join(messages)
            )
