"""`citadel`: the command-line tool (API keys)."""

from __future__ import annotations

import argparse

from citadel.gateway import __version__


def main(argv: list[str] | None = None) -> int:
    """Starts the gateway (until the gateway lands: reports its version)."""
    parser = argparse.ArgumentParser(prog="citadel")
    parser.add_argument("--version", action="version", version=__version__)
    parser.parse_args(argv)
    print(f"citadel {__version__}")
    return 0
