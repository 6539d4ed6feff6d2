"""Memorizing from the model: a background sender of admitted rows to the store's Add.

The training step (or decoding loop) hands over each step's hard tokens and goes on;
a daemon thread sends them as batched Adds over the client's persistent channel.
The queue is bounded, so a store that falls behind slows the producer down instead
of growing memory without limit. ``flush()`` waits until everything queued is stored
and raises the first send error; it also runs at interpreter exit.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time

import numpy as np

_STOP = object()


class AdmissionSender:
    """client: MemoryClient; namespace: where rows go; source: their tag;
    max_queue: batches that may wait; merge_eps: passed to Add (0 = no merge)."""

    def __init__(self, client, namespace: str, source: str = "", max_queue: int = 64, merge_eps: float = 0.0):
        self.client, self.namespace, self.source, self.merge_eps = client, namespace, source, merge_eps
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.error: BaseException | None = None
        self.rows_sent = 0
        self.rows_merged = 0
        self.batches_sent = 0
        self.send_seconds = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="monim-admission", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def submit(self, keys: np.ndarray, tokens: np.ndarray, values: np.ndarray | None = None) -> None:
        """Queues one batch (keys float32 [N, dim], tokens int [N], values float32 [N, value_dim]);
        blocks while the queue is full. Raises a previous send's error."""
        self._raise_pending_error()
        if self._closed:
            raise RuntimeError("the admission sender is closed")
        if len(keys):
            self.queue.put((keys, tokens, values))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is _STOP:
                    return
                if self.error is None:
                    keys, tokens, values = item
                    started = time.perf_counter()
                    result = self.client.add(self.namespace, keys, tokens, values=values, source=self.source,
                                             merge_eps=self.merge_eps, details=True)
                    self.send_seconds += time.perf_counter() - started
                    self.rows_sent += int(len(keys))
                    self.rows_merged += int(result.merged.sum())
                    self.batches_sent += 1
            except BaseException as error:  # noqa: BLE001 - kept and raised in the caller's thread
                self.error = error
            finally:
                self.queue.task_done()

    def _raise_pending_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    @property
    def pending(self) -> int:
        return self.queue.unfinished_tasks

    def flush(self) -> None:
        """Waits until every queued batch is stored; raises the first send error."""
        self.queue.join()
        self._raise_pending_error()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.queue.join()
        self.queue.put(_STOP)
        self._thread.join(timeout=60)
        atexit.unregister(self.close)
