"""A background thread that keeps the next examples of a resumable stream ready while the step runs.

The thread pulls examples from the wrapped stream into a bounded queue, each with the stream's state right after
it, so `state_dict()` is the position after the last example the *consumer* took, not after the ones read ahead:
a checkpoint resumes with exactly the next example, as without prefetching. `load_state_dict()` stops the thread,
drops what it read ahead, restores the stream and starts again.

A thread, not a DataLoader worker process: the stream (a tokenizer, a streamed dataset, its packing state) stays
in one process, so nothing needs pickling, and the work overlaps with the step whenever the training thread
waits on the accelerator (the GIL is released there) or in any C++ code that releases it. For corpora whose
tokenization outruns one core, prepare them instead (data_pipeline.prepare, `data.source: indexed`).
"""

from __future__ import annotations

import atexit
import queue
import threading
from typing import Any

_DONE = object()


class Prefetcher:
    """Wraps a ResumableStream (iterator with state_dict/load_state_dict); `depth` examples are read ahead."""

    def __init__(self, stream: Any, depth: int = 64) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be positive, got {depth}")
        self.stream, self.depth = stream, depth
        self._state = stream.state_dict()  # the position after the last example handed out
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __getattr__(self, name: str) -> Any:  # last_block_id, epoch, ...: the wrapped stream's, as it was consumed
        if name in ("stream", "depth"):
            raise AttributeError(name)
        return getattr(self.stream, name)

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, args=(self._queue,), name="data-prefetch",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.close)  # stopped before the interpreter tears down what the thread is reading

    def _produce(self, out: queue.Queue) -> None:
        try:
            while not self._stop.is_set():
                item = next(self.stream)
                extra = {"last_block_id": getattr(self.stream, "last_block_id", None)}
                state = self.stream.state_dict()
                while not self._stop.is_set():
                    try:
                        out.put((item, state, extra), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # StopIteration or a data error: handed to the consumer, raised there
            out.put((_DONE, error, None))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            self._start()
        assert self._queue is not None
        item, state, extra = self._queue.get()
        if item is _DONE:
            self._thread = None
            raise state
        self._state = state
        self._extra = extra
        return item

    @property
    def last_block_id(self) -> int:
        return self._extra["last_block_id"]

    def close(self) -> None:
        """Stop the thread (it finishes the example it is reading); what it read ahead is dropped."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.stream.load_state_dict(state)
        self._state = self.stream.state_dict()
