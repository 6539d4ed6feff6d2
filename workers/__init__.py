"""The distributed runtime: shard actors, router, registry, gRPC servicer and server, CLI.

The only package that calls Ray, and only through workers/runtime.py.
"""
