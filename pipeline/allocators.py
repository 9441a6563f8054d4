"""Allocator settings for the `pipeline` command: freed memory goes back to the OS at once.

polars allocates through its own jemalloc, which otherwise keeps freed pages
resident for a while (the input check's memory then sits under the start of the
run), and pyarrow's default pool keeps what the output assembly freed: together
30-50 MB of a million-row run's peak (docs/BENCHMARKS.md). Both settings are read
when the library first allocates, so they are made before polars or pyarrow is
imported: by the command's entry point, never by `import pipeline`, which must not
change how a host program's own polars and pyarrow allocate.
"""

from __future__ import annotations

import os

_FREED_AT_ONCE = "dirty_decay_ms:0,muzzy_decay_ms:0"
_POLARS_DEFAULTS = {"dirty_decay_ms:500", "muzzy_decay_ms:1000"}  # what `import polars` sets


def return_freed_memory() -> None:
    """Set the allocators' environment, unless it already says otherwise.

    A choice already in the environment wins; polars' own defaults, passed on by a
    parent process that imported polars, are not a choice.
    """
    inherited = os.environ.get("_RJEM_MALLOC_CONF", "").split(",")
    chosen = [option for option in inherited if option and option not in _POLARS_DEFAULTS]
    if not any("decay_ms" in option for option in chosen):
        os.environ["_RJEM_MALLOC_CONF"] = ",".join([*chosen, _FREED_AT_ONCE])
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
