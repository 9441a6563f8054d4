"""Freed memory goes back to the operating system: the allocator settings the command makes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PRINT_SETTINGS = (
    "import os, sys; print(os.environ.get('_RJEM_MALLOC_CONF', '-'), "
    "os.environ.get('ARROW_DEFAULT_MEMORY_POOL', '-'), 'polars' in sys.modules)"
)
# The command's entry point, with the CLI replaced by a report of what it would start with.
THROUGH_THE_COMMAND = (
    "import sys, types; cli = types.ModuleType('pipeline.cli'); "
    f"cli.main = lambda: exec({PRINT_SETTINGS!r}); sys.modules['pipeline.cli'] = cli; "
    "from pipeline.__main__ import main; main()"
)


def run_python(code: str, **env: str) -> list[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("_RJEM_MALLOC_CONF", "ARROW_DEFAULT_MEMORY_POOL")
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.parametrize(
    "inherited",
    [None, "dirty_decay_ms:500,muzzy_decay_ms:1000"],  # nothing, or what `import polars` sets
)
def test_the_command_sets_both_before_polars_loads(inherited: str | None) -> None:
    env = {} if inherited is None else {"_RJEM_MALLOC_CONF": inherited}

    jemalloc, arrow_pool, polars_loaded = run_python(THROUGH_THE_COMMAND, **env)

    assert jemalloc.endswith("dirty_decay_ms:0,muzzy_decay_ms:0")  # the last option wins
    assert arrow_pool == "system"
    assert polars_loaded == "False"


def test_a_choice_in_the_environment_wins() -> None:
    jemalloc, arrow_pool, _ = run_python(
        THROUGH_THE_COMMAND,
        _RJEM_MALLOC_CONF="dirty_decay_ms:2000",
        ARROW_DEFAULT_MEMORY_POOL="mimalloc",
    )

    assert jemalloc == "dirty_decay_ms:2000"
    assert arrow_pool == "mimalloc"


def test_importing_the_library_leaves_the_host_programs_allocators_alone() -> None:
    jemalloc, arrow_pool, _ = run_python(f"import pipeline, pipeline.api; {PRINT_SETTINGS}")

    assert "dirty_decay_ms:0" not in jemalloc  # polars' own defaults, if polars set any
    assert arrow_pool == "-"
