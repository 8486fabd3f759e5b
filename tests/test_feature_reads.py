"""Feature rows read with preadv give exactly the memory map's rows; int8 features are their values within
half a scale; batches made ahead arrive in order, errors and all, and a consumer that stops early stops the producer."""
import os
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from config import UserError
from feature_reads import Int8Features, RowReader, prefetch, quantize


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A (300, 7, 5) float16 array in a .npy file, memory-mapped."""
    path = tmp_path_factory.mktemp("rows") / "features.npy"
    np.save(path, np.random.default_rng(0).standard_normal((300, 7, 5)).astype(np.float16))
    return np.load(path, mmap_mode="r")


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.integers(0, 299), max_size=200))
def test_any_rows_in_any_order_are_the_arrays_rows(stored, rows):
    read, expected = RowReader(stored).read(rows), stored[np.array(rows, dtype=np.int64)]
    assert read.dtype == np.float16 and read.shape == (len(rows), 7, 5) and np.array_equal(read, expected)


def test_a_file_cut_short_is_one_line_and_a_row_outside_an_index_error(stored, tmp_path):
    path = tmp_path / "cut.npy"
    path.write_bytes(open(stored.filename, "rb").read())
    reader = RowReader(np.load(path, mmap_mode="r"))
    os.truncate(path, os.path.getsize(path) - 100)  # cut while in use (a disk full at extraction's copy...)
    assert reader.read([0, 5]).shape == (2, 7, 5)
    with pytest.raises(UserError, match="cut.npy: ends before row 299; extract the features again"):
        reader.read([0, 299])
    with pytest.raises(IndexError):
        reader.read([300])


@settings(max_examples=80, deadline=None)
@given(values=arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(1, 9)),
                     elements=st.floats(-6e4, 6e4, width=16)),  # what extraction's float16 rounding leaves
       rows=st.lists(st.integers(0, 4), max_size=8))
def test_int8_features_are_the_values_within_half_a_scale(values, rows, tmp_path_factory):
    codes, scales = quantize(torch.from_numpy(values))
    assert codes.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == values.shape[:-1]
    largest = np.abs(values).max(-1)
    assert np.array_equal(np.abs(codes).max(-1)[largest > 0], np.full((largest > 0).sum(), 127, np.int8))
    restored = Int8Features(codes, scales)[np.arange(len(values))]
    assert restored.dtype == np.float32
    assert np.all(np.abs(restored - values) <= scales[..., None] * 0.5001)  # zero vectors come back exactly
    path = tmp_path_factory.mktemp("int8") / "codes.npy"
    np.save(path, codes)
    rows = [row % len(values) for row in rows]
    mapped = Int8Features(np.load(path, mmap_mode="r"), scales)
    assert np.array_equal(mapped.read(rows), restored[rows]) and len(mapped) == len(values)


def test_prefetch_yields_everything_in_order_ahead_of_the_consumer():
    made = []

    def produce():
        for i in range(10):
            made.append(i)
            yield i

    batches = prefetch(produce(), depth=2)
    assert next(batches) == 0
    time.sleep(0.3)
    assert len(made) >= 3  # made ahead while the consumer waited
    assert list(batches) == list(range(1, 10))


def test_prefetch_raises_the_producers_error_and_a_consumer_that_stops_stops_it():
    def failing():
        yield 1
        raise ValueError("disk gone")

    with pytest.raises(ValueError, match="disk gone"):
        list(prefetch(failing()))

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    batches = prefetch(endless())
    assert next(batches) == 0
    batches.close()  # what an abandoned training epoch does
    deadline = time.time() + 5
    while any(thread.name == "prefetch" for thread in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(thread.name == "prefetch" for thread in threading.enumerate())


def test_a_batch_of_blocks_reads_each_run_of_distinct_rows_once(stored, monkeypatch):
    """Five captions of each of rows 10..19 and 40..49, shuffled (a --read-block batch): two preadv calls,
    not 100."""
    calls = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *args: calls.append(args[2]) or real_preadv(*args))
    rows = np.random.default_rng(1).permutation(np.repeat(np.r_[10:20, 40:50], 5))
    assert np.array_equal(RowReader(stored).read(rows), stored[rows])
    assert len(calls) == 2
