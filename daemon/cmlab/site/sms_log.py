"""The SMS trace log format that CMTrace and OneTrace read, one file per component.

    message  $$<COMPONENT><MM-DD-YYYY HH:MM:SS.mmm+BIAS><thread=N (0xHEX)>

The bias is in minutes with the Windows sign convention (UTC minus local time). A log rolls
over to `<name>.lo_` at a configured size, as ConfigMgr does. Every line is also emitted as a
structlog JSON event on stdout, for journald and machines."""

from __future__ import annotations

import os
import re
import sys
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import structlog

LINE_RE = re.compile(
    r"^(?P<message>.*)  \$\$<(?P<component>[^>]*)><(?P<date>\d\d-\d\d-\d{4}) "
    r"(?P<time>\d\d:\d\d:\d\d\.\d{3})(?P<bias>[+-]\d+)><thread=(?P<thread>\d+) \(0x[0-9A-F]+\)>$"
)


def format_bias(minutes: int) -> str:
    return "+000" if minutes == 0 else f"{minutes:+d}"


def format_line(message: str, component: str, when: datetime, thread: int) -> str:
    local = when.astimezone()
    offset = local.utcoffset()
    bias = -int(offset.total_seconds() // 60) if offset is not None else 0
    stamp = local.strftime("%m-%d-%Y %H:%M:%S") + f".{local.microsecond // 1000:03d}"
    # A log line is one line: embedded newlines would break every reader of the format.
    text = message.replace("\r", " ").replace("\n", " ")
    return f"{text}  $$<{component}><{stamp}{format_bias(bias)}><thread={thread} (0x{thread:X})>\n"


@dataclass
class LogSink:
    """Shared settings: where the logs go, when they roll, whether JSON goes to stdout."""

    folder: Path
    max_size: int = 2_621_440
    json_stdout: bool = False
    site_code: str = ""


def _json_logger(stream: TextIO) -> Any:
    return structlog.wrap_logger(
        structlog.PrintLogger(stream),
        processors=[
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
    )


class SmsLog:
    """One component log file (e.g. `hman.log`). Thread-safe; every line is flushed at once so a
    trainee tailing the file (or a test awaiting a line) sees it immediately."""

    def __init__(self, sink: LogSink, file_name: str, component: str) -> None:
        self.sink = sink
        self.file_name = file_name
        self.component = component
        self.path = sink.folder / file_name
        self._lock = threading.Lock()
        self._fh: TextIO | None = None
        self._size = 0
        self._json = _json_logger(sys.stdout) if sink.json_stdout else None

    def _open(self) -> TextIO:
        if self._fh is None:
            self.sink.folder.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
            self._size = self._fh.tell()
        return self._fh

    def _rollover(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        os.replace(self.path, self.path.with_suffix(".lo_"))

    def write(self, message: str, *, thread: int | None = None, level: str = "info") -> str:
        tid = thread if thread is not None else threading.get_native_id()
        line = format_line(message, self.component, datetime.now().astimezone(), tid)
        data_len = len(line.encode("utf-8"))
        with self._lock:
            fh = self._open()
            if self._size and self._size + data_len > self.sink.max_size:
                self._rollover()
                fh = self._open()
            fh.write(line)
            fh.flush()
            self._size += data_len
        if self._json is not None:
            self._json.msg(
                message,
                level=level,
                component=self.component,
                log=self.file_name,
                site=self.sink.site_code,
                thread=tid,
            )
        return line

    def __call__(self, message: str, *, thread: int | None = None, level: str = "info") -> str:
        return self.write(message, thread=thread, level=level)

    def error(self, message: str, *, thread: int | None = None) -> str:
        return self.write(message, thread=thread, level="error")

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class LogRegistry:
    """The logs of one site process, so every component shares one writer per file."""

    def __init__(self, sink: LogSink) -> None:
        self.sink = sink
        self._logs: dict[str, SmsLog] = {}
        self._lock = threading.Lock()

    def get(self, file_name: str, component: str) -> SmsLog:
        with self._lock:
            log = self._logs.get(file_name)
            if log is None:
                log = SmsLog(self.sink, file_name, component)
                self._logs[file_name] = log
            return log

    def close(self) -> None:
        with self._lock:
            for log in self._logs.values():
                log.close()


def message_of(line: str) -> str:
    """The message part of one line of an SMS log (the whole line if it is not in the format)."""
    m = LINE_RE.match(line)
    return m.group("message") if m else line


def read_messages(path: Path) -> list[str]:
    """The message part of each line of an SMS log (for tests, `cmlab status` and tools)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [message_of(raw) for raw in text.splitlines()]
