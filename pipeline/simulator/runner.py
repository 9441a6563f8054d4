"""Running the simulator: in the foreground (``serve``) or on a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from .config import SimulatorConfig
from .server import Simulator

T = TypeVar("T")


class RunningSimulator:
    """A simulator serving on a daemon thread with its own event loop."""

    def __init__(self, config: SimulatorConfig | None, host: str, port: int) -> None:
        self.simulator = Simulator(config)
        self.host = host
        self._requested_port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="llm-simulator", daemon=True)
        self.port = 0

    # --- thread body ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to the starting thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self.port = await self.simulator.start(self.host, self._requested_port)
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await self.simulator.stop()

    def _start(self, timeout: float) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("simulator did not start in time")
        if self._error is not None:
            self._thread.join(timeout)
            raise RuntimeError(f"simulator failed to start: {self._error!r}") from self._error

    # --- public API -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:54321``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, e.g. ``http://127.0.0.1:54321/v1``."""
        return f"{self.url}/v1"

    @property
    def config(self) -> SimulatorConfig:
        return self.simulator.config

    def _call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        loop = self._loop
        if (
            loop is None
            or not self._thread.is_alive()
            or threading.current_thread() is self._thread
        ):
            return fn()

        async def run() -> T:
            return fn()

        fut: Future[T] = asyncio.run_coroutine_threadsafe(run(), loop)
        return fut.result(timeout)

    def stats(self, full: bool = True) -> dict[str, Any]:
        return self._call(lambda: self.simulator.stats(full))

    def reset(self) -> None:
        self._call(self.simulator.reset)

    def finish_batches(self) -> int:
        """Every batch open now ends at its next look; later batches keep the turnaround."""
        return self._call(self.simulator.finish_batches)

    def configure(self, **fields: Any) -> SimulatorConfig:
        """Change config fields live, e.g. ``configure(fail_503=0.5)``."""
        return self._call(lambda: self.simulator.configure(**fields))

    def stop(self, timeout: float = 10.0) -> None:
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> RunningSimulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RunningSimulator({self.url})"


def start_in_thread(
    config: SimulatorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 10.0,
) -> RunningSimulator:
    """Start a simulator on a daemon thread; returns once it is listening."""
    running = RunningSimulator(config, host, port)
    running._start(timeout)
    return running


async def _serve(config: SimulatorConfig, host: str, port: int) -> None:
    sim = Simulator(config)
    bound = await sim.start(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"simulator listening on http://{shown}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


def serve(config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve in the foreground until Ctrl-C."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config or SimulatorConfig(), host, port))
    sys.stdout.flush()
