"""The machine's limits a run must fit in: open files.

Every connection in the pool is a file descriptor, as are the checkpoint, its WAL,
the run log and the input. A pool larger than the open-file limit fails with EMFILE
in the middle of a run, after rows were paid for; so the soft limit is raised to
the hard limit at start and the pool is capped below whatever that allows.
"""

from __future__ import annotations

import resource

# Descriptors kept for everything that is not a connection: stdio, the checkpoint
# (two connections, WAL, shm), the run log, the input, the lock, the event loop.
RESERVED_FILES = 64
# A pool the user gave no cap starts small and grows up to this, whatever runs it.
ADAPTIVE_MAX_CONCURRENCY = 256
ADAPTIVE_START_CONCURRENCY = 16


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit as far as the hard limit allows; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # some platforms refuse; the cap below then uses the current limit
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def fit_concurrency(requested: int) -> tuple[int, str | None]:
    """The concurrency that fits the open-file limit, and a note when it is lower."""
    limit = raise_open_file_limit()
    usable = max(1, limit - RESERVED_FILES)
    if requested <= usable:
        return requested, None
    return usable, (
        f"concurrency capped at {usable} (asked for {requested}): the open-file limit is "
        f"{limit} (`ulimit -n`); raise it to use more"
    )
