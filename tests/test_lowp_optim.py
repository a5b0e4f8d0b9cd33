"""fastadam.Adam/AdamW with 16-bit params and state (issue 12): state_dtype,
stochastic rounding with the seed in the state dict and the checkpoint,
param_copies, errors before any write."""
import numpy as np
import pytest
from conftest import assert_bitwise

import fastadam as fa
from fastadam import _plan

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)


def _params(dt, sizes=(7, 33, 1000), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32).astype(dt) for n in sizes]


def _grads(ps, t):
    rng = np.random.default_rng(100 + t)
    return [rng.standard_normal(p.shape).astype(np.float32).astype(p.dtype) for p in ps]


@pytest.mark.parametrize("state_dtype", ["bf16", "bfloat16", ml_dtypes.bfloat16, BF16])
def test_state_dtype_bf16_for_float32_params(state_dtype):
    ps = _params(np.float32)
    ref = [p.copy() for p in ps]
    opt = fa.AdamW(ps, lr=1e-2, state_dtype=state_dtype, amsgrad=True)
    ms = [np.zeros(p.shape, BF16) for p in ref]
    vs = [np.zeros(p.shape, BF16) for p in ref]
    vms = [np.zeros(p.shape, BF16) for p in ref]
    for t in (1, 2, 3):
        gs = _grads(ps, t)
        opt.step(gs)
        fa.functional.adamw(ref, gs, ms, vs, steps=t, lr=1e-2, amsgrad=True,
                            max_exp_avg_sqs=vms)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["state_dtype"] == "bfloat16"
    for i in range(3):
        st = sd["state"][i]
        assert st["exp_avg"].dtype == BF16 and st["max_exp_avg_sq"].dtype == BF16
        assert_bitwise([ps[i], st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"]],
                       [ref[i], ms[i], vs[i], vms[i]])


def test_default_state_dict_has_no_precision_keys():
    opt = fa.Adam([np.zeros(3, np.float32)])
    assert not {"state_dtype", "stochastic_rounding", "seed"} & set(opt.param_groups[0])


def test_all_bf16_and_fp16_params():
    for dt in (BF16, F16):
        ps = _params(dt)
        ref = [p.copy() for p in ps]
        opt = fa.Adam(ps, lr=1e-2, weight_decay=0.1)
        st = [[np.zeros(p.shape, dt) for p in ref] for _ in range(2)]
        for t in (1, 2):
            gs = _grads(ps, t)
            opt.step(gs)
            fa.functional.adam(ref, gs, st[0], st[1], steps=t, lr=1e-2, weight_decay=0.1)
        assert_bitwise(ps, ref)
        assert opt.state_dict()["state"][0]["exp_avg"].dtype == dt


def _sr_run(ps, steps, opt=None, seed=5):
    opt = opt or fa.Adam(ps, lr=1e-3, stochastic_rounding=True, seed=seed)
    for t in steps:
        opt.step(_grads(ps, t))
    return opt


def test_stochastic_rounding_seed_in_state_dict_and_checkpoint(tmp_path):
    """Resuming from a saved checkpoint continues bit for bit: the seed
    travels with the param groups, the bf16 state keeps its dtype."""
    full = _params(BF16)
    _sr_run(full, range(1, 7))
    half = _params(BF16)
    opt = _sr_run(half, range(1, 4))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["seed"] == 5 and sd["param_groups"][0]["stochastic_rounding"]
    f = tmp_path / "sr.npz"
    fa.save(sd, f)
    loaded = fa.load(f)
    assert loaded["state"][0]["exp_avg"].dtype == BF16
    assert_bitwise([loaded["state"][1]["exp_avg_sq"]], [sd["state"][1]["exp_avg_sq"]])
    resumed_ps = [p.copy() for p in half]
    opt2 = fa.Adam(resumed_ps, lr=1e-3, stochastic_rounding=True, seed=123)
    opt2.load_state_dict(loaded)
    assert opt2.param_groups[0]["seed"] == 5
    _sr_run(resumed_ps, range(4, 7), opt2)
    assert_bitwise(resumed_ps, full)
    other = _params(BF16)
    _sr_run(other, range(1, 7), seed=6)
    assert not all(np.array_equal(a.view(np.uint16), b.view(np.uint16))
                   for a, b in zip(other, full))


def test_seed_drawn_when_not_given():
    a = fa.Adam(_params(BF16), stochastic_rounding=True)
    b = fa.Adam(_params(BF16), stochastic_rounding=True)
    sa, sb = a.param_groups[0]["seed"], b.param_groups[0]["seed"]
    assert isinstance(sa, int) and 0 <= sa < 2**64 and sa != sb


def test_state_dtype_conversion_on_load():
    """A float32-state checkpoint loads into a bf16-state optimizer rounded to
    nearest even (and back exactly)."""
    ps = _params(np.float32)
    opt = fa.Adam(ps)
    opt.step(_grads(ps, 1))
    sd = opt.state_dict()
    opt16 = fa.Adam([p.copy() for p in ps], state_dtype="bf16")
    opt16.load_state_dict(sd)
    m16 = opt16.state_dict()["state"][2]["exp_avg"]
    assert m16.dtype == BF16
    assert_bitwise([m16], [sd["state"][2]["exp_avg"].astype(BF16)])
    # the group's state_dtype travels with the checkpoint (as its hyperparameters do) ...
    back = fa.Adam([p.copy() for p in ps])
    back.load_state_dict(opt16.state_dict())
    assert back.state_dict()["state"][2]["exp_avg"].dtype == BF16
    # ... and a checkpoint without it (float32 state) converts back exactly
    sd16 = opt16.state_dict()
    del sd16["param_groups"][0]["state_dtype"]
    back = fa.Adam([p.copy() for p in ps])
    back.load_state_dict(sd16)
    assert_bitwise([back.state_dict()["state"][2]["exp_avg"]], [m16.astype(np.float32)])


def test_param_copies():
    ps = _params(np.float32)
    cs = [np.zeros(p.shape, BF16) for p in ps]
    opt = fa.Adam(ps, lr=1e-2)
    gs = [g.astype(BF16) for g in _grads(ps, 1)]
    opt.step(gs, param_copies=cs)
    for p, c in zip(ps, cs):
        assert_bitwise([c], [p.astype(BF16)])
    with pytest.raises(ValueError, match="param_copies must have 3 entries"):
        opt.step(gs, param_copies=cs[:2])
    before = [p.copy() for p in ps]
    with pytest.raises(ValueError, match="or for none"):
        opt.step(gs, param_copies=[cs[0], None, cs[2]])
    assert_bitwise(ps, before)


def test_errors_name_the_argument_and_write_nothing():
    with pytest.raises(TypeError, match="state_dtype 'q9' is not a known name"):
        fa.Adam(_params(np.float32), state_dtype="q9")
    with pytest.raises(TypeError, match="state_dtype float16 is not supported for float32"):
        fa.Adam(_params(np.float32), state_dtype="fp16")
    with pytest.raises(TypeError, match="stochastic_rounding must be a bool"):
        fa.Adam(_params(BF16), stochastic_rounding=1)
    with pytest.raises(ValueError, match="seed must be an int"):
        fa.Adam(_params(BF16), stochastic_rounding=True, seed=-3)
    ps = _params(np.float32)
    before = [p.copy() for p in ps]
    opt = fa.Adam(ps, stochastic_rounding=True, seed=1)       # float32 only: no SR kernel
    with pytest.raises(TypeError, match="stochastic_rounding=True: no kernel"):
        opt.step(_grads(ps, 1))
    assert_bitwise(ps, before)
    assert not opt.state_dict()["state"]
    opt = fa.Adam(_params(np.float32))
    sd = opt.state_dict()
    sd["param_groups"][0]["state_dtype"] = "nope"
    with pytest.raises(TypeError, match="param group 0: state_dtype 'nope'"):
        opt.load_state_dict(sd)


def test_state_dtype_is_one_function():
    """Every layer asks _plan.state_dtype (a new format is an entry there)."""
    assert _plan.STATE_DTYPE_NAMES["bf16"] == "bfloat16"
    assert _plan.state_dtype(np.float32, "BF16") == BF16
