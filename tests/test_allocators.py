"""Freed memory goes back to the operating system: the allocator settings made on import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SHOW = (
    "import os, pipeline; "
    "print(os.environ['_RJEM_MALLOC_CONF']); print(os.environ['ARROW_DEFAULT_MEMORY_POOL'])"
)


def settings_after_import(**env: str) -> list[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("_RJEM_MALLOC_CONF", "ARROW_DEFAULT_MEMORY_POOL")
    }
    result = subprocess.run(
        [sys.executable, "-c", SHOW], env={**clean, **env}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.parametrize(
    "inherited",
    [None, "dirty_decay_ms:500,muzzy_decay_ms:1000"],  # nothing, or what `import polars` sets
)
def test_polars_and_pyarrow_return_freed_memory_at_once(inherited: str | None) -> None:
    env = {} if inherited is None else {"_RJEM_MALLOC_CONF": inherited}

    jemalloc, arrow_pool = settings_after_import(**env)

    assert jemalloc.endswith("dirty_decay_ms:0,muzzy_decay_ms:0")  # the last option wins
    assert arrow_pool == "system"


def test_a_choice_in_the_environment_wins() -> None:
    jemalloc, arrow_pool = settings_after_import(
        _RJEM_MALLOC_CONF="dirty_decay_ms:2000", ARROW_DEFAULT_MEMORY_POOL="mimalloc"
    )

    assert jemalloc == "dirty_decay_ms:2000"
    assert arrow_pool == "mimalloc"
