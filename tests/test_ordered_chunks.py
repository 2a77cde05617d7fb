"""Work in decoding processes comes back whole and in order, and its errors are raised here."""

import os

import pytest

from tipslab.datamodules.ordered_chunks import ordered_chunks


def ranges_with_pid(start, stop):
    return list(range(start, stop)), os.getpid()


def fails_on_seven(start, stop):
    if start <= 7 < stop:
        raise ValueError("item 7 is bad")
    return list(range(start, stop))


@pytest.mark.parametrize("workers", [0, 2])
def test_ranges_cover_every_item_once_in_order(workers):
    results = list(ordered_chunks(ranges_with_pid, 23, workers=workers, chunk=4))
    assert [items for items, _ in results] == [list(range(s, min(s + 4, 23))) for s in range(0, 23, 4)]
    pids = {pid for _, pid in results}
    assert (pids == {os.getpid()}) if workers == 0 else (os.getpid() not in pids and len(pids) == 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_in_the_work_is_raised_to_the_caller(workers):
    with pytest.raises(Exception, match="item 7 is bad"):
        list(ordered_chunks(fails_on_seven, 12, workers=workers, chunk=3))
