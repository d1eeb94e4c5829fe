"""Work done ahead on threads and taken in order (service/ahead.py): what `predict`, `evaluate`, the export's checks
and batch prediction decode with."""

from __future__ import annotations

import random
import threading
import time

import pytest

from headstart.service.ahead import in_order


class Counted:
    """A function that records how many calls started, on which threads, and raises for the items asked."""

    def __init__(self, fail: set[int] = frozenset(), pause: float = 0.0) -> None:
        self.started, self.threads, self.fail, self.pause = 0, set(), fail, pause
        self.lock = threading.Lock()
        self.random = random.Random(0)

    def __call__(self, item: int) -> int:
        with self.lock:
            self.started += 1
            self.threads.add(threading.get_ident())
            pause = self.random.random() * self.pause
        time.sleep(pause)  # the later items often finish first
        if item in self.fail:
            raise ValueError(f"item {item} cannot be read")
        return item * item


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_results_come_in_the_items_order_and_errors_where_their_item_is(threads):
    fn = Counted(fail={3, 17}, pause=0.003)
    got = []
    for future in in_order(fn, range(40), threads=threads):
        try:
            got.append(future.result())
        except ValueError as exc:
            got.append(str(exc))
    assert got == [f"item {i} cannot be read" if i in (3, 17) else i * i for i in range(40)]
    assert fn.started == 40
    assert (threading.get_ident() in fn.threads) == (threads == 1)  # one thread: the caller's own, a plain loop


@pytest.mark.parametrize(("threads", "ahead"), [(1, None), (2, 3), (4, None)])
def test_no_more_than_ahead_results_are_computed_beyond_the_one_taken(threads, ahead):
    fn = Counted(pause=0.002)
    bound = 0 if threads == 1 else (ahead or 4 * threads)
    for taken, future in enumerate(in_order(fn, iter(range(60)), threads=threads, ahead=ahead), start=1):
        time.sleep(0.004)  # a slow consumer: the threads run as far ahead as they may
        assert future.result() == (taken - 1) ** 2
        assert fn.started <= taken + bound
    assert fn.started == 60


def test_a_caller_that_stops_early_leaves_nothing_running():
    fn = Counted(pause=0.002)
    before = threading.active_count()
    results = in_order(fn, range(1000), threads=2, ahead=4)
    for taken, future in enumerate(results, start=1):
        future.result()
        if taken == 5:
            break
    results.close()  # as a for loop's generator is closed when dropped
    started = fn.started
    time.sleep(0.05)
    assert fn.started == started <= 5 + 4
    assert threading.active_count() == before
