"""`python -m harness up|down|status|build|reset` for the Makefile."""

from __future__ import annotations

import argparse
import shutil
import sys

from .cluster import Cluster, ClusterError, say


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    parser.add_argument("action", choices=["up", "down", "status", "build", "reset"])
    args = parser.parse_args(argv)
    cluster = Cluster()
    try:
        if args.action == "up":
            cluster.up()
        elif args.action == "down":
            cluster.down()
        elif args.action == "build":
            cluster.build()
        elif args.action == "reset":
            cluster.down()
            shutil.rmtree(cluster.layout.state, ignore_errors=True)
            say(f"removed {cluster.layout.state}")
        else:
            states = cluster.status()
            for name, ok in states.items():
                print(f"{name:25} {'healthy' if ok else 'down'}")
            return 0 if all(states.values()) else 1
    except ClusterError as err:
        say(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
