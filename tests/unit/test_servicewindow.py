"""cmlab.site.service_windows: site.toml's [[service_window]] tables and when CMUpdate may
install."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cmlab.core.errors import ConfigError
from cmlab.site.config import load_config
from cmlab.site.service_windows import (
    EVERY_DAY,
    ServiceWindow,
    is_open,
    next_opening,
    parse_service_windows,
)

MON, TUE, WED, THU, FRI, SAT, SUN = range(7)

# 2025-01-06 is a Monday, so 2025-01-06 + n days has weekday n.
MONDAY = datetime(2025, 1, 6)


def at(weekday: int, hh: int, mm: int = 0, ss: int = 0, week: int = 0) -> datetime:
    return MONDAY + timedelta(days=weekday + 7 * week, hours=hh, minutes=mm, seconds=ss)


def window(days: set[int], start: str, minutes: int) -> ServiceWindow:
    return ServiceWindow(frozenset(days), time.fromisoformat(start), timedelta(minutes=minutes))


WEEKEND_NIGHTS = window({SAT, SUN}, "22:00", 480)  # the guide's usual overnight window


# --- parsing ---------------------------------------------------------------------------


def test_parse_the_documented_shape() -> None:
    doc = tomllib.loads(
        """
        [[service_window]]
        days = ["Sat", "Sun"]
        start = "22:00"
        duration = 480

        [[service_window]]
        days = ["mon", "WED", "fRi"]
        start = "01:02:03"
        duration = 1440

        [[service_window]]
        start = "12:00"
        duration = 1

        [[service_window]]
        days = "*"
        start = "00:00"
        duration = 60

        [[service_window]]
        days = ["*"]
        start = "23:59:59"
        duration = 30
        """
    )
    assert parse_service_windows(doc["service_window"]) == (
        WEEKEND_NIGHTS,
        ServiceWindow(frozenset({MON, WED, FRI}), time(1, 2, 3), timedelta(hours=24)),
        ServiceWindow(EVERY_DAY, time(12), timedelta(minutes=1)),
        ServiceWindow(EVERY_DAY, time(0), timedelta(hours=1)),
        ServiceWindow(EVERY_DAY, time(23, 59, 59), timedelta(minutes=30)),
    )


def test_missing_or_empty_means_no_windows() -> None:
    assert parse_service_windows(None) == ()
    assert parse_service_windows([]) == ()


def test_duplicate_days_are_harmless() -> None:
    (w,) = parse_service_windows([{"days": ["Sat", "sat", "SAT"], "start": "10:00", "duration": 5}])
    assert w.days == frozenset({SAT})


@pytest.mark.parametrize(
    ("w", "text"),
    [
        (WEEKEND_NIGHTS, "Sat,Sun 22:00:00 for 8h00m"),
        (window({SUN, MON}, "06:30", 90), "Mon,Sun 06:30:00 for 1h30m"),
        (window(set(EVERY_DAY), "00:00", 1440), "Every day 00:00:00 for 24h00m"),
        (
            ServiceWindow(frozenset({FRI}), time(1, 2, 3), timedelta(seconds=61)),
            "Fri 01:02:03 for 0h01m01s",
        ),
    ],
)
def test_describe(w: ServiceWindow, text: str) -> None:
    assert w.describe() == text


GOOD = {"days": ["Sat"], "start": "22:00", "duration": 60}
_DROP = object()  # with_(key=_DROP): leave the key out


def with_(**changes: Any) -> dict[str, Any]:
    table = dict(GOOD)
    for key, value in changes.items():
        if value is _DROP:
            del table[key]
        else:
            table[key] = value
    return table


@pytest.mark.parametrize(
    ("key", "table"),
    [
        # unknown keys, including near misses of the real ones
        ("day", with_(day=["Sat"])),
        ("length", with_(length=60)),
        ("Start", with_(Start="22:00")),
        # days
        ("days", with_(days=[])),
        ("days", with_(days="Sat")),
        ("days", with_(days="all")),
        ("days", with_(days=None)),
        ("days", with_(days=6)),
        ("days", with_(days=[6])),
        ("days", with_(days=["Saturday"])),
        ("days", with_(days=["Sa"])),
        ("days", with_(days=["Sat", "Sonntag"])),
        ("days", with_(days=[" Sat"])),
        ("days", with_(days=["ſun"])),  # casefolds to "sun"; not a name anyone typed
        ("days", with_(days=[["Sat"]])),
        ("days", with_(days={"Sat": True})),
        # start
        ("start", with_(start=_DROP)),
        ("start", with_(start="")),
        ("start", with_(start="22")),
        ("start", with_(start="9:00")),
        ("start", with_(start="24:00")),
        ("start", with_(start="23:60")),
        ("start", with_(start="23:59:60")),
        ("start", with_(start="22:00:00.5")),
        ("start", with_(start="22:00 ")),
        ("start", with_(start="22:00\n")),
        ("start", with_(start="10pm")),
        ("start", with_(start="٢٢:٠٠")),  # Arabic-Indic digits: int() would take them
        ("start", with_(start=2200)),
        ("start", with_(start=time(22))),  # an unquoted TOML local time
        # duration
        ("duration", with_(duration=_DROP)),
        ("duration", with_(duration=0)),
        ("duration", with_(duration=-60)),
        ("duration", with_(duration=1441)),
        ("duration", with_(duration=10**30)),
        ("duration", with_(duration=60.0)),
        ("duration", with_(duration="60")),
        ("duration", with_(duration=True)),
        ("duration", with_(duration=None)),
    ],
)
def test_bad_table_names_the_key(key: str, table: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_service_windows([GOOD, table])
    message = str(info.value)
    assert f"service_window[1].{key}" in message
    assert "must be" in message or "allowed" in message or "missing" in message


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ({"days": ["Sat"], "start": "22:00", "duration": 60}, "service_window must be"),
        ("22:00", "service_window must be"),
        (480, "service_window must be"),
        ([GOOD, "Sat 22:00"], "service_window[1] must be a table"),
        ([GOOD, GOOD, ["Sat"]], "service_window[2] must be a table"),
        ([None], "service_window[0] must be a table"),
    ],
)
def test_not_an_array_of_tables(value: object, named: str) -> None:
    with pytest.raises(ConfigError, match=r"array of tables|must be a table") as info:
        parse_service_windows(value)
    assert named in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"days": frozenset()},
        {"days": frozenset({7})},
        {"days": frozenset({-1})},
        {"start": time(1, 2, 3, 4)},
        {"duration": timedelta(0)},
        {"duration": timedelta(seconds=-1)},
        {"duration": timedelta(hours=24, seconds=1)},
    ],
)
def test_hand_built_bad_window_is_refused(kwargs: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "days": frozenset({SAT}),
        "start": time(22),
        "duration": timedelta(hours=1),
    }
    fields.update(kwargs)
    with pytest.raises(ValueError):
        ServiceWindow(**fields)


# --- is_open / next_opening -------------------------------------------------------------


def test_no_windows_is_always_open() -> None:
    assert is_open((), at(WED, 12))
    assert next_opening((), at(WED, 12)) is None


def test_simple_window_edges() -> None:
    w = [window({WED}, "09:00", 120)]
    assert not is_open(w, at(WED, 8, 59, 59))
    assert is_open(w, at(WED, 9))
    assert is_open(w, at(WED, 10, 59, 59) + timedelta(microseconds=999_999))
    assert not is_open(w, at(WED, 11))  # the end is not in the window
    assert next_opening(w, at(WED, 8, 59, 59)) == at(WED, 9)
    assert next_opening(w, at(WED, 10)) is None
    # After today's window: next week's.
    assert next_opening(w, at(WED, 11)) == at(WED, 9, week=1)


def test_midnight_crossing_window() -> None:
    w = [window({FRI}, "22:00", 480)]  # Friday 22:00 to Saturday 06:00
    assert is_open(w, at(FRI, 23, 30))
    assert is_open(w, at(SAT, 0))
    assert is_open(w, at(SAT, 5, 59, 59))
    assert not is_open(w, at(SAT, 6))
    # Saturday is not one of its days: Saturday evening stays closed.
    assert not is_open(w, at(SAT, 22, 30))
    assert not is_open(w, at(THU, 23))
    assert next_opening(w, at(SAT, 6)) == at(FRI, 22, week=1)
    assert next_opening(w, at(FRI, 21)) == at(FRI, 22)


def test_sunday_to_monday_wrap() -> None:
    w = [WEEKEND_NIGHTS]  # Sat 22:00-Sun 06:00 and Sun 22:00-Mon 06:00
    assert is_open(w, at(MON, 3))  # started on Sunday, the week before this Monday
    assert is_open(w, at(MON, 3, week=1))
    assert not is_open(w, at(MON, 6))
    assert is_open(w, at(SUN, 5))
    assert not is_open(w, at(SUN, 12))
    assert next_opening(w, at(SUN, 12)) == at(SUN, 22)
    # From Monday morning, across the week, to Saturday night.
    assert next_opening(w, at(MON, 6)) == at(SAT, 22)


def test_full_day_window_and_back_to_back() -> None:
    full = [window({TUE}, "00:00", 1440)]
    assert is_open(full, at(TUE, 0))
    assert is_open(full, at(TUE, 23, 59, 59))
    assert not is_open(full, at(WED, 0))
    assert next_opening(full, at(WED, 0)) == at(TUE, 0, week=1)
    # A 24-hour window starting mid-day is open until the same time the next day.
    noon = [window({TUE}, "12:00", 1440)]
    assert is_open(noon, at(WED, 11, 59, 59))
    assert not is_open(noon, at(WED, 12))
    # One window ends exactly as the next starts: no gap between them.
    pair = [window({TUE}, "08:00", 60), window({TUE}, "09:00", 60)]
    assert is_open(pair, at(TUE, 9))
    assert next_opening(pair, at(TUE, 9)) is None


def test_several_windows_earliest_wins() -> None:
    w = [
        window({SAT}, "02:00", 60),
        window({THU}, "23:00", 30),
        window({THU}, "18:00", 30),
        window({MON, TUE}, "12:00", 60),
    ]
    assert next_opening(w, at(THU, 9)) == at(THU, 18)
    assert next_opening(w, at(THU, 18, 30)) == at(THU, 23)
    assert next_opening(w, at(THU, 23, 30)) == at(SAT, 2)
    assert next_opening(w, at(SAT, 3)) == at(MON, 12, week=1)
    assert next_opening(w, at(MON, 13)) == at(TUE, 12)
    # The order they are listed in does not matter.
    assert next_opening(list(reversed(w)), at(THU, 9)) == at(THU, 18)
    assert is_open(w, at(THU, 23, 10))
    assert not is_open(w, at(THU, 22))


def test_now_with_microseconds() -> None:
    w = [window({WED}, "09:00", 60)]
    now = at(WED, 8, 59, 59) + timedelta(microseconds=999_999)
    assert not is_open(w, now)
    assert next_opening(w, now) == at(WED, 9)


def test_aware_now_is_refused() -> None:
    with pytest.raises(ValueError):
        is_open([WEEKEND_NIGHTS], datetime(2025, 1, 6, tzinfo=UTC))
    with pytest.raises(ValueError):
        next_opening([WEEKEND_NIGHTS], datetime(2025, 1, 6, tzinfo=UTC))


# --- properties -------------------------------------------------------------------------

windows_st = st.builds(
    ServiceWindow,
    days=st.frozensets(st.integers(0, 6), min_size=1),
    start=st.times().map(lambda t: t.replace(microsecond=0)),
    duration=st.integers(1, 24 * 3600).map(lambda s: timedelta(seconds=s)),
)
now_st = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1))


@given(
    windows=st.lists(windows_st, min_size=1, max_size=4),
    now=now_st,
    fractions=st.lists(st.floats(0.0, 1.0), max_size=5),
)
def test_next_opening_is_the_first_open_moment(
    windows: list[ServiceWindow], now: datetime, fractions: list[float]
) -> None:
    opens = next_opening(windows, now)
    if is_open(windows, now):
        assert opens is None
        return
    assert opens is not None
    assert now < opens <= now + timedelta(days=8)
    assert is_open(windows, opens)
    gap = opens - now
    samples = [now + timedelta(seconds=1), opens - timedelta(seconds=1)]
    samples += [opens - timedelta(microseconds=1)]
    samples += [now + gap * f for f in fractions]
    for t in samples:
        if now < t < opens:
            assert not is_open(windows, t), t


@given(w=windows_st, now=now_st)
def test_single_window_agrees_with_a_plain_scan(w: ServiceWindow, now: datetime) -> None:
    # An independent oracle: walk this week's and last week's starts directly.
    base = datetime.combine(now.date(), w.start)
    starts = [base + timedelta(days=d) for d in range(-7, 8)]
    starts = [s for s in starts if s.weekday() in w.days]
    assert is_open([w], now) == any(s <= now < s + w.duration for s in starts)
    if not is_open([w], now):
        assert next_opening([w], now) == min(s for s in starts if s > now)


# --- site.toml --------------------------------------------------------------------------


def test_load_config_reads_service_windows(site: Path) -> None:
    assert load_config(site).service_windows == ()
    toml_path = site / "site.toml"
    with toml_path.open("a", encoding="utf-8") as f:
        f.write(
            "\n"
            "[[service_window]]\n"
            'days = ["Sat", "Sun"]\n'
            'start = "22:00"\n'
            "duration = 480\n"
            "\n"
            "[[service_window]]\n"
            'start = "03:30:15"\n'
            "duration = 30\n"
        )
    config = load_config(site)
    assert config.service_windows == (
        WEEKEND_NIGHTS,
        ServiceWindow(EVERY_DAY, time(3, 30, 15), timedelta(minutes=30)),
    )
    assert config.site_code == "CAS"  # the rest of site.toml still reads as before


def test_load_config_rejects_a_bad_window(site: Path) -> None:
    toml_path = site / "site.toml"
    with toml_path.open("a", encoding="utf-8") as f:
        f.write('\n[[service_window]]\ndays = ["Sat"]\nstart = "25:00"\nduration = 60\n')
    with pytest.raises(ConfigError, match=r"service_window\[0\]\.start"):
        load_config(site)


def test_load_config_rejects_a_plain_table(site: Path) -> None:
    toml_path = site / "site.toml"
    with toml_path.open("a", encoding="utf-8") as f:
        f.write('\n[service_window]\nstart = "22:00"\nduration = 60\n')
    with pytest.raises(ConfigError, match=r"\[\[service_window\]\]"):
        load_config(site)
