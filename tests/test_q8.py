"""8-bit blockwise state (issue 13): the maps, the exact nearest-code
quantiser (kernel tables vs the reference search), the fused step against
the numpy reference bit for bit (every ISA module, thread counts, one and
many arrays), the quantisation error bound, and rejected calls."""
import numpy as np
import pytest
from conftest import assert_bitwise, assert_rejected, importable_isas, isa_module

from fastadam import _interface as I
from fastadam import _quant as Q
from fastadam import _reference as R
from fastadam import functional as F

F32 = np.float32


def _adversarial(rng, n, signed=True):
    """Values at and around every midpoint of the map (relative to a block's
    absmax of 1), zeros of both signs, subnormals, and random magnitudes."""
    mag = Q._magnitudes(signed)
    mid = ((mag[:-1] + mag[1:]) / 2).astype(F32)
    near = np.concatenate([mid, np.nextafter(mid, F32(0)), np.nextafter(mid, F32(2)),
                           mag.astype(F32), [0.0, -0.0, 1e-45, 1e-39, 1e-30, 5e-8, 1.0]])
    x = np.concatenate([near, (10.0 ** rng.uniform(-9, 0, n)).astype(F32)]).astype(F32)
    if signed:
        x = np.concatenate([x, -x])
    rng.shuffle(x)
    # put absmax 1 into every block, so that y == x exactly where r = 1
    x = x[: x.size - x.size % Q.BLOCK].reshape(-1, Q.BLOCK)
    x[:, 0] = 1.0
    return x.reshape(-1)


def test_maps_are_bitsandbytes_dynamic_maps():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        ref = bnbf.create_dynamic_map(signed=signed).numpy()
        assert_bitwise([Q.dynamic_map(signed)], [ref], f"signed={signed}")


def test_map_structure():
    s, u = Q.dynamic_map(True), Q.dynamic_map(False)
    assert s.dtype == u.dtype == F32 and s.size == u.size == 256
    assert np.all(np.diff(s) > 0) and np.all(np.diff(u) > 0)
    assert s[Q.SIGNED_ZERO] == 0 and s[255] == 1 and u[Q.UNSIGNED_ZERO] == 0 and u[255] == 1
    assert_bitwise([-s[:127][::-1]], [s[128:255]], "signed map mirrored")
    # Dettmers' construction: decade i (10**(i-6)) holds 2**i (signed) / 2**(i+1)
    # (unsigned) midpoints of linspace(0.1, 1) -- to float32 rounding (bitsandbytes'
    # torch linspace rounds its own way, hence the stored bits)
    for signed, vals in ((True, s[128:255]), (False, u[1:255])):
        want = []
        for i in range(7):
            k = 2 ** i if signed else 2 ** (i + 1)
            b = np.linspace(0.1, 1, k + 1)
            want += list(10.0 ** (i - 6) * (b[:-1] + b[1:]) / 2)
        np.testing.assert_allclose(vals, np.sort(want), rtol=1e-6)


def test_reference_quantiser_is_the_exact_nearest_code():
    rng = np.random.default_rng(0)
    for signed in (True, False):
        x = _adversarial(rng, 3000, signed)
        codes, absmax = Q.quantize(x, signed)
        assert np.all(absmax == 1)
        mp = Q.dynamic_map(signed).astype(np.float64)
        dist = np.abs(x.astype(np.float64)[:, None] - mp[None, :])
        best = dist.min(axis=1)
        got = dist[np.arange(x.size), codes]
        assert np.all(got == best), "not the nearest code"
        # ties: the smaller magnitude
        tie = np.sum(dist == best[:, None], axis=1) > 1
        assert tie.any()
        assert np.all(np.abs(mp[codes[tie]]) <= np.abs(x[tie]))
        # zero stays zero, the sign is kept
        zero = Q.SIGNED_ZERO if signed else Q.UNSIGNED_ZERO
        assert np.all(codes[x == 0] == zero)
        if signed:
            assert np.all(mp[codes[x < 0]] <= 0) and np.all(mp[codes[x > 0]] >= 0)


@pytest.mark.parametrize("isa", importable_isas())
def test_kernel_quantiser_equals_reference(isa):
    mod = isa_module(isa)
    assert Q.tables().size == mod.Q8_TABLE_BYTES
    rng = np.random.default_rng(1)
    for signed in (True, False):
        base = _adversarial(rng, 5000, signed)
        cases = [base, base * F32(3e-30), base * F32(1e30), base[:1000] * F32(1e-39)]
        odd = base[:777].copy()
        odd[5] = np.nan
        odd[300] = np.inf if not signed else -np.inf
        cases += [odd, np.zeros(300, F32), np.array([np.nan] * 3, F32), base[:17]]
        for x in cases:
            x = x if signed else np.abs(x)
            c = np.empty(x.size, np.uint8)
            a = np.empty(Q.n_blocks(x.size), F32)
            mod.q8_quantize(x, c, a, signed, Q.tables())
            cr, ar = Q.quantize(x, signed)
            assert_bitwise([c, a], [cr, ar], f"{isa} signed={signed} n={x.size}")


def test_quantisation_error_within_the_maps_bound():
    """Per element: |dequant - x| <= absmax * (half the gap between the
    map's values around x / absmax) + the rounding of y and of the product;
    per block: <= absmax * the map's largest half gap."""
    rng = np.random.default_rng(2)
    for signed in (True, False):
        x = (rng.standard_normal(64 * Q.BLOCK) * 10.0 ** rng.uniform(-8, 3, 64 * Q.BLOCK))
        x = x.astype(F32) if signed else np.abs(x).astype(F32)
        codes, absmax = Q.quantize(x, signed)
        deq = Q.dequantize(codes, absmax, signed).astype(np.float64)
        mp = Q.dynamic_map(signed).astype(np.float64)
        am = np.repeat(absmax.astype(np.float64), Q.BLOCK)
        y = x / am
        k = np.clip(np.searchsorted(mp, y), 1, 255)
        half_gap = (mp[k] - mp[k - 1]) / 2
        slack = 4 * np.finfo(F32).eps * (np.abs(x) + np.abs(deq))
        err = np.abs(deq - x)
        assert np.all(err <= am * half_gap + slack)
        block_err = err.reshape(-1, Q.BLOCK).max(axis=1)
        bound = absmax * (np.max(np.diff(mp)) / 2 + 8 * np.finfo(F32).eps)
        assert np.all(block_err <= bound)


# ------------------------------------------------------------- the fused step

OPTIONS = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.05, "decoupled_weight_decay": True, "maximize": True},
    {"grad_scale": 8.0, "betas": (0.3, 0.99)},              # lerp's other formula
    {"eps": 1e-3, "lr": 0.5},
]


def _problem(n, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(F32)
    st = F.new_state8bit(n)
    grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 1)).astype(F32)
             for _ in range(4)]
    return p, st, grads


def _run(p, st, grads, kw, start=1, n_threads=1):
    kw = {"lr": 1e-2, **kw}
    for t, g in enumerate(grads, start):
        F.adam8bit_step(p, g, **st, step=t, n_threads=n_threads, **kw)


def _run_ref(p, st, grads, kw, start=1):
    kw = {"lr": 1e-2, **kw}
    for t, g in enumerate(grads, start):
        R.adam8bit(p, g, **st, step=t, **kw)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 255, 256, 257, 4099])
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(kw) or "default")
def test_step_equals_reference_bitwise(n, kw):
    p, st, grads = _problem(n, n)
    p2, st2 = p.copy(), {k: v.copy() for k, v in st.items()}
    _run(p, st, grads, kw)
    _run_ref(p2, st2, grads, kw)
    assert_bitwise([p] + list(st.values()), [p2] + list(st2.values()), f"n={n} {kw}")


def test_long_run_bc2_one_and_reference():
    """Far into a run bc2_sqrt rounds to 1 (the kernel's variant without the
    division): still the reference's bits."""
    p, st, grads = _problem(3000, 7)
    p2, st2 = p.copy(), {k: v.copy() for k, v in st.items()}
    _run(p, st, grads, {}, start=40000)
    _run_ref(p2, st2, grads, {}, start=40000)
    assert_bitwise([p] + list(st.values()), [p2] + list(st2.values()))


@pytest.mark.parametrize("isa", importable_isas())
def test_bitwise_across_isas_and_threads(isa, use_isa):
    n = 100 * Q.BLOCK + 77
    p0, st0, grads = _problem(n, 3)
    p, st = p0.copy(), {k: v.copy() for k, v in st0.items()}
    _run(p, st, grads, {"weight_decay": 0.01, "decoupled_weight_decay": True}, n_threads=1)
    use_isa(isa)
    for nt in (1, 2, 3):
        q, sq = p0.copy(), {k: v.copy() for k, v in st0.items()}
        _run(q, sq, grads, {"weight_decay": 0.01, "decoupled_weight_decay": True},
             n_threads=nt)
        assert_bitwise([q] + list(sq.values()), [p] + list(st.values()), f"{isa} nt={nt}")


def test_multi_array_call_equals_single_calls():
    sizes = [5000, 1, 256, 300, 0, 70000, 257]
    rng = np.random.default_rng(4)
    ps = [rng.standard_normal(s).astype(F32) for s in sizes]
    gs = [rng.standard_normal(s).astype(F32) for s in sizes]
    sts = [F.new_state8bit(s) for s in sizes]
    steps = [1, 2, 3, 1, 5, 2, 9]
    ref_p = [p.copy() for p in ps]
    ref_st = [{k: v.copy() for k, v in st.items()} for st in sts]
    for _ in range(2):
        F.adamw8bit(ps, gs, *[[st[k] for st in sts] for k in F._Q8_STATE], steps=steps,
                    lr=0.01, n_threads=2)
        for p, g, st, s in zip(ref_p, gs, ref_st, steps):
            F.adamw8bit_step(p, g, **st, step=s, lr=0.01, n_threads=1)
        steps = [s + 1 for s in steps]
    for p, q, st, sr in zip(ps, ref_p, sts, ref_st):
        assert_bitwise([p] + list(st.values()), [q] + list(sr.values()))


def test_state_memory_per_parameter():
    for n in (4096, 2**20, 2**20 + 1):
        st = F.new_state8bit(n)
        assert sum(a.nbytes for a in st.values()) / n <= 2.1
    assert I.Q8_BLOCK == Q.BLOCK == 256 and Q.MIN_SIZE == 4096


# ----------------------------------------------------------------- bad input

def _args(n=600):
    rng = np.random.default_rng(5)
    p = rng.standard_normal(n).astype(F32)
    g = rng.standard_normal(n).astype(F32)
    st = F.new_state8bit(n)
    F.adam8bit_step(p, g, **st, step=1)           # non-trivial state
    return {"param": p, "grad": g, **st}


def _ro(a):
    a = a.copy()
    a.flags.writeable = False
    return a


BAD = [
    ("param", lambda b: b["param"].astype(np.float64), TypeError),
    ("param", lambda b: b["param"].astype(np.int32), TypeError),
    ("grad", lambda b: b["grad"][:-1].copy(), ValueError),
    ("grad", lambda b: b["grad"].astype(np.float64), TypeError),
    ("exp_avg", lambda b: b["exp_avg"].astype(np.int8), TypeError),
    ("exp_avg", lambda b: b["exp_avg"][:-1].copy(), ValueError),
    ("exp_avg_sq", lambda b: b["exp_avg_sq"].tolist(), TypeError),
    ("exp_avg_sq", lambda b: _ro(b["exp_avg_sq"]), ValueError),
    ("exp_avg_absmax", lambda b: b["exp_avg_absmax"][:-1].copy(), ValueError),
    ("exp_avg_sq_absmax", lambda b: b["exp_avg_sq_absmax"].astype(np.float64), TypeError),
    ("exp_avg_sq_absmax", lambda b: np.zeros((6, 2), F32)[:, 0], ValueError),
]


@pytest.mark.parametrize("name,make,exc", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_buffer_rejected_nothing_written(name, make, exc):
    b = _args()
    b[name] = make(b)
    before = [np.array(v, copy=True) for v in b.values()]
    with pytest.raises(exc, match=name):
        F.adam8bit_step(**b, step=2)
    for v, w in zip(b.values(), before):
        assert_bitwise([np.asarray(v)], [w])


@pytest.mark.parametrize("kw,exc,frag", [
    ({"step": 0}, ValueError, "step"), ({"lr": -1.0}, ValueError, "lr"),
    ({"betas": (1.0, 0.9)}, ValueError, "beta"), ({"maximize": "no"}, TypeError, "maximize"),
    ({"grad_scale": 0.0}, ValueError, "grad_scale"), ({"n_threads": 0}, ValueError, "n_threads"),
])
def test_bad_hyperparameter_rejected_nothing_written(kw, exc, frag):
    b = _args()
    assert_rejected(exc, frag, b, F.adam8bit_step, **b, **{"step": 2, **kw})


def test_aliasing_rejected_nothing_written():
    b = _args()
    before = [v.copy() for v in b.values()]
    with pytest.raises(ValueError, match="share memory"):
        F.adam8bit_step(b["param"], b["grad"], b["exp_avg"], b["exp_avg"], b["exp_avg_absmax"],
                        b["exp_avg_sq_absmax"], step=2)
    with pytest.raises(ValueError, match="share memory"):
        F.adam8bit_step(b["param"], b["param"], b["exp_avg"], b["exp_avg_sq"],
                        b["exp_avg_absmax"], b["exp_avg_sq_absmax"], step=2)
    # a bad entry late in a list: nothing written in the earlier ones either
    c = _args()
    lists = [[b[k], c[k]] for k in b]
    lists[3][1] = lists[3][1][:-1].copy()
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[1\]"):
        F.adam8bit(*lists, steps=2)
    assert_bitwise(list(b.values()), before)
