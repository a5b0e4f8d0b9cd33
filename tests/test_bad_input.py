"""Every rejected call raises a clear error naming the argument and writes nothing."""
import numpy as np
import pytest
from conftest import assert_bitwise, copies, make_state

import fastadam as fa

N = 64


def _bufs(dtype=np.float32):
    p, g, m, v, vm = make_state(N, dtype)
    return {"param": p, "grad": g, "exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": vm}


def _call(b, **kw):
    args = dict(step=1)
    args.update(kw)
    fa.adam_step(b["param"], b["grad"], b["exp_avg"], b["exp_avg_sq"],
                 max_exp_avg_sq=b["max_exp_avg_sq"], **args)


def _replace(name, value_fn):
    def make():
        b = _bufs()
        b[name] = value_fn(b[name])
        return b
    return make


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


BUF_CASES = [
    # (id, make buffers, kwargs, exception, message fragment)
    ("int-param", _replace("param", lambda a: a.astype(np.int32)), {}, TypeError, "param"),
    ("list-grad", _replace("grad", lambda a: a.tolist()), {}, TypeError, "grad"),
    ("i16-grad", _replace("grad", lambda a: a.astype(np.int16)), {}, TypeError, "grad"),
    ("mixed-grad", _replace("grad", lambda a: a.astype(np.float64)), {}, TypeError, "mixed"),
    ("mixed-exp_avg", _replace("exp_avg", lambda a: a.astype(np.float64)), {}, TypeError,
     "exp_avg"),
    ("byteswapped", _replace("exp_avg_sq", lambda a: a.astype(">f4")), {}, TypeError,
     "exp_avg_sq"),
    ("shape-grad", _replace("grad", lambda a: a[:-1].copy()), {}, ValueError, "grad"),
    ("shape-exp_avg_sq", _replace("exp_avg_sq", lambda a: a.reshape(8, 8).copy()), {},
     ValueError, "exp_avg_sq"),
    ("noncontig-exp_avg", _replace("exp_avg", lambda a: np.repeat(a, 2)[::2]), {}, ValueError,
     "C-contiguous"),
    ("noncontig-grad", _replace("grad", lambda a: np.repeat(a, 2)[::2]), {}, ValueError,
     "grad"),
    ("readonly-param", _replace("param", _readonly), {}, ValueError, "param is read-only"),
    ("readonly-vmax", _replace("max_exp_avg_sq", _readonly), {"amsgrad": True}, ValueError,
     "max_exp_avg_sq"),
    ("alias-m-v", lambda: (lambda b: b.update(exp_avg_sq=b["exp_avg"]) or b)(_bufs()), {},
     ValueError, "share memory"),
    ("alias-grad-param", lambda: (lambda b: b.update(grad=b["param"]) or b)(_bufs()), {},
     ValueError, "share memory"),
    ("partial-overlap", lambda: (lambda b, big: b.update(
        exp_avg=big[:N], exp_avg_sq=big[N // 2:N // 2 + N]) or b)(
        _bufs(), np.zeros(2 * N, np.float32)), {}, ValueError, "share memory"),
    ("ams-no-buffer", _replace("max_exp_avg_sq", lambda a: None), {"amsgrad": True},
     ValueError, "max_exp_avg_sq"),
]

HYPER_CASES = [
    ("lr<0", {"lr": -1e-3}, ValueError, "lr"),
    ("lr-nan", {"lr": float("nan")}, ValueError, "lr"),
    ("lr-str", {"lr": "x"}, TypeError, "lr"),
    ("beta1=1", {"betas": (1.0, 0.999)}, ValueError, "betas[0]"),
    ("beta2<0", {"betas": (0.9, -0.1)}, ValueError, "betas[1]"),
    ("betas-short", {"betas": (0.9,)}, TypeError, "betas"),
    ("eps<0", {"eps": -1.0}, ValueError, "eps"),
    ("wd<0", {"weight_decay": -0.1}, ValueError, "weight_decay"),
    ("step=0", {"step": 0}, ValueError, "step"),
    ("step-frac", {"step": 1.5}, ValueError, "step"),
    ("step-str", {"step": "1"}, TypeError, "step"),
    ("grad_scale=0", {"grad_scale": 0.0}, ValueError, "grad_scale"),
    ("grad_scale-inf", {"grad_scale": float("inf")}, ValueError, "grad_scale"),
    ("n_threads=0", {"n_threads": 0}, ValueError, "n_threads"),
    ("n_threads-float", {"n_threads": 1.5}, TypeError, "n_threads"),
]


@pytest.mark.parametrize("case", BUF_CASES, ids=[c[0] for c in BUF_CASES])
def test_bad_buffers_write_nothing(case):
    _, make, kw, exc, frag = case
    b = make()
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in b.items()}
    with pytest.raises(exc, match=None) as info:
        _call(b, **kw)
    assert frag in str(info.value)
    for k, v in b.items():
        if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.dtype.isnative:
            assert_bitwise([v], [before[k]], k)
        elif isinstance(v, np.ndarray):
            assert np.array_equal(v, before[k])


@pytest.mark.parametrize("case", HYPER_CASES, ids=[c[0] for c in HYPER_CASES])
def test_bad_hyperparameters_write_nothing(case):
    _, kw, exc, frag = case
    b = _bufs()
    before = copies(list(b.values()))
    with pytest.raises(exc) as info:
        _call(b, n_threads=kw.pop("n_threads", None), **kw)
    assert frag in str(info.value)
    assert_bitwise(list(b.values()), before)


def _lists(k=3):
    bufs = [make_state(n, np.float32, seed=n) for n in (5, 70000, 9)[:k]]
    return [list(x) for x in zip(*bufs)]


@pytest.mark.parametrize("bad", ["len", "dtype", "alias-out", "alias-grad", "steps", "shape",
                                 "readonly", "not-list", "ams"])
def test_multi_array_rejects_before_any_write(bad):
    ps, gs, ms, vs, vms = _lists()
    kw = {"steps": [1, 2, 3]}
    if bad == "len":
        gs = gs[:2]
    elif bad == "dtype":
        vs[2] = vs[2].astype(np.float64)
    elif bad == "alias-out":
        ms[2] = ps[0]
    elif bad == "alias-grad":
        gs[0] = vs[1][:5]
    elif bad == "steps":
        kw["steps"] = [1, 0, 2]
    elif bad == "shape":
        gs[2] = gs[2][:-1].copy()
    elif bad == "readonly":
        ps[2].flags.writeable = False
    elif bad == "not-list":
        ps = np.stack([ps[0], ps[0]])
    elif bad == "ams":
        kw["amsgrad"] = True
    everything = [a for lst in (ps, gs, ms, vs, vms)
                  for a in (lst if isinstance(lst, list) else [lst])]
    before = copies(everything)
    with pytest.raises((TypeError, ValueError)) as info:
        fa.functional.adam(ps, gs, ms, vs, **kw)
    assert any(w in str(info.value) for w in ("params", "grads", "exp_avg", "steps", "max_exp"))
    assert_bitwise(everything, before)


def test_grad_norm_rejects_bad_input():
    with pytest.raises(TypeError, match="grads\\[1\\]"):
        fa.grad_norm([np.ones(3), np.ones(3, np.int64)])
    with pytest.raises(ValueError, match="C-contiguous"):
        fa.grad_norm([np.ones((4, 4))[:, 0]])


def test_optimizer_step_rejects_before_any_write():
    ps = [np.ones(5, np.float32), np.ones(7, np.float32)]
    opt = fa.Adam(ps, lr=0.1)
    opt.step([np.ones(5, np.float32), np.ones(7, np.float32)])
    before = copies(ps)
    with pytest.raises(ValueError, match="grads\\[1\\]"):
        opt.step([np.ones(5, np.float32), np.ones(6, np.float32)])
    with pytest.raises(TypeError, match="grads\\[0\\]"):
        opt.step([np.ones(5, np.float64), np.ones(7, np.float32)])
    with pytest.raises(ValueError, match="2 entries"):
        opt.step([np.ones(5, np.float32)])
    assert_bitwise(ps, before)
    assert opt.state_dict()["state"][0]["step"] == 1


def test_multi_array_grads_may_share_memory_with_each_other():
    """Gradients are only read: two params may use the same gradient buffer."""
    ps = [np.zeros(4), np.zeros(4)]
    g = np.ones(4)
    fa.functional.adam(ps, [g, g], [np.zeros(4), np.zeros(4)], [np.zeros(4), np.zeros(4)],
                       steps=1, lr=0.1)
    assert_bitwise([ps[0]], [ps[1]])
    big = np.ones(8)
    fa.functional.adam(ps, [big[:4], big[2:6]], [np.zeros(4), np.zeros(4)],
                       [np.zeros(4), np.zeros(4)], steps=1, lr=0.1)


@pytest.mark.parametrize("k", [2, 7, 40])
def test_overlap_detection_matches_brute_force(k):
    """The native O(n log n) check agrees with a pairwise check on random layouts."""
    from fastadam import _runtime
    rng = np.random.default_rng(k)
    base = np.zeros(400)
    for trial in range(200):
        entries = []
        for _ in range(k):
            a = int(rng.integers(0, 390))
            b = a + int(rng.integers(0, 10))
            entries.append((base[a:b], bool(rng.random() < 0.5)))
        expect = any(
            (entries[i][1] or entries[j][1]) and entries[i][0].size and entries[j][0].size
            and np.shares_memory(entries[i][0], entries[j][0])
            for i in range(k) for j in range(i + 1, k))
        lo = np.array([e[0].ctypes.data for e in entries], dtype=np.int64)
        nbytes = np.array([e[0].nbytes for e in entries], dtype=np.int64)
        out = np.array([e[1] for e in entries], dtype=np.int8)
        hit = _runtime.first_conflict(lo, nbytes, out)
        got = hit is not None
        if got:
            i, j = hit
            assert i < j and (entries[i][1] or entries[j][1])
            assert np.shares_memory(entries[i][0], entries[j][0])
        assert got == expect, trial


@pytest.mark.parametrize("bad, frag", [("dtype", "exp_avgs[0]"), ("shape", "grads[0]"),
                                       ("alias", "share memory"), ("step", "steps")])
def test_single_entry_list_fast_path_names_list_entries(bad, frag):
    """functional.adam with one array takes the single-buffer path: same checks, list names."""
    p, g, m, v, vm = make_state(40, np.float32)
    kw = {"steps": 1}
    if bad == "dtype":
        m = m.astype(np.float64)
    elif bad == "shape":
        g = g[:-1].copy()
    elif bad == "alias":
        v = p
    elif bad == "step":
        kw["steps"] = 0
    before = copies([p, g, m, v])
    with pytest.raises((TypeError, ValueError)) as info:
        fa.functional.adam([p], [g], [m], [v], **kw)
    assert frag in str(info.value)
    assert_bitwise([p, g, m, v], before)


def test_single_entry_list_equals_adam_step():
    a = make_state(40, np.float64)
    b = copies(a)
    fa.functional.adam([a[0]], [a[1]], [a[2]], [a[3]], steps=[3], amsgrad=True,
                       max_exp_avg_sqs=[a[4]], lr=0.1, weight_decay=0.1)
    fa.adam_step(*b[:4], step=3, amsgrad=True, max_exp_avg_sq=b[4], lr=0.1, weight_decay=0.1)
    assert_bitwise(a, b)


def test_optimizer_rejection_in_a_later_group_writes_nothing():
    """All groups are validated before any group is stepped; names are global indices."""
    a, b, c = np.ones(5), np.ones(6), np.ones(7)
    opt = fa.Adam([{"params": [a, b], "lr": 0.1}, {"params": [c], "lr": 0.2}], amsgrad=True)
    opt.step([np.ones(5), np.ones(6), np.ones(7)])
    before = copies([a, b, c])
    sd_before = {i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
                 for i, st in opt.state_dict()["state"].items()}
    with pytest.raises(ValueError, match=r"grads\[2\]"):
        opt.step([np.ones(5), np.ones(6), np.ones(8)])
    with pytest.raises(TypeError, match=r"grads\[2\]"):
        opt.step([np.ones(5), None, np.ones(7, np.float32)])
    assert_bitwise([a, b, c], before)
    sd = opt.state_dict()["state"]
    for i, st in sd_before.items():
        assert sd[i]["step"] == st["step"] == 1
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert_bitwise([sd[i][k]], [st[k]])
    fresh = fa.Adam([np.ones(3), np.ones(4)])
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        fresh.step([np.ones(3), np.ones(5)])
    assert fresh.state_dict()["state"] == {}  # no state created by a rejected first step
