"""Memorizing from the model: a background sender of admitted rows to the store's Add.

The training step (or decoding loop) hands over each step's hard tokens and goes on;
a daemon thread sends them as batched Adds over the client's persistent channel.
The queue is bounded, so a store that falls behind slows the producer down instead
of growing memory without limit.

A send that fails with a transient error (``Unavailable``, ``DeadlineExceeded``) is
retried with exponential backoff and jitter, every attempt under the batch's one
``request_id``, so that the store applies a retried batch once. A batch that still
fails, or fails with any other error, is counted and its error kept, and the sender
goes on with the next batch. ``submit()`` never raises a send error (it runs inside
a model's forward hook); ``flush()`` waits until everything queued is sent and raises
one ``AdmissionError`` for the batches lost since the previous flush. ``stats()``
gives the cumulative counts. ``close()`` runs at interpreter exit too, so it logs
lost batches instead of raising.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import queue
import random
import threading
import time

import numpy as np
from monim.protos import validation
from monim.protos.errors import DeadlineExceeded, InvalidArgument, Unavailable

logger = logging.getLogger(__name__)

_STOP = object()
TRANSIENT_ERRORS = (Unavailable, DeadlineExceeded)  # with their subclasses, e.g. ShardUnavailable


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@dataclasses.dataclass(frozen=True)
class SendFailures:
    """Batches the sender gave up on: how many, their rows, and the first and last error."""

    batches: int
    rows: int
    first_error: BaseException
    last_error: BaseException

    def summary(self) -> str:
        batches = f"{self.batches} batch" if self.batches == 1 else f"{self.batches} batches"
        text = f"{batches} ({self.rows} rows) could not be stored; first error: {_describe(self.first_error)}"
        if self.batches > 1:
            text += f"; last error: {_describe(self.last_error)}"
        return text


class AdmissionError(RuntimeError):
    """Raised by ``AdmissionSender.flush()`` when admitted rows were lost; ``failures``: SendFailures."""

    def __init__(self, failures: SendFailures):
        super().__init__(f"admission: {failures.summary()}")
        self.failures = failures


class AdmissionSender:
    """client: MemoryClient; namespace: where rows go; source: their tag;
    max_queue: batches that may wait; merge_eps: passed to Add (0 = no merge).
    retries: extra attempts of a batch after a transient error; backoff_s: the delay
    before the first retry, doubled for each later one (times a jitter in [0.5, 1.5),
    at most max_backoff_s)."""

    def __init__(self, client, namespace: str, source: str = "", max_queue: int = 64, merge_eps: float = 0.0,
                 retries: int = 3, backoff_s: float = 0.2, max_backoff_s: float = 5.0):
        for name, value in (("retries", retries), ("backoff_s", backoff_s), ("max_backoff_s", max_backoff_s)):
            if value < 0:
                raise InvalidArgument(f"{name} must be >= 0, got {value}")
        self.client, self.namespace, self.source, self.merge_eps = client, namespace, source, merge_eps
        self.retries, self.backoff_s, self.max_backoff_s = int(retries), float(backoff_s), float(max_backoff_s)
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        # Counters are written by the sender thread only; the lock keeps flush()'s
        # read-and-reset of the unreported failures whole.
        self._lock = threading.Lock()
        self.rows_sent = 0
        self.rows_merged = 0
        self.batches_sent = 0
        self.batches_failed = 0
        self.rows_failed = 0
        self.retries_made = 0
        self.send_seconds = 0.0
        self.last_error: BaseException | None = None
        self._unreported: SendFailures | None = None  # lost since the last flush
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="monim-admission", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def submit(self, keys: np.ndarray, tokens: np.ndarray, values: np.ndarray | None = None) -> None:
        """Queues one batch (keys float32 [N, dim], tokens int [N], values float32 [N, value_dim]);
        blocks while the queue is full. Never raises a send error (see flush); raises
        RuntimeError once the sender is closed."""
        if self._closed:
            raise RuntimeError("the admission sender is closed")
        if len(keys):
            self.queue.put((keys, tokens, values))

    # ----- the sender thread -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is _STOP:
                    return
                self._send(*item)
            finally:
                self.queue.task_done()

    def _send(self, keys, tokens, values) -> None:
        """Sends one batch: retries transient errors under one request id, counts the batch
        as lost when it still fails."""
        request_id = validation.new_request_id()
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                result = self.client.add(self.namespace, keys, tokens, values=values, source=self.source,
                                         merge_eps=self.merge_eps, details=True, request_id=request_id)
            except TRANSIENT_ERRORS as error:
                self.send_seconds += time.perf_counter() - started
                if attempt < self.retries:
                    time.sleep(self._backoff_s(attempt))
                    attempt += 1
                    self.retries_made += 1
                    continue
                self._lost(len(keys), error)
                return
            except BaseException as error:  # noqa: BLE001 - kept for flush(); the thread must go on
                self.send_seconds += time.perf_counter() - started
                self._lost(len(keys), error)
                return
            self.send_seconds += time.perf_counter() - started
            self.rows_sent += int(len(keys))
            self.rows_merged += int(np.asarray(result.merged).sum())
            self.batches_sent += 1
            return

    def _backoff_s(self, attempt: int) -> float:
        """Seconds before retry number attempt + 1: backoff_s * 2**attempt with jitter, so that
        senders that failed together do not retry together."""
        return min(self.max_backoff_s, self.backoff_s * 2**attempt * random.uniform(0.5, 1.5))

    def _lost(self, rows: int, error: BaseException) -> None:
        with self._lock:
            self.batches_failed += 1
            self.rows_failed += int(rows)
            self.last_error = error
            previous = self._unreported
            self._unreported = SendFailures(
                batches=1 + (previous.batches if previous else 0),
                rows=int(rows) + (previous.rows if previous else 0),
                first_error=previous.first_error if previous else error,
                last_error=error,
            )

    def _take_unreported(self) -> SendFailures | None:
        with self._lock:
            failures, self._unreported = self._unreported, None
        return failures

    # ----- the caller's side ---------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Batches queued or being sent."""
        return self.queue.unfinished_tasks

    def stats(self) -> dict:
        """Cumulative counts since the sender started (send_seconds: time spent in Add, retries included)."""
        with self._lock:
            return {
                "rows_sent": self.rows_sent,
                "rows_merged": self.rows_merged,
                "batches_sent": self.batches_sent,
                "batches_failed": self.batches_failed,
                "rows_failed": self.rows_failed,
                "retries": self.retries_made,
                "pending": self.pending,
                "send_seconds": self.send_seconds,
                "last_error": None if self.last_error is None else _describe(self.last_error),
            }

    def flush(self) -> None:
        """Waits until every queued batch is sent; raises AdmissionError if a batch was lost
        since the last flush (it is reported once; stats() keeps the totals)."""
        self.queue.join()
        failures = self._take_unreported()
        if failures is not None:
            raise AdmissionError(failures) from failures.first_error

    def close(self) -> None:
        """Sends what is queued, stops the thread, and logs (does not raise) batches lost since
        the last flush: it also runs at interpreter exit."""
        if self._closed:
            return
        self._closed = True
        self.queue.join()
        self.queue.put(_STOP)
        self._thread.join(timeout=60)
        atexit.unregister(self.close)
        failures = self._take_unreported()
        if failures is not None:
            logger.warning("admission sender for namespace %r closed: %s", self.namespace, failures.summary())
