"""The README's recipes work as written."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from conftest import ROOT, reviews, run_cli

from pipeline.simulator import SimulatorConfig, start_in_thread


def test_the_simulator_recipe_runs_with_no_key_set(tmp_path: Path) -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    recipe = re.search(
        r"Point a job at it with `provider: (\w+)` and `base_url: (http://127\.0\.0\.1:8000/v1)`",
        readme,
    )
    assert recipe, "the README's simulator recipe moved"
    provider, base_url = recipe.groups()
    reviews(4).write_csv(tmp_path / "reviews.csv")
    with start_in_thread(SimulatorConfig()) as simulator:  # `pipeline simulate`: any key
        spec = {
            "input": {"path": "reviews.csv"},
            "model": {
                "provider": provider,
                "model": "x-ai-grok-3-mini",
                "base_url": base_url.replace("http://127.0.0.1:8000", simulator.base_url[:-3]),
            },
            "prompt": {"template": "Summarize: {{ text }}"},
            "output": {"path": "out.parquet"},
        }
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        result = run_cli("run", "job.yaml", "--quiet", cwd=tmp_path, key=None)
        assert result.returncode == 0, result.stderr
        assert simulator.stats(full=False)["requests"] == 4
