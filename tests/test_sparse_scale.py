"""Sparse steps at scale (issue 15): tables past 2**31 elements on np.memmap
(sparse files: no disk until touched), bucketed and threaded; nothing of
size n_rows is allocated or scanned per step (RSS and tracemalloc stay
O(batch))."""
import os
import tracemalloc

import numpy as np
import pytest

import fastadam as fa
from fastadam import _plan
from fastadam.functional import CatchUpHistory, sparse_adam_catchup_step


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def folder(tmp_path):
    """A RAM-backed folder where there is one (sparse files on tmpfs: pages
    appear when touched, no disk writes; a disk's block allocation per page
    fault made this test take minutes on a busy machine), else tmp_path."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        import tempfile
        with tempfile.TemporaryDirectory(dir=shm) as d:
            yield d
    else:  # pragma: no cover
        yield str(tmp_path)


def _maps(folder, n_rows, dim):
    out = []
    for name in ("table", "m", "v"):
        path = os.path.join(folder, f"{name}.bin")
        with open(path, "wb") as f:
            f.truncate(n_rows * dim * 4)
        try:
            out.append(np.memmap(path, dtype=np.float32, mode="r+", shape=(n_rows, dim)))
        except (OSError, ValueError) as e:  # pragma: no cover - 32-bit address space
            pytest.skip(f"cannot map a {n_rows * dim * 4 / 1e9:.1f} GB sparse file here: {e}")
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (RSS)")
@pytest.mark.parametrize("catchup", [False, True])
def test_memmap_past_2_31_elements_bucketed_threaded_bounded_memory(folder, catchup):
    n_rows, dim, k = 2**23 + 3, 257, 256         # 2.16e9 elements per buffer (8.6 GB each)
    assert n_rows * dim > 2**31
    assert _plan.KERNELS.module.sparse_parts(2, k, dim, n_rows)[0] > 1   # several buckets
    table, m, v = _maps(folder, n_rows, dim)
    rng = np.random.default_rng(0)
    hot = np.array([n_rows - 1, 0, 2**31 // dim + 1, 2**22 + 11], np.int64)
    batches = []
    for _ in range(2):
        ids = rng.integers(0, n_rows, k)
        ids[rng.integers(0, k, 32)] = rng.choice(hot, 32)      # rows past 2**31 elements, repeated
        batches.append((ids, rng.standard_normal((k, dim)).astype(np.float32)))
    rows = np.unique(np.concatenate([b[0] for b in batches]))
    small = [np.zeros((rows.size, dim), np.float32) for _ in range(3)]
    last = np.zeros(n_rows, np.int64) if catchup else None      # np.zeros: lazily paged
    small_last = np.zeros(rows.size, np.int64)
    h = CatchUpHistory(weight_decay=0.01)
    rss0 = _rss()
    tracemalloc.start()
    for step, (ids, g) in enumerate(batches, start=1):
        sid = np.searchsorted(rows, ids)
        if catchup:
            h.append(1e-2)
            sparse_adam_catchup_step(table, ids, g, m, v, last, h, n_threads=2)
            sparse_adam_catchup_step(small[0], sid, g, small[1], small[2], small_last, h,
                                     n_threads=1)
        else:
            fa.sparse_adam_step(table, ids, g, m, v, step=step, n_threads=2)
            fa.sparse_adam_step(small[0], sid, g, small[1], small[2], step=step, n_threads=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    grown = _rss() - rss0
    # the touched rows' pages: ~3 x 512 rows x 2 pages, each fault mapping up to
    # 64 KiB around it (the kernel's fault-around), last_step's touched 2 MiB
    # huge pages (numpy advises them): ~0.2 GB; one scan of n_rows would fault
    # in the 26 GB of the three files
    assert grown < 512 * 2**20, grown
    assert peak < 40 * k * dim * 4, peak     # Python-side allocations: O(batch)
    for big, ref in zip((table, m, v), small):
        assert np.array(big[rows]).tobytes() == ref.tobytes()
    if catchup:
        assert (last[rows] == small_last).all() and last[1] == 0
    untouched = np.setdiff1d(np.array([1, 2**22, n_rows - 2]), rows)
    assert untouched.size and not np.any(table[untouched]) and not np.any(m[untouched])
    for a in (table, m, v):
        a.flush()
    used = sum(os.stat(os.path.join(folder, f"{n}.bin")).st_blocks * 512
               for n in ("table", "m", "v"))
    if used < n_rows * dim * 4:        # the filesystem keeps sparse files sparse
        assert used < 64 * 2**20, used
    del table, m, v
