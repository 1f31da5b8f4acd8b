"""Routed training batches, reproducible from (seed, step).

A batch is `shards` blocks (one per data-parallel shard, train/mesh.py), each the
concatenation of its routing slots, each slot filled from its route's bucket. The rows drawn
depend only on (seed, step, shard, route), so a resumed run sees exactly the batches an
uninterrupted run would have seen, and each process builds only its own shards' rows: the
global batch is the same whatever the number of processes.

Prefetcher builds them ahead of the step on a background thread (train/loop.fit uses it), so
reading and decoding rows overlaps the device's work.

A bucket is either held in memory (a dict of arrays: the shapes world) or read row by row (a
RowSource: data/conditions.PreparedBucket).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from danceopd_jax.core.routing import Route, Slot, step_slots


class RowSource(Protocol):
    """A bucket read on demand: its size, whether its rows carry source images, and the
    model's arrays for given rows."""

    has_sources: bool

    def __len__(self) -> int: ...

    def rows(self, rows: np.ndarray, with_source: bool) -> dict[str, np.ndarray]: ...


Bucket = Mapping[str, np.ndarray]  # in memory
TrainBucket = Bucket | RowSource
MODEL_KEYS = ("target", "source", "has_source", "input_ids", "attention_mask")
SOURCE_KEYS = ("source", "has_source")
_BATCH_STREAM = 0x42_41_54_43  # "BATC"


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] images -> float32 [-1, 1] (the model's pixel space)."""
    return images.astype(np.float32) / 127.5 - 1.0


def has_sources(bucket: Bucket) -> bool:
    return bool(np.any(bucket["has_source"]))


def model_rows(bucket: Bucket, rows: np.ndarray, with_source: bool = True) -> dict[str, np.ndarray]:
    """The arrays a model step consumes, for the given rows of a bucket.

    with_source=False leaves the source slot out entirely (pure T2I batches), which the
    backbone runs as a shorter sequence."""
    missing = [k for k in MODEL_KEYS if k not in bucket]
    if missing:
        raise KeyError(f"bucket lacks {missing}; build it with data.shapes.dataset.load_split.")
    keys = MODEL_KEYS if with_source else tuple(k for k in MODEL_KEYS if k not in SOURCE_KEYS)
    out = {k: bucket[k][rows] for k in keys}
    for k in ("target", "source"):
        if k in out:
            out[k] = to_unit_range(out[k])
    return out


class ArrayBucket:
    """An in-memory bucket (a dict of arrays, built by data.shapes.dataset) as a RowSource."""

    def __init__(self, arrays: Bucket):
        self.arrays = arrays
        self.has_sources = has_sources(arrays)

    def __len__(self) -> int:
        return len(self.arrays["target"])

    def rows(self, rows: np.ndarray, with_source: bool) -> dict[str, np.ndarray]:
        return model_rows(self.arrays, rows, with_source)


def as_row_source(bucket: TrainBucket) -> RowSource:
    return ArrayBucket(bucket) if isinstance(bucket, Mapping) else bucket


class RouteBatcher:
    """Batches for a route table: `batcher(step[, shard_range]) -> (slots, batch)`."""

    def __init__(self, buckets: Mapping[str, TrainBucket], routes: Sequence[Route], mode: str,
                 batch_size: int, seed: int, shards: int = 1):
        if batch_size % shards:
            raise ValueError(f"batch size {batch_size} does not split into {shards} equal "
                             "data-parallel shards; make it a multiple of the mesh's data x "
                             f"fsdp size ({shards}).")
        for r in routes:
            if r.bucket not in buckets:
                raise KeyError(f"route {r.name!r} needs bucket {r.bucket!r}, which was not loaded.")
        self.buckets = {name: as_row_source(b) for name, b in buckets.items()}
        for r in routes:
            if len(self.buckets[r.bucket]) == 0:
                raise ValueError(f"bucket {r.bucket!r} of route {r.name!r} is empty.")
        self.routes, self.mode = tuple(routes), mode
        self.batch_size, self.seed, self.shards = batch_size, seed, shards
        self.weights = [r.weight for r in self.routes]
        # Static per run: a batch carries the source slot iff some route's data has sources.
        self.with_source = any(self.buckets[r.bucket].has_sources for r in self.routes)

    def __call__(self, step: int, shard_range: range | None = None
                 ) -> tuple[tuple[Slot, ...], dict[str, np.ndarray]]:
        """The step's slots (tiling one shard) and the rows of shards `shard_range` (default:
        all of them, i.e. the global batch)."""
        slots = step_slots(self.mode, self.seed, step, self.weights,
                           self.batch_size // self.shards)
        parts = []
        for shard in shard_range or range(self.shards):
            for s in slots:
                bucket = self.buckets[self.routes[s.route].bucket]
                rng = np.random.default_rng([self.seed, step, shard, s.route, _BATCH_STREAM])
                rows = rng.integers(0, len(bucket), size=s.stop - s.start)
                parts.append(bucket.rows(rows, self.with_source))
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return slots, batch


class Prefetcher:
    """The batches of `steps`, built in order by a background thread up to `depth` steps
    ahead of the device: `get(step)` returns `batcher(step, shards)`.

    The rows are whatever the batcher gives for (step, shards), so prefetched batches equal the
    synchronous ones, a resumed run (steps starting later) sees the same batches, and each
    process still builds only its own shards. An error while building step s's batch (a bad or
    missing row, with its file and row in the message) is raised unchanged by `get(s)`, after
    the batches before it were used. `wait_s` adds up the time `get` waited for a batch."""

    def __init__(self, batcher: Callable[[int, range | None], tuple[tuple, dict]],
                 steps: range, shards: range | None = None, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth {depth}: build at least 1 batch ahead (depth >= 1).")
        self.batcher, self.steps, self.shards = batcher, steps, shards
        self.wait_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._build, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _build(self) -> None:
        for step in self.steps:
            try:
                item = (step, self.batcher(step, self.shards), None)
            except Exception as e:  # noqa: BLE001 - re-raised by get(step) in the caller
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[2] is not None:
                return

    def get(self, step: int) -> tuple[tuple, dict]:
        t0 = time.perf_counter()
        while True:
            try:
                built, batch, error = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"prefetcher has no batch for step {step}: it builds "
                                       f"steps {self.steps} in order, once each.") from None
        self.wait_s += time.perf_counter() - t0
        if built != step:
            raise RuntimeError(f"prefetcher built step {built}'s batch but step {step}'s was "
                               f"asked for; steps must be consumed in order {self.steps}.")
        if error is not None:
            raise error
        return batch

    def close(self) -> None:
        """Stop building (a run that ends early, or an error) and wait for the thread."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
