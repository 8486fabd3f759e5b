"""Feature rows read fast from files larger than memory, and batches made ahead of the training step.

A memory-mapped read of 128 random rows from a features file that does not fit in memory costs one
page fault per 4 KiB and the kernel's reclaim: 15x slower than the same rows read with one `pread`
each (docs/scale.md). RowReader reads each run of consecutive rows with one `preadv`, many in flight
from a thread pool (the call releases the GIL); `prefetch` builds the next batches in a background
thread while the model computes. Int8Features reads features stored as int8 with a scale per vector
(`feature_extract.py extract --dtype=int8`: half of float16's bytes) back as float32.
"""
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from config import UserError

READS_IN_FLIGHT = 16


class RowReader:
    """Rows of a memory-mapped .npy array (as np.load(mmap_mode="r") returns it) read with preadv."""

    def __init__(self, array: np.memmap):
        self.path, self.offset, self.shape, self.dtype = array.filename, array.offset, array.shape, array.dtype
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def read(self, rows) -> np.ndarray:
        """rows (B,), any order, repeats allowed -> their rows (B, ...) in the file's dtype. Each row is read
        straight into its place, or, where sorting them makes fewer runs (a batch of blocks of consecutive
        rows, --read-block), each distinct row once in order and then copied to its places."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows {rows.min()}..{rows.max()} outside {self.shape[0]}")
        distinct, places = np.unique(rows, return_inverse=True)
        if 2 * len(_runs(distinct)) < len(_runs(rows)):
            return self._read_in_place(distinct)[places]
        return self._read_in_place(rows)

    def _read_in_place(self, rows):
        """rows (B,) -> their rows (B, ...): a run of consecutive rows with one preadv, the runs shared among
        the threads."""
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if not len(rows):
            return out
        runs = _runs(rows)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            shares = [runs[thread::READS_IN_FLIGHT] for thread in range(min(READS_IN_FLIGHT, len(runs)))]
            for done in [_pool().submit(self._read_runs, fd, out, rows, share) for share in shares]:
                done.result()
        finally:
            os.close(fd)
        return out

    def _read_runs(self, fd, out, rows, runs):
        """Fill out[start:stop] with the consecutive rows from rows[start] on, for each (start, stop) of runs."""
        for start, stop in runs:
            view, position = memoryview(out[start:stop]).cast("B"), self.offset + int(rows[start]) * self.row_bytes
            while len(view):
                count = os.preadv(fd, [view], position)
                if count <= 0:
                    raise UserError(f"{self.path}: ends before row {rows[stop - 1]}; extract the features again")
                view, position = view[count:], position + count


def _runs(rows):
    """rows (B,) -> [(start, stop)] of each run of consecutive rows (r, r + 1, ...) in rows."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return list(zip(np.concatenate([[0], breaks]).tolist(), np.concatenate([breaks, [len(rows)]]).tolist()))


class Int8Features:
    """Features stored as int8 codes (N, ..., F), memory-mapped, with one float32 scale per vector of F
    (N, ...), in memory: a value is its code x its vector's scale. Indexed or read like a float array."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray):
        self.codes, self.scales, self.shape = codes, np.array(scales, dtype=np.float32), codes.shape
        self._reader = RowReader(codes) if isinstance(codes, np.memmap) else None

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, rows):
        return _dequantize(self.codes[rows], self.scales[rows])

    def read(self, rows) -> np.ndarray:
        """rows (B,) -> their values (B, ..., F) float32, the codes read with RowReader."""
        rows = np.asarray(rows, dtype=np.int64)
        return _dequantize(self._reader.read(rows) if self._reader else self.codes[rows], self.scales[rows])


def _dequantize(codes, scales):
    """codes (..., F) int8, scales (...) -> values (..., F) float32."""
    values = codes.astype(np.float32)
    values *= scales[..., None]
    return values


def quantize(values):
    """values (..., F) float tensor (in float16's range) -> (codes (..., F) int8, scales (...) float32) as numpy
    arrays: each vector scaled so that its largest magnitude is 127 (an error of at most half a scale a value)."""
    scales = values.abs().amax(-1).float() / 127  # (...)
    codes = (values.float() / scales.clamp_min(1e-30)[..., None]).round_().clamp_(-127, 127)
    return codes.to(torch.int8).numpy(), scales.numpy()


def row_reader(features):
    """What reads rows of a features array fast: its RowReader when memory-mapped, itself when int8, else None."""
    if isinstance(features, Int8Features):
        return features
    return RowReader(features) if isinstance(features, np.memmap) else None


_POOL = {}


def _pool():
    """This process's reading threads (a forked child makes its own)."""
    if os.getpid() not in _POOL:
        _POOL.clear()
        _POOL[os.getpid()] = ThreadPoolExecutor(READS_IN_FLIGHT, thread_name_prefix="feature-reads")
    return _POOL[os.getpid()]


def prefetch(iterable, depth=2):
    """Yield what iterable yields, made up to `depth` items ahead in a background thread (an error there
    is raised here; a consumer that stops early stops the thread)."""
    ready, stop, done = queue.Queue(depth), threading.Event(), object()

    def hand(item, error=None):
        """Put item in the queue, waiting while it is full; False once the consumer has stopped."""
        while not stop.is_set():
            try:
                ready.put((item, error), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterable:
                if not hand(item):
                    return
            hand(done)
        except BaseException as error:  # raised in the consumer
            hand(done, error)

    thread = threading.Thread(target=produce, daemon=True, name="prefetch")
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:  # the thread ends with its current item: none may run on into the interpreter's exit
        stop.set()
        thread.join()
