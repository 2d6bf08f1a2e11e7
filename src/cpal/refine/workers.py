"""Per-image work over a pool of worker processes, results in input order.

Refinement (CRF, IR labels) is per image and CPU-bound in a single thread, so a stage
spreads images over processes, each limited to `threads` torch threads: without the
limit every worker would start one thread per core and the workers would slow each other
down many times over. Processes are spawned (not forked), so a parent's large tensors
are not copied into each worker.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TypeVar

__all__ = ["map_images"]

T = TypeVar("T")
R = TypeVar("R")

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _init_worker(threads: int) -> None:
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(threads)
    import torch  # after the variables, for libraries that read them at load time

    torch.set_num_threads(threads)


def map_images(fn: Callable[[T], R], items: Iterable[T], *, workers: int = 1,
               threads: int = 1, prefetch: int = 2) -> Iterator[R]:
    """Yield fn(item) for each item, in order.

    workers <= 1 runs in this process (with its own thread setting). Otherwise `fn`
    (a module-level function, picklable) runs in `workers` spawned processes, each with
    `threads` torch threads; at most workers * prefetch items are in flight, so a long
    iterable of ids streams. The first exception raised by `fn` propagates here and
    cancels what has not started.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    if workers == 1:
        for item in items:
            yield fn(item)
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context,
                               initializer=_init_worker, initargs=(threads,))
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers * prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
