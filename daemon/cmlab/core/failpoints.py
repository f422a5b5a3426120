"""Crash points for the crash tests: the process kills itself with SIGKILL at a named point.

`CMLAB_CRASHPOINTS=hman.after_extract` (or `name:N` for the N-th time the point is reached)
makes a real, uncatchable kill at exactly the moment a test wants to prove recovery from; with
the variable unset, a crash point costs one set lookup."""

from __future__ import annotations

import os
import signal
import threading

_spec: dict[str, int] = {}
for _item in filter(None, os.environ.get("CMLAB_CRASHPOINTS", "").split(",")):
    _name, _, _count = _item.partition(":")
    _spec[_name.strip()] = int(_count) if _count else 1
_hits: dict[str, int] = {}
_lock = threading.Lock()


def crashpoint(name: str) -> None:
    if name not in _spec:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] >= _spec[name]:
            os.kill(os.getpid(), signal.SIGKILL)
