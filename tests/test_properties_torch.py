"""Property-based tests of the torch drop-ins (hypothesis).

Random parameter lists (0-size, 1-D, 2-D, transposed and strided views),
dtypes, options and hyperparameters (edges: 0, denormals, huge, NaN, inf,
negative), set on the param group after construction so that every value
reaches ``step``. Every call fastadam accepts matches torch.optim:
``fastadam.torch.Adam/AdamW`` bitwise against the same class with
``fused=True`` (NaN = NaN), ``SparseAdam`` within a few ulp of
``torch.optim.SparseAdam`` (duplicate ids are summed in another order). Every
call fastadam rejects raises an error naming the argument and leaves every
parameter, state tensor and step bit-identical.
"""
import math

import pytest

torch = pytest.importorskip("torch")
hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastadam import torch as fat  # noqa: E402

pytestmark = pytest.mark.torch
SETTINGS = dict(deadline=None, max_examples=60, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DENORMAL = {torch.float32: 1e-40, torch.float64: 1e-310}
BAD = [math.nan, math.inf, -math.inf, -1.0]
MESSAGE = {"lr": "lr must be", "eps": "eps must be", "weight_decay": "weight_decay must be",
           "beta1": r"betas\[0\]", "beta2": r"betas\[1\]"}


def _value(kind, dtype, good):
    """A hyperparameter value of ``kind``: an ordinary one, an edge or a bad one."""
    return {"good": good, "zero": 0.0, "denormal": DENORMAL[dtype], "huge": 1e30,
            "nan": math.nan, "inf": math.inf, "neg": -1.0}[kind]


KINDS = st.sampled_from(["good", "good", "good", "zero", "denormal", "huge", "nan", "inf",
                         "neg"])


@st.composite
def param_specs(draw):
    """Shapes and layouts: ('flat', n), ('2d', a, b), ('t', a, b) a transposed
    (b, a) tensor, ('strided', n) every other element of a 2n vector."""
    n_params = draw(st.integers(1, 3))
    specs = []
    for _ in range(n_params):
        kind = draw(st.sampled_from(["flat", "flat", "2d", "t", "strided"]))
        if kind in ("flat", "strided"):
            specs.append((kind, draw(st.sampled_from([0, 1, 7, 8, 16, 17, 40]))))
        else:
            specs.append((kind, draw(st.integers(0, 5)), draw(st.integers(1, 9))))
    return specs


def _make(spec, dtype, gen):
    kind = spec[0]
    if kind == "flat":
        t = torch.randn(spec[1], generator=gen, dtype=dtype)
    elif kind == "strided":
        t = torch.randn(2 * spec[1], generator=gen, dtype=dtype)[::2]
    elif kind == "2d":
        t = torch.randn(spec[1], spec[2], generator=gen, dtype=dtype)
    else:
        t = torch.randn(spec[2], spec[1], generator=gen, dtype=dtype).t()
    return t


def _clone_like(t):
    """A parameter with t's values AND t's layout (strides)."""
    base = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype) if t.numel() else \
        torch.empty(t.shape, dtype=t.dtype)
    if t.is_contiguous() or t.numel() == 0 or t.t().is_contiguous():
        base.copy_(t)
        return base
    big = torch.zeros(2 * t.numel(), dtype=t.dtype)   # a strided view, like the source
    v = big[::2]
    v.copy_(t)
    return v


_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def _bits(t):
    x = t.detach().contiguous().reshape(-1)
    return x.view(_INT[x.dtype]).clone() if x.dtype in _INT else x.clone()


def _snapshot(opt, ps):
    """Per parameter: its bits and its state's (None: no state yet)."""
    return [(_bits(p), {k: _bits(v) if isinstance(v, torch.Tensor) else v
                        for k, v in opt.state[p].items()} if opt.state.get(p) else None)
            for p in ps]


def _same(after, before):
    """Bit-identical; state created by the rejected first step may remain, zeroed."""
    for (pa, sa), (pb, sb) in zip(after, before):
        assert torch.equal(pa, pb), "a parameter was written"
        if sb is None:
            assert all(not v.any() if isinstance(v, torch.Tensor) else v == 0
                       for v in (sa or {}).values()), "new state is not zero"
            continue
        assert sa is not None and sa.keys() == sb.keys()
        for k in sb:
            x, y = sa[k], sb[k]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, k


def _assert_equal(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@settings(**SETTINGS)
@given(specs=param_specs(), dtype=st.sampled_from([torch.float32, torch.float64]),
       cls=st.sampled_from(["Adam", "AdamW"]), amsgrad=st.booleans(), maximize=st.booleans(),
       lr=KINDS, eps=KINDS, wd=KINDS, beta1=st.sampled_from([0.0, 0.3, 0.5, 0.51, 0.9, "bad"]),
       beta2=st.sampled_from([0.0, 0.9, 0.999, "bad"]), steps=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_dense_matches_torch_fused_or_rejects_cleanly(specs, dtype, cls, amsgrad, maximize, lr,
                                                      eps, wd, beta1, beta2, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    srcs = [_make(s, dtype, gen) for s in specs]
    ps = [torch.nn.Parameter(_clone_like(t)) for t in srcs]
    # torch's fused CPU Adam (2.13) pairs a non-contiguous param (a [::2] view, or a
    # transposed one whose grad is contiguous) with the wrong gradient elements. The
    # update is elementwise, so torch steps contiguous copies: the true result.
    qs = [torch.nn.Parameter(t.contiguous().clone()) for t in srcs]
    values = {"lr": _value(lr, dtype, 1e-2), "eps": _value(eps, dtype, 1e-8),
              "weight_decay": _value(wd, dtype, 1e-2)}
    b1 = math.nan if beta1 == "bad" else beta1
    b2 = 1.0 if beta2 == "bad" else beta2
    a = getattr(fat, cls)(ps, amsgrad=amsgrad, maximize=maximize)
    b = getattr(torch.optim, cls)(qs, amsgrad=amsgrad, maximize=maximize, fused=True)
    for o in (a, b):
        o.param_groups[0].update(values, betas=(b1, b2))
    bad = [k for k, v in values.items() if not (math.isfinite(v) and v >= 0)]
    bad += ["beta1"] if beta1 == "bad" else []
    bad += ["beta2"] if beta2 == "bad" else []
    for s in range(steps):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape, generator=gen, dtype=dtype)
            if s == 1:
                g = g * 1e20   # large gradients too
            p.grad = g
            q.grad = g.clone()
        before = _snapshot(a, ps)
        if bad:
            with pytest.raises((ValueError, TypeError), match="|".join(MESSAGE[k] for k in bad)):
                a.step()
            _same(_snapshot(a, ps), before)
            return
        a.step()
        b.step()
        for p, q in zip(ps, qs):
            _assert_equal(p.detach(), q.detach())
            for k, v in b.state[q].items():
                _assert_equal(a.state[p][k].to(v.dtype) if k == "step" else a.state[p][k], v)


@settings(**SETTINGS)
@given(rows=st.integers(1, 12), dim=st.integers(1, 9), dtype=st.sampled_from([torch.float32,
                                                                              torch.float64]),
       n_params=st.integers(1, 2), lr=st.sampled_from(["good", "good", "zero", "denormal",
                                                         "nan", "inf", "neg"]),
       eps=st.sampled_from(["good", "good", "huge", "nan", "inf", "neg"]),
       beta1=st.sampled_from([0.0, 0.5, 0.9, "bad"]), beta2=st.sampled_from([0.0, 0.999, "bad"]),
       maximize=st.booleans(), steps=st.integers(1, 3), seed=st.integers(0, 2**16),
       data=st.data())
def test_sparse_adam_matches_torch_or_rejects_cleanly(rows, dim, dtype, n_params, lr, eps, beta1,
                                                      beta2, maximize, steps, seed, data):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(rows, dim, generator=gen, dtype=dtype) for _ in range(n_params)]
    ps = [torch.nn.Parameter(t.clone()) for t in base]
    qs = [torch.nn.Parameter(t.clone()) for t in base]
    values = {"lr": _value(lr, dtype, 1e-2), "eps": _value(eps, dtype, 1e-8)}
    b1 = -0.5 if beta1 == "bad" else beta1
    b2 = math.inf if beta2 == "bad" else beta2
    a = fat.SparseAdam(ps, maximize=maximize)
    b = torch.optim.SparseAdam(qs, maximize=maximize)
    for o in (a, b):
        o.param_groups[0].update(values, betas=(b1, b2))
    bad = [k for k, v in values.items() if not (math.isfinite(v) and v >= 0)]
    bad += ["beta1"] if beta1 == "bad" else []
    bad += ["beta2"] if beta2 == "bad" else []
    out_of_range = data.draw(st.booleans()) and not bad
    for s in range(steps):
        for p, q in zip(ps, qs):
            k = data.draw(st.integers(0, 8))
            ids = torch.tensor([data.draw(st.lists(st.integers(0, rows - 1), min_size=k,
                                                   max_size=k))], dtype=torch.int64)
            if out_of_range and s == steps - 1 and p is ps[-1]:
                ids = torch.cat([ids, torch.tensor([[rows]])], 1)
            vals = torch.randn(ids.shape[1], dim, generator=gen, dtype=dtype)
            p.grad = torch.sparse_coo_tensor(ids, vals, (rows, dim), check_invariants=False)
            q.grad = torch.sparse_coo_tensor(ids.clone(), vals.clone(), (rows, dim),
                                             check_invariants=False)
        before = _snapshot(a, ps)
        if bad or (out_of_range and s == steps - 1):
            match = "|".join(MESSAGE[k] for k in bad) if bad else "out of range"
            with pytest.raises((ValueError, TypeError, IndexError), match=match):
                a.step()
            _same(_snapshot(a, ps), before)
            return
        a.step()
        b.step()
        tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else \
            dict(rtol=1e-14, atol=1e-15)
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p.detach(), q.detach(), equal_nan=True, **tol)
            assert a.state[p]["step"] == b.state[q]["step"]
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(a.state[p][key], b.state[q][key], equal_nan=True,
                                           **tol)
