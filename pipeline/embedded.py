"""The bundled simulator standing in for a provider, started where a run starts.

A preset with `embedded_simulator` (`configs/providers/simulator.yaml`) names no server:
the command or Python call that starts the run starts a simulator in this process on a
free loopback port and points the job at it. Everything past that edge (the executors,
the batch engine, cluster workers, estimates) sees an ordinary provider with a base
URL, so none of it imports the simulator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from pipeline.job import ResolvedJob


def served_in_process(job: ResolvedJob) -> bool:
    """Whether `simulator_for` serves `job` from this process (nothing outlives it)."""
    return job.settings.preset.embedded_simulator is not None and not job.spec.model.base_url


@contextmanager
def simulator_for(job: ResolvedJob) -> Iterator[ResolvedJob]:
    """`job` pointed at an in-process simulator while the block runs, when its preset
    asks for one and the job names no `model.base_url`; otherwise `job` unchanged."""
    settings = job.settings
    wanted = settings.preset.embedded_simulator
    if wanted is None or not served_in_process(job):
        yield job
        return
    from pipeline.simulator import SimulatorConfig, start_in_thread

    # The job's model name is whatever the user chose: the simulator answers any.
    config = SimulatorConfig(**{"accept_any_model": True, **wanted})
    with start_in_thread(config) as simulator:
        served = dataclasses.replace(settings, base_url=simulator.base_url)
        yield dataclasses.replace(job, settings=served)


class SharedSimulators:
    """One in-process simulator per preset for runs that send at the same time from one
    process (the steps of a job streaming rows to each other), started on first use and
    stopped when the block ends, so they share its rate limits as they would a server's."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._urls: dict[str, str] = {}

    def __enter__(self) -> SharedSimulators:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def serve(self, job: ResolvedJob) -> ResolvedJob:
        """`job` pointed at its preset's simulator when `simulator_for` would start one."""
        if not served_in_process(job):
            return job
        name = job.settings.name
        if name not in self._urls:
            served = self._stack.enter_context(simulator_for(job))
            assert served.settings.base_url is not None
            self._urls[name] = served.settings.base_url
        settings = dataclasses.replace(job.settings, base_url=self._urls[name])
        return dataclasses.replace(job, settings=settings)
