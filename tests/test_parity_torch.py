"""Parity with torch.optim.Adam/AdamW: bitwise vs fused=True, trajectories vs foreach=False.

torch is installed in CI (.ci/run pins torch==2.13.0): these tests run there.
"""
import numpy as np
import pytest
from _options import TORCH
from conftest import assert_bitwise, make_state

import fastadam as fa

torch = pytest.importorskip("torch")

# (weight_decay, decoupled, amsgrad, maximize) of the registry's torch option sets
OPTIONS = [(o.weight_decay, o.decoupled, o.amsgrad, o.maximize) for o in TORCH]


def _torch_opt(tp, opt, lr, **extra):
    wd, dec, ams, mx = opt
    cls = torch.optim.AdamW if dec else torch.optim.Adam
    return cls([tp], lr=lr, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd, amsgrad=ams,
               maximize=mx, **extra)


def _step_both(tp, topt, bufs, opt, lr, steps, seed, scale=None):
    """Apply the same random gradients with torch (``topt``) and fastadam."""
    wd, dec, ams, mx = opt
    p, m, v, vm = bufs
    rng = np.random.default_rng(seed)
    for t in steps:
        g = (rng.standard_normal(p.size) * (scale or 1.0)).astype(p.dtype)
        tp.grad = torch.from_numpy(g.copy())
        if scale is not None:
            topt.grad_scale = torch.tensor(scale, dtype=torch.float32)
            topt.found_inf = torch.tensor(0.0, dtype=torch.float32)
        topt.step()
        fa.adam_step(p, g, m, v, step=t, lr=lr, betas=(0.9, 0.99), eps=1e-6,
                     weight_decay=wd, decoupled_weight_decay=dec, amsgrad=ams,
                     max_exp_avg_sq=vm if ams else None, maximize=mx, grad_scale=scale)


@pytest.mark.parametrize("opt", OPTIONS)
@pytest.mark.parametrize("n", [16, 1024, 2**17])
def test_bitwise_equal_to_torch_fused(dtype, n, opt):
    """Lengths a multiple of 16; other lengths (torch's scalar tail) and betas <= 0.5
    (lerp's other formula): test_parity_torch_conformance.py."""
    ams = opt[2]
    p, _, m, v, vm = make_state(n, dtype)
    m[...] = 0
    v[...] = 0
    vm[...] = 0
    tp = torch.from_numpy(p.copy())
    topt = _torch_opt(tp, opt, 1e-2, fused=True)
    _step_both(tp, topt, (p, m, v, vm), opt, 1e-2, range(1, 21), seed=7)
    st = topt.state[tp]
    assert_bitwise([p, m, v], [tp.numpy(), st["exp_avg"].numpy(), st["exp_avg_sq"].numpy()],
                   "fastadam vs torch fused")
    if ams:
        assert_bitwise([vm], [st["max_exp_avg_sq"].numpy()])


@pytest.mark.parametrize("opt", OPTIONS)
def test_grad_scale_bitwise_equal_to_torch_fused(dtype, opt):
    """torch fused divides grads by grad_scale inside the kernel, as fastadam does."""
    n = 4096
    p = make_state(n, dtype)[0]
    m, v, vm = np.zeros(n, dtype), np.zeros(n, dtype), np.zeros(n, dtype)
    tp = torch.from_numpy(p.copy())
    topt = _torch_opt(tp, opt, 1e-2, fused=True)
    _step_both(tp, topt, (p, m, v, vm), opt, 1e-2, range(1, 6), seed=3, scale=1024.0)
    assert_bitwise([p], [tp.numpy()])


@pytest.mark.parametrize("opt", OPTIONS)
def test_trajectory_vs_torch_foreach_false(dtype, opt):
    """100 steps of fastadam.Adam/AdamW vs torch (foreach=False) over several params."""
    wd, dec, ams, mx = opt
    rng = np.random.default_rng(11)
    shapes = [(33,), (7, 5), (1000,), (3, 4, 5)]
    ps = [rng.standard_normal(s).astype(dtype) for s in shapes]
    tps = [torch.from_numpy(p.copy()) for p in ps]
    cls = fa.AdamW if dec else fa.Adam
    tcls = torch.optim.AdamW if dec else torch.optim.Adam
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd, amsgrad=ams, maximize=mx)
    opt_fa = cls(ps, **kw)
    opt_t = tcls(tps, foreach=False, **kw)
    for _ in range(100):
        gs = [rng.standard_normal(s).astype(dtype) for s in shapes]
        for tp, g in zip(tps, gs):
            tp.grad = torch.from_numpy(g.copy())
        opt_t.step()
        opt_fa.step(gs)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for p, tp in zip(ps, tps):
        np.testing.assert_allclose(p, tp.numpy(), rtol=rtol, atol=rtol * 1e-2)


def test_torch_state_dict_loads_into_fastadam():
    """A torch Adam checkpoint (tensors) continues bit-identically in fastadam.Adam."""
    n = 64
    p = make_state(n, np.float32)[0]
    tp = torch.from_numpy(p.copy())
    topt = torch.optim.Adam([tp], lr=1e-2, fused=True)
    rng = np.random.default_rng(0)
    for _ in range(5):
        tp.grad = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        topt.step()
    w = tp.numpy().copy()
    opt = fa.Adam([w], lr=1e-2)
    opt.load_state_dict(topt.state_dict())
    for _ in range(5):
        g = rng.standard_normal(n).astype(np.float32)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
        opt.step([g])
    assert_bitwise([w], [tp.numpy()])
    assert opt.state_dict()["state"][0]["step"] == 10


@pytest.mark.parametrize("opt", OPTIONS)
def test_bitwise_equal_to_torch_fused_late_in_training(dtype, opt):
    """Steps past ~17K (fp32) / ~37K (fp64), where sqrt(bias_correction2) rounds to 1."""
    ams = opt[2]
    n = 1024
    p, _, m, v, vm = make_state(n, dtype)
    vm = np.maximum(vm, v)
    tp = torch.from_numpy(p.copy())
    topt = _torch_opt(tp, opt, 1e-3, fused=True)
    tp.grad = torch.zeros_like(tp)
    topt.step()  # creates the state; overwrite it with ours
    st = topt.state[tp]
    tp.copy_(torch.from_numpy(p))
    st["exp_avg"].copy_(torch.from_numpy(m))
    st["exp_avg_sq"].copy_(torch.from_numpy(v))
    if ams:
        st["max_exp_avg_sq"].copy_(torch.from_numpy(vm))
    start = 50_000
    st["step"].fill_(start)
    _step_both(tp, topt, (p, m, v, vm), opt, 1e-3, range(start + 1, start + 4), seed=9)
    assert_bitwise([p, m, v], [tp.numpy(), st["exp_avg"].numpy(), st["exp_avg_sq"].numpy()])
