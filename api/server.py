"""``python -m api.server --port N``: start the API without the CLI (tests and benchmarks start it this way)."""

from __future__ import annotations

import argparse
import logging
import sys

from api.commands import serve
from indexer.errors import SleuthError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the Sleuth API (settings from SLEUTH_* variables)")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        serve(host=args.host, port=args.port, log_level=args.log_level)
    except SleuthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
