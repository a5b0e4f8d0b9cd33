"""Stateful numpy optimizers: groups, lazy state, checkpoints, bit-identical resume."""
import numpy as np
import pytest
from conftest import assert_bitwise, copies

import fastadam as fa


def _params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in [(10,), (3, 4), (100,)]]


def _grads(ps, rng):
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in ps]


@pytest.mark.parametrize("cls", [fa.Adam, fa.AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_resume_from_checkpoint_file_is_bit_identical(tmp_path, dtype, cls, amsgrad):
    ps = _params(dtype)
    groups = [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.1}]
    opt = cls(groups, amsgrad=amsgrad)
    rng = np.random.default_rng(1)
    for _ in range(5):
        opt.step(_grads(ps, rng))
    path = tmp_path / "ckpt.npz"
    fa.save(opt.state_dict(), path)
    snapshot = copies(ps)
    # continue the original
    rng_a = np.random.default_rng(2)
    for _ in range(5):
        opt.step(_grads(ps, rng_a))
    # resume a fresh optimizer from the file
    ps2 = snapshot
    opt2 = cls([{"params": ps2[:2], "lr": 999.0}, {"params": ps2[2:]}], amsgrad=amsgrad)
    opt2.load_state_dict(fa.load(path))
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[1]["weight_decay"] == 0.1
    rng_b = np.random.default_rng(2)
    for _ in range(5):
        opt2.step(_grads(ps2, rng_b))
    assert_bitwise(ps2, ps, "resumed vs continuous")
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    for i in sd1["state"]:
        assert sd1["state"][i]["step"] == sd2["state"][i]["step"] == 10
        assert_bitwise([sd2["state"][i]["exp_avg"]], [sd1["state"][i]["exp_avg"]])


def test_state_dict_layout_is_torchs():
    ps = _params(np.float32)
    opt = fa.Adam(ps, lr=1e-3, amsgrad=True)
    opt.step([np.ones_like(p) for p in ps])
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert set(sd["state"]) == {0, 1, 2}
    assert set(sd["state"][1]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    g = sd["param_groups"][0]
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach",
                "capturable", "differentiable", "fused", "params"):
        assert key in g
    assert g["params"] == [0, 1, 2]
    assert fa.AdamW(ps[:1]).param_groups[0]["weight_decay"] == 1e-2
    assert fa.Adam(ps[:1]).param_groups[0]["weight_decay"] == 0.0


def test_state_dict_round_trip_in_memory(dtype):
    ps = _params(dtype)
    opt = fa.Adam(ps)
    opt.step([np.ones_like(p) for p in ps])
    sd = opt.state_dict()
    ps2 = copies(ps)
    opt2 = fa.Adam(ps2)
    opt2.load_state_dict(sd)
    sd2 = opt2.state_dict()
    for i in sd["state"]:
        for k, v in sd["state"][i].items():
            if k == "step":
                assert sd2["state"][i][k] == v
            else:
                assert_bitwise([sd2["state"][i][k]], [v])
                assert sd2["state"][i][k] is not v  # copied, not aliased


def test_none_grads_are_skipped_and_steps_are_per_param():
    ps = _params(np.float64)
    opt = fa.Adam(ps, lr=0.1)
    before = ps[1].copy()
    opt.step([np.ones(10), None, np.ones(100)])
    opt.step([np.ones(10), np.ones((3, 4)), np.ones(100)])
    st = opt.state_dict()["state"]
    assert st[0]["step"] == 2 and st[1]["step"] == 1 and st[2]["step"] == 2
    # ps[1] took exactly one first step
    expect = before.copy()
    fa.adam_step(expect, np.ones((3, 4)), np.zeros((3, 4)), np.zeros((3, 4)), step=1, lr=0.1)
    assert_bitwise([ps[1]], [expect])


def test_group_hyperparameters_apply_per_group():
    a, b = np.zeros(4), np.zeros(4)
    opt = fa.Adam([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    opt.step([np.ones(4), np.ones(4)])
    np.testing.assert_allclose(a, -0.1, rtol=1e-6)
    np.testing.assert_allclose(b, -0.2, rtol=1e-6)
    opt.param_groups[0]["lr"] = 0.0  # schedulers write the group
    opt.step([np.ones(4), np.ones(4)])
    np.testing.assert_allclose(a, -0.1, rtol=1e-6)


def test_constructor_rejects_bad_args():
    with pytest.raises(ValueError, match="lr"):
        fa.Adam([np.zeros(3)], lr=-1)
    with pytest.raises(ValueError, match="empty"):
        fa.Adam([])
    a = np.zeros(3)
    with pytest.raises(ValueError, match="more than one"):
        fa.Adam([{"params": [a]}, {"params": [a]}])
    with pytest.raises(ValueError, match="read-only"):
        r = np.zeros(3)
        r.flags.writeable = False
        fa.Adam([r])


def test_grad_scale_in_optimizer_step():
    a, b = np.zeros(8), np.zeros(8)
    fa.Adam([a], lr=0.1).step([np.full(8, 512.0)], grad_scale=512.0)
    fa.Adam([b], lr=0.1).step([np.ones(8)])
    assert_bitwise([a], [b])
