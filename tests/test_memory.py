"""Long-lived objects are frozen only after a collection, and frozen cycles are freed in time."""

from __future__ import annotations

import gc
import weakref

from prometheus_client import CollectorRegistry, Histogram

from gpufleet.collector import memory
from gpufleet.collector.memory import LongLivedObjects


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the garbage collector frees it


def pauses() -> Histogram:
    return Histogram("pauses", "GC pauses.", ["generation"], registry=CollectorRegistry())


def test_garbage_is_collected_before_anything_is_frozen() -> None:
    now = [0.0]
    objects = LongLivedObjects(pauses(), clock=lambda: now[0])
    try:
        garbage = Node()
        gone = weakref.ref(garbage)
        del garbage
        objects.settle()
        assert gone() is None  # collected, not frozen
    finally:
        objects.close()
        gc.unfreeze()


def test_a_cycle_that_dies_after_it_was_frozen_is_freed_by_the_next_full_collection() -> None:
    now = [0.0]
    histogram = pauses()
    objects = LongLivedObjects(histogram, clock=lambda: now[0])
    try:
        kept = Node()
        gone = weakref.ref(kept)
        objects.settle()  # kept is alive: frozen
        del kept
        objects.settle()
        assert gone() is not None  # frozen: left alone by the quick collections
        now[0] = memory.FULL_COLLECTION_S
        objects.settle()
        assert gone() is None
        assert (
            sum(
                sample.value
                for metric in histogram.collect()
                for sample in metric.samples
                if sample.name == "pauses_count"
            )
            >= 3
        )
    finally:
        objects.close()
        gc.unfreeze()
