"""Serving front ends over one engine thread: gRPC (`grpc_server`), OpenAI-compatible HTTP (`http_server`),
Prometheus metrics, and the `jlora serve` command.

Imports go one way: `cli -> server -> {grpc_server, http_server} -> {protocol, metrics} -> async_engine -> engine`.
"""
