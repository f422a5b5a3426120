"""The SMS trace log format CMTrace reads, rollover to .lo_, and the JSON copy on stdout."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from cmlab.site.sms_log import LINE_RE, LogSink, SmsLog, format_bias, format_line, read_messages


def test_line_format_matches_the_design_example() -> None:
    when = datetime(2026, 11, 21, 13, 15, 8, 957000, tzinfo=UTC)
    line = format_line(
        r"Extracted E:\ConfigMgr\CMUStaging\Manifest.xml", "SMS_HIERARCHY_MANAGER", when, 4888
    )
    # The local zone decides the printed time and bias; compare in a fixed zone instead.
    expected_local = when.astimezone()
    offset = expected_local.utcoffset() or timedelta(0)
    bias = -int(offset.total_seconds() // 60)
    stamp = expected_local.strftime("%m-%d-%Y %H:%M:%S") + ".957"
    assert line == (
        r"Extracted E:\ConfigMgr\CMUStaging\Manifest.xml  $$<SMS_HIERARCHY_MANAGER>"
        f"<{stamp}{format_bias(bias)}><thread=4888 (0x1318)>\n"
    )
    assert LINE_RE.match(line.rstrip("\n"))


@pytest.mark.parametrize(
    ("minutes", "text"), [(0, "+000"), (420, "+420"), (-60, "-60"), (-330, "-330")]
)
def test_bias_uses_the_windows_sign_convention(minutes: int, text: str) -> None:
    assert format_bias(minutes) == text


def test_bias_of_a_zone_east_of_utc_is_negative() -> None:
    when = datetime(2026, 11, 21, 12, 0, tzinfo=timezone(timedelta(hours=1)))
    offset = when.utcoffset()
    assert offset is not None and -int(offset.total_seconds() // 60) == -60


def test_newlines_never_split_a_log_line() -> None:
    line = format_line("first\nsecond\rthird", "X", datetime.now(UTC), 1)
    assert line.count("\n") == 1 and line.startswith("first second third  $$<X>")


def test_rollover_to_lo_(tmp_path: Path) -> None:
    log = SmsLog(LogSink(folder=tmp_path, max_size=400), "hman.log", "SMS_HIERARCHY_MANAGER")
    for i in range(10):
        log.write(f"message number {i}", thread=7)
    log.close()
    current = read_messages(tmp_path / "hman.log")
    previous = read_messages(tmp_path / "hman.lo_")
    assert current and previous
    assert current[-1] == "message number 9"
    assert (tmp_path / "hman.log").stat().st_size <= 400
    # Nothing lost across the last rollover: the two files hold a contiguous tail.
    tail = previous + current
    assert tail == [f"message number {i}" for i in range(10 - len(tail), 10)]


def test_json_copy_on_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = SmsLog(
        LogSink(folder=tmp_path, json_stdout=True, site_code="CAS"),
        "hman.log",
        "SMS_HIERARCHY_MANAGER",
    )
    log.write("Check CMU status...", thread=3)
    log.close()
    event = json.loads(capsys.readouterr().out.strip())
    assert event["event"] == "Check CMU status..."
    assert event["component"] == "SMS_HIERARCHY_MANAGER"
    assert event["site"] == "CAS" and event["log"] == "hman.log"
