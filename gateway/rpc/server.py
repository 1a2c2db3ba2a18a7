"""The gRPC server: grpcio's asyncio server on its own port, in the gateway's
event loop, beside uvicorn.

It starts and stops with the app (`Deps.startup`/`Deps.shutdown`), so it shares
the pooled upstream client, the catalog, the keys and the limits with REST.
Besides `citadel.v1.Inference` it serves server reflection and the standard
health service: `""` and `citadel.v1.Inference` are SERVING once the routing
document is loaded (what `/readyz` says), NOT_SERVING before and while
stopping.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from citadel.gateway.deps import Deps
from citadel.gateway.rpc.service import InferenceService, readable
from citadel.gateway.rpc.v1 import citadel_pb2 as pb
from citadel.gateway.upstream import authority

log = logging.getLogger(__name__)


def grpc_limit(max_body_bytes: int) -> int:
    """grpc-core's limit on a received message, a little above the gateway's."""
    return max_body_bytes + max_body_bytes // 8 + 64 * 1024


def listen_address(host: str, port: int) -> str:
    """`host:port` as grpc-core reads it, an IPv6 address in brackets
    (`[::]:50051`): grpc-core reads `:::50051` as a host without a port, and the
    server fails to start."""
    return authority(host, port)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
HEALTH_PERIOD_S = 0.5


class GrpcServer:
    """The gRPC door of one gateway process.

    Args:
        deps: the app's parts.
        host: address to listen on.
        port: port to listen on (0: any free port, see `port` after `start`).
        max_message_bytes: largest request message (the REST body limit).
        stop_grace_s: how long calls in flight may finish when it stops.
    """

    def __init__(
        self,
        deps: Deps,
        host: str,
        port: int,
        max_message_bytes: int,
        stop_grace_s: float = 30.0,
    ) -> None:
        self._deps = deps
        self._stop_grace_s = stop_grace_s
        self._address = listen_address(host, port)
        self._max = max_message_bytes
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._health = health.aio.HealthServicer()
        self.port = port

    async def start(self) -> None:
        """Binds the port and starts serving."""
        server = grpc.aio.server(
            options=[
                # Above the gateway's own limit, which the service applies
                # (counted, and answered as REST's 413 is), by an eighth and
                # 64 KiB: grpc-core reads a whole message before any key is
                # checked, so not by much. Past it, grpc-core's own
                # RESOURCE_EXHAUSTED, uncounted.
                ("grpc.max_receive_message_length", grpc_limit(self._max)),
                ("grpc.so_reuseport", 0),
            ]
        )
        _add_inference(InferenceService(self._deps), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        self.port = server.add_insecure_port(self._address)
        await server.start()
        self._server = server
        log.info("grpc listening", extra={"port": self.port})

    async def stop(self) -> None:
        """Reports NOT_SERVING, then lets calls in flight finish (bounded).

        The gateway starts this when it begins to shut down and awaits it again
        when the app stops: every call waits for the one stop.
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await self._stopping

    async def _stop(self) -> None:
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self._stop_grace_s)
        self._server = None

    async def run(self) -> None:
        """Keeps the health status in step with readiness until cancelled."""
        serving: bool | None = None
        while True:
            ready = self._deps.catalog.loaded
            if ready != serving:
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if ready
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                for name in ("", SERVICE_NAME):
                    await self._health.set(name, status)
                serving = ready
            await asyncio.sleep(HEALTH_PERIOD_S)


def _add_inference(service: InferenceService, server: grpc.aio.Server) -> None:
    """What the generated `add_InferenceServicer_to_server` does, with each
    request message read by `readable`: a message protobuf refuses (nested past
    its depth limit) then reaches the servicer, to be refused as
    INVALID_ARGUMENT and counted, not ended by grpc with UNKNOWN."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in pb.DESCRIPTOR.services_by_name["Inference"].methods:
        request = getattr(pb, method.input_type.name)
        reply = getattr(pb, method.output_type.name)
        handler = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = handler(
            getattr(service, method.name),
            request_deserializer=readable(request.FromString),
            response_serializer=reply.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
    )
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def add_grpc(
    deps: Deps,
    host: str,
    port: int,
    max_message_bytes: int,
    *,
    stop_grace_s: float = 30.0,
) -> GrpcServer:
    """Adds a gRPC server to the app's lifecycle (after the upstream client
    starts, stopped before it closes)."""
    server = GrpcServer(deps, host, port, max_message_bytes, stop_grace_s)
    deps.startup.append(server.start)
    deps.shutdown.append(server.stop)
    deps.sources.append(server)
    return server
