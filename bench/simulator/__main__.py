"""`python -m simulator`: serve one or more simulated vLLM replicas on loopback.

Prints `listening on PORT [PORT...]` once every replica serves; runs until SIGTERM
or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal

from aiohttp import web

from simulator.params import SimParams
from simulator.server import make_app


def parse_params(argv: list[str] | None = None) -> tuple[argparse.Namespace, SimParams]:
    """The command line: server options and the model's parameters."""
    parser = argparse.ArgumentParser(
        prog="python -m simulator", description="Simulated vLLM replicas."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="first port; 0: any")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--served-name", default="sim")
    defaults = SimParams()
    for f in dataclasses.fields(SimParams):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=f"default {f.default}")
        else:
            kind = float if isinstance(getattr(defaults, f.name), float) else int
            parser.add_argument(
                flag, type=kind, default=f.default, help=f"default {f.default}"
            )
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SimParams)}
    return args, SimParams(**values)


async def serve(args: argparse.Namespace, params: SimParams) -> None:
    runners: list[web.AppRunner] = []
    ports: list[int] = []
    for i in range(args.replicas):
        runner = web.AppRunner(make_app(params, args.served_name), access_log=None)
        await runner.setup()
        port = args.port + i if args.port else 0
        await web.TCPSite(runner, args.host, port, backlog=1024).start()
        runners.append(runner)
        ports.append(runner.addresses[0][1])
    print("listening on " + " ".join(map(str, ports)), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for runner in runners:
        with contextlib.suppress(Exception):
            await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args, params = parse_params(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args, params))


if __name__ == "__main__":
    main()
