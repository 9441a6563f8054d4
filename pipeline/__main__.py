"""The `pipeline` command, and `python -m pipeline`."""

import contextlib
import os
import sys

from pipeline.allocators import return_freed_memory


def main() -> None:
    return_freed_memory()  # before polars or pyarrow is loaded
    from pipeline.cli import main as cli

    try:
        cli()
    except SystemExit as stop:
        exit_at_once(stop.code)
    exit_at_once(0)


def exit_at_once(code: object) -> None:
    """Exit with `code` (a SystemExit's) without the interpreter's teardown.

    Tearing down polars, pyarrow, numpy and the rest takes 0.15-0.2 s, a second's
    share of a twenty-second job. By the time the command returns, everything it
    wrote is flushed and closed, and no thread has work left; only a Ray driver has a
    shutdown of its own to run, so it exits the usual way.
    """
    if "ray" in sys.modules:
        raise SystemExit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing can reach it
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
