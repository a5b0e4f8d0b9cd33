"""8-bit blockwise state with 16-bit parameters and gradients (issue 13):
bfloat16 / float16 params and grads, float32 params with bfloat16 / float16
grads. The fused step against the numpy reference bit for bit (every ISA
module, thread counts 1/2/3, one and many arrays, non-finite values), bad
combinations refused before anything is written, the numpy optimizers and
the torch drop-ins (trajectories, state dicts, checkpoints)."""
import numpy as np
import pytest
from conftest import importable_isas, q8_trajectory

import fastadam as fa
from fastadam import _interface as I
from fastadam import _quant as Q
from fastadam import _reference as R
from fastadam import functional as F

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
NP = {"float32": F32, "bfloat16": BF16, "float16": F16}

# every 8-bit combination with a 16-bit param or grad: (param, grad)
LOWP = sorted((NP[p], NP[g]) for p, g, _ in I.Q8_COMBOS.values() if (p, g) != ("float32",) * 2)
IDS = [f"{p.name}-{g.name}" for p, g in LOWP]


def _bits(a):
    a = np.asarray(a)
    return a.view(f"u{a.itemsize}") if a.dtype.kind in "fV" else a


def assert_bits(actual, expected, what=""):
    """Equal bit for bit (16-bit formats and NaN payloads included)."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, what
        ai, ei = _bits(a), _bits(e)
        if not np.array_equal(ai, ei):
            j = np.flatnonzero(ai.ravel() != ei.ravel())[0]
            raise AssertionError(f"{what} buffer {i}: first difference at {j}: "
                                 f"{ai.ravel()[j]:#x} != {ei.ravel()[j]:#x}")


def _problem(n, dp, dg, seed=0, steps=4):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32).astype(dp)
    st = F.new_state8bit(n)
    grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32).astype(dg)
             for _ in range(steps)]
    return p, st, grads


def _copy(p, st):
    return p.copy(), {k: v.copy() for k, v in st.items()}


def _run(p, st, grads, kw, start=1, n_threads=1):
    for t, g in enumerate(grads, start):
        F.adam8bit_step(p, g, **st, step=t, n_threads=n_threads, **{"lr": 1e-2, **kw})


def _run_ref(p, st, grads, kw, start=1):
    for t, g in enumerate(grads, start):
        R.adam8bit(p, g, **st, step=t, **{"lr": 1e-2, **kw})


OPTIONS = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.05, "decoupled_weight_decay": True, "maximize": True},
    {"grad_scale": 8.0, "betas": (0.3, 0.99)},              # lerp's other formula
    {"eps": 1e-3, "lr": 0.5},
]


def test_the_combinations_are_built():
    got = {(p.name, g.name) for p, g in LOWP}
    assert {("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "bfloat16"),
            ("float32", "float16")} <= got


@pytest.mark.parametrize("dp,dg", LOWP, ids=IDS)
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(kw) or "default")
def test_step_equals_reference_bitwise(dp, dg, kw):
    for n in (0, 1, 15, 16, 17, 255, 256, 257, 4099):
        p, st, grads = _problem(n, dp, dg, n)
        p2, st2 = _copy(p, st)
        _run(p, st, grads, kw)
        _run_ref(p2, st2, grads, kw)
        assert_bits([p] + list(st.values()), [p2] + list(st2.values()), f"n={n} {kw}")


@pytest.mark.parametrize("dp,dg", [c for c in LOWP if c[0] != F32],
                         ids=[i for c, i in zip(LOWP, IDS) if c[0] != F32])
def test_16bit_param_is_the_float32_kernel_rounded_to_nearest_even(dp, dg):
    """One step: the 16-bit param is the RNE rounding of the float32-param
    kernel's result on the widened inputs, and the state is that kernel's."""
    p, st, grads = _problem(3000, dp, dg, 11, steps=1)
    p32, st32 = p.astype(np.float32), {k: v.copy() for k, v in st.items()}
    F.adamw8bit_step(p, grads[0], **st, step=1, lr=1e-2)
    F.adamw8bit_step(p32, grads[0].astype(np.float32), **st32, step=1, lr=1e-2)
    assert_bits([p] + list(st.values()), [R.round_rne(p32, dp)] + list(st32.values()))
    assert np.mean(_bits(p) != _bits(p32.astype(dp))) < 0.01     # numpy's RNE cast too


@pytest.mark.parametrize("dp,dg", LOWP, ids=IDS)
def test_non_finite_values_equal_reference(dp, dg):
    p, st, grads = _problem(1000, dp, dg, 5, steps=2)
    grads[0][[3, 300, 700]] = np.array([np.nan, np.inf, -np.inf], np.float32).astype(dg)
    # the NaN param in a block of finite moments: where two NaNs meet (a NaN
    # param plus a NaN update), which one an addition returns is the
    # compiler's choice of operand order, not a property of the format
    p[[10, 900]] = np.array([np.inf, np.nan], np.float32).astype(dp)
    big = np.float32(np.finfo(dp).max if dp != BF16 else 3.3e38)
    p[950] = big.astype(dp)
    p2, st2 = _copy(p, st)
    with np.errstate(all="ignore"):
        _run(p, st, grads, {"lr": 1.0})
        _run_ref(p2, st2, grads, {"lr": 1.0})
    assert_bits([p] + list(st.values()), [p2] + list(st2.values()))
    assert np.isnan(np.asarray(p, np.float32)[900])


@pytest.mark.parametrize("isa", importable_isas())
@pytest.mark.parametrize("dp,dg", LOWP, ids=IDS)
def test_bitwise_across_isas_and_threads(dp, dg, isa, use_isa):
    n = 100 * Q.BLOCK + 77
    p0, st0, grads = _problem(n, dp, dg, 3, steps=3)
    kw = {"weight_decay": 0.01, "decoupled_weight_decay": True}
    p, st = _copy(p0, st0)
    _run_ref(p, st, grads, kw)
    use_isa(isa)
    for nt in (1, 2, 3):
        q, sq = _copy(p0, st0)
        _run(q, sq, grads, kw, n_threads=nt)
        assert_bits([q] + list(sq.values()), [p] + list(st.values()), f"{isa} nt={nt}")


@pytest.mark.parametrize("dp,dg", LOWP, ids=IDS)
def test_multi_array_call_equals_single_calls(dp, dg):
    sizes = [5000, 1, 256, 300, 0, 70000, 257]
    probs = [_problem(s, dp, dg, i, steps=2) for i, s in enumerate(sizes)]
    ps = [pr[0] for pr in probs]
    sts = [pr[1] for pr in probs]
    ref = [_copy(p, st) for p, st in zip(ps, sts)]
    steps = [1, 2, 3, 1, 5, 2, 9]
    for k in range(2):
        gs = [pr[2][k] for pr in probs]
        F.adamw8bit(ps, gs, *[[st[key] for st in sts] for key in F._Q8_STATE], steps=steps,
                    lr=0.01, n_threads=2)
        for (p, st), g, s in zip(ref, gs, steps):
            F.adamw8bit_step(p, g, **st, step=s, lr=0.01, n_threads=1)
        steps = [s + 1 for s in steps]
    for p, st, (q, sq) in zip(ps, sts, ref):
        assert_bits([p] + list(st.values()), [q] + list(sq.values()))


def test_mixed_combinations_in_one_list_equal_single_calls():
    """One list mixing dtype combinations: one native call per combination,
    the bits of single calls."""
    probs = [_problem(600 + 100 * i, dp, dg, i, steps=1) for i, (dp, dg) in
             enumerate(LOWP + [(F32, F32)])]
    ref = [_copy(p, st) for p, st, _ in probs]
    F.adam8bit([p for p, _, _ in probs], [g[0] for _, _, g in probs],
               *[[st[k] for _, st, _ in probs] for k in F._Q8_STATE], steps=2, lr=0.01)
    for (p, st), (_, _, g) in zip(ref, probs):
        F.adam8bit_step(p, g[0], **st, step=2, lr=0.01)
    for (p, st, _), (q, sq) in zip(probs, ref):
        assert_bits([p] + list(st.values()), [q] + list(sq.values()))


# ----------------------------------------------------------------- bad input

BAD_COMBOS = [(BF16, F32), (BF16, F16), (F16, BF16), (F16, F32), (np.dtype(np.float64),) * 2]


@pytest.mark.parametrize("dp,dg", BAD_COMBOS, ids=lambda d: d.name)
def test_combination_without_kernel_refused_nothing_written(dp, dg):
    good = _problem(600, BF16, BF16, 1, steps=1)
    F.adam8bit_step(good[0], good[2][0], **good[1], step=1)           # non-trivial state
    p, st, grads = _problem(600, dp, dg, 2, steps=1)
    bufs = [good[0], *good[1].values(), p, *st.values()]
    before = [b.copy() for b in bufs]
    with pytest.raises(TypeError, match=r"params\[1\]|grads\[1\]"):
        F.adam8bit([good[0], p], [good[2][0], grads[0]],
                   *[[good[1][k], st[k]] for k in F._Q8_STATE], steps=2)
    with pytest.raises(TypeError, match="param|grad"):
        F.adam8bit_step(p, grads[0], **st, step=2)
    assert_bits(bufs, before)


def test_bad_state_with_bf16_params_refused_nothing_written():
    p, st, grads = _problem(600, BF16, BF16, 4, steps=1)
    F.adam8bit_step(p, grads[0], **st, step=1)
    before = [p.copy()] + [v.copy() for v in st.values()]
    bad = dict(st, exp_avg_absmax=st["exp_avg_absmax"][:-1].copy())
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        F.adam8bit_step(p, grads[0], **bad, step=2)
    with pytest.raises(ValueError, match="grad"):
        F.adam8bit_step(p, grads[0][:-1].copy(), **st, step=2)
    with pytest.raises(ValueError, match="share memory"):
        F.adam8bit_step(p, p, **st, step=2)
    assert_bits([p] + list(st.values()), before)


# --------------------------------------------------------- numpy optimizers

SHAPES = [(5000,), (100,), (64, 128), (4096,), (4095,)]


def _params(dt, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32).astype(dt) for s in SHAPES]


def _grads(rng, ps):
    return [rng.standard_normal(p.shape).astype(np.float32).astype(p.dtype) for p in ps]


@pytest.mark.parametrize("dt", [BF16, F16], ids=lambda d: d.name)
@pytest.mark.parametrize("cls,kw", [(fa.AdamW, {"weight_decay": 0.05}),
                                    (fa.Adam, {"weight_decay": 0.01, "maximize": True})])
def test_optimizer_trajectory_equals_reference(dt, cls, kw):
    ps = _params(dt)
    opt, ref, ref_st = q8_trajectory(cls, ps, _grads, kw)
    assert_bits(ps, ref)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["state_dtype"] == "q8"
    for i, p in enumerate(ps):
        st = sd["state"][i]
        if p.size >= Q.MIN_SIZE:
            assert st["exp_avg"].dtype == np.uint8 and st["exp_avg_absmax"].dtype == F32
            assert_bits([st[k] for k in F._Q8_STATE], [ref_st[i][k] for k in F._Q8_STATE])
        else:
            assert st["exp_avg"].dtype == dt                       # the param's dtype


@pytest.mark.parametrize("dt", [BF16, F16], ids=lambda d: d.name)
def test_optimizer_save_load_resumes_bit_identically(dt, tmp_path):
    rng = np.random.default_rng(2)
    ps = _params(dt, 3)
    opt = fa.AdamW(ps, lr=1e-2, state_dtype="q8")
    for _ in range(2):
        opt.step(_grads(rng, ps))
    path = tmp_path / "q8.npz"
    fa.save(opt.state_dict(), path)
    ps2 = [p.copy() for p in ps]
    opt2 = fa.AdamW(ps2, lr=1e-2, state_dtype="q8")
    opt2.load_state_dict(fa.load(path))
    for _ in range(3):
        gs = _grads(rng, ps)
        opt.step(gs)
        opt2.step(gs)
    assert_bits(ps, ps2)
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    for i in a:
        assert_bits([a[i][k] for k in a[i] if k != "step"], [b[i][k] for k in a[i] if k != "step"])


def test_optimizer_refuses_stochastic_rounding_with_q8():
    ps = _params(BF16)
    before = [p.copy() for p in ps]
    with pytest.raises(ValueError, match="stochastic_rounding.*q8"):
        fa.AdamW(ps, state_dtype="q8", stochastic_rounding=True, seed=1)
    assert_bits(ps, before)


# -------------------------------------------------------------- torch drop-ins

def _torch():
    return pytest.importorskip("torch")


TSHAPES = [(80, 64), (300,), (4096,), (33, 257)]


@pytest.mark.parametrize("tdt", ["bfloat16", "float16"])
@pytest.mark.parametrize("cname,ncls,kw", [
    ("AdamW8bit", fa.AdamW, {"weight_decay": 0.05}),
    ("Adam8bit", fa.Adam, {"weight_decay": 0.01, "maximize": True, "betas": (0.8, 0.99)}),
])
def test_torch_equals_numpy_optimizer_bitwise(tdt, cname, ncls, kw, tmp_path):
    torch = _torch()
    import fastadam.torch as fat
    dt = getattr(torch, tdt)
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(np.float32) for s in TSHAPES]
    tps = [torch.nn.Parameter(torch.from_numpy(a.copy()).to(dt)) for a in init]
    nps = [t.detach().clone().numpy() if dt == torch.float16 else
           t.detach().clone().view(torch.int16).numpy().view(BF16) for t in tps]
    topt = getattr(fat, cname)(tps, lr=1e-2, **kw)
    nopt = ncls(nps, lr=1e-2, state_dtype="q8", **kw)

    def tstep(opt, ps, gs):
        for p, g in zip(ps, gs):
            p.grad = torch.from_numpy(g.astype(np.float32)).to(dt)
        opt.step()

    def tbits(ps):
        return [p.detach().view(torch.int16).numpy().view(np.uint16) for p in ps]

    for _ in range(3):
        gs = [rng.standard_normal(s).astype(np.float32) for s in TSHAPES]
        tstep(topt, tps, gs)
        nopt.step([torch.from_numpy(g).to(dt).view(torch.int16).numpy().view(nps[0].dtype)
                   for g in gs])
    assert_bits(tbits(tps), [_bits(p) for p in nps])
    st = topt.state[tps[0]]
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg_absmax"].dtype == torch.float32
    assert float(st["step"]) == 3
    assert topt.state[tps[1]]["exp_avg"].dtype == dt              # under 4096 elements
    # torch.save / load round trip resumes bit-identically
    torch.save(topt.state_dict(), tmp_path / "t.pt")
    qs = [torch.nn.Parameter(p.detach().clone()) for p in tps]
    o2 = getattr(fat, cname)(qs, lr=1e-2, **kw)
    o2.load_state_dict(torch.load(tmp_path / "t.pt"))
    assert o2.state[qs[0]]["exp_avg"].dtype == torch.uint8
    gs = [rng.standard_normal(s).astype(np.float32) for s in TSHAPES]
    tstep(topt, tps, gs)
    tstep(o2, qs, gs)
    assert_bits(tbits(qs), tbits(tps))


def test_torch_adam_q8_state_dtype_points_at_adam8bit():
    torch = _torch()
    import fastadam.torch as fat
    p = torch.nn.Parameter(torch.zeros(5000, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="Adam8bit"):
        fat.Adam([p], state_dtype="q8")
