"""``python -m pipeline.simulator --port P --config FILE``"""

from __future__ import annotations

import argparse

from .config import SimulatorConfig
from .runner import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.simulator", description="Run the LLM provider simulator."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--config", help="YAML file with SimulatorConfig fields")
    args = parser.parse_args(argv)
    config = SimulatorConfig.from_yaml(args.config) if args.config else SimulatorConfig()
    serve(config, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
