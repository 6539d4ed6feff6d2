#!/usr/bin/env bash
# Regenerates protos/memory_pb2.py, memory_pb2.pyi and memory_pb2_grpc.py from
# protos/memory.proto. Run from anywhere; needs grpcio-tools (pinned in
# constraints.txt). The generated files are checked in; the unit test
# tests/unit/test_proto_drift.py fails when they differ from what this makes.
#
# Installed, this folder is the package monim.protos, so protoc sees the file as
# monim/protos/memory.proto: the generated code then imports `monim.protos.memory_pb2`
# and registers the file under that name in protobuf's descriptor pool.
# Usage: generate.sh [OUT]  (writes OUT/protos/*; default: this checkout)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/in/monim/protos" "$stage/out" "$out/protos"
cp "$root/protos/memory.proto" "$stage/in/monim/protos/memory.proto"
python -m grpc_tools.protoc -I "$stage/in" --python_out="$stage/out" --pyi_out="$stage/out" \
  --grpc_python_out="$stage/out" "$stage/in/monim/protos/memory.proto"
cp "$stage/out/monim/protos/memory_pb2.py" "$stage/out/monim/protos/memory_pb2.pyi" \
  "$stage/out/monim/protos/memory_pb2_grpc.py" "$out/protos/"
