"""Helpers for tests/test_sparse.py (kept apart from the shared conftest)."""
import numpy as np


def make_sparse_state(n_rows, dim, dtype, *, rowwise=False, amsgrad=False, row_step=False,
                      seed=0):
    """Random (table, exp_avg, exp_avg_sq, max_exp_avg_sq, row_step)."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((n_rows, dim)).astype(dtype)
    m = (0.1 * rng.standard_normal((n_rows, dim))).astype(dtype)
    vshape = (n_rows,) if rowwise else (n_rows, dim)
    v = (0.01 * rng.random(vshape)).astype(dtype)
    vm = (v + 0.01 * rng.random(vshape)).astype(dtype) if amsgrad else None
    rs = rng.integers(0, 7, n_rows).astype(np.int64) if row_step else None
    return [table, m, v, vm, rs]


def make_batch(n_rows, dim, k, dtype, *, dups=True, seed=1, idx_dtype=np.int64):
    rng = np.random.default_rng(seed)
    if dups:
        idx = rng.integers(0, n_rows, k)
    else:
        idx = rng.permutation(n_rows)[:k]
    grads = rng.standard_normal((k, dim)).astype(dtype)
    return idx.astype(idx_dtype), grads


def copies(arrays):
    return [None if a is None else a.copy() for a in arrays]


def bits(a):
    if a.dtype == np.float32:
        return a.view(np.uint32)
    if a.dtype == np.float64:
        return a.view(np.uint64)
    return a


def assert_bitwise(actual, expected, what=""):
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a is None and e is None:
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, what
        ab, eb = bits(np.asarray(a)), bits(np.asarray(e))
        if not np.array_equal(ab, eb):
            bad = np.flatnonzero(ab.ravel() != eb.ravel())
            j = bad[0]
            raise AssertionError(f"{what} buffer {i}: {bad.size} elements differ, first at "
                                 f"{j}: {a.ravel()[j]!r} != {e.ravel()[j]!r}")
