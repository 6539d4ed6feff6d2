"""Hostile input (issue 15, item 3): generated bad requests for every RPC of protos/memory.proto.

Against a served 2-shard deployment seeded with two namespaces (tests/reliability/local_deployment.py),
hypothesis generates for each RPC of MemoryService (tests/reliability/hostile_requests.py and
hostile_wire.py):
- requests aimed at the seeded data with 1-3 defects, each with the status code docs/API.md gives it;
- requests whose fields hold random values;
- bytes on the wire: random, a request truncated, doubled or followed by garbage, over the size limit.
Each must be answered with one of the codes it may get, never UNKNOWN or INTERNAL (an exception the
server did not handle); afterwards every shard still answers a valid search, and the digest of
everything stored (tests/reliability/state_digest.py) is what it was before the request.

MONIM_FUZZ_EXAMPLES (default 2100): generated requests per run, spread evenly over the RPCs (rounded up).
Examples are derandomized (the same every run) unless MONIM_FUZZ_SEED=<int> picks another sequence.
"""

from __future__ import annotations

import math
import os

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from monim.protos import convert
from monim.protos import memory_pb2 as pb

from tests.reliability.hostile_requests import CASES, EXHAUSTED, INVALID, OK, REQUEST_TYPES, RPCS
from tests.reliability.hostile_wire import REFUSALS, random_field_cases, raw_payloads
from tests.reliability.state_digest import state_digest

EXAMPLES = int(os.environ.get("MONIM_FUZZ_EXAMPLES", "2100"))
SEED = os.environ.get("MONIM_FUZZ_SEED")
SHARES = {"structured": 0.5, "random fields": 0.2, "raw bytes": 0.3}
CALL_TIMEOUT_S = 20.0
METHODS = pb.DESCRIPTOR.services_by_name["MemoryService"].methods
STREAMING_RPCS = {method.name for method in METHODS if method.client_streaming}
SERVER_STREAMING_RPCS = {method.name for method in METHODS if method.server_streaming and not method.client_streaming}
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def examples(kind: str) -> int:
    return max(1, math.ceil(EXAMPLES * SHARES[kind] / len(RPCS)))


class Referee:
    """Sends requests and judges the answers: the status code, every shard still serving, and the
    stored state unchanged."""

    def __init__(self, deployment, world, ledger):
        self.deployment, self.world, self.ledger = deployment, world, ledger
        self.seeded = {ns.name for ns in world.namespaces}
        self.before = state_digest(deployment.stub)

    def send(self, rpc: str, request) -> tuple[str, str]:
        if rpc in STREAMING_RPCS:
            return self._send_step(rpc, request)
        if rpc in SERVER_STREAMING_RPCS:
            return self._read_stream(rpc, request)
        call = self.deployment.raw(rpc) if isinstance(request, bytes) else getattr(self.deployment.stub, rpc)
        try:
            call(request, timeout=CALL_TIMEOUT_S)
            return OK, ""
        except grpc.RpcError as error:
            return error.code().name, error.details() or ""

    def _send_step(self, rpc: str, request) -> tuple[str, str]:
        """A stream of one step: the step's code and message, or the stream's if it ended with one."""
        call = self.deployment.raw_stream(rpc) if isinstance(request, bytes) else getattr(self.deployment.stub, rpc)
        try:
            (result,) = list(call(iter([request]), timeout=CALL_TIMEOUT_S))
        except grpc.RpcError as error:
            return error.code().name, error.details() or ""
        if isinstance(result, bytes):
            result = pb.DecodeStepResult.FromString(result)
        return STATUS_NAMES[result.code], result.message

    def _read_stream(self, rpc: str, request) -> tuple[str, str]:
        """A unary-stream call read to its end: OK, or the code it ended with."""
        call = self.deployment.raw_server_stream(rpc) if isinstance(request, bytes) else getattr(self.deployment.stub, rpc)
        try:
            for _ in call(request, timeout=CALL_TIMEOUT_S):
                pass
            return OK, ""
        except grpc.RpcError as error:
            return error.code().name, error.details() or ""

    def judge(self, kind: str, rpc: str, what, code: str, details: str, expected) -> None:
        self.ledger[(kind, rpc, code)] += 1
        where = f"{rpc} with {what}"
        if code == OK and rpc == "CreateNamespace":  # random fields that make a valid namespace
            self._drop_new_namespaces()
        self._assert_serving(where)
        # The next request is judged against the state this one left, even if this one fails the test
        # (hypothesis goes on to find other failing examples, and must not see this one's change in them).
        before, self.before = self.before, state_digest(self.deployment.stub)
        assert code not in ("UNKNOWN", "INTERNAL"), f"{where}: unhandled on the server: {code} {details[:500]!r}"
        assert code in expected, f"{where}: answered {code} {details[:500]!r}; expected one of {sorted(expected)}"
        assert code == OK or details, f"{where}: {code} without a message"
        assert self.before == before, f"{where} answered {code} but changed what is stored: {before.changes(self.before)}"

    def _drop_new_namespaces(self) -> None:
        listed = self.deployment.stub.ListNamespaces(pb.ListNamespacesRequest(), timeout=CALL_TIMEOUT_S).namespaces
        for config in listed:
            if config.name not in self.seeded:
                self.deployment.stub.DropNamespace(pb.DropNamespaceRequest(namespace=config.name), timeout=CALL_TIMEOUT_S)

    def _assert_serving(self, where: str) -> None:
        """A valid search of each seeded namespace reaches every shard and answers."""
        for ns in self.world.namespaces:
            request = pb.SearchRequest(namespace=ns.name, k=3)
            convert.fill_tensor(request.queries, np.ones((1, ns.dim), np.float32))
            try:
                reply = self.deployment.stub.Search(request, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as error:
                raise AssertionError(f"after {where}, a valid search of {ns.name!r} fails: "
                                     f"{error.code().name} {error.details()}") from None
            ids = convert.tensor_from_proto(reply.ids, "ids")
            assert ids.shape == (1, 3) and (ids >= 0).all(), f"after {where}, a valid search answers {ids}"


@pytest.fixture(scope="module")
def module_referee(served, ledger):
    deployment, world = served
    return Referee(deployment, world, ledger)


@pytest.fixture
def referee(module_referee):
    """The module's referee, with the state as a test finds it (so one failure is not every test's)."""
    module_referee.before = state_digest(module_referee.deployment.stub)
    return module_referee


def run_examples(strategy, count: int, check) -> None:
    """Runs check on count examples of strategy; fails if hypothesis ran fewer."""
    ran = []

    @settings(max_examples=count, deadline=None, derandomize=SEED is None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(example):
        check(example)
        ran.append(example)

    if SEED is not None:
        run = hypothesis_seed(int(SEED))(run)
    run()
    assert len(ran) >= count, f"hypothesis generated {len(ran)} examples of the {count} asked for"


def test_every_rpc_has_generators():
    """An RPC added to protos/memory.proto fails here until hostile_requests.py generates its requests."""
    assert set(RPCS) == set(CASES) == set(REFUSALS) == set(REQUEST_TYPES), \
        f"RPCs without a generator: {sorted(set(RPCS) - set(CASES))}; stale: {sorted(set(CASES) - set(RPCS))}"


@pytest.mark.parametrize("rpc", RPCS)
def test_requests_with_defects_get_their_codes_and_change_nothing(served, referee, rpc):
    _, world = served

    def check(case):
        code, details = referee.send(rpc, case.request)
        referee.judge("structured", rpc, list(case.defects), code, details, case.expected)

    run_examples(CASES[rpc](world), examples("structured"), check)


@pytest.mark.parametrize("rpc", RPCS)
def test_requests_with_random_fields_are_refused_or_harmless(served, referee, rpc):
    _, world = served

    def check(case):
        code, details = referee.send(rpc, case.request)
        referee.judge("random fields", rpc, f"random fields {case.request!r:.300}", code, details, case.expected)

    run_examples(random_field_cases(world, rpc), examples("random fields"), check)


@pytest.mark.parametrize("rpc", RPCS)
def test_raw_bytes_on_the_wire_are_refused_or_harmless(served, referee, rpc):
    _, world = served

    def check(payload):
        code, details = referee.send(rpc, payload.data)
        if payload.what == "oversized":
            expected = {EXHAUSTED}
        else:
            try:
                REQUEST_TYPES[rpc].FromString(payload.data)
                expected = REFUSALS[rpc] | {OK}
            except DecodeError:  # bytes that are not the request message (workers/decoding.py)
                expected = {INVALID}
        referee.judge("raw bytes", rpc, f"{payload.what} bytes {payload.data[:80]!r} ({len(payload.data)} bytes)",
                      code, details, expected)

    run_examples(raw_payloads(world, rpc), examples("raw bytes"), check)


# ----- regressions: what the generated requests found, fixed in protos/ and workers/router.py ---------
def _t(array) -> pb.Tensor:
    return convert.tensor_to_proto(np.asarray(array))


REGRESSIONS = {
    # name: (RPC, request for the World, expected code). Before the fix, the answer in brackets.
    "shape whose size overflows int64 [INTERNAL: numpy cannot reshape]": (
        "Search", lambda w: pb.SearchRequest(namespace=w.values.name, k=1,
                                             queries=pb.Tensor(dtype="float32", shape=[2**32, 2**32])), INVALID),
    "65 dimensions [INTERNAL: numpy's limit is 64]": (
        "Search", lambda w: pb.SearchRequest(namespace=w.values.name, k=1,
                                             queries=pb.Tensor(dtype="float32", shape=[1] * 65, data=b"\0" * 4)),
        INVALID),
    "empty tensor with a dimension of 2^62 [INTERNAL: numpy 'array is too big']": (
        "Get", lambda w: pb.GetRequest(namespace=w.values.name, ids=pb.Tensor(dtype="int64", shape=[0, 2**62])),
        INVALID),
    # A status message over 8 KiB is dropped at random, one over 16 KiB always.
    "dtype of 20,000 characters [RESOURCE_EXHAUSTED: the quoted dtype overflowed the status header]": (
        "Add", lambda w: pb.AddRequest(namespace=w.plain.name, tokens=_t([1]),
                                       keys=pb.Tensor(dtype="d" * 20_000, shape=[1, 6], data=b"\0" * 24)), INVALID),
    "metric of 20,000 characters [RESOURCE_EXHAUSTED, as above]": (
        "CreateNamespace", lambda w: pb.CreateNamespaceRequest(
            config=pb.NamespaceConfig(name="regression-metric", dim=4, metric="m" * 20_000)), INVALID),
    "optimizer of 20,000 characters [RESOURCE_EXHAUSTED, as above]": (
        "CreateNamespace", lambda w: pb.CreateNamespaceRequest(config=pb.NamespaceConfig(
            name="regression-optimizer", dim=4, optimizer=pb.OptimizerConfig(name="o" * 20_000))), INVALID),
    "CreateNamespace with a request id of 129 characters [OK: created; kept by the registry]": (
        "CreateNamespace", lambda w: pb.CreateNamespaceRequest(config=pb.NamespaceConfig(name="regression-id", dim=4),
                                                               request_id="r" * 129), INVALID),
    "Add with a request id of 129 characters [OK: added; kept by every shard]": (
        "Add", lambda w: pb.AddRequest(namespace=w.plain.name, keys=_t(np.ones((1, 6), np.float32)), tokens=_t([1]),
                                       request_id="r" * 129), INVALID),
    "Add with the request id of an Add of 160 rows, with 3 [INTERNAL: IndexError in the router]": (
        "Add", lambda w: pb.AddRequest(namespace=w.values.name, keys=_t(np.ones((3, 8), np.float32)),
                                       tokens=_t([1, 2, 3]), request_id="seed-add-values-0"), INVALID),
    "Delete of other ids with the request id of a Delete every shard applied [OK, and it deleted them]": (
        "Delete", lambda w: pb.DeleteRequest(namespace=w.values.name, ids=_t(np.array(w.values.stored_ids[:4])),
                                             request_id="seed-delete-values"), OK),
    "snapshot location with a part of 300 characters [INTERNAL: OSError, file name too long]": (
        "CreateSnapshot", lambda w: pb.CreateSnapshotRequest(location="l" * 300), INVALID),
    "snapshot location of 10,000 characters [RESOURCE_EXHAUSTED: quoted whole in FAILED_PRECONDITION]": (
        "RestoreSnapshot", lambda w: pb.RestoreSnapshotRequest(location="l" * 10_000), INVALID),
}


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_regressions(served, referee, case):
    rpc, build, expected = REGRESSIONS[case]
    code, details = referee.send(rpc, build(served[1]))
    referee.judge("regressions", rpc, case, code, details, {expected})


def _backward(world, ids, step_id: str, defer_step: bool = True) -> pb.RetrieveBackwardRequest:
    ids = np.asarray(ids, np.int64).reshape(1, -1)
    k = ids.shape[1]
    return pb.RetrieveBackwardRequest(
        namespace=world.values.name, queries=_t(np.ones((1, 8), np.float32)), ids=_t(ids),
        alpha=_t(np.full((1, k), 1 / k, np.float32)), distances=_t(np.ones((1, k), np.float32)),
        grad_memory=_t(np.ones((1, 4), np.float32)), temperature=1.0, step_id=step_id, defer_step=defer_step)


def test_a_refused_deferred_part_leaves_nothing_for_a_commit(served, referee):
    """Was: the shard holding id 0 kept its part of a deferred step whose other shard answered NOT_FOUND;
    CommitStep then answered ABORTED, yet had stepped row 0."""
    world = served[1]
    unknown = world.values.next_id + 1  # on the other shard than id 0
    code, details = referee.send("RetrieveBackward", _backward(world, [0, unknown], "regression-deferred"))
    referee.judge("regressions", "RetrieveBackward", "a deferred part naming an unknown id", code, details, {"NOT_FOUND"})
    code, details = referee.send("CommitStep", pb.StepRequest(namespace=world.values.name, step_id="regression-deferred"))
    referee.judge("regressions", "CommitStep", "the step of a refused deferred part", code, details, {"ABORTED"})


def test_a_step_staged_for_one_namespace_is_not_committed_or_aborted_by_another(served, referee):
    """Was: CommitStep naming fuzz-plain applied fuzz-values' staged gradients to fuzz-plain's rows:
    INTERNAL, step counts changed, and a log record that stopped the shard from ever starting again.
    AbortStep naming another namespace dropped the step."""
    world = served[1]
    code, details = referee.send("RetrieveBackward", _backward(world, [0, 1], "regression-staged"))
    referee.judge("regressions", "RetrieveBackward", "a valid deferred part", code, details, {OK})
    for rpc, answer in (("CommitStep", "ABORTED"), ("AbortStep", OK)):
        code, details = referee.send(rpc, pb.StepRequest(namespace=world.plain.name, step_id="regression-staged"))
        referee.judge("regressions", rpc, "another namespace's staged step", code, details, {answer})
    reply = referee.deployment.stub.CommitStep(pb.StepRequest(namespace=world.values.name, step_id="regression-staged"))
    assert reply.rows_updated == 2, "the staged step was lost"
    referee.before = state_digest(referee.deployment.stub)  # the commit changed rows 0 and 1, as it should


def test_snapshot_locations_outside_the_root_are_refused_before_anything_opens_them(served, referee, monkeypatch):
    """Was: an s3:// or gs:// location was resolved first (pyarrow connects to resolve a bucket's
    region, to a host the caller picks with ?endpoint_override=), and found outside the root after."""
    from monim.datastore import snapshot

    opened = []
    resolve = snapshot.resolve
    monkeypatch.setattr(snapshot, "resolve", lambda location: opened.append(location) or resolve(location))
    root = served[0].router.snapshots.root_path
    for location in ("s3://bucket/x", "gs://bucket/x", "hdfs://host:8020/x",
                     f"s3://bucket{root}/x?endpoint_override=127.0.0.1:9", f"file://{root}/x?endpoint_override=a"):
        for rpc, request in (("CreateSnapshot", pb.CreateSnapshotRequest(location=location)),
                             ("RestoreSnapshot", pb.RestoreSnapshotRequest(location=location))):
            code, details = referee.send(rpc, request)
            referee.judge("regressions", rpc, f"location {location}", code, details, {INVALID})
    assert opened == [], f"locations opened before they were refused: {opened}"


# ----- known bugs whose fix is outside protos/ and the servicer / router ------------------------------
def test_undecodable_bytes_are_invalid_argument(referee):
    answers = {rpc: referee.send(rpc, b"\xff\xff\xff\xff")[0] for rpc in RPCS}
    assert answers == {rpc: INVALID for rpc in RPCS}


def test_namespace_name_with_a_trailing_newline_is_invalid(served, referee):
    code, details = referee.send("DescribeNamespace", pb.DescribeNamespaceRequest(namespace="fuzz-values\n"))
    assert code == INVALID, f"answered {code} {details!r}"


def _scratch_namespace(referee, name: str, optimizer: pb.OptimizerConfig):
    stub = referee.deployment.stub
    stub.CreateNamespace(pb.CreateNamespaceRequest(config=pb.NamespaceConfig(name=name, dim=2, value_dim=2,
                                                                             optimizer=optimizer)))
    stub.Add(pb.AddRequest(namespace=name, keys=_t(np.eye(2, dtype=np.float32)), tokens=_t([0, 1]),
                           values=_t(np.ones((2, 2), np.float32))))


def _stored_values(referee, name: str) -> np.ndarray:
    reply = referee.deployment.stub.Get(pb.GetRequest(namespace=name, ids=_t(np.arange(2))))
    return convert.tensor_from_proto(reply.values, "values")


def test_an_lr_beyond_float32_is_refused_or_harmless(referee):
    name = "regression-lr"
    try:
        _scratch_namespace(referee, name, pb.OptimizerConfig(name="sgd", lr=1e39))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        return
    try:
        referee.deployment.stub.ApplyGradients(pb.ApplyGradientsRequest(
            namespace=name, ids=_t([0]), grads=_t(np.array([[1.0, 0.0]], np.float32))))
        assert np.isfinite(_stored_values(referee, name)).all(), _stored_values(referee, name)
    finally:
        referee.deployment.stub.DropNamespace(pb.DropNamespaceRequest(namespace=name))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gradients_that_overflow_float32_leave_the_values_finite(referee, optimizer):
    name = f"regression-overflow-{optimizer}"
    _scratch_namespace(referee, name, pb.OptimizerConfig(name=optimizer))
    try:
        try:
            referee.deployment.stub.ApplyGradients(pb.ApplyGradientsRequest(
                namespace=name, ids=_t([0, 0]), grads=_t(np.full((2, 2), 3e38, np.float32))))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert np.isfinite(_stored_values(referee, name)).all(), _stored_values(referee, name)
    finally:
        referee.deployment.stub.DropNamespace(pb.DropNamespaceRequest(namespace=name))


# ----- last: what the hostile requests left is what a restart recovers ---------------------------------
def test_a_restart_on_the_data_dir_recovers_the_same_state(served, referee):
    """Every shard replays its log (with the refused requests' traces, if any were written) and
    answers as before; only the next ids skip ahead, to the registry's reserved mark."""
    deployment = served[0]
    before = state_digest(deployment.stub)
    deployment.restart()
    after = state_digest(deployment.stub)
    assert after.namespaces == before.namespaces, before.changes(after)
    assert all(after.next_ids[name] >= before.next_ids[name] for name in before.next_ids), before.changes(after)
    referee.before = after
    referee._assert_serving("a restart")
