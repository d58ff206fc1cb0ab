"""Container HEALTHCHECK: exit 0 when the semroute service in this container answers the gRPC
health check (grpc.health.v1) with SERVING, else 1. The address is SEMROUTE_HEALTH_ADDRESS
(default 127.0.0.1:50051, the router; the dispatcher's image sets 127.0.0.1:50052). Only the
gRPC health client the runtime image already has: no grpc_health_probe binary to download."""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    address = os.environ.get("SEMROUTE_HEALTH_ADDRESS", "127.0.0.1:50051")
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2.0
            )
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
