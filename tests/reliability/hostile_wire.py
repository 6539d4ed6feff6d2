"""Hostile requests that are not built from a valid one: every field at random, and raw bytes.

``random_field_cases`` fills a request's fields at random from its descriptor (tensors, strings,
numbers, nested configs; namespace names odd, unknown, or for the calls that cannot change a row
with random fields, the seeded ones). ``raw_payloads`` draws the bytes sent on the wire: random, a
random request truncated, doubled or with bytes after it, or over the server's message limit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import DecodeError
from hypothesis import strategies as st
from monim.protos import memory_pb2 as pb

from tests.reliability import hostile_values as hv
from tests.reliability.hostile_requests import (
    ABORTED,
    EXISTS,
    INVALID,
    NOT_FOUND,
    OK,
    PRECONDITION,
    REQUEST_TYPES,
    Case,
    unknown_fields,
)
from tests.reliability.local_deployment import MAX_MESSAGE_BYTES, World

# ----- random field values -------------------------------------------------------------------------
# The codes a request of each RPC may get whatever its fields hold (docs/API.md), OK aside.
REFUSALS = {
    "CreateNamespace": {INVALID, EXISTS},
    "ListNamespaces": set(),
    "DescribeNamespace": {INVALID, NOT_FOUND},
    "DropNamespace": {INVALID, NOT_FOUND},
    "Add": {INVALID, NOT_FOUND, PRECONDITION},
    "Search": {INVALID, NOT_FOUND, PRECONDITION},
    "Get": {INVALID, NOT_FOUND, PRECONDITION},
    "Delete": {INVALID, NOT_FOUND, PRECONDITION},
    "Retrieve": {INVALID, NOT_FOUND, PRECONDITION},
    "RetrieveBackward": {INVALID, NOT_FOUND, PRECONDITION},
    "ApplyGradients": {INVALID, NOT_FOUND, PRECONDITION},
    "CommitStep": {INVALID, NOT_FOUND, PRECONDITION, ABORTED},
    "AbortStep": {INVALID, NOT_FOUND, PRECONDITION},
    "CreateSnapshot": {INVALID, NOT_FOUND, PRECONDITION},
    "ListSnapshots": set(),
    "RestoreSnapshot": {INVALID, NOT_FOUND, EXISTS, PRECONDITION},
    "Decode": {INVALID, NOT_FOUND, PRECONDITION},  # each step a Search or a Retrieve
    "Reshard": {INVALID},  # a valid one names the deployment's own count (pinned_reshard)
    "ReadEndpoints": set(),
    "SearchParts": {INVALID, NOT_FOUND, PRECONDITION},
    "RetrieveParts": {INVALID, NOT_FOUND, PRECONDITION},
    "ProbeSharedMemory": {PRECONDITION},  # the fuzzing client made no region
}
# Calls whose random requests may name the seeded namespaces: none can change a stored row with random
# fields (reads; a commit of a step no part reached; creating or restoring a name that is taken). The
# others never name them (a random request that happens to be valid could change it, and rightly).
SEEDED_NAMES_ALLOWED = {"ListNamespaces", "DescribeNamespace", "Search", "Get", "Retrieve", "SearchParts",
                        "RetrieveParts", "Decode", "AbortStep",
                        "CommitStep", "CreateNamespace", "CreateSnapshot", "ListSnapshots", "RestoreSnapshot",
                        "ReadEndpoints"}


def _random_value(draw, field, world: World, rpc: str):
    if field.message_type is not None:
        if field.message_type.name == "Tensor":
            return hv.random_tensor(draw)
        message = getattr(pb, field.message_type.name)()
        for inner in field.message_type.fields:
            if draw(st.booleans()):
                _set(message, inner, _random_value(draw, inner, world, rpc))
        return message
    if field.name in ("namespace", "name"):
        seeded = [n.name for n in world.namespaces] if rpc in SEEDED_NAMES_ALLOWED else []
        taken = {n.name for n in world.namespaces}
        return draw(st.one_of(hv.odd_names, hv.unknown_names(taken), *([st.sampled_from(seeded)] if seeded else [])))
    kind = field.type
    if kind == pb_descriptor.FieldDescriptor.TYPE_STRING:
        return draw(hv.hostile_text)
    if kind == pb_descriptor.FieldDescriptor.TYPE_BOOL:
        return draw(st.booleans())
    if kind == pb_descriptor.FieldDescriptor.TYPE_DOUBLE:
        return draw(st.floats(allow_nan=True, allow_infinity=True))
    bits = 64 if kind in (pb_descriptor.FieldDescriptor.TYPE_INT64, pb_descriptor.FieldDescriptor.TYPE_UINT64) else 32
    return draw(hv.int_range(bits, kind in (pb_descriptor.FieldDescriptor.TYPE_INT32,
                                            pb_descriptor.FieldDescriptor.TYPE_INT64)))


def _set(message, field, value) -> None:
    if field.message_type is not None:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def moves_rows(rpc: str, request, world: World) -> bool:
    """A valid Reshard to another shard count: it moves every row, rightly, which would change the
    deployment under the other examples (tests/integration/test_reshard_service.py checks moves)."""
    return rpc == "Reshard" and 1 <= request.shards <= 4096 and request.shards != world.shards


@st.composite
def random_field_requests(draw, world: World, rpc: str):
    request = REQUEST_TYPES[rpc]()
    for field in request.DESCRIPTOR.fields:
        if draw(st.booleans()):
            _set(request, field, _random_value(draw, field, world, rpc))
    if not request.DESCRIPTOR.fields or draw(st.integers(0, 4)) == 0:
        request.MergeFromString(b"".join(draw(st.lists(unknown_fields(), min_size=1, max_size=3))))
    if moves_rows(rpc, request, world):
        request.shards = world.shards
    return request


@st.composite
def random_field_cases(draw, world: World, rpc: str) -> Case:
    return Case(rpc, draw(random_field_requests(world, rpc)), ("random field values",),
                frozenset(REFUSALS[rpc] | {OK}))


# ----- bytes on the wire ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Payload:
    """Bytes sent as the request; ``what`` says how they were made."""

    rpc: str
    data: bytes
    what: str


def raw_payloads(world: World, rpc: str) -> st.SearchStrategy[Payload]:
    """Bytes of every kind, less those that parse to a Reshard that moves rows (moves_rows)."""
    return _raw_payloads(world, rpc).filter(lambda payload: not _parses_to_a_move(payload, world))


def _parses_to_a_move(payload: Payload, world: World) -> bool:
    try:
        return moves_rows(payload.rpc, REQUEST_TYPES[payload.rpc].FromString(payload.data), world)
    except DecodeError:
        return False


@st.composite
def _raw_payloads(draw, world: World, rpc: str) -> Payload:
    kind = draw(st.sampled_from(["random", "random", "truncated", "truncated", "trailing bytes", "doubled",
                                 "oversized"]))
    if kind == "random":
        return Payload(rpc, draw(st.binary(max_size=200)), kind)
    if kind == "oversized":
        size = MAX_MESSAGE_BYTES + draw(st.integers(1, 4096))
        return Payload(rpc, np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(size), kind)
    whole = draw(random_field_requests(world, rpc)).SerializeToString()
    if kind == "truncated":
        return Payload(rpc, whole[:draw(st.integers(0, max(0, len(whole) - 1)))], kind)
    if kind == "trailing bytes":
        return Payload(rpc, whole + draw(st.binary(min_size=1, max_size=32)), kind)
    return Payload(rpc, whole + whole, kind)
