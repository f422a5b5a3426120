"""`with` and `async with` for a lab site or hierarchy: start on entry, stop on exit, the
async forms off the event loop (a start copies a site and waits for its daemon)."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self


class StartStop:
    """What has start() and stop() gets both kinds of context manager from here."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)
