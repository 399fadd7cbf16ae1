"""Overlap reading and converting (worker threads) with writing (the caller), keeping few tensors alive."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def prefetched(jobs: Iterable[Callable[[], T]], depth: int = 1) -> Iterator[T]:
    """Run `jobs` in `depth` threads ahead of the consumer, yielding results in order.

    At most `depth` results wait besides the one being consumed, which bounds memory to a few tensors. One is
    enough for the writers: a job's heavy parts (reading, casting, quantizing) release the GIL and quantizing
    uses every core itself, while the consumer only hands bytes to the O_DIRECT writer threads.
    """
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=depth) as pool:
        try:
            for job in jobs:
                pending.append(pool.submit(job))
                if len(pending) > depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
