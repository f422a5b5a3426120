"""Service windows for the site server: when CMUpdate may install an update.

A site with no service window installs an update as soon as it is ready; CMUpdate logs the
guide's line "There is no service window defined for the site server to apply the CM server
updates." With one or more windows (site.toml's `[[service_window]]` tables) CMUpdate puts
the update in INSTALL_WAITING_SERVICE_WINDOW (196610) and starts the installation only once a
window is open.

    [[service_window]]
    days = ["Sat", "Sun"]   # three-letter names, any case; "*" or left out: every day
    start = "22:00"         # "HH:MM" or "HH:MM:SS", 24 h, the site server's local time
    duration = 480          # minutes, 1 .. 1440; a window may run past midnight

Times are naive wall-clock times of the site server, as ConfigMgr's are: a window that
spans a daylight-saving change is an hour longer or shorter in real time. Each window is
half-open, [start, start + duration): a window that ends exactly when another starts leaves
no gap, and one that ends at 06:00 is closed at 06:00.

Everything here is pure (no clock, no I/O) so CMUpdate passes `datetime.now()` in and the
tests pass fixed times.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

from cmlab.core.errors import ConfigError

DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # index = datetime.weekday()
EVERY_DAY = frozenset(range(7))
MAX_DURATION = timedelta(hours=24)
MAX_MINUTES = 24 * 60
KEYS = ("days", "start", "duration")
# lower(), not casefold(): casefold() turns "ſun" into "sun", letting through a name nobody typed.
_DAY_INDEX = {name.lower(): i for i, name in enumerate(DAY_NAMES)}

# [0-9], not \d: \d also matches other scripts' digits, which int() would then accept.
_TIME = re.compile(r"([0-9]{2}):([0-9]{2})(?::([0-9]{2}))?")


@dataclass(frozen=True)
class ServiceWindow:
    days: frozenset[int]  # datetime.weekday(): 0 = Monday .. 6 = Sunday
    start: time  # local time of the site server, second precision
    duration: timedelta  # > 0 and <= 24 h; a window may cross midnight

    def __post_init__(self) -> None:
        # The parser never builds a bad window; these catch code that builds one by hand,
        # where a silent never-open or always-open window would be hard to trace.
        if not self.days or not self.days <= EVERY_DAY:
            raise ValueError(f"days must be a non-empty subset of 0..6, not {set(self.days)}")
        if self.start.tzinfo is not None or self.start.microsecond:
            raise ValueError("start must be a naive time with whole seconds")
        if not timedelta(0) < self.duration <= MAX_DURATION:
            raise ValueError(f"duration must be > 0 and <= 24 h, not {self.duration}")

    def describe(self) -> str:
        """Short and human, for log lines: "Sat,Sun 22:00:00 for 8h00m"."""
        days = (
            "Every day"
            if self.days == EVERY_DAY
            else ",".join(DAY_NAMES[d] for d in sorted(self.days))
        )
        total = int(self.duration.total_seconds())
        hours, rest = divmod(total, 3600)
        minutes, seconds = divmod(rest, 60)
        length = f"{hours}h{minutes:02d}m" + (f"{seconds:02d}s" if seconds else "")
        return f"{days} {self.start.isoformat(timespec='seconds')} for {length}"

    def occurrence(self, day: date) -> tuple[datetime, datetime] | None:
        """The [start, end) this window has when it starts on `day`, if `day` is one of its days."""
        if day.weekday() not in self.days:
            return None
        begin = datetime.combine(day, self.start)
        return begin, begin + self.duration


def _where(index: int, key: str | None = None) -> str:
    return f"site.toml: service_window[{index}]" + (f".{key}" if key else "")


def _parse_days(value: Any, index: int) -> frozenset[int]:
    where = _where(index, "days")
    allowed = f'a list of day names ({", ".join(DAY_NAMES)}, any case) or "*" for every day'
    if value == "*":
        return EVERY_DAY
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be {allowed}")
    days: set[int] = set()
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{where} must be {allowed}; {item!r} is not a string")
        if item == "*":
            days.update(EVERY_DAY)
            continue
        day = _DAY_INDEX.get(item.lower())
        if day is None:
            raise ConfigError(f"{where} must be {allowed}; {item!r} is not a day")
        days.add(day)
    return frozenset(days)


def _parse_start(value: Any, index: int) -> time:
    where = _where(index, "start")
    allowed = 'a quoted 24-hour time "HH:MM" or "HH:MM:SS", e.g. "22:00"'
    if not isinstance(value, str):
        # An unquoted TOML local time (start = 22:00:00) arrives as datetime.time: say how
        # to write it rather than just "wrong type".
        raise ConfigError(f"{where} must be {allowed}, not {type(value).__name__} {value!r}")
    match = _TIME.fullmatch(value)
    if match is None:
        raise ConfigError(f"{where} must be {allowed}, not {value!r}")
    hour, minute, second = (int(g) if g else 0 for g in match.groups())
    if hour > 23 or minute > 59 or second > 59:
        raise ConfigError(f"{where} must be {allowed}; {value!r} is not a time of day")
    return time(hour, minute, second)


def _parse_duration(value: Any, index: int) -> timedelta:
    where = _where(index, "duration")
    allowed = f"a whole number of minutes from 1 to {MAX_MINUTES} (24 hours)"
    # bool is an int subclass: `duration = true` must not mean one minute.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be {allowed}, not {type(value).__name__} {value!r}")
    if not 1 <= value <= MAX_MINUTES:
        raise ConfigError(f"{where} must be {allowed}, not {value}")
    return timedelta(minutes=value)


def parse_service_windows(value: object) -> tuple[ServiceWindow, ...]:
    """site.toml's `[[service_window]]` array of tables, as tomllib gives it (None: none)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(
            "site.toml: service_window must be an array of tables, each written "
            "[[service_window]] with days, start and duration"
        )
    windows: list[ServiceWindow] = []
    for index, table in enumerate(value):
        if not isinstance(table, dict):
            raise ConfigError(
                f"{_where(index)} must be a table ([[service_window]]) with keys {', '.join(KEYS)}"
            )
        for key in table:
            if key not in KEYS:
                raise ConfigError(
                    f"{_where(index, key)} is not a known key: allowed are {', '.join(KEYS)}"
                )
        for key in ("start", "duration"):
            if key not in table:
                raise ConfigError(f"{_where(index, key)} is missing: every window needs one")
        windows.append(
            ServiceWindow(
                days=_parse_days(table.get("days", "*"), index),
                start=_parse_start(table["start"], index),
                duration=_parse_duration(table["duration"], index),
            )
        )
    return tuple(windows)


def _check_naive(now: datetime) -> None:
    # Windows are wall-clock times; comparing them with an aware datetime would raise a
    # TypeError deep inside, or (after stripping the zone) silently use the wrong clock.
    if now.tzinfo is not None:
        raise ValueError("now must be a naive local datetime")


def is_open(windows: Sequence[ServiceWindow], now: datetime) -> bool:
    """True when CMUpdate may install at `now`: inside a window, or no windows at all."""
    _check_naive(now)
    if not windows:
        return True
    today = now.date()
    # A window lasts at most 24 h, so only one starting today or yesterday can cover `now`.
    for day in (today - timedelta(days=1), today):
        for window in windows:
            span = window.occurrence(day)
            if span is not None and span[0] <= now < span[1]:
                return True
    return False


def next_opening(windows: Sequence[ServiceWindow], now: datetime) -> datetime | None:
    """The earliest window start strictly after `now`; None with no windows or one open now."""
    _check_naive(now)
    if not windows or is_open(windows, now):
        return None
    today = now.date()
    # Every window has at least one day, so its next start is at most a week after today's.
    starts = (
        span[0]
        for offset in range(8)
        for window in windows
        if (span := window.occurrence(today + timedelta(days=offset))) is not None
    )
    return min((s for s in starts if s > now), default=None)
