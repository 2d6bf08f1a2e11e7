"""map_images: ordered results, thread limit in workers, errors propagate."""

from __future__ import annotations

import math
import operator
import sys
from functools import partial

import pytest
import torch

from cpal.refine.workers import map_images


def test_in_process_is_ordered_and_lazy() -> None:
    seen: list[int] = []

    def square(x: int) -> int:
        seen.append(x)
        return x * x

    results = map_images(square, range(5))
    assert seen == []  # nothing runs before the first result is asked for
    assert list(results) == [0, 1, 4, 9, 16]


@pytest.mark.slow
@pytest.mark.skipif(sys.version_info < (3, 11), reason="operator.call is Python 3.11+")
def test_worker_processes_keep_order_limit_threads_and_propagate_errors() -> None:
    """One pool (spawning is the slow part): results in order, one torch thread per
    worker, and the first error re-raised here."""
    items = [partial(math.sqrt, 4.0), partial(math.sqrt, 9.0), torch.get_num_threads,
             torch.get_num_threads, partial(math.sqrt, 16.0), partial(math.sqrt, -1.0)]
    results = map_images(operator.call, items, workers=2, threads=1, prefetch=1)
    assert [next(results) for _ in range(5)] == [2.0, 3.0, 1, 1, 4.0]
    with pytest.raises(ValueError, match="math domain error"):
        next(results)


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="workers"):
        list(map_images(math.sqrt, [1.0], workers=0))
    with pytest.raises(ValueError, match="threads"):
        list(map_images(math.sqrt, [1.0], threads=0))
