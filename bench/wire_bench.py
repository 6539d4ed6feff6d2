"""A request's encoding on the client: built as a protobuf message vs framed (protos/framing.py).

For an Add of ``--rows`` x ``--dim`` keys with values and tokens (what the data plane bench loads in
65,536-row calls), in one run: the seconds to build the message the generated code's way
(``fill_tensor`` into each field, the cheapest protobuf path) and serialize it, against
``framing.serialized``; the two byte strings parse to the same message.

    python -m bench.wire_bench [--rows 65536] [--dim 768] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from monim.protos import convert, framing, heap
from monim.protos import memory_pb2 as pb


def built(keys, tokens, values) -> bytes:
    request = pb.AddRequest(namespace="bench")
    for name, array in (("keys", keys), ("tokens", tokens), ("values", values)):
        convert.fill_tensor(getattr(request, name), array)
    return request.SerializeToString()


def framed(keys, tokens, values) -> bytes:
    return framing.serialized(pb.AddRequest(namespace="bench"), dict(keys=keys, tokens=tokens, values=values))


def answer_built(result) -> bytes:
    return convert_message(result).SerializeToString()


def convert_message(result) -> pb.SearchResponse:
    response = pb.SearchResponse(generation=result.generation)
    for name in ("ids", "distances", "tokens"):
        convert.fill_tensor(getattr(response, name), getattr(result, name))
    return response


def answer_read_parsed(wire) -> list:
    return list(convert.search_result_from_proto(pb.SearchResponse.FromString(wire)).ids.shape)


def answer_read_framed(wire) -> list:
    return list(convert.search_result_from_proto(*framing.parsed(pb.SearchResponse, wire)).ids.shape)


def best_of(function, args, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wire_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=65_536)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    tuned = heap.keep_freed_memory()  # as a client's process does (MONIM_KEEP_FREED_MEMORY=0: not)
    print(f"# malloc keeps freed memory: {tuned} (protos/heap.py)")
    rng = np.random.default_rng(0)
    arrays = (rng.standard_normal((args.rows, args.dim), dtype=np.float32), np.arange(args.rows),
              rng.standard_normal((args.rows, args.dim), dtype=np.float32))
    assert pb.AddRequest.FromString(built(*arrays)) == pb.AddRequest.FromString(framed(*arrays))
    megabytes = sum(a.nbytes for a in arrays) / 1e6
    protobuf_s, framed_s = best_of(built, arrays, args.repeats), best_of(framed, arrays, args.repeats)
    print(f"# Add of {args.rows:,} x {args.dim} keys + values + tokens ({megabytes:,.0f} MB); "
          f"{platform.machine()}, best of {args.repeats}")
    print(f"protobuf message: {protobuf_s * 1e3:8.1f} ms = {megabytes / protobuf_s:7,.0f} MB/s")
    print(f"framed          : {framed_s * 1e3:8.1f} ms = {megabytes / framed_s:7,.0f} MB/s "
          f"({protobuf_s / framed_s:.1f}x faster)")
    from monim.datastore import SearchResult

    shape = (args.batch, args.k)
    result = SearchResult(ids=rng.integers(0, 1 << 40, shape), distances=rng.random(shape, dtype=np.float32),
                          tokens=rng.integers(0, 50_000, shape).astype(np.int32))
    built_wire, framed_wire = answer_built(result), convert.search_result_to_wire(result)
    assert pb.SearchResponse.FromString(built_wire) == pb.SearchResponse.FromString(framed_wire)
    megabytes = len(framed_wire) / 1e6
    timings = {"encode": (best_of(answer_built, (result,), args.repeats),
                          best_of(convert.search_result_to_wire, (result,), args.repeats)),
               "read": (best_of(answer_read_parsed, (built_wire,), args.repeats),
                        best_of(answer_read_framed, (framed_wire,), args.repeats))}
    print(f"# Search answer of {args.batch:,} x {args.k:,} neighbours (ids, distances, tokens; {megabytes:,.0f} MB)")
    for step, (protobuf_s, framed_s) in timings.items():
        print(f"{step:6s} protobuf message: {protobuf_s * 1e3:8.1f} ms | framed: {framed_s * 1e3:8.1f} ms "
              f"({protobuf_s / framed_s:.1f}x faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
