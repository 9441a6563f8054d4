"""The `pipeline` command, and `python -m pipeline`."""

from pipeline.allocators import return_freed_memory


def main() -> None:
    return_freed_memory()  # before polars or pyarrow is loaded
    from pipeline.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
