"""Forward states: what a Retrieve's backward needs, kept at the front end under a handle.

A Retrieve with ``keep_state`` leaves its queries, global top-k ids, alpha and distances and its
temperature here and answers a handle; the RetrieveBackward that names the handle sends only
grad_memory (B x value_dim) instead of the forward's B x (dim + 3k) numbers, which for k=1024 is
most of the bytes of a training step. A handle lives for ``ttl_s`` after its last use, in a table
bounded by entry count and bytes (the oldest go first); an unknown, expired or evicted handle is
a FAILED_PRECONDITION naming it (the client then sends the arrays, which it still holds). A
handle is known to the front end that made it only. A state goes as soon as a backward of its whole
batch is done; that backward's answer is kept (the last ANSWERS_KEPT, at most ANSWER_BYTES) under the
handle and its step id, so that the same backward sent again (a retry after its answer was lost)
gets it, and steps nothing again, rather than find the handle gone.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
import threading
import time

import numpy as np
from monim.protos.errors import FailedPrecondition

DEFAULT_TTL_S = 300.0
DEFAULT_MAX_ENTRIES = 4096
DEFAULT_MAX_BYTES = 2 << 30
# The answers of the last backwards by handle, kept for their repeats (a B=4096 x 768 dL/dq is 12.6 MB).
ANSWERS_KEPT = 16
ANSWER_BYTES = 256 << 20


class HandleUnknown(FailedPrecondition):
    def __init__(self, handle: str, why: str):
        super().__init__(f"retrieve handle {handle!r} is {why}; send the forward's queries, ids, alpha and "
                         "distances instead (MemoryClient does this by itself)")


@dataclasses.dataclass
class ForwardState:
    namespace: str
    generation: int
    queries: np.ndarray
    ids: np.ndarray
    alpha: np.ndarray
    distances: np.ndarray
    temperature: float
    used: float
    rows_token: str = ""  # the search's rows kept at its one shard under this name (NeighborStore.kept_rows)

    @property
    def nbytes(self) -> int:
        return self.queries.nbytes + self.ids.nbytes + self.alpha.nbytes + self.distances.nbytes


# Why a kept state went (ForwardStates.counts; metrics by these labels).
DROP_REASONS = ("evicted", "expired", "missed")


class ForwardStates:
    """The table. Counters (for metrics): kept, evicted (for room), expired, missed (unknown handles)."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        self.ttl_s, self.max_entries, self.max_bytes = ttl_s, max_entries, max_bytes
        self._states: collections.OrderedDict[str, ForwardState] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.counts = dict.fromkeys(("kept", *DROP_REASONS), 0)
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()  # handle -> why, to say so
        # (handle, step id) -> (grad_queries, grad_temperature) of a whole backward done by handle
        self._answers: collections.OrderedDict[tuple[str, str], tuple] = collections.OrderedDict()
        self._answer_bytes = 0

    def keep(self, namespace: str, generation: int, queries, ids, alpha, distances, temperature: float,
             rows_token: str = "") -> str:
        """Keeps a forward's state; returns its handle ("" if it alone would pass max_bytes)."""
        state = ForwardState(namespace, generation, queries, ids, alpha, distances, float(temperature),
                             time.monotonic(), rows_token)
        if state.nbytes > self.max_bytes:
            return ""
        handle = secrets.token_hex(12)
        with self._lock:
            self._expire(time.monotonic())
            while self._states and (len(self._states) >= self.max_entries or self.bytes + state.nbytes > self.max_bytes):
                self._drop(next(iter(self._states)), "evicted")
            self._states[handle] = state
            self.bytes += state.nbytes
            self.counts["kept"] += 1
        return handle

    def get(self, handle: str, namespace: str) -> ForwardState:
        """The state under handle (its lease renewed); HandleUnknown if there is none (for namespace)."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            state = self._states.get(handle)
            if state is None or state.namespace != namespace:
                self.counts["missed"] += 1
                why = self._gone.get(handle, "unknown to this front end")
                raise HandleUnknown(handle, why if state is None else "a handle of another namespace")
            state.used = now
            self._states.move_to_end(handle)
            return state

    def release(self, handle: str, step_id: str = "", answer: tuple | None = None) -> None:
        """Lets the state under handle go now (a backward of its whole batch is done); unknown handles
        are ignored. answer: (grad_queries, grad_temperature) of that backward, kept under (handle,
        step_id) for its repeats (answered)."""
        with self._lock:
            state = self._states.pop(handle, None)
            if state is None:
                return
            self.bytes -= state.nbytes
            self._say_gone(handle, "released (its backward was done)")
            size = getattr(answer[0], "nbytes", 0) if answer is not None else 0
            if answer is None or not step_id or size > ANSWER_BYTES:
                return
            self._answers[(handle, step_id)] = (state.namespace, answer)
            self._answer_bytes += size
            while len(self._answers) > ANSWERS_KEPT or self._answer_bytes > ANSWER_BYTES:
                self._answer_bytes -= self._answers.popitem(last=False)[1][1][0].nbytes

    def batch_of(self, handle: str) -> int:
        """The rows of the forward kept under handle (0 if none is)."""
        with self._lock:
            state = self._states.get(handle)
            return 0 if state is None else int(state.ids.shape[0])

    def answered(self, handle: str, step_id: str, namespace: str) -> tuple | None:
        """The answer of the whole backward by handle (of namespace) with step_id, if it was done and is
        still kept."""
        with self._lock:
            kept = self._answers.get((handle, step_id)) if step_id else None
            return kept[1] if kept is not None and kept[0] == namespace else None

    def _expire(self, now: float) -> None:
        while self._states:
            handle, state = next(iter(self._states.items()))
            if now - state.used <= self.ttl_s:
                break
            self._drop(handle, "expired")

    def _drop(self, handle: str, why: str) -> None:
        state = self._states.pop(handle)
        self.bytes -= state.nbytes
        self.counts[why] += 1
        self._say_gone(handle, f"{why} (unused for {self.ttl_s:g} s)" if why == "expired" else
                       f"{why} (the table keeps {self.max_entries} forwards, {self.max_bytes} bytes)")

    def _say_gone(self, handle: str, why: str) -> None:
        self._gone[handle] = why
        while len(self._gone) > self.max_entries:
            self._gone.popitem(last=False)

    def __len__(self) -> int:
        return len(self._states)
