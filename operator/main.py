"""`citadel-operator`: the operator's entry point."""

from __future__ import annotations

import argparse

from citadel.operator import __version__


def main(argv: list[str] | None = None) -> int:
    """Starts the operator (until the operator lands: reports its version)."""
    parser = argparse.ArgumentParser(prog="citadel-operator")
    parser.add_argument("--version", action="version", version=__version__)
    parser.parse_args(argv)
    print(f"citadel-operator {__version__}")
    return 0
