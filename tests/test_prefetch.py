"""Batches built ahead of the step (data/batches.Prefetcher) are the synchronous batcher's."""

from __future__ import annotations

import numpy as np
import pytest

from danceopd_jax.core.routing import Route
from danceopd_jax.data.batches import Prefetcher, RouteBatcher
from danceopd_jax.data.conditions import DataError

ROUTES = [Route("a", "anchor", "t2i", 0.25), Route("b", "edit", "edit", 0.75)]


def _bucket(n: int, offset: int, has_source: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(offset)
    return {"target": rng.integers(0, 255, (n, 6, 6, 3), np.uint8),
            "source": rng.integers(0, 255, (n, 6, 6, 3), np.uint8),
            "has_source": np.full(n, has_source),
            "input_ids": offset + np.arange(n)[:, None].repeat(4, 1).astype(np.int32),
            "attention_mask": np.ones((n, 4), bool)}


def _batcher(**buckets) -> RouteBatcher:
    buckets = buckets or {"t2i": _bucket(10, 0, False), "edit": _bucket(12, 100, True)}
    return RouteBatcher(buckets, ROUTES, "per_sample", 8, seed=3, shards=2)


def _equal(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(
        np.array_equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetched_batches_equal_the_synchronous_ones_and_on_resume(depth):
    batcher = _batcher()
    shard = range(1, 2)  # this process's shard of two
    with Prefetcher(batcher, range(0, 6), shard, depth) as ahead:
        got = [ahead.get(step) for step in range(6)]
    assert all(_equal(got[s], batcher(s, shard)) for s in range(6))
    assert not _equal(got[0], got[1])
    with Prefetcher(_batcher(), range(4, 6), shard, depth) as resumed:  # a fresh process
        assert all(_equal(resumed.get(s), got[s]) for s in (4, 5))
        with pytest.raises(RuntimeError, match="in order, once each"):
            resumed.get(4)


class _BadRow:
    """A prepared-like bucket whose row 7 cannot be read."""

    has_sources = True

    def __len__(self) -> int:
        return 8

    def rows(self, rows: np.ndarray, with_source: bool) -> dict[str, np.ndarray]:
        if 7 in rows:
            raise DataError("rows.jsonl line 9 (bucket 'edit' row 7): image cannot be decoded")
        return _bucket(len(rows), 0, True) | {"target": np.zeros((len(rows), 6, 6, 3))}


def test_errors_reach_the_step_that_needs_the_bad_row():
    batcher = _batcher(t2i=_bucket(10, 0, False), edit=_BadRow())
    bad = next(s for s in range(50) if _raises(batcher, s))
    with Prefetcher(batcher, range(bad + 1)) as ahead:
        for step in range(bad):
            assert _equal(ahead.get(step), batcher(step))
        with pytest.raises(DataError, match=r"rows.jsonl line 9 \(bucket 'edit' row 7\)"):
            ahead.get(bad)


def _raises(batcher: RouteBatcher, step: int) -> bool:
    try:
        batcher(step)
    except DataError:
        return True
    return False
