"""Which shard read endpoint a remote MemoryClient sends its memory layer's calls to (docs/API.md,
"Read endpoints").

A server may serve the calls a memory layer makes every step (Search, Retrieve, Decode streams, the
training step's RetrieveBackward, CommitStep, AbortStep, and its writes, Add and ApplyGradients) on
each shard's own endpoint too (workers/read_endpoint.py), with no hop from the front end to the
shards. A client asks the front end for them (``ReadEndpoints``) at its first such call and keeps
one, picked at random (so that clients spread over the shards), for all of them; everything else
goes to the front end. When the
endpoint cannot be reached or breaks (its shard restarted and the endpoint with it, a TLS
certificate that does not name its host, a firewall), the call goes to the front end at once,
without a retry or a wait, and so do the client's calls for ``ENDPOINT_RETRY_S``; then it asks
again. A server that names none is asked again after as long.
"""

from __future__ import annotations

import random
import threading
import time

from monim.protos.errors import MemoryStoreError

# After an endpoint failed, or the server named none, reads go to the front end this long before the
# client asks for endpoints again.
ENDPOINT_RETRY_S = 30.0
# The unary calls a read endpoint serves (Decode, a stream, goes there too): a memory layer's every
# step. A backward named by its forward's handle must reach the router that kept it: the client's
# one endpoint, as its forward did; where it does not (the endpoint failed in between), the router
# answers FAILED_PRECONDITION and MemoryClient.retrieve_backward sends the forward's arrays instead.
# A write sent to the front end after its endpoint failed carries the request id it had there (the
# client always sends one): it lands once.
ENDPOINT_CALLS = frozenset({"Search", "Retrieve", "SearchParts", "RetrieveParts", "RetrieveBackward", "CommitStep",
                            "AbortStep", "Add", "ApplyGradients"})


class ReadRouting:
    """ask() -> the targets the server names (its ReadEndpoints call); enabled: False routes nothing.
    Thread-safe: a client's pipelined chunks read at once."""

    def __init__(self, ask, enabled: bool = True):
        self._ask = ask
        self.enabled = enabled
        self._lock = threading.Lock()
        self._target: str | None = None
        self._asked_after = 0.0  # time.monotonic() before which the server is not asked again

    def routes(self, method: str) -> bool:
        """Whether this call may go to an endpoint."""
        return self.enabled and method in ENDPOINT_CALLS

    def target(self) -> str | None:
        """The endpoint to read through now, or None (the front end)."""
        if not self.enabled:
            return None
        with self._lock:
            if self._target is None and time.monotonic() >= self._asked_after:
                try:
                    targets = self._ask()
                except MemoryStoreError:  # the front end's own answer will say what is wrong
                    targets = []
                if targets:
                    self._target = random.choice(targets)
                else:
                    self._asked_after = time.monotonic() + ENDPOINT_RETRY_S
            return self._target

    def failed(self, target: str) -> None:
        """The endpoint did not serve a read: the front end takes reads for ENDPOINT_RETRY_S."""
        with self._lock:
            if self._target == target:
                self._target = None
                self._asked_after = time.monotonic() + ENDPOINT_RETRY_S

    def forget(self) -> None:
        """Ask the server again at the next read (tests; after an operator restarted the shards)."""
        with self._lock:
            self._target = None
            self._asked_after = 0.0
