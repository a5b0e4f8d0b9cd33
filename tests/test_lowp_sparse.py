"""The sparse path with bfloat16 state rows and bfloat16 tables (issue 12),
against the reference; untouched rows stay bit-identical; thread invariant."""
import numpy as np
import pytest
from _options import SPARSE
from conftest import THREADS, assert_bitwise, make_batch

import fastadam as fa
from fastadam import _reference as R

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
OPTS = ["torch", "maximize", "l2", "decoupled", "amsgrad", "rowwise", "row_step", "everything"]
# (table, grad rows, state)
COMBOS = [(np.float32, np.float32, BF16), (BF16, np.float32, BF16), (BF16, BF16, BF16)]


def _state(n_rows, dim, dt_t, dt_s, o, seed=0):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((n_rows, dim)).astype(np.float32).astype(dt_t)
    m = (0.1 * rng.standard_normal((n_rows, dim))).astype(np.float32).astype(dt_s)
    vshape = (n_rows,) if o.rowwise else (n_rows, dim)
    v = (0.01 * rng.random(vshape)).astype(np.float32).astype(dt_s)
    vm = (np.asarray(v, np.float32) + 0.01).astype(dt_s) if o.amsgrad else None
    rs = rng.integers(0, 7, n_rows).astype(np.int64) if o.row_step else None
    return [table, m, v, vm, rs]


@pytest.mark.parametrize("combo", COMBOS, ids=["f32-bf16s", "bf16-f32g-bf16s", "bf16-bf16g"])
@pytest.mark.parametrize("name", OPTS)
def test_sparse_low_precision_matches_reference(combo, name):
    o = SPARSE[name]
    dt_t, dt_g, dt_s = combo
    n_rows, dim, k = 300, 37, 200
    for nt in THREADS:
        bufs = _state(n_rows, dim, dt_t, dt_s, o)
        ref = [None if b is None else b.copy() for b in bufs]
        before = [b.copy() for b in bufs[:3]]
        idx, g = make_batch(n_rows, dim, k, np.float32)
        g = g.astype(dt_g)
        table, m, v, vm, rs = bufs
        for step in (1, 2):
            kw = dict(o.kwargs, step=None if o.row_step else step, max_exp_avg_sq=vm,
                      row_step=rs)
            fa.sparse_adam_step(table, idx, g, m, v, n_threads=nt, **kw)
            kw.update(max_exp_avg_sq=ref[3], row_step=ref[4])
            R.sparse_adam(ref[0], idx, g, ref[1], ref[2], **kw)
        touched = np.zeros(n_rows, bool)
        touched[idx] = True
        for a, e, b in zip(bufs[:3], ref[:3], before):
            a32, e32 = np.asarray(a, np.float64), np.asarray(e, np.float64)
            if a.dtype == BF16:
                spacing = np.maximum(np.abs(e32), 1e-30) * 2.0 ** -7
                assert np.max(np.abs(a32 - e32) / spacing) <= 2.0
            else:
                np.testing.assert_allclose(a32, e32, rtol=1e-5, atol=1e-6)
            rows = touched if a.shape[0] == n_rows else touched
            assert_bitwise([a[~rows]], [b[~rows]], "untouched rows changed")


def test_sparse_bf16_thread_invariant():
    o = SPARSE["amsgrad"]
    outs = []
    for nt in (1, 2, 3):
        bufs = _state(5000, 64, BF16, BF16, o, seed=3)
        idx, g = make_batch(5000, 64, 4096, np.float32, seed=4)
        fa.sparse_adam_step(bufs[0], idx, g, bufs[1], bufs[2], step=1, amsgrad=True,
                            max_exp_avg_sq=bufs[3], n_threads=nt)
        outs.append(bufs[:4])
    for o_ in outs[1:]:
        assert_bitwise(o_, outs[0])


def test_sparse_adam_optimizer_state_dtype():
    table = np.zeros((50, 8), np.float32)
    opt = fa.SparseAdam(table, lr=0.1, state_dtype="bf16")
    opt.step(np.array([1, 3, 3]), np.ones((3, 8), np.float32))
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == BF16 and sd["param_groups"][0]["state_dtype"]
    assert np.allclose(table[3], -0.1) and not table[2].any()
    t2 = np.zeros((50, 8), np.float32)
    o2 = fa.SparseAdam(t2, lr=0.1)
    o2.load_state_dict(sd)
    assert o2.state_dict()["state"][0]["exp_avg"].dtype == BF16
    with pytest.raises(TypeError, match="state_dtype float16 is not supported"):
        fa.SparseAdam(table, state_dtype="fp16")
    h = np.zeros((4, 2), np.float16)
    with pytest.raises(TypeError, match="table"):
        fa.sparse_adam_step(h, np.array([0]), np.ones((1, 2), np.float16), np.zeros_like(h),
                            np.zeros_like(h), step=1)
