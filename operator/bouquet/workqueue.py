"""The controller's work queue: client-go's workqueue semantics on asyncio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class WorkQueue:
    """Each key at most once in the queue and at most one worker on it; a key added while
    a worker has it is queued again when the worker is done (client-go's workqueue)."""

    def __init__(self, added: Callable[[], None] = lambda: None, waited: Callable[[float], None] = lambda seconds: None) -> None:
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.pending: set = set()
        self.active: set = set()
        self.dirty: set = set()
        self.forced: set = set()
        self.timers: dict = {}
        self.queued_at: dict = {}  # key -> when it was queued
        self.added, self.waited = added, waited  # for the metrics: a key queued; how long one waited

    def add(self, key: tuple[str, str], force: bool = False) -> None:
        if force:
            self.forced.add(key)
        if key in self.active:
            self.dirty.add(key)
        elif key not in self.pending:
            self.pending.add(key)
            self.queued_at[key] = time.monotonic()
            self.added()
            self.queue.put_nowait(key)

    def add_after(self, key: tuple[str, str], seconds: float, force: bool = False) -> None:
        timer = self.timers.pop(key, None)
        if timer:
            timer.cancel()
        self.timers[key] = asyncio.get_running_loop().call_later(seconds, self.add, key, force)

    async def get(self) -> tuple[tuple[str, str], bool]:
        key = await self.queue.get()
        self.waited(time.monotonic() - self.queued_at.pop(key, time.monotonic()))
        self.pending.discard(key)
        self.active.add(key)
        force = key in self.forced
        self.forced.discard(key)
        return key, force

    def done(self, key: tuple[str, str]) -> None:
        self.active.discard(key)
        if key in self.dirty:
            self.dirty.discard(key)
            self.add(key)

    def forget(self, key: tuple[str, str]) -> None:
        timer = self.timers.pop(key, None)
        if timer:
            timer.cancel()
