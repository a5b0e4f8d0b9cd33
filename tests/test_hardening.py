"""Hardening: consistent argument checks, alignment, overflow, aliasing, checkpoints."""
import numpy as np
import pytest
from conftest import assert_bitwise, copies, make_state

import fastadam as fa
from fastadam import functional as F

N = 64


def _dense(dtype=np.float32, n=N):
    return list(make_state(n, dtype))


def _sparse(dtype=np.float32, rows=10, dim=4, k=6):
    rng = np.random.default_rng(1)
    t = rng.standard_normal((rows, dim)).astype(dtype)
    ids = rng.integers(0, rows, k)
    g = rng.standard_normal((k, dim)).astype(dtype)
    return [t, ids, g, np.zeros_like(t), np.zeros_like(t)]


def _rejects(fn, bufs, exc, match):
    before = copies(bufs)
    with pytest.raises(exc, match=match):
        fn()
    assert_bitwise(bufs, before, "a rejected call wrote")


# ------------------------------------------------------ finding 6: scalars

BAD_SCALARS = [
    # (kwargs, exception, the argument named)
    (dict(lr=True), TypeError, "lr"),
    (dict(lr=np.True_), TypeError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(lr=np.array("0.1")), TypeError, "lr"),
    (dict(lr=10**400), ValueError, "lr"),
    (dict(lr=-(10**400)), ValueError, "lr"),
    (dict(eps=False), TypeError, "eps"),
    (dict(eps=10**400), ValueError, "eps"),
    (dict(weight_decay="1"), TypeError, "weight_decay"),
    (dict(weight_decay=True), TypeError, "weight_decay"),
    (dict(betas="ab"), TypeError, "betas"),
    (dict(betas="12"), TypeError, "betas"),
    (dict(betas=(True, 0.9)), TypeError, r"betas\[0\]"),
    (dict(betas=(0.9, "0.9")), TypeError, r"betas\[1\]"),
    (dict(betas=(0.9, 10**400)), ValueError, r"betas\[1\]"),
    (dict(step=True), TypeError, "step"),
    (dict(step="1"), TypeError, "step"),
    (dict(step=10**400), ValueError, "step"),
    (dict(step=2**63), ValueError, "step"),
    (dict(step=1e300), ValueError, "step"),
    (dict(n_threads=True), TypeError, "n_threads"),
    (dict(n_threads="2"), TypeError, "n_threads"),
    (dict(maximize="false"), TypeError, "maximize"),
    (dict(amsgrad=1), TypeError, "amsgrad"),
    (dict(decoupled_weight_decay="yes"), TypeError, "decoupled_weight_decay"),
]
DENSE_ONLY = [
    (dict(grad_scale="2"), TypeError, "grad_scale"),
    (dict(grad_scale=True), TypeError, "grad_scale"),
    (dict(grad_scale=10**400), ValueError, "grad_scale"),
]


@pytest.mark.parametrize("kw,exc,name", BAD_SCALARS + DENSE_ONLY,
                         ids=[repr(c[0])[:40] for c in BAD_SCALARS + DENSE_ONLY])
@pytest.mark.parametrize("entry", ["adam_step", "adam_list", "optim"])
def test_bad_scalar_dense(kw, exc, name, entry):
    b = _dense()
    p, g, m, v, vm = b
    kw = dict(kw)
    step = kw.pop("step", 1)
    if entry == "adam_step":
        _rejects(lambda: fa.adam_step(p, g, m, v, step=step, max_exp_avg_sq=vm, **kw),
                 b, exc, name)
    elif entry == "adam_list":
        p2, g2, m2, v2, vm2 = _dense(np.float64)
        b += [p2, g2, m2, v2, vm2]
        _rejects(lambda: F.adam([p, p2], [g, g2], [m, m2], [v, v2], steps=step,
                                max_exp_avg_sqs=[vm, vm2], **kw), b, exc, name)
    else:
        if "step" in name or "grad_scale" in name:
            opt = fa.Adam([p])
            if name == "step":
                pytest.skip("optimizers count their steps")
            _rejects(lambda: opt.step([g], grad_scale=kw["grad_scale"]), b, exc, name)
        else:
            with pytest.raises(exc, match=name):
                fa.Adam([p], **kw)


@pytest.mark.parametrize("kw,exc,name", BAD_SCALARS, ids=[repr(c[0])[:40] for c in BAD_SCALARS])
def test_bad_scalar_sparse(kw, exc, name):
    b = _sparse()
    kw = dict(kw)
    step = kw.pop("step", 1)
    _rejects(lambda: fa.sparse_adam_step(*b, step=step, **kw), b, exc, name)
    _rejects(lambda: F.plan_sparse_adam(*b, step=step, **kw), b, exc, name)
    if name not in ("step",):
        with pytest.raises(exc, match=name):
            fa.SparseAdam(b[0], **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gs", [1e-46, 1e39, 1e-39, 5e-324, 1e309 / 10, 1.7e308])
def test_grad_scale_out_of_range_for_the_arithmetic(dtype, gs):
    """Rounded to float32, 1e-46 is 0 (NaN gradients) and 1e39 is inf (zero
    gradients): rejected for float32 calls; float64 takes what it can."""
    b = _dense(dtype)
    p, g, m, v, _ = b
    ct = np.float32 if dtype == np.float32 else np.float64
    with np.errstate(all="ignore"):
        ok = np.isfinite(ct(gs)) and ct(gs) > 0 and np.isfinite(1 / ct(gs)) and 1 / ct(gs) > 0
    if ok:
        fa.adam_step(p, g, m, v, step=1, grad_scale=gs)
        assert np.isfinite(p).all()
    else:
        _rejects(lambda: fa.adam_step(p, g, m, v, step=1, grad_scale=gs), b, ValueError,
                 "grad_scale")
        _rejects(lambda: F.adam([p, p.copy()], [g, g], [m, m.copy()], [v, v.copy()], steps=1,
                                grad_scale=gs), b, ValueError, "grad_scale")


def test_grad_scale_checked_per_dtype_of_a_mixed_list():
    p32, g32, m32, v32, _ = _dense(np.float32)
    p64, g64, m64, v64, _ = _dense(np.float64)
    # fine for float64 alone
    F.adam([p64, p64.copy()], [g64, g64], [m64, m64.copy()], [v64, v64.copy()], steps=1,
           grad_scale=1e39)
    b = [p32, m32, v32, p64, m64, v64]
    _rejects(lambda: F.adam([p64, p32], [g64, g32], [m64, m32], [v64, v32], steps=1,
                            grad_scale=1e39), b, ValueError, "grad_scale")


def test_good_scalars_still_accepted():
    p, g, m, v, _ = _dense()
    fa.adam_step(p, g, m, v, step=np.int64(3), lr=np.float32(0.1), betas=[0.5, np.float64(0.9)],
                 eps=0, weight_decay=np.array(0.1), grad_scale=2, maximize=np.bool_(True),
                 n_threads=np.int64(1))
    fa.adam_step(p, g, m, v, step=2.0, lr=1, betas=(0, 0))
    fa.adam_step(p, g, m, v, step=2**63 - 1)
