"""fastadam.Adam/AdamW(state_dtype="q8"): the numpy optimizers with 8-bit
state -- trajectories equal the reference bit for bit (8-bit state for
arrays of 4096+ elements, float32 below), state_dict keys, fastadam.save /
load resume bit-identically, bad options and bad checkpoints rejected
without changing anything."""
import numpy as np
import pytest
from conftest import assert_bitwise, q8_trajectory

import fastadam as fa
from fastadam import _quant as Q
from fastadam import functional as F

F32 = np.float32
SHAPES = [(5000,), (100,), (64, 128), (4096,), (4095,)]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(F32) for s in SHAPES]


def _grads(rng, ps):
    return [rng.standard_normal(p.shape).astype(F32) for p in ps]


@pytest.mark.parametrize("cls,kw", [(fa.AdamW, {"weight_decay": 0.05}),
                                    (fa.Adam, {"weight_decay": 0.01, "maximize": True})])
def test_trajectory_equals_reference(cls, kw):
    ps = _params()
    opt, ref, ref_st = q8_trajectory(cls, ps, _grads, kw)
    assert_bitwise(ps, ref)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["state_dtype"] == "q8"
    for i, p in enumerate(ps):
        st = sd["state"][i]
        assert st["step"] == 3
        if p.size >= Q.MIN_SIZE:
            assert sorted(st) == ["exp_avg", "exp_avg_absmax", "exp_avg_sq",
                                  "exp_avg_sq_absmax", "step"]
            assert st["exp_avg"].dtype == np.uint8 and st["exp_avg"].shape == p.shape
            assert st["exp_avg_absmax"].shape == (Q.n_blocks(p.size),)
            assert sum(st[k].nbytes for k in st if k != "step") / p.size <= 2.1
            assert_bitwise([st[k] for k in F._Q8_STATE], [ref_st[i][k] for k in F._Q8_STATE])
        else:
            assert st["exp_avg"].dtype == F32


def test_without_state_dtype_the_layout_is_unchanged():
    ps = _params()
    opt = fa.Adam(ps)
    opt.step(_grads(np.random.default_rng(0), ps))
    sd = opt.state_dict()
    assert "state_dtype" not in sd["param_groups"][0]
    assert all(st["exp_avg"].dtype == F32 for st in sd["state"].values())


def test_save_load_resumes_bit_identically(tmp_path):
    rng = np.random.default_rng(2)
    ps = _params(3)
    opt = fa.AdamW(ps, lr=1e-2, state_dtype="q8")
    for _ in range(2):
        opt.step(_grads(rng, ps))
    path = tmp_path / "q8.npz"
    fa.save(opt.state_dict(), path)
    ps2 = [p.copy() for p in ps]
    opt2 = fa.AdamW(ps2, lr=1e-2, state_dtype="q8")
    opt2.load_state_dict(fa.load(path))
    # the checkpoint alone carries the format: an optimizer built without
    # state_dtype takes the group's 'q8' from it
    ps3 = [p.copy() for p in ps]
    opt3 = fa.AdamW(ps3, lr=1e-2)
    opt3.load_state_dict(fa.load(path))
    for _ in range(3):
        gs = _grads(rng, ps)
        for o in (opt, opt2, opt3):
            o.step(gs)
    assert_bitwise(ps, ps2)
    assert_bitwise(ps, ps3)
    for i in opt.state_dict()["state"]:
        a, b = opt.state_dict()["state"][i], opt2.state_dict()["state"][i]
        assert_bitwise([a[k] for k in a if k != "step"], [b[k] for k in a if k != "step"])


@pytest.mark.parametrize("kw,exc,frag", [
    ({"state_dtype": "q4"}, TypeError, "state_dtype 'q4'.*q8"),
    ({"state_dtype": "q8", "amsgrad": True}, ValueError, "amsgrad"),
])
def test_bad_options(kw, exc, frag):
    with pytest.raises(exc, match=frag):
        fa.Adam(_params(), **kw)


def test_float64_params_rejected():
    with pytest.raises(TypeError, match=r"params\[0\].*'q8'.*float64"):
        fa.Adam([np.zeros(5000)], state_dtype="q8")


def _trained():
    ps = _params(4)
    opt = fa.AdamW(ps, lr=1e-2, state_dtype="q8")
    opt.step(_grads(np.random.default_rng(5), ps))
    return ps, opt


def _snapshot(opt):
    sd = opt.state_dict()
    return ({i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
             for i, st in sd["state"].items()}, [dict(g) for g in opt.param_groups])


def _unchanged(opt, snap):
    st, groups = snap
    now = opt.state_dict()["state"]
    assert now.keys() == st.keys()
    for i in st:
        assert now[i].keys() == st[i].keys()
        for k, v in st[i].items():
            if isinstance(v, np.ndarray):
                assert_bitwise([now[i][k]], [v])
            else:
                assert now[i][k] == v
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in groups]


def _bad(mutate):
    ps, opt = _trained()
    sd = opt.state_dict()
    sd = {"state": {i: dict(st) for i, st in sd["state"].items()},
          "param_groups": [dict(g) for g in sd["param_groups"]]}
    mutate(sd)
    return sd


@pytest.mark.parametrize("mutate,exc,frag", [
    (lambda sd: sd["state"][0].__setitem__("exp_avg_absmax", -sd["state"][0]["exp_avg_absmax"]
                                           - 1), ValueError, "exp_avg_absmax"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", sd["state"][0]["exp_avg"][:-1]),
     ValueError, "exp_avg"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg_sq", sd["state"][0]["exp_avg_sq"]
                                           .astype(F32)), TypeError, "exp_avg_sq"),
    (lambda sd: sd["state"][0].pop("exp_avg_sq_absmax"), ValueError, "exp_avg_sq_absmax"),
    (lambda sd: sd["param_groups"][0].__setitem__("state_dtype", None), ValueError, "q8"),
    (lambda sd: sd["param_groups"][0].__setitem__("state_dtype", "int8"), TypeError,
     "state_dtype"),
    (lambda sd: sd["param_groups"][0].__setitem__("amsgrad", True), ValueError, "amsgrad"),
])
def test_bad_checkpoint_rejected_nothing_changed(mutate, exc, frag):
    ps, opt = _trained()
    snap = _snapshot(opt)
    with pytest.raises(exc, match=frag):
        opt.load_state_dict(_bad(mutate))
    _unchanged(opt, snap)


def test_float_checkpoint_into_q8_optimizer_keeps_float_state():
    """A float32 checkpoint keeps its float32 state in a 'q8' optimizer (new
    parameters' state is 8-bit); the steps are those of the float optimizer."""
    ps = _params(6)
    f32 = fa.Adam(ps, lr=1e-2)
    rng = np.random.default_rng(7)
    f32.step(_grads(rng, ps))
    ps2 = [p.copy() for p in ps]
    q8 = fa.Adam(ps2, lr=1e-2, state_dtype="q8")
    q8.load_state_dict(f32.state_dict())
    gs = _grads(rng, ps)
    f32.step(gs)
    q8.step(gs)
    assert_bitwise(ps, ps2)
