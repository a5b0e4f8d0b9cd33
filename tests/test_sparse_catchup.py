"""The dense-equivalent sparse mode (issue 15): touched rows catch up the
steps they missed, so the table follows dense torch AdamW(fused=True)
stepping the whole table with zero gradients on untouched rows."""
import numpy as np
import pytest

import fastadam.functional as F
from fastadam.functional import CatchUpHistory, sparse_adam_catch_up, sparse_adam_catchup_step

torch = pytest.importorskip("torch")

RTOL = {np.float32: 1e-5, np.float64: 1e-12}
# Elements where the gap's updates cancel most of p (|p| << the movement)
# carry torch's own rounding noise (per-step float32 sums over 150 steps:
# ~4e-7 here, lr up to 2e-2 on a N(0, 1) table) in absolute terms: ATOL.
ATOL = {np.float32: 1e-6, np.float64: 1e-13}


def _schedule(n, kind):
    if kind == "const":
        return [1e-2] * n
    # warm-up then cosine decay, and one jump: a real schedule
    out = []
    for t in range(1, n + 1):
        w = min(1.0, t / 20)
        out.append(2e-2 * w * (0.55 + 0.45 * np.cos(np.pi * t / n)) * (0.5 if t > 150 else 1))
    return out


def _touches(rng, n_rows, n_steps):
    """Per step the rows touched: a hot set every step, the others with gaps
    up to 150 steps (row 1 skips steps 2..151, row 2 is touched twice only)."""
    plan = []
    for t in range(1, n_steps + 1):
        ids = [0, 3] + list(rng.choice(np.arange(4, n_rows), size=6, replace=True))
        if t in (1, 152):
            ids.append(1)
        if t in (5, 200):
            ids.append(2)
        plan.append(np.array(ids, np.int64))
    return plan


def _run(dtype, kind, amsgrad, wd, n_threads, n_rows=40, dim=19, n_steps=210, seed=0):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal((n_rows, dim)).astype(dtype)
    plan = _touches(rng, n_rows, n_steps)
    grads = [rng.standard_normal((ids.size, dim)).astype(dtype) for ids in plan]
    lrs = _schedule(n_steps, kind)
    # torch: dense fused AdamW over the whole table, zero grads on untouched rows
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.AdamW([tp], lr=lrs[0], weight_decay=wd, amsgrad=amsgrad, fused=True)
    # fastadam: the dense-equivalent sparse step
    table = p0.copy()
    m, v = np.zeros_like(table), np.zeros_like(table)
    vmax = np.zeros_like(table) if amsgrad else None
    last = np.zeros(n_rows, np.int64)
    hist = CatchUpHistory((0.9, 0.999), weight_decay=wd)
    checked = 0
    for t, (ids, g, lr) in enumerate(zip(plan, grads, lrs), start=1):
        dense = np.zeros_like(table)
        np.add.at(dense, ids, g)
        for group in opt.param_groups:
            group["lr"] = lr
        tp.grad = torch.from_numpy(dense)
        opt.step()
        hist.append(lr)
        sparse_adam_catchup_step(table, ids, g, m, v, last, hist, amsgrad=amsgrad,
                                 max_exp_avg_sq=vmax, n_threads=n_threads)
        assert (last[np.unique(ids)] == t).all()
        if t in (1, 152, 200):       # touched rows are current: compare them now
            u = np.unique(ids)
            st = opt.state[tp]
            np.testing.assert_allclose(table[u], tp.detach().numpy()[u], rtol=RTOL[dtype],
                                       atol=ATOL[dtype])
            np.testing.assert_allclose(m[u], st["exp_avg"].numpy()[u], rtol=RTOL[dtype] * 10,
                                       atol=1e-30)
            checked += 1
    assert checked == 3
    before = last.copy()
    sparse_adam_catch_up(table, m, v, last, hist, amsgrad=amsgrad, max_exp_avg_sq=vmax,
                         n_threads=n_threads, block_rows=7)
    assert (last == n_steps).all() and (before < n_steps).any()
    st = opt.state[tp]
    ref = tp.detach().numpy()
    np.testing.assert_allclose(table, ref, rtol=RTOL[dtype], atol=ATOL[dtype])
    np.testing.assert_allclose(m, st["exp_avg"].numpy(), rtol=RTOL[dtype] * 10, atol=1e-30)
    np.testing.assert_allclose(v, st["exp_avg_sq"].numpy(), rtol=RTOL[dtype] * 10, atol=1e-30)
    assert not np.allclose(table, p0)           # the rows did move
    return table


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["const", "schedule"])
def test_matches_torch_fused_adamw_dense(dtype, kind):
    _run(dtype, kind, amsgrad=False, wd=0.05, n_threads=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_amsgrad_and_no_weight_decay(dtype):
    _run(dtype, "schedule", amsgrad=True, wd=0.0, n_threads=1)


def test_bitwise_identical_for_any_thread_count():
    """Batches large enough for several buckets (threads take them dynamically)."""
    from fastadam import _plan
    rng = np.random.default_rng(3)
    n_rows, dim, k = 20000, 16, 4000
    assert _plan.KERNELS.module.sparse_parts(2, k, dim, n_rows)[0] > 1
    batches = [(rng.integers(0, n_rows if s % 3 else 500, k), rng.standard_normal((k, dim))
                .astype(np.float32)) for s in range(12)]
    out = []
    for nt in (1, 2, 3):
        table = np.ones((n_rows, dim), np.float32)
        m, v = np.zeros_like(table), np.zeros_like(table)
        last = np.zeros(n_rows, np.int64)
        h = CatchUpHistory(weight_decay=0.01)
        for s, (ids, g) in enumerate(batches):
            h.append(1e-2 / (1 + s))
            sparse_adam_catchup_step(table, ids, g, m, v, last, h, n_threads=nt)
        out.append(b"".join(a.tobytes() for a in (table, m, v, last)))
    assert out[0] == out[1] == out[2]


def test_lazy_rows_are_not_touched_until_caught_up():
    table = np.ones((5, 3), np.float32)
    m, v = np.zeros_like(table), np.zeros_like(table)
    last = np.zeros(5, np.int64)
    h = CatchUpHistory(weight_decay=0.1)
    for _ in range(3):
        h.append(0.1)
        sparse_adam_catchup_step(table, np.array([0]), np.ones((1, 3), np.float32), m, v, last, h)
    assert (table[1:] == 1).all() and last.tolist() == [3, 0, 0, 0, 0]
    sparse_adam_catch_up(table, m, v, last, h)
    # rows 1..4 had zero gradients: only the decoupled decay, three times
    np.testing.assert_allclose(table[1:], (1 - 0.1 * 0.1) ** 3, rtol=1e-6)


def test_bad_input_writes_nothing():
    table = np.ones((5, 3), np.float32)
    m, v = np.zeros_like(table), np.zeros_like(table)
    last = np.zeros(5, np.int64)
    h = CatchUpHistory()
    h.append(0.1)
    last[2] = 1                      # already current through step 1: cannot take step 1
    arrays = [table, m, v, last]
    before = [a.copy() for a in arrays]
    g = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"last_step\[2\] = 1"):
        sparse_adam_catchup_step(table, np.array([0, 2]), g, m, v, last, h)
    with pytest.raises(IndexError, match=r"indices\[1\] = 5"):
        sparse_adam_catchup_step(table, np.array([0, 5]), g, m, v, last, h)
    with pytest.raises(ValueError, match="elementwise"):
        sparse_adam_catchup_step(table, np.array([0, 1]), g, m, np.zeros(5, np.float32), last, h)
    with pytest.raises(TypeError, match="history"):
        sparse_adam_catchup_step(table, np.array([0, 1]), g, m, v, last, [0.1])
    with pytest.raises(TypeError, match="last_step"):
        sparse_adam_catchup_step(table, np.array([0, 1]), g, m, v, last.astype(np.int32), h)
    with pytest.raises(ValueError, match="empty"):
        sparse_adam_catchup_step(table, np.array([0, 1]), g, m, v, last, CatchUpHistory())
    with pytest.raises(ValueError, match="lr"):
        h.append(-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        CatchUpHistory(weight_decay=0.5).append(2.0)
    for a, b in zip(arrays, before):
        assert a.tobytes() == b.tobytes()
    assert h.step == 1 and F.CatchUpHistory is CatchUpHistory


def test_sparse_adam_class_dense_equivalent_matches_torch_and_checkpoints():
    import fastadam as fa
    rng = np.random.default_rng(5)
    n_rows, dim = 30, 5
    p0 = rng.standard_normal((n_rows, dim)).astype(np.float64)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.AdamW([tp], lr=1e-2, weight_decay=0.1, fused=True)
    table = p0.copy()
    opt = fa.SparseAdam(table, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True,
                        dense_equivalent=True)
    for t in range(1, 61):
        ids = rng.integers(0, n_rows, 4) if t % 7 else np.zeros(0, np.int64)
        g = rng.standard_normal((ids.size, dim))
        lr = 1e-2 * (0.97 ** t)
        opt.param_groups[0]["lr"] = lr
        topt.param_groups[0]["lr"] = lr
        dense = np.zeros_like(table)
        np.add.at(dense, ids, g)
        tp.grad = torch.from_numpy(dense)
        topt.step()
        opt.step(ids, g)
        if t == 30:      # a checkpoint round trip mid-run (the history is rebuilt)
            sd = {"state": {0: {k: (np.array(v) if isinstance(v, np.ndarray) else v)
                                for k, v in opt.state_dict()["state"][0].items()}},
                  "param_groups": opt.state_dict()["param_groups"]}
            opt2 = fa.SparseAdam(table, dense_equivalent=True, decoupled_weight_decay=True)
            opt2.load_state_dict(sd)
            assert opt2.state["lr_history"].shape == (30,)
            opt = opt2
    opt.catch_up()
    assert (opt.state["last_step"] == 60).all()
    np.testing.assert_allclose(table, tp.detach().numpy(), rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="decoupled"):
        fa.SparseAdam(table, weight_decay=0.1, dense_equivalent=True)
    with pytest.raises(ValueError, match="rowwise"):
        fa.SparseAdam(table, rowwise=True, dense_equivalent=True)
    before = table.copy(), opt.state["last_step"].copy(), opt.state["step"]
    with pytest.raises(IndexError):
        opt.step(np.array([n_rows]), np.ones((1, dim)))
    assert table.tobytes() == before[0].tobytes()
    assert opt.state["step"] == before[2] and opt._history(opt.state).step == before[2]
