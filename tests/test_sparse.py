"""Sparse embedding path: sparse_adam_step and SparseAdam against the numpy oracle."""
import os
import warnings

import numpy as np
import pytest
from _options import SPARSE
from conftest import assert_bitwise, copies, make_batch, make_sparse_state

import fastadam as fa
from fastadam import _reference as R
from fastadam._dispatch import kernels as K

DTYPES = [np.float32, np.float64]
THREADS = [1, 2]

OPTIONS = SPARSE


def _run(fn, bufs, idx, grads, opts, **kw):
    table, m, v, vm, rs = bufs
    fn(table, idx, grads, m, v, max_exp_avg_sq=vm, row_step=rs, **opts, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dim", [1, 17, 64])
def test_matches_oracle_bitwise(dtype, n_threads, option, dim):
    o = OPTIONS[option]
    opts, rowwise, ams, rstep = dict(o.kwargs, amsgrad=o.amsgrad), o.rowwise, o.amsgrad, o.row_step
    n_rows, k = 400, 700          # many duplicates; dim 64: 2 threads, one hash partition each
    bufs = make_sparse_state(n_rows, dim, dtype, rowwise=rowwise, amsgrad=ams, row_step=rstep)
    want = copies(bufs)
    for step in (1, 2, 7):
        idx, g = make_batch(n_rows, dim, k, dtype, seed=step,
                            idx_dtype=np.int32 if step == 2 else np.int64)
        _run(fa.sparse_adam_step, bufs, idx, g, opts, step=step, lr=0.01, betas=(0.8, 0.99),
             eps=1e-6, n_threads=n_threads)
        _run(R.sparse_adam, want, idx, g, opts, step=step, lr=0.01, betas=(0.8, 0.99),
             eps=1e-6)
        assert_bitwise(bufs, want, f"{option} step {step}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", ["torch", "rowwise_ams_l2_max", "everything"])
def test_thread_counts_bitwise_identical(dtype, option):
    o = OPTIONS[option]
    opts, rowwise, ams, rstep = dict(o.kwargs, amsgrad=o.amsgrad), o.rowwise, o.amsgrad, o.row_step
    n_rows, dim, k = 5000, 40, 20000
    rng = np.random.default_rng(3)
    idx = (rng.zipf(1.2, k) % n_rows).astype(np.int64)      # hot rows repeated a lot
    g = rng.standard_normal((k, dim)).astype(dtype)
    results = []
    for nt in (1, 2, 3, 4, 8):
        bufs = make_sparse_state(n_rows, dim, dtype, rowwise=rowwise, amsgrad=ams,
                                 row_step=rstep)
        _run(fa.sparse_adam_step, bufs, idx, g, opts, step=3, n_threads=nt)
        results.append(bufs)
    for r in results[1:]:
        assert_bitwise(r, results[0], f"{option} threads")


@pytest.mark.parametrize("dtype", DTYPES)
def test_untouched_rows_bit_identical(dtype):
    n_rows, dim = 300, 24
    bufs = make_sparse_state(n_rows, dim, dtype, amsgrad=True, row_step=True)
    # untouched rows hold NaN payloads and odd values: any write would show
    bufs[0][::2] = np.nan
    bufs[1][::2] = -0.0
    before = copies(bufs)
    idx = np.array([1, 3, 3, 299, 5, 1], np.int64)
    g = np.ones((6, dim), dtype)
    fa.sparse_adam_step(bufs[0], idx, g, bufs[1], bufs[2], step=4, amsgrad=True,
                        max_exp_avg_sq=bufs[3], row_step=bufs[4], weight_decay=0.1,
                        decoupled_weight_decay=True, n_threads=2)
    touched = np.unique(idx)
    mask = np.ones(n_rows, bool)
    mask[touched] = False
    assert_bitwise([b[mask] for b in bufs], [b[mask] for b in before], "untouched")
    assert not np.array_equal(bufs[0][touched], before[0][touched])
    assert np.array_equal(bufs[4][touched], before[4][touched] + 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicates_summed_in_batch_order(dtype):
    n_rows, dim = 10, 33
    rng = np.random.default_rng(5)
    a, b, c, d = (rng.standard_normal(dim).astype(dtype) * s for s in (1, 1e4, 1e-4, 3))
    bufs = make_sparse_state(n_rows, dim, dtype)
    once = copies(bufs)
    fa.sparse_adam_step(bufs[0], np.array([7, 2, 7, 7]), np.stack([a, d, b, c]), bufs[1],
                        bufs[2], step=2)
    fa.sparse_adam_step(once[0], np.array([2, 7]), np.stack([d, (a + b) + c]), once[1],
                        once[2], step=2)
    assert_bitwise(bufs, once, "dups")
    assert K.sparse_unique(np.array([7, 2, 7, 7, 0]), 10) == ([7, 2, 0], [3, 1, 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("option", ["torch", "rowwise_ams_l2_max"])
def test_repeated_rows_in_several_accumulator_blocks(dtype, n_threads, option):
    """Wide rows: the merged rows of repeated ids are summed and updated in
    blocks of 1 MiB of accumulator rows per partition (32 float32 / 16 float64
    rows of 8192 here); 160 repeated rows take several blocks per partition."""
    o = OPTIONS[option]
    opts, rowwise, ams, rstep = dict(o.kwargs, amsgrad=o.amsgrad), o.rowwise, o.amsgrad, o.row_step
    n_rows, dim = 200, 8192
    assert (1 << 20) // (dim * np.dtype(dtype).itemsize) * 2 * n_threads < 160
    rng = np.random.default_rng(11)
    idx = rng.permutation(np.concatenate([np.repeat(np.arange(160), 3), np.arange(160, 190)]))
    g = rng.standard_normal((idx.size, dim)).astype(dtype)
    bufs = make_sparse_state(n_rows, dim, dtype, rowwise=rowwise, amsgrad=ams, row_step=rstep)
    want = copies(bufs)
    _run(fa.sparse_adam_step, bufs, idx, g, opts, step=4, n_threads=n_threads)
    _run(R.sparse_adam, want, idx, g, opts, step=4)
    assert_bitwise(bufs, want, f"{option} blocks")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_threads", THREADS)
def test_touch_every_row_once_equals_dense_step(dtype, n_threads):
    """A batch with every row once (any order) is the dense step of the sparse semantics."""
    n_rows, dim = 257, 19
    table, m, v, _, _ = make_sparse_state(n_rows, dim, dtype)
    perm = np.random.default_rng(2).permutation(n_rows)
    g_dense = np.random.default_rng(3).standard_normal((n_rows, dim)).astype(dtype)
    p2, m2, v2 = table.copy(), m.copy(), v.copy()
    lr, b1, b2, eps, step = 0.003, 0.9, 0.999, 1e-8, 5
    fa.sparse_adam_step(table, perm, g_dense[perm], m, v, step=step, lr=lr, eps=eps,
                        n_threads=n_threads)
    fl = dtype
    m2 = m2 + (g_dense - m2) * fl(1 - b1)
    v2 = v2 + (g_dense * g_dense - v2) * fl(1 - b2)
    ss = lr * np.sqrt(1 - b2 ** step) / (1 - b1 ** step)
    p2 = p2 + fl(-ss) * (m2 / (np.sqrt(v2) + fl(eps)))
    assert_bitwise([table, m, v], [p2, m2, v2], "dense")


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch_is_noop(dtype):
    bufs = make_sparse_state(20, 4, dtype, amsgrad=True, row_step=True)
    before = copies(bufs)
    for idx in (np.zeros(0, np.int64), np.zeros(0, np.int32)):
        fa.sparse_adam_step(bufs[0], idx, np.zeros((0, 4), dtype), bufs[1], bufs[2], step=1,
                            amsgrad=True, max_exp_avg_sq=bufs[3], row_step=bufs[4])
    assert_bitwise(bufs, before, "empty")
    emb = fa.SparseAdam(bufs[0])
    emb.step(np.zeros(0, np.int64), np.zeros((0, 4), dtype))
    assert emb.state_dict()["state"][0]["step"] == 1
    assert_bitwise(bufs, before, "empty stateful")


def test_zero_dim_table():
    t = np.zeros((5, 0), np.float32)
    fa.sparse_adam_step(t, np.array([1, 1]), np.zeros((2, 0), np.float32), t.copy(),
                        np.zeros((5, 0), np.float32), step=1)
    with pytest.raises(IndexError):
        fa.sparse_adam_step(t, np.array([5]), np.zeros((1, 0), np.float32),
                            np.zeros((5, 0), np.float32), np.zeros((5, 0), np.float32), step=1)


def test_index_dtypes_and_readonly_inputs():
    n_rows, dim = 50, 8
    ref = make_sparse_state(n_rows, dim, np.float32)
    idx, g = make_batch(n_rows, dim, 30, np.float32)
    R.sparse_adam(ref[0], idx, g, ref[1], ref[2], step=1)
    for conv in (np.int32, np.int64, np.uint16, np.uint64, np.int8, ">i8"):
        bufs = make_sparse_state(n_rows, dim, np.float32)
        i2 = idx.astype(conv)
        g2 = g.copy()
        i2.flags.writeable = False
        g2.flags.writeable = False
        fa.sparse_adam_step(bufs[0], i2, g2, bufs[1], bufs[2], step=1)
        assert_bitwise(bufs, ref, str(conv))
    bufs = make_sparse_state(n_rows, dim, np.float32)   # non-contiguous indices: copied
    i3 = np.repeat(idx, 2)[::2]
    fa.sparse_adam_step(bufs[0], i3, g, bufs[1], bufs[2], step=1)
    assert_bitwise(bufs, ref, "strided indices")
    assert fa.functional.sparse_adam_step is fa.sparse_adam_step


# ----------------------------------------------------------------------- bad input

def _bad_cases(dtype):
    """(name, exception, message fragment, mutate(kwargs))."""
    other = np.float64 if dtype == np.float32 else np.float32

    def ro(key):
        def f(kw):
            kw[key] = kw[key].copy()
            kw[key].flags.writeable = False
        return f

    def setkw(**upd):
        return lambda kw: kw.update(upd)

    return [
        ("float indices", TypeError, "integer",
         lambda kw: kw.update(indices=kw["indices"].astype(np.float64))),
        ("bool indices", TypeError, "integer",
         lambda kw: kw.update(indices=kw["indices"] > 3)),
        ("list indices", TypeError, "indices",
         lambda kw: kw.update(indices=list(kw["indices"]))),
        ("2-D indices", ValueError, "1-D",
         lambda kw: kw.update(indices=kw["indices"].reshape(2, -1),
                              grad_rows=kw["grad_rows"])),
        ("id == n_rows", IndexError, "indices[5] = 40",
         lambda kw: kw["indices"].__setitem__(5, 40)),
        ("negative id", IndexError, "indices[3] = -1",
         lambda kw: (kw["indices"].__setitem__(3, -1), kw["indices"].__setitem__(9, 99))),
        ("negative id int32", IndexError, "indices[0] = -7",
         lambda kw: kw.update(indices=np.r_[-7, kw["indices"][1:]].astype(np.int32))),
        ("huge uint64 id", IndexError, "indices[2]",
         lambda kw: kw.update(indices=np.concatenate(
             [kw["indices"][:2].astype(np.uint64), np.array([2**63 + 5], np.uint64),
              kw["indices"][3:].astype(np.uint64)]))),
        ("grad rows short", ValueError, "grad_rows must have shape",
         lambda kw: kw.update(grad_rows=kw["grad_rows"][:-1].copy())),
        ("grad dim wrong", ValueError, "grad_rows must have shape",
         lambda kw: kw.update(grad_rows=kw["grad_rows"][:, :-1].copy())),
        ("grad 1-D", ValueError, "grad_rows",
         lambda kw: kw.update(grad_rows=kw["grad_rows"].ravel().copy())),
        ("grad dtype", TypeError, "grad_rows",
         lambda kw: kw.update(grad_rows=kw["grad_rows"].astype(other))),
        ("exp_avg dtype", TypeError, "exp_avg",
         lambda kw: kw.update(exp_avg=kw["exp_avg"].astype(other))),
        ("exp_avg_sq dtype", TypeError, "exp_avg_sq",
         lambda kw: kw.update(exp_avg_sq=kw["exp_avg_sq"].astype(other))),
        ("int table", TypeError, "table",
         lambda kw: kw.update(table=kw["table"].astype(np.int32))),
        ("1-D table", ValueError, "2-D", lambda kw: kw.update(table=kw["table"].ravel())),
        ("table non-contiguous", ValueError, "C-contiguous",
         lambda kw: kw.update(table=np.asfortranarray(kw["table"]))),
        ("exp_avg non-contiguous", ValueError, "C-contiguous",
         lambda kw: kw.update(exp_avg=np.asfortranarray(kw["exp_avg"]))),
        ("grad non-contiguous", ValueError, "C-contiguous",
         lambda kw: kw.update(grad_rows=np.asfortranarray(kw["grad_rows"]))),
        ("table read-only", ValueError, "read-only", ro("table")),
        ("exp_avg read-only", ValueError, "read-only", ro("exp_avg")),
        ("exp_avg_sq read-only", ValueError, "read-only", ro("exp_avg_sq")),
        ("max_exp_avg_sq read-only", ValueError, "read-only", ro("max_exp_avg_sq")),
        ("row_step read-only", ValueError, "read-only", ro("row_step")),
        ("exp_avg_sq shape", ValueError, "exp_avg_sq must have shape",
         lambda kw: kw.update(exp_avg_sq=kw["exp_avg_sq"][:-1].copy())),
        ("max_exp_avg_sq shape", ValueError, "max_exp_avg_sq",
         lambda kw: kw.update(max_exp_avg_sq=kw["max_exp_avg_sq"][:, :2].copy())),
        ("amsgrad without buffer", ValueError, "max_exp_avg_sq",
         setkw(max_exp_avg_sq=None)),
        ("row_step dtype", TypeError, "row_step",
         lambda kw: kw.update(row_step=kw["row_step"].astype(np.int32))),
        ("row_step shape", ValueError, "row_step",
         lambda kw: kw.update(row_step=kw["row_step"][:-1].copy())),
        ("row_step negative on a touched row", ValueError, "row_step[",
         lambda kw: kw["row_step"].__setitem__(kw["indices"][-1], -3)),
        ("exp_avg is table", ValueError, "share memory",
         lambda kw: kw.update(exp_avg=kw["table"])),
        ("grad_rows view of exp_avg", ValueError, "share memory",
         lambda kw: kw.update(grad_rows=kw["exp_avg"][:kw["grad_rows"].shape[0]])),
        ("max_exp_avg_sq is exp_avg_sq", ValueError, "share memory",
         lambda kw: kw.update(max_exp_avg_sq=kw["exp_avg_sq"])),
        ("indices inside row_step", ValueError, "share memory",
         lambda kw: kw.update(indices=kw["row_step"][:kw["indices"].shape[0]])),
        ("lr < 0", ValueError, "lr", setkw(lr=-1.0)),
        ("beta1 = 1", ValueError, "betas", setkw(betas=(1.0, 0.999))),
        ("eps < 0", ValueError, "eps", setkw(eps=-1e-8)),
        ("weight_decay < 0", ValueError, "weight_decay", setkw(weight_decay=-0.1)),
        ("step 0", ValueError, "step", setkw(step=0)),
        ("step missing", TypeError, "step", setkw(step=None, row_step=None)),
        ("n_threads 0", ValueError, "n_threads", setkw(n_threads=0)),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extensions", [True, False])
def test_bad_input_leaves_every_buffer_unchanged(dtype, extensions):
    """extensions=False: the usual call (no amsgrad, no row_step), which takes
    the native validation fast path; every rejection must still be explained."""
    n_rows, dim, k = 40, 6, 12
    for name, exc, frag, mutate in _bad_cases(dtype):
        if not extensions and ("row_step" in name or "max_exp_avg_sq" in name
                               or "amsgrad" in name):
            continue
        table, m, v, vm, rs = make_sparse_state(n_rows, dim, dtype, amsgrad=True,
                                                row_step=True)
        idx, g = make_batch(n_rows, dim, k, dtype)
        kw = dict(table=table, indices=idx, grad_rows=g, exp_avg=m, exp_avg_sq=v,
                  max_exp_avg_sq=vm, row_step=rs, step=3, amsgrad=True, n_threads=2)
        mutate(kw)
        if not extensions:
            kw.update(amsgrad=False, max_exp_avg_sq=None, row_step=None)
        watched = [kw[key] for key in ("table", "exp_avg", "exp_avg_sq", "max_exp_avg_sq",
                                       "row_step", "grad_rows", "indices")
                   if isinstance(kw.get(key), np.ndarray)]
        watched += [a for a in (table, m, v, vm, rs, g, idx) if a is not None]
        before = copies(watched)
        args = [kw.pop(key) for key in ("table", "indices", "grad_rows", "exp_avg",
                                        "exp_avg_sq")]
        with pytest.raises(exc) as info:
            fa.sparse_adam_step(*args, **kw)
        assert frag in str(info.value), f"{name}: {info.value}"
        assert_bitwise(watched, before, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_validation_fast_path(dtype):
    """_runtime.sparse_scan accepts exactly the usual well-formed call (0: float32,
    1: float64) and hands everything else to the Python checks (-1)."""
    from fastadam import _runtime
    table, m, v, _, _ = make_sparse_state(40, 6, dtype)
    idx, g = make_batch(40, 6, 12, dtype)
    want = 0 if dtype == np.float32 else 1
    assert _runtime.sparse_scan(table, idx, g, m, v) == want
    assert _runtime.sparse_scan(table, idx.astype(np.int32), g, m, v) == want
    gro = g.copy()
    gro.flags.writeable = False
    assert _runtime.sparse_scan(table, idx, gro, m, v) == want      # inputs may be read-only
    ro = m.copy()
    ro.flags.writeable = False
    other = np.float64 if dtype == np.float32 else np.float32
    bad = [(table[:, :5], idx, g[:, :5], m[:, :5], v[:, :5]),        # non-contiguous rows
           (table, idx, g, ro, v), (table, idx, g, m, v[:, 0].copy()),
           (table, idx, g[:-1], m, v), (table, idx.astype(np.uint32), g, m, v),
           (table, idx.astype(">i8"), g, m, v), (table, idx, g.astype(other), m, v),
           (table, idx, g, table, v), (table, idx, m[:12], m, v), (table, list(idx), g, m, v),
           (table.ravel(), idx, g, m.ravel(), v.ravel())]
    for args in bad:
        assert _runtime.sparse_scan(*args) == -1


def test_index_error_names_first_bad_id_and_position():
    t = np.zeros((10, 2))
    with pytest.raises(IndexError, match=r"indices\[2\] = 10 .*10 rows"):
        fa.sparse_adam_step(t, np.array([1, 9, 10, -4]), np.ones((4, 2)), np.zeros_like(t),
                            np.zeros_like(t), step=1)


def test_stateful_bad_input_does_not_advance():
    t = np.zeros((10, 2))
    emb = fa.SparseAdam(t)
    emb.step(np.array([1]), np.ones((1, 2)))
    with pytest.raises(IndexError):
        emb.step(np.array([11]), np.ones((1, 2)))
    assert emb.state["step"] == 1


# ---------------------------------------------------------------------- big tables

def test_memmap_table_with_64bit_offsets(tmp_path):
    """Sparse files: row * dim > 2**31, only touched pages written."""
    n_rows, dim = 2**25 + 3, 65                 # 2.18e9 elements per buffer (8.7 GB, sparse)
    assert n_rows * dim > 2**31
    dtype = np.float32
    files = []
    for name in ("table", "m", "v"):
        path = tmp_path / f"{name}.bin"
        with open(path, "wb") as f:
            f.truncate(n_rows * dim * 4)
        files.append(path)
    try:
        table, m, v = (np.memmap(p, dtype=dtype, mode="r+", shape=(n_rows, dim))
                       for p in files)
    except (OSError, ValueError) as e:  # pragma: no cover - 32-bit address space
        pytest.skip(f"cannot map an 8.7 GB sparse file here: {e}")
    idx = np.array([n_rows - 1, 0, 2**24 + 11, n_rows - 1, 2**31 // dim + 1], np.int64)
    rng = np.random.default_rng(0)
    g = rng.standard_normal((idx.size, dim)).astype(dtype)
    table[idx] = rng.standard_normal((idx.size, dim)).astype(dtype)
    rows = np.unique(idx)
    small_p = np.array(table[rows])
    small_m = np.zeros_like(small_p)
    small_v = np.zeros_like(small_p)
    remap = {r: i for i, r in enumerate(rows)}
    small_idx = np.array([remap[r] for r in idx])
    for step in (1, 2):
        fa.sparse_adam_step(table, idx, g, m, v, step=step, n_threads=2)
        R.sparse_adam(small_p, small_idx, g, small_m, small_v, step=step)
    assert_bitwise([np.array(table[rows]), np.array(m[rows]), np.array(v[rows])],
                   [small_p, small_m, small_v], "memmap")
    assert not np.any(table[1]) and not np.any(m[n_rows - 2])
    for a in (table, m, v):
        a.flush()
    # only touched pages were written: the files stay sparse (a few MB at most)
    used = sum(os.stat(p).st_blocks * 512 for p in files)
    if used < n_rows * dim * 4:        # filesystem supports sparse files
        assert used < 64 * 2**20, used
    ro = np.memmap(files[0], dtype=dtype, mode="r", shape=(n_rows, dim))
    with pytest.raises(ValueError, match="read-only"):
        fa.sparse_adam_step(ro, idx, g, m, v, step=3)
    del table, m, v, ro


def test_memmap_state_in_stateful_optimizer(tmp_path):
    n_rows, dim = 1000, 16
    def mk(name, shape):
        return np.memmap(tmp_path / name, dtype=np.float64, mode="w+", shape=shape)

    table, m, v = mk("t", (n_rows, dim)), mk("m", (n_rows, dim)), mk("v", (n_rows,))
    ref_t = np.zeros((n_rows, dim))
    emb = fa.SparseAdam(table, lr=0.1, rowwise=True, exp_avg=m, exp_avg_sq=v)
    ref = fa.SparseAdam(ref_t, lr=0.1, rowwise=True)
    for s in range(3):
        idx, g = make_batch(n_rows, dim, 50, np.float64, seed=s)
        emb.step(idx, g)
        ref.step(idx, g)
    assert emb.state["exp_avg"] is m
    assert_bitwise([np.asarray(table), np.asarray(m), np.asarray(v)],
                   [ref_t, ref.state["exp_avg"], ref.state["exp_avg_sq"]], "memmap state")


# ---------------------------------------------------------------------- torch parity

def _torch_close(ours, theirs, dtype, what):
    eps = np.finfo(dtype).eps
    scale = max(1.0, float(np.max(np.abs(theirs))))
    err = float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64))))
    assert err <= 32 * eps * scale, f"{what}: max error {err} (scale {scale})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dups", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_trajectory_matches_torch_sparse_adam(dtype, dups, maximize):
    torch = pytest.importorskip("torch")
    n_rows, dim, k = 300, 33, 120
    rng = np.random.default_rng(11)
    table = rng.standard_normal((n_rows, dim)).astype(dtype)
    w = torch.nn.Parameter(torch.from_numpy(table.copy()))
    theirs = torch.optim.SparseAdam([w], lr=0.01, betas=(0.8, 0.99), eps=1e-7,
                                    maximize=maximize)
    ours = fa.SparseAdam(table, lr=0.01, betas=(0.8, 0.99), eps=1e-7, maximize=maximize,
                         n_threads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(50):
            if step == 17:
                idx = np.zeros(0, np.int64)      # empty batch: torch still counts the step
            elif dups:
                idx = rng.integers(0, n_rows, k)
            else:
                idx = rng.permutation(n_rows)[:k]
            g = rng.standard_normal((idx.size, dim)).astype(dtype)
            w.grad = torch.sparse_coo_tensor(torch.from_numpy(idx)[None], torch.from_numpy(g),
                                             (n_rows, dim))
            theirs.step()
            ours.step(idx, g)
    st = theirs.state[w]
    assert ours.state["step"] == st["step"] == 50
    # torch's CPU sqrt is not correctly rounded (ours is) and its coalesce sums
    # duplicates in an unspecified order: a few ulp, not bits.
    _torch_close(table, w.detach().numpy(), dtype, "param")
    _torch_close(ours.state["exp_avg"], st["exp_avg"].numpy(), dtype, "exp_avg")
    _torch_close(ours.state["exp_avg_sq"], st["exp_avg_sq"].numpy(), dtype, "exp_avg_sq")
    if not dups:   # moments use no sqrt: without duplicates they are bitwise torch's
        assert_bitwise([ours.state["exp_avg"], ours.state["exp_avg_sq"]],
                       [st["exp_avg"].numpy(), st["exp_avg_sq"].numpy()], "moments")


def test_state_dict_layout_matches_torch_and_loads_torch_state():
    torch = pytest.importorskip("torch")
    n_rows, dim = 50, 4
    table = np.random.default_rng(0).standard_normal((n_rows, dim)).astype(np.float32)
    w = torch.nn.Parameter(torch.from_numpy(table.copy()))
    theirs = torch.optim.SparseAdam([w], lr=0.02)
    ours = fa.SparseAdam(table.copy(), lr=0.02)
    assert ours.state_dict() == {"state": {}, "param_groups": [
        {"lr": 0.02, "betas": (0.9, 0.999), "eps": 1e-8, "maximize": False, "params": [0]}]}
    idx, g = make_batch(n_rows, dim, 20, np.float32, dups=False)
    w.grad = torch.sparse_coo_tensor(torch.from_numpy(idx)[None], torch.from_numpy(g),
                                     (n_rows, dim))
    theirs.step()
    ours.step(idx, g)
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert sd_o["param_groups"] == sd_t["param_groups"]
    assert set(sd_o["state"]) == set(sd_t["state"]) == {0}
    assert set(sd_o["state"][0]) == set(sd_t["state"][0])
    assert sd_o["state"][0]["step"] == sd_t["state"][0]["step"]
    # resume from torch's state dict
    resumed = fa.SparseAdam(w.detach().numpy().copy(), lr=1.0)
    resumed.load_state_dict(sd_t)
    assert resumed.param_groups[0]["lr"] == 0.02 and resumed.state["step"] == 1
    assert np.array_equal(resumed.state["exp_avg"], sd_t["state"][0]["exp_avg"].numpy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ext", [{}, {"rowwise": True, "amsgrad": True, "per_row_step": True,
                                      "weight_decay": 0.1}])
def test_resume_bit_identical(tmp_path, dtype, ext):
    n_rows, dim = 80, 9
    t0 = np.random.default_rng(0).standard_normal((n_rows, dim)).astype(dtype)
    batches = [make_batch(n_rows, dim, 40, dtype, seed=s) for s in range(12)]
    full = fa.SparseAdam(t0.copy(), lr=0.05, **ext)
    for b in batches:
        full.step(*b)
    t1 = t0.copy()
    first = fa.SparseAdam(t1, lr=0.05, **ext)
    for b in batches[:5]:
        first.step(*b)
    path = tmp_path / "ckpt.npz"
    fa.save(first.state_dict(), path)
    t2 = t1.copy()
    second = fa.SparseAdam(t2, lr=0.5)                 # options come from the checkpoint
    second.load_state_dict(fa.load(path))
    for b in batches[5:]:
        second.step(*b)
    assert second.state_dict()["param_groups"] == full.state_dict()["param_groups"]
    keys = sorted(k for k in full.state if k != "step")
    assert keys == sorted(k for k in second.state if k != "step")
    assert_bitwise([t2] + [second.state[k] for k in keys],
                   [full.table] + [full.state[k] for k in keys], "resume")
    assert second.state["step"] == full.state["step"] == 12


def test_row_step_bias_correction_per_row():
    """A row first touched at global step 10 gets the step-1 correction with row_step."""
    t = np.zeros((3, 2))
    emb = fa.SparseAdam(t, lr=0.1, per_row_step=True)
    for _ in range(9):
        emb.step(np.array([0]), np.ones((1, 2)))
    emb.step(np.array([2]), np.full((1, 2), 5.0))
    assert np.allclose(t[2], -0.1)                   # bias-corrected first step: -lr*sign(g)
    assert list(emb.state["row_step"]) == [9, 0, 1]
    t_glob = np.zeros((3, 2))
    emb2 = fa.SparseAdam(t_glob, lr=0.1)
    for _ in range(9):
        emb2.step(np.array([0]), np.ones((1, 2)))
    emb2.step(np.array([2]), np.full((1, 2), 5.0))
    assert abs(t_glob[2, 0]) < 0.05                  # global step 10: weak first step


def test_functional_row_step_without_global_step():
    t = np.zeros((4, 3), np.float32)
    m, v = np.zeros_like(t), np.zeros_like(t)
    rs = np.zeros(4, np.int64)
    fa.sparse_adam_step(t, np.array([1, 1]), np.ones((2, 3), np.float32), m, v, lr=0.1,
                        row_step=rs)
    assert list(rs) == [0, 1, 0, 0]
    assert np.allclose(t[1], -0.1)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_first_bad_position_reported_with_parallel_merge(n_threads):
    """Large batches merge over several threads; the earliest problem still wins."""
    n_rows, dim, k = 3000, 3, 9000
    idx, g = make_batch(n_rows, dim, k, np.float64, seed=4)
    for nparts in (1, 2, 3, 8):
        u1, c1 = K.sparse_unique(idx, n_rows, 1)
        u, c = K.sparse_unique(idx, n_rows, nparts)  # dim: the bucket layout
        assert dict(zip(u, c)) == dict(zip(u1, c1))
    table, m, v, _, rs = make_sparse_state(n_rows, dim, np.float64, row_step=True)
    before = copies([table, m, v, rs])
    bad = idx.copy()
    bad[7000], bad[8000] = n_rows, -1
    with pytest.raises(IndexError, match=r"indices\[7000\] = 3000"):
        fa.sparse_adam_step(table, bad, g, m, v, step=1, row_step=rs, n_threads=n_threads)
    rs[bad[5000]] = -1            # a negative count on an earlier touched row wins
    before[3] = rs.copy()
    with pytest.raises(ValueError, match=r"row_step\[\d+\] = -1"):
        fa.sparse_adam_step(table, bad, g, m, v, step=1, row_step=rs, n_threads=n_threads)
    assert_bitwise([table, m, v, rs], before, "parallel merge errors")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_isa_module_bitwise_identical(dtype, use_isa):
    from fastadam import _dispatch
    isas = _dispatch.available_modules()
    n_rows, dim, k = 500, 37, 3000
    idx, g = make_batch(n_rows, dim, k, dtype, seed=9)
    results = []
    for isa in isas:
        use_isa(isa)
        for rowwise in (False, True):
            bufs = make_sparse_state(n_rows, dim, dtype, rowwise=rowwise, amsgrad=True,
                                     row_step=rowwise)
            fa.sparse_adam_step(bufs[0], idx, g, bufs[1], bufs[2], step=2, amsgrad=True,
                                max_exp_avg_sq=bufs[3], row_step=bufs[4], weight_decay=0.1,
                                n_threads=2)
            results.append((isa, rowwise, bufs))
    for isa, rowwise, bufs in results:
        ref = next(b for i, r, b in results if r == rowwise)
        assert_bitwise(bufs, ref, f"{isa} rowwise={rowwise}")
