"""A virtual clock for tests: the event loop's time only moves when every task is idle."""

from __future__ import annotations

import asyncio
import selectors
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar
from unittest import mock

import anyio

T = TypeVar("T")


class _VirtualClock(selectors.DefaultSelector):
    """Polls real I/O without blocking; where the loop would sleep, the clock jumps instead."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise RuntimeError("virtual clock: every task waits and no timer is due (deadlock)")
        self.now += timeout
        return []


class _VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: _VirtualClock) -> None:
        self._clock = clock
        super().__init__(clock)

    def time(self) -> float:
        return self._clock.now


def run_virtual(main: Callable[[], Awaitable[T]]) -> T:
    """Run `main` under anyio on a loop whose clock only moves when every task is idle.

    `time.monotonic()` reads the same virtual clock, but only on this thread (the Pacer
    estimates its recent send rate with it; a simulator thread must keep real time).
    """
    clock = _VirtualClock()
    real_monotonic = time.monotonic
    thread = threading.get_ident()

    def monotonic() -> float:
        return clock.now if threading.get_ident() == thread else real_monotonic()

    with mock.patch("time.monotonic", monotonic):
        return anyio.run(
            main,
            backend="asyncio",
            backend_options={"loop_factory": lambda: _VirtualClockLoop(clock)},
        )
