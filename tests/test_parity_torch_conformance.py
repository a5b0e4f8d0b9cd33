"""Conformance with ``torch.optim.Adam/AdamW(fused=True)``: every length, every beta.

torch's CPU fused Adam treats two things specially that a lab case (beta1 =
0.9, lengths a multiple of 16) never reaches: ``exp_avg.lerp_(grad, 1 - beta1)``
switches formula when the weight ``1 - beta1`` is >= 0.5 (beta1 <= 0.5), and
the last ``numel % lanes`` elements of each tensor run a scalar loop whose
second moment is rounded differently (``fastadam._reference.adam``). These
tests run torch and fastadam side by side for 300 steps on every length
1..40, 100 and 1000 (all in one optimizer, so every tensor has its own tail),
on 2**20 + 3 for a few steps, for both dtypes and every option, and train a
small classifier with a 10-class head.
"""
import numpy as np
import pytest
from _options import TORCH, TORCH_SCALED
from conftest import assert_bitwise, importable_isas, make_state

import fastadam as fa
from fastadam import _plan
from fastadam import _reference as ref

torch = pytest.importorskip("torch")

LENGTHS = list(range(1, 41)) + [100, 1000]
BETA1S = [0.0, 0.3, 0.5, 0.51, 0.9]
OPTIONS = TORCH + TORCH_SCALED
BIG = 2**20 + 3


def _torch_opt(tps, opt, beta1, lr=1e-2):
    cls = torch.optim.AdamW if opt.decoupled else torch.optim.Adam
    return cls(tps, lr=lr, betas=(beta1, 0.99), eps=1e-6, weight_decay=opt.weight_decay,
               amsgrad=opt.amsgrad, maximize=opt.maximize, fused=True)


def _fa_step(api, bufs, gs, t, opt, beta1, n_threads, lr=1e-2):
    kw = opt.kwargs(lr=lr, betas=(beta1, 0.99))
    ams = kw.pop("amsgrad")
    if api == "multi":
        fa.functional.adam([b[0] for b in bufs], gs, [b[1] for b in bufs],
                           [b[2] for b in bufs], steps=t, amsgrad=ams,
                           max_exp_avg_sqs=[b[3] for b in bufs] if ams else None,
                           n_threads=n_threads, **kw)
    else:
        for b, g in zip(bufs, gs):
            fa.adam_step(b[0], g, b[1], b[2], step=t, amsgrad=ams,
                         max_exp_avg_sq=b[3] if ams else None, n_threads=n_threads, **kw)


def _run_both(lengths, dtype, opt, beta1, steps, api="multi", n_threads=1, seed=0):
    """Same gradients into torch fused and fastadam; returns (fastadam, torch) buffers."""
    rng = np.random.default_rng(seed)
    ps = [rng.standard_normal(n).astype(dtype) for n in lengths]
    bufs = [(p, np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)) for p in ps]
    tps = [torch.from_numpy(p.copy()) for p in ps]
    topt = _torch_opt(tps, opt, beta1)
    scale = opt.grad_scale
    for t in range(1, steps + 1):
        gs = [rng.standard_normal(n).astype(dtype) for n in lengths]
        if scale is not None:
            gs = [g * dtype(scale) for g in gs]  # a power of two: exact
            topt.grad_scale = torch.tensor(scale, dtype=torch.float32)
            topt.found_inf = torch.tensor(0.0, dtype=torch.float32)
        for tp, g in zip(tps, gs):
            tp.grad = torch.from_numpy(g.copy())  # torch unscales grads in place
        topt.step()
        _fa_step(api, bufs, gs, t, opt, beta1, n_threads)
    theirs = []
    for tp in tps:
        st = topt.state[tp]
        theirs.append((tp.numpy(), st["exp_avg"].numpy(), st["exp_avg_sq"].numpy(),
                       st["max_exp_avg_sq"].numpy() if opt.amsgrad else None))
    return [(b[0], b[1], b[2], b[3] if opt.amsgrad else None) for b in bufs], theirs


def _assert_all(ours, theirs, what):
    for a, e in zip(ours, theirs):
        assert_bitwise(list(a), list(e), f"{what}, tensor of {a[0].size} elements "
                                         "(param, exp_avg, exp_avg_sq, max_exp_avg_sq)")


# every option through the multi-array kernel; plain, all options and all options
# with grad_scale also through single-array calls
CASES = ([(o, "multi") for o in OPTIONS]
         + [(o, "single") for o in (TORCH[0], TORCH[-1], TORCH_SCALED[-1])])


@pytest.mark.parametrize("beta1", BETA1S)
@pytest.mark.parametrize("opt, api", CASES, ids=[f"{o.id}-{a}" for o, a in CASES])
def test_every_length_every_beta_300_steps(dtype, opt, beta1, api):
    """Lengths 1..40, 100, 1000 in one optimizer, 300 steps: bitwise equal."""
    ours, theirs = _run_both(LENGTHS, dtype, opt, beta1, 300, api=api)
    _assert_all(ours, theirs, f"beta1={beta1} {opt.id} {api}")


@pytest.mark.parametrize("beta1", [0.3, 0.9])
@pytest.mark.parametrize("opt", [TORCH[0], TORCH[-1], TORCH_SCALED[-1]], ids=lambda o: o.id)
def test_big_length_with_tail(dtype, opt, beta1):
    """2**20 + 3 elements (torch: 3 tail elements, fastadam: 2 threads), a few steps."""
    ours, theirs = _run_both([BIG], dtype, opt, beta1, 3, api="single", n_threads=2)
    _assert_all(ours, theirs, f"beta1={beta1} {opt.id}")


def test_vector_width_matches_torch(dtype):
    """Exactly one of the widths fastadam can be told matches torch here: the chosen one.

    Length 12 (float32) / 6 (float64) tells 16, 32 and 64 bytes apart (all
    vector, vector + tail, all tail). Guards against a torch that changes its
    dispatch (e.g. registers an AVX-512 fused Adam: then set
    FASTADAM_TORCH_VECTOR_BYTES=64 and update the default).
    """
    n = 48 // np.dtype(dtype).itemsize
    lengths = [n] * 200
    opt = TORCH[0]
    matches = []
    for width in (16, 32, 64):
        saved = _plan.VECTOR_BYTES
        _plan.VECTOR_BYTES = width
        try:
            ours, theirs = _run_both(lengths, dtype, opt, 0.9, 3)
        finally:
            _plan.VECTOR_BYTES = saved
        same = all(np.array_equal(a[2].view(np.uint8), e[2].view(np.uint8))
                   for a, e in zip(ours, theirs))
        if same:
            matches.append(width)
    assert matches == [_plan.VECTOR_BYTES], (matches, _plan.VECTOR_BYTES_REASON)


def test_vector_width_choice_and_override():
    assert _plan.torch_vector_bytes(env="", machine="x86_64")[0] == 32
    assert _plan.torch_vector_bytes(env="", machine="AMD64")[0] == 32
    assert _plan.torch_vector_bytes(env="", machine="aarch64")[0] == 16
    assert _plan.torch_vector_bytes(env="64", machine="x86_64") == (64, "forced by "
                                                                     "FASTADAM_TORCH_VECTOR_BYTES")
    for bad in ("48", "avx2", "0"):
        with pytest.raises(ValueError, match="FASTADAM_TORCH_VECTOR_BYTES"):
            _plan.torch_vector_bytes(env=bad)


@pytest.mark.parametrize("width", [16, 32, 64])
@pytest.mark.parametrize("beta1", [0.3, 0.9])
def test_isa_modules_and_threads_bitwise_any_width(dtype, width, beta1, use_isa, monkeypatch):
    """The tail width is a per-call value: every ISA module and thread count gives
    the same bits for the same width (single and multi-array calls), and the
    kernels agree with the reference's tail rule."""
    monkeypatch.setattr(_plan, "VECTOR_BYTES", width)
    sizes = [1, 7, 13, 100, 70001, 2**17 + 5]
    opt = TORCH_SCALED[-1]
    kw = opt.kwargs(betas=(beta1, 0.99))
    ams = kw.pop("amsgrad")
    results = []
    for isa in importable_isas():
        use_isa(isa)
        for nt in (1, 2):
            single = [make_state(n, dtype, seed=n) for n in sizes]
            multi = [make_state(n, dtype, seed=n) for n in sizes]
            for b in single:
                fa.adam_step(b[0], b[1], b[2], b[3], step=3, amsgrad=ams, max_exp_avg_sq=b[4],
                             n_threads=nt, **kw)
            fa.functional.adam(*([b[j] for b in multi] for j in range(4)), steps=3,
                               amsgrad=ams, max_exp_avg_sqs=[b[4] for b in multi],
                               n_threads=nt, **kw)
            results.append((isa, nt, single, multi))
    first = results[0][2]
    for isa, nt, single, multi in results:
        for a, b, e in zip(single, multi, first):
            assert_bitwise(a, e, f"{isa} x{nt} single")
            assert_bitwise(b, e, f"{isa} x{nt} multi")
    if dtype == np.float32:  # the float32 reference has a true fma (float64 does not)
        for n, got in zip(sizes, first):
            e = make_state(n, dtype, seed=n)
            ref.adam(e[0], e[1], e[2], e[3], step=3, amsgrad=ams, max_exp_avg_sq=e[4],
                     vector_bytes=width, **kw)
            assert_bitwise([got[0], got[2], got[3], got[4]], [e[0], e[2], e[3], e[4]],
                           f"kernel vs reference, n={n}")


def _classifier(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 100), torch.nn.ReLU(),
                               torch.nn.Linear(100, 30), torch.nn.Tanh(),
                               torch.nn.Linear(30, 10))


@pytest.mark.parametrize("kind, kw", [
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.5, 0.999), amsgrad=True)),
    ("AdamW", dict(lr=1e-2, betas=(0.3, 0.99), weight_decay=0.05)),
], ids=["adam", "adam-b0.5-ams", "adamw-b0.3"])
def test_classifier_with_10_class_head_trains_bitwise(kind, kw):
    """An MLP (biases of 100, 30 and 10 elements, weights of 2000, 3000, 300)
    trained 120 steps on synthetic data: fastadam.torch vs torch fused, every
    parameter bitwise equal after every step."""
    import fastadam.torch as fat
    ours, theirs = _classifier(0), _classifier(0)
    opt_a = getattr(fat, kind)(ours.parameters(), **kw)
    opt_b = getattr(torch.optim, kind)(theirs.parameters(), fused=True, **kw)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 20, generator=gen)
    y = torch.randint(0, 10, (512,), generator=gen)
    loss_fn = torch.nn.CrossEntropyLoss()
    for step in range(120):
        idx = torch.randint(0, 512, (64,), generator=gen)
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (step, name)
    assert loss_fn(ours(x), y).item() < 2.0  # it learned something
