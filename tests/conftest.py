"""Shared helpers for the fastadam test suite."""
import importlib

import numpy as np
import pytest

import fastadam
from fastadam import _dispatch, _plan

DTYPES = [np.float32, np.float64]
SIZES = [0, 1, 7, 15, 16, 17, 1000, 2**20 + 3]
THREADS = [1, 2]


def importable_isas():
    """ISA kernel modules built AND runnable on this CPU (baseline first)."""
    return _dispatch.available_modules()


def isa_module(isa):
    return importlib.import_module(f"fastadam._kernels_{isa}")


def make_state(n, dtype, seed=0, shape=None):
    """Random (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq) of ``n`` elements."""
    rng = np.random.default_rng(seed)
    shape = (n,) if shape is None else shape
    p = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    m = (0.1 * rng.standard_normal(shape)).astype(dtype)
    v = (0.01 * rng.random(shape)).astype(dtype)
    vm = (v + 0.01 * rng.random(shape)).astype(dtype)
    return p, g, m, v, vm


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


def q8_trajectory(cls, ps, grads, kw, steps=3, lr=1e-2):
    """Step ``cls(ps, state_dtype="q8", lr=lr, **kw)`` ``steps`` times on
    ``grads(rng, ps)`` and the same from copies by the references (the 8-bit
    reference for arrays of ``MIN_SIZE``+ elements, ``fastadam.adam_step``
    below); returns ``(opt, reference params, reference states)``."""
    from fastadam import _quant as Q
    from fastadam import _reference as R
    from fastadam import functional as F
    opt = cls(ps, lr=lr, state_dtype="q8", **kw)
    ref = [p.copy() for p in ps]
    ref_st = [F.new_state8bit(p.shape) if p.size >= Q.MIN_SIZE else
              {"exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)} for p in ps]
    decoupled = cls is fastadam.AdamW
    rng = np.random.default_rng(1)
    for t in range(1, steps + 1):
        gs = grads(rng, ps)
        opt.step(gs)
        for p, g, st in zip(ref, gs, ref_st):
            if "exp_avg_absmax" in st:
                R.adam8bit(p, g, **st, step=t, lr=lr, decoupled_weight_decay=decoupled, **kw)
            else:
                fastadam.adam_step(p, g, st["exp_avg"], st["exp_avg_sq"], step=t, lr=lr,
                                   decoupled_weight_decay=decoupled, **kw)
    return opt, ref, ref_st


def assert_bitwise(actual, expected, what=""):
    """Equal bit for bit (NaN payloads included)."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a is None and e is None:
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, what
        a, e = np.asarray(a), np.asarray(e)
        ai = a.view(f"u{a.itemsize}") if a.dtype.kind == "f" else a
        ei = e.view(f"u{e.itemsize}") if e.dtype.kind == "f" else e
        if not np.array_equal(ai, ei):
            bad = np.flatnonzero(ai.ravel() != ei.ravel())
            j = bad[0]
            raise AssertionError(f"{what} buffer {i}: {bad.size} elements differ, first at "
                                 f"{j}: {a.ravel()[j]!r} != {e.ravel()[j]!r}")


def assert_rejected(exc, match, bufs, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises ``exc`` matching ``match`` and leaves every
    array of ``bufs`` (a dict or a list) bit-identical."""
    arrays = list(bufs.values()) if isinstance(bufs, dict) else list(bufs)
    before = copies(arrays)
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)
    assert_bitwise(arrays, before, "after a rejected call")


def assert_close(actual, expected, dtype, ulps=None):
    """Close to a few ulp of the buffer's scale.

    The float64 reference has no true fma (numpy rounds a*b and then +c), so
    after cancellation it differs by tens of ulp of the buffer's scale; any
    semantic error is orders of magnitude larger.
    """
    eps = np.finfo(dtype).eps
    if ulps is None:
        ulps = 8 if dtype == np.float32 else 128
    for a, e in zip(actual, expected):
        if a is None:
            continue
        scale = np.abs(e) + np.max(np.abs(e), initial=0.0) * 0.05
        err = np.abs(a.astype(np.float64) - e.astype(np.float64))
        assert np.all(err <= ulps * eps * scale), float(np.max(err / np.maximum(scale, 1e-300)))


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return request.param


@pytest.fixture
def restore_threads():
    yield
    fastadam.set_num_threads(None)


@pytest.fixture
def use_isa(monkeypatch):
    """``use_isa(isa)``: run the functional API (validation, argument builder
    and all) on the kernels of ISA module ``isa`` until the test ends."""
    def use(isa):
        monkeypatch.setattr(_plan, "KERNELS", _plan.Kernels(isa_module(isa)))
    return use


# Markers (declared in pyproject.toml) applied by file name, so that
# ``-m "not torch"``, ``-m "not slow"`` or ``-m bench`` select whole files.
_FILE_MARKERS = {
    "torch": ("test_torch", "test_parity_torch", "test_q8_torch"),
    "bench": ("test_bench",),
    "slow": ("test_build", "test_bench"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        stem = item.path.stem
        for marker, prefixes in _FILE_MARKERS.items():
            if stem.startswith(prefixes):
                item.add_marker(getattr(pytest.mark, marker))
