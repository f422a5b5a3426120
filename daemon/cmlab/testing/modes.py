"""The few names the pytest plugin needs before any site exists. Kept apart from the modules
that import the daemon, so loading the plugin (every pytest run where cmlab is installed) costs
milliseconds, not the 0.6-0.7 s importing every component takes (measured with -X importtime)."""

from __future__ import annotations

from typing import Literal

Mode = Literal["inprocess", "subprocess"]
MODES: tuple[Mode, ...] = ("inprocess", "subprocess")

# Seconds a wait allows unless the test says otherwise (--cmlab-timeout).
DEFAULT_TIMEOUT = 60.0
