"""Read ahead: produce the next items of an iterator in a thread while the caller works on this one.

One home for the bounded-queue hand-over that curation (metadata batches), encoding (prepared
image batches) and distillation (`distill.prefetch`: latent batches) use.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def read_ahead(items: Iterable[T], depth: int, name: str = "lcmlora-read-ahead") -> Iterator[T]:
    """The same items in the same order, up to `depth` produced ahead by a daemon thread.

    An exception in the producer is re-raised in the consumer; a consumer that stops early
    stops the producer, which is joined before returning.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            q.put(err)

    thread = threading.Thread(target=produce, daemon=True, name=name)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
