"""The command's entry point exits with the CLI's status, its output flushed."""

from __future__ import annotations

import subprocess
import sys

import pytest


def through_the_command(body: str) -> subprocess.CompletedProcess[str]:
    """Run the entry point with the CLI replaced by `body`."""
    code = (
        "import sys, types; cli = types.ModuleType('pipeline.cli'); "
        f"exec({body!r}, cli.__dict__); sys.modules['pipeline.cli'] = cli; "
        "from pipeline.__main__ import main; main()"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize(("raised", "status"), [("None", 0), ("0", 0), ("1", 1), ("3", 3)])
def test_the_status_is_the_clis_and_unflushed_output_arrives(raised: str, status: int) -> None:
    result = through_the_command(
        "import sys\n"
        "def main():\n"
        "    sys.stdout.write('summary without a newline')\n"
        "    sys.stderr.write('and a warning')\n"
        f"    raise SystemExit({raised})\n"
    )
    assert result.returncode == status
    assert result.stdout == "summary without a newline"
    assert result.stderr == "and a warning"


def test_a_message_exits_1_and_is_printed() -> None:
    result = through_the_command("def main():\n    raise SystemExit('no such job file')\n")
    assert result.returncode == 1
    assert result.stderr.strip() == "no such job file"


def test_returning_normally_exits_0() -> None:
    result = through_the_command("def main():\n    print('done')\n")
    assert (result.returncode, result.stdout) == (0, "done\n")
