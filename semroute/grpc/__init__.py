"""The gRPC layer: thin servicers over the core, plus what every semroute server shares.

- ``server_common``: interceptors (request id, access log, bearer-token auth), TLS credentials,
  health + reflection registration, graceful shutdown. Generic: the router and the dispatcher
  both build on it.
- ``convert``: proto messages <-> ``semroute.types`` records (the only place that knows both).
- ``router_service``: the ``semroute.v1.Router`` servicer and ``create_router_server``.

Nothing here decides anything; it translates requests into core calls and core results or
errors (``semroute.errors.GRPC_STATUS``) into replies or status codes.
"""
