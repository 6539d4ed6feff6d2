#!/usr/bin/env bash
# Regenerates protos/memory_pb2.py, memory_pb2.pyi and memory_pb2_grpc.py from
# protos/memory.proto. Run from anywhere; needs grpcio-tools (pinned in
# constraints.txt). The generated files are checked in; the unit test
# tests/unit/test_proto_drift.py fails when they differ from what this makes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
cd "$root"
python -m grpc_tools.protoc -I . --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" protos/memory.proto
