"""16-bit parameters, gradients and state (issue 12): codecs, every dtype
combination against the reference, all-bf16/all-fp16 bitwise against
torch fused, the param_copy output, validation.

Stochastic rounding: tests/test_lowp_sr.py.
"""
import numpy as np
import pytest
from _options import TORCH, TORCH_SCALED, Dense
from conftest import THREADS, assert_bitwise, assert_close, importable_isas, isa_module

import fastadam as fa
from fastadam import _interface as I
from fastadam import _plan
from fastadam import _reference as R

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
NP = {"float32": F32, "float64": np.dtype(np.float64), "bfloat16": BF16, "float16": F16}
LOWP = {"bf16": BF16, "f16": F16}
SIZES = [1, 15, 16, 17, 33, 1000 + 5]     # torch's tails: n % 16 (bf16/fp16), n % 8 (fp32)


def _bits(a):
    return np.asarray(a).view(f"u{np.asarray(a).itemsize}")


def _state(n, dt_p, dt_g, dt_s, seed=0, amsgrad=False):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32).astype(dt_p)
    g = rng.standard_normal(n).astype(np.float32).astype(dt_g)
    m = (0.1 * rng.standard_normal(n)).astype(np.float32).astype(dt_s)
    v = (0.01 * rng.random(n)).astype(np.float32).astype(dt_s)
    vm = (np.asarray(v, np.float32) + 0.01 * rng.random(n)).astype(np.float32).astype(dt_s)
    return p, g, m, v, (vm if amsgrad else None)


def _ulps16(a, e, dt):
    """|a - e| in units of the 16-bit format's spacing at e (float32 values)."""
    a = np.asarray(a, np.float64)
    e = np.asarray(e, np.float64)
    fi = ml_dtypes.finfo(dt) if dt == BF16 else np.finfo(dt)
    spacing = np.maximum(np.abs(e), float(fi.smallest_normal)) * float(fi.eps)
    return np.abs(a - e) / spacing


# ------------------------------------------------------------------ codecs

def _interesting_f32():
    """Every bf16 upper half with 12 low halves (ties, just above/below,
    max), random float32 bit patterns, and specials."""
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1000, 0x2000, 0x0FFF, 0x1001,
                     0x3000, 0xE000], np.uint32)
    rng = np.random.default_rng(5)
    rand = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([(hi[:, None] | lows[None, :]).ravel(), rand]).view(np.float32)


@pytest.mark.parametrize("isa", importable_isas())
@pytest.mark.parametrize("codec", ["bf16", "f16"])
def test_store_rounds_to_nearest_even(isa, codec):
    """The kernels' 16-bit store is RNE (subnormals, overflow to inf, NaN as
    torch's) for every ISA module, against numpy / ml_dtypes and the reference."""
    mod = isa_module(isa)
    x = _interesting_f32()
    dt = LOWP[codec]
    out = np.empty(x.size, np.uint16)
    for tail in (0, 1):
        mod.round_to(x, out, codec, tail)
        ref = R.round_rne(x, dt, np.full(x.size, bool(tail))).view(np.uint16)
        assert_bitwise([out], [ref], f"{codec} tail={tail}")
    if codec == "f16":
        # the loops' block conversion (vcvtps2ph on ymm/zmm in the F16C modules),
        # every offset of the vector remainder included
        ref = R.round_rne(x, dt).view(np.uint16)
        for start in range(17):
            blk = np.empty(x.size - start, np.uint16)
            mod.round_to(x[start:], blk, codec, 0, 1)
            assert_bitwise([blk], [ref[start:]], f"block store from {start}")
    finite = ~np.isnan(x)
    mod.round_to(x, out, codec, 0)
    with np.errstate(all="ignore"):
        lib = x[finite].astype(dt).view(np.uint16)     # ml_dtypes / numpy RNE
    assert_bitwise([out[finite]], [lib])
    nan = out[np.isnan(x)]
    if codec == "bf16":
        assert np.all(nan == 0xFFFF)
        mod.round_to(x, out, codec, 1)
        assert np.all(out[np.isnan(x)] == 0x7FC0)
    else:
        # F16C's (and torch's) NaN: quieted, the top 10 payload bits kept
        u = x[np.isnan(x)].view(np.uint32)
        want = ((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x3FF)
        assert np.array_equal(nan, want.astype(np.uint16))


@pytest.mark.parametrize("isa", importable_isas())
@pytest.mark.parametrize("codec", ["bf16", "f16"])
def test_load_is_exact(isa, codec):
    """Widening every one of the 65536 patterns is exact (subnormals, inf, NaN kept NaN)."""
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(h.size, np.float32)
    isa_module(isa).widen(h, out, codec)
    ref = h.view(LOWP[codec]).astype(np.float32)
    nan = np.isnan(ref)
    assert_bitwise([out[~nan]], [ref[~nan]])
    assert np.all(np.isnan(out[nan]))
    if codec == "f16":
        # NaN widened quiet, payload kept (vcvtph2ps and the software codec alike)
        hn = h[nan].astype(np.uint32)
        want = ((hn & 0x8000) << 16) | 0x7FC00000 | ((hn & 0x3FF) << 13)
        assert np.array_equal(out[nan].view(np.uint32), want)
        for start in range(17):          # the loops' block conversion (vcvtph2ps)
            blk = np.empty(h.size - start, np.float32)
            isa_module(isa).widen(h[start:], blk, codec, 1)
            assert_bitwise([blk], [out[start:]], f"block load from {start}")


# --------------------------------------------------- all-bf16 / all-fp16 vs torch

torch = pytest.importorskip("torch")
TDT = {"bf16": torch.bfloat16, "f16": torch.float16}


def _as_torch(a, codec):
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16).copy()).view(TDT[codec])


def _np_of(t, codec):
    return t.detach().view(torch.int16).numpy().view(LOWP[codec])


def _torch_run(codec, o, n, betas, steps, seed, n_threads=1):
    """``steps`` steps of torch fused and fastadam on the same random 16-bit
    gradients; returns (fastadam buffers, torch buffers)."""
    dt = LOWP[codec]
    p, _, _, _, _ = _state(n, dt, dt, dt, seed)
    m, v, vm = (np.zeros(n, dt) for _ in range(3))
    tp = _as_torch(p, codec).requires_grad_()
    cls = torch.optim.AdamW if o.decoupled else torch.optim.Adam
    topt = cls([tp], lr=1e-2, betas=betas, eps=1e-6, weight_decay=o.weight_decay,
               amsgrad=o.amsgrad, maximize=o.maximize, fused=True)
    rng = np.random.default_rng(seed + 1)
    for t in range(1, steps + 1):
        g = (rng.standard_normal(n) * (o.grad_scale or 1.0)).astype(np.float32).astype(dt)
        tp.grad = _as_torch(g, codec)
        if o.grad_scale:
            topt.grad_scale = torch.tensor(o.grad_scale, dtype=torch.float32)
            topt.found_inf = torch.tensor(0.0, dtype=torch.float32)
        topt.step()
        fa.adam_step(p, g, m, v, step=t, lr=1e-2, betas=betas, eps=1e-6,
                     weight_decay=o.weight_decay, decoupled_weight_decay=o.decoupled,
                     amsgrad=o.amsgrad, max_exp_avg_sq=vm if o.amsgrad else None,
                     maximize=o.maximize, grad_scale=o.grad_scale, n_threads=n_threads)
    st = topt.state[tp]
    ours = [p, m, v] + ([vm] if o.amsgrad else [])
    theirs = [_np_of(tp, codec), _np_of(st["exp_avg"], codec), _np_of(st["exp_avg_sq"], codec)]
    if o.amsgrad:
        theirs.append(_np_of(st["max_exp_avg_sq"], codec))
    return ours, theirs


@pytest.mark.parametrize("codec", ["bf16", "f16"])
@pytest.mark.parametrize("o", TORCH + TORCH_SCALED, ids=lambda o: o.id)
@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.3, 0.95)], ids=["lerp-lo", "lerp-hi"])
def test_bitwise_equal_to_torch_fused(codec, o, betas):
    """Every torch option, both lerp formulas, lengths with and without
    torch's 16-lane scalar tail, 4 steps."""
    for n in (16, 37, 1000 + 5):
        ours, theirs = _torch_run(codec, o, n, betas, 4, seed=n)
        assert_bitwise(ours, theirs, f"{codec} {o.id} n={n}")


@pytest.mark.parametrize("codec", ["bf16", "f16"])
@pytest.mark.parametrize("isa", importable_isas())
def test_bitwise_torch_every_isa_and_thread_count(codec, isa, use_isa):
    use_isa(isa)
    o = Dense(0.1, True, True, False)
    for nt in THREADS:
        ours, theirs = _torch_run(codec, o, 2**16 + 17, (0.9, 0.99), 2, seed=3, n_threads=nt)
        assert_bitwise(ours, theirs, f"{codec} {isa} threads={nt}")


@pytest.mark.parametrize("isa", importable_isas())
def test_f16_nan_payloads_as_torch(isa, use_isa):
    """fp16 params holding NaNs with payloads (quiet and signalling, both signs)
    come out of a step as torch fused's: quieted, payload kept (F16C's rule,
    which the software codec of the baseline module follows too)."""
    use_isa(isa)
    n = 37                                    # 32 in the vector loop, 5 in the tail
    nans = np.array([0x7E01, 0xFD55, 0x7FFF, 0xFC01, 0x7C01, 0xFE00], np.uint16)
    p = np.resize(nans, n).view(np.float16).copy()
    p[::7] = np.float16(0.5)
    g = np.linspace(-1, 1, n).astype(np.float16)
    m, v = np.zeros(n, np.float16), np.zeros(n, np.float16)
    tp = _as_torch(p, "f16").requires_grad_()
    tp.grad = _as_torch(g, "f16")
    torch.optim.Adam([tp], lr=1e-2, fused=True).step()
    fa.adam_step(p, g, m, v, step=1, lr=1e-2)
    assert_bitwise([p.view(np.uint16)], [_np_of(tp, "f16").view(np.uint16)])
    assert np.any(p.view(np.uint16) == 0x7E01) and np.any(p.view(np.uint16) == 0xFF55)


def test_simd_modules_need_f16c(monkeypatch):
    """The avx2 / avx512 modules convert fp16 with F16C: a CPU without it
    (or a probe that says so) gets the baseline module."""
    from fastadam import _dispatch
    feats = dict(_dispatch.cpu_features(), f16c=False)
    monkeypatch.setattr(_dispatch, "cpu_features", lambda: feats)
    for isa in ("avx2", "avx512"):
        ok, why = _dispatch.supported(isa)
        assert not ok and "f16c" in why


# ------------------------------------------------------- every combination vs reference

DENSE_KEYS = sorted({k[1:] for k in I.KERNELS if k[0] == "adam"})
OPTS = [Dense(), Dense(0.05), Dense(0.05, True, True, True), Dense(0.0, False, True, False, 128.0)]


def _check_vs_reference(bufs, ref, dts):
    for a, e, dt in zip(bufs, ref, dts):
        if a is None:
            continue
        if dt in (BF16, F16):
            assert np.max(_ulps16(np.asarray(a, np.float32), np.asarray(e, np.float32), dt),
                          initial=0) <= 1.0
            # and nearly always the same bits (the reference's float32 fma
            # rounds twice in rare cases)
            assert np.mean(_bits(a) != _bits(e)) < 0.01
        else:
            assert_close([a], [e], dt)


@pytest.mark.parametrize("key", DENSE_KEYS, ids=lambda k: "-".join(k))
@pytest.mark.parametrize("o", OPTS, ids=lambda o: o.id)
def test_every_combination_matches_reference(key, o):
    dt_p, dt_g, dt_s = (NP[k] for k in key)
    for n in SIZES:
        p, g, m, v, vm = _state(n, dt_p, dt_g, dt_s, seed=n, amsgrad=o.amsgrad)
        rp, rm, rv, rvm = (None if a is None else a.copy() for a in (p, m, v, vm))
        for t in (1, 2):
            kw = o.kwargs(betas=(0.9, 0.99))
            fa.adam_step(p, g, m, v, step=t, max_exp_avg_sq=vm, **kw)
            R.adam(rp, g, rm, rv, step=t, max_exp_avg_sq=rvm, **kw)
        _check_vs_reference([p, m, v, vm], [rp, rm, rv, rvm], [dt_p, dt_s, dt_s, dt_s])


@pytest.mark.parametrize("key", DENSE_KEYS, ids=lambda k: "-".join(k))
def test_every_combination_lists_equal_single_calls(key):
    """functional.adam over several arrays (one native call, mixed lengths,
    per-array steps) gives the bits of single-array calls, threads 1 and 2."""
    dt_p, dt_g, dt_s = (NP[k] for k in key)
    sizes = [5, 16, 4099, 70_000]
    for nt in THREADS:
        ones = [_state(n, dt_p, dt_g, dt_s, seed=n, amsgrad=True) for n in sizes]
        many = [tuple(None if a is None else a.copy() for a in st) for st in ones]
        for i, (p, g, m, v, vm) in enumerate(ones):
            fa.adam_step(p, g, m, v, step=i + 1, amsgrad=True, max_exp_avg_sq=vm,
                         weight_decay=0.01, n_threads=1)
        fa.functional.adam([s[0] for s in many], [s[1] for s in many], [s[2] for s in many],
                           [s[3] for s in many], steps=[1, 2, 3, 4], amsgrad=True,
                           max_exp_avg_sqs=[s[4] for s in many], weight_decay=0.01,
                           n_threads=nt)
        for a, b in zip(ones, many):
            assert_bitwise([a[0], a[2], a[3], a[4]], [b[0], b[2], b[3], b[4]], f"nt={nt}")


def test_float32_params_with_16bit_grads_equal_float32_on_widened_grads():
    """f32 params + bf16/fp16 grads: exactly the float32 kernel on the widened gradient."""
    for dt in (BF16, F16):
        p, g, m, v, _ = _state(4099, F32, dt, F32, seed=2)
        p2, m2, v2 = p.copy(), m.copy(), v.copy()
        fa.adam_step(p, g, m, v, step=3, weight_decay=0.1)
        fa.adam_step(p2, g.astype(np.float32), m2, v2, step=3, weight_decay=0.1)
        assert_bitwise([p, m, v], [p2, m2, v2])


def test_bf16_state_is_float32_state_rounded():
    """f32 params + bf16 state, one step from bf16-representable state: the
    params are the float32 kernel's bit for bit, the state its RNE rounding."""
    p, g, m, v, _ = _state(4099, F32, F32, BF16, seed=4)
    p2, m2, v2 = p.copy(), m.astype(np.float32), v.astype(np.float32)
    fa.adam_step(p, g, m, v, step=1)
    fa.adam_step(p2, g, m2, v2, step=1)
    assert_bitwise([p, m, v], [p2, R.round_rne(m2, BF16), R.round_rne(v2, BF16)])


# -------------------------------------------------------------- param_copy

COPY_KEYS = sorted(k[1:] for k in I.KERNELS if k[0] == "adam_copy")


@pytest.mark.parametrize("key", COPY_KEYS, ids=lambda k: "-".join(k))
def test_param_copy_is_the_rounded_master(key):
    """The copy is the RNE rounding of the updated float32 master, written in
    the same pass; the master and state are those of the kernel without copy."""
    dt_p, dt_g, dt_s, dt_c = (NP[k] for k in key)
    for n in SIZES + [70_001]:
        p, g, m, v, vm = _state(n, dt_p, dt_g, dt_s, seed=n, amsgrad=True)
        p2, m2, v2, vm2 = p.copy(), m.copy(), v.copy(), vm.copy()
        c = np.full(n, 7, dt_c)
        fa.adamw_step(p, g, m, v, step=2, amsgrad=True, max_exp_avg_sq=vm, param_copy=c)
        fa.adamw_step(p2, g, m2, v2, step=2, amsgrad=True, max_exp_avg_sq=vm2)
        assert_bitwise([p, m, v, vm], [p2, m2, v2, vm2])
        assert_bitwise([c], [R.round_rne(p, dt_c)])


def test_param_copies_in_lists():
    sizes = [3, 17, 5000]
    ps = [np.random.default_rng(n).standard_normal(n).astype(np.float32) for n in sizes]
    gs = [np.ones(n, BF16) for n in sizes]
    ms = [np.zeros(n, np.float32) for n in sizes]
    vs = [np.zeros(n, np.float32) for n in sizes]
    cs = [np.zeros(n, BF16) for n in sizes]
    for nt in THREADS:
        fa.functional.adam(ps, gs, ms, vs, steps=1, param_copies=cs, n_threads=nt)
        for p, c in zip(ps, cs):
            assert_bitwise([c], [R.round_rne(p, BF16)])


# --------------------------------------------------------------- bad input

def _rejects(exc, match, call, bufs):
    before = [None if b is None else b.copy() for b in bufs]
    with pytest.raises(exc, match=match):
        call()
    assert_bitwise(bufs, before, "a rejected call wrote")


def test_bad_input_writes_nothing():
    p, g, m, v, _ = _state(64, F32, BF16, F32)
    c = np.zeros(64, BF16)
    bufs = [p, m, v, c]
    _rejects(TypeError, "param_copy", lambda: fa.adam_step(
        p, g, m, v, step=1, param_copy=np.zeros(64, np.float64)), bufs)
    _rejects(ValueError, "param_copy must have the shape", lambda: fa.adam_step(
        p, g, m, v, step=1, param_copy=np.zeros(63, BF16)), bufs)
    _rejects(ValueError, "share memory", lambda: fa.adam_step(
        p, g, m, v, step=1, param_copy=m.view(BF16)[:64]), bufs)
    _rejects(ValueError, "cannot be combined", lambda: fa.adam_step(
        p, g, m, v, step=1, param_copy=c, stochastic_rounding=True), bufs)
    _rejects(TypeError, "stochastic_rounding=True: no kernel", lambda: fa.adam_step(
        p, g, m, v, step=1, stochastic_rounding=True), bufs)
    h = [np.zeros(64, F16) for _ in range(4)]
    _rejects(TypeError, "stochastic_rounding=True: no kernel", lambda: fa.adam_step(
        *h, step=1, stochastic_rounding=True), h)
    _rejects(TypeError, "grad: no kernel for the mixed combination", lambda: fa.adam_step(
        p, np.zeros(64, np.float64), m, v, step=1), bufs)
    _rejects(TypeError, "exp_avg: no kernel", lambda: fa.adam_step(
        p, g, np.zeros(64, F16), np.zeros(64, F16), step=1), bufs)
    _rejects(TypeError, "grad: no kernel", lambda: fa.adam_step(
        np.zeros(64, F16), g, m, v, step=1), bufs)
    _rejects(TypeError, "stochastic_rounding must be a bool", lambda: fa.adam_step(
        p, g, m, v, step=1, stochastic_rounding="yes"), bufs)
    _rejects(TypeError, r"param_copies\[1\]", lambda: fa.functional.adam(
        [p, p.copy()], [g, g], [m, m.copy()], [v, v.copy()], steps=1,
        param_copies=[c, np.zeros(64, np.int16)]), bufs)


def test_state_dtype_names_and_errors():
    assert _plan.state_dtype(F32, "bf16") == BF16
    assert _plan.state_dtype(F32, ml_dtypes.bfloat16) == BF16
    assert _plan.state_dtype(F32, torch.bfloat16) == BF16
    assert _plan.state_dtype(F32, "float32") == F32
    assert _plan.state_dtype(BF16, None) == BF16
    with pytest.raises(TypeError, match="state_dtype 'int4' is not a known name"):
        _plan.state_dtype(F32, "int4")
    with pytest.raises(TypeError, match="state_dtype float16 is not supported for float32"):
        _plan.state_dtype(F32, "fp16")
    with pytest.raises(TypeError, match="state_dtype int32 has no kernels"):
        _plan.state_dtype(F32, np.int32)
