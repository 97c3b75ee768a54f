"""``python -m checkstream.demo``: the demo upstream on its own (its own process)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence

from checkstream.demo.server import serve_until_stopped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m checkstream.demo",
        description="Fake OpenAI/Anthropic API for trying CheckStream without an API key.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=9001, help="port to bind (9001)")
    parser.add_argument(
        "--chunk-delay-ms", type=float, default=0.0, help="delay between stream events (0)"
    )
    args = parser.parse_args(argv)
    # Ctrl-C is the normal way to stop it when run by hand.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_until_stopped(args.host, args.port, args.chunk_delay_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
