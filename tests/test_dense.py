"""Dense Adam/AdamW kernels vs the numpy reference, across threads, builds and torch."""
import numpy as np
import pytest
from _options import DENSE, PLAIN, Dense
from conftest import (
    SIZES,
    THREADS,
    assert_bitwise,
    assert_close,
    copies,
    importable_isas,
    make_state,
)

import fastadam as fa
from fastadam import _reference as ref

OPTIONS = DENSE


def _opt_id(o):
    return o.id


def _kw(o, lr=1e-2):
    return o.kwargs(lr=lr)


def _steps(bufs, kw, nsteps, n_threads, seed=1):
    p, g, m, v, vm = bufs
    rng = np.random.default_rng(seed)
    for t in range(1, nsteps + 1):
        g[...] = rng.standard_normal(g.shape).astype(g.dtype)
        fa.adam_step(p, g, m, v, step=t, max_exp_avg_sq=vm if kw["amsgrad"] else None,
                     n_threads=n_threads, **kw)


def _ref_steps(bufs, kw, nsteps, seed=1):
    p, g, m, v, vm = bufs
    rng = np.random.default_rng(seed)
    for t in range(1, nsteps + 1):
        g[...] = rng.standard_normal(g.shape).astype(g.dtype)
        ref.adam(p, g, m, v, step=t, max_exp_avg_sq=vm, **kw)


# Every option combination at every small size; the large size (2**20 + 3)
# with plain Adam and the options combined with grad_scale (keeps CI fast).
CASES = [(n, opt) for n in SIZES for opt in OPTIONS
         if n != SIZES[-1] or opt == PLAIN or (not opt.maximize and opt.grad_scale is not None)]


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n, opt", CASES, ids=[f"{n}-{_opt_id(o)}" for n, o in CASES])
def test_matches_reference(dtype, n, n_threads, opt):
    bufs = make_state(n, dtype)
    expect = copies(bufs)
    kw = _kw(opt)
    _steps(bufs, kw, 3, n_threads)
    _ref_steps(expect, kw, 3)
    p, _, m, v, vm = bufs
    assert_close([p, m, v, vm if opt.amsgrad else None],
                 [expect[0], expect[2], expect[3], expect[4] if opt.amsgrad else None], dtype)
    if n:
        assert not np.array_equal(p, make_state(n, dtype)[0])  # it did move


@pytest.mark.parametrize("opt", OPTIONS, ids=_opt_id)
def test_threads_bitwise(dtype, opt):
    n = 2**20 + 3
    a = make_state(n, dtype)
    b = copies(a)
    kw = _kw(opt)
    _steps(a, kw, 2, n_threads=1)
    _steps(b, kw, 2, n_threads=2)
    assert_bitwise(a, b, "1 vs 2 threads")


@pytest.mark.parametrize("n", [17, 1000, 2**17 + 5])
@pytest.mark.parametrize("opt", OPTIONS, ids=_opt_id)
def test_isa_modules_bitwise(dtype, n, opt, use_isa):
    """Every ISA module gives the same bits as the baseline (and for 1 and 2 threads)."""
    isas = importable_isas()
    kw = _kw(opt)
    results = []
    for isa in isas:
        use_isa(isa)
        for nt in (1, 2):
            bufs = make_state(n, dtype)
            _steps(bufs, kw, 2, nt)
            results.append((isa, nt, bufs))
    for isa, nt, bufs in results[1:]:
        assert_bitwise(bufs, results[0][2], f"{isa} x{nt} vs {results[0][0]}")


def test_multi_array_equals_single_calls(dtype):
    sizes = [0, 1, 15, 16, 17, 1000, 70000, 3, 2**17 + 1]
    rng = np.random.default_rng(5)
    steps = [int(s) for s in rng.integers(1, 50, len(sizes))]
    for opt in [PLAIN, Dense(0.05, False, True, True, 8.0), Dense(0.05, True)]:
        kw = _kw(opt)
        single = [make_state(n, dtype, seed=i) for i, n in enumerate(sizes)]
        multi = [copies(b) for b in single]
        for b, s in zip(single, steps):
            fa.adam_step(b[0], b[1], b[2], b[3], step=s,
                         max_exp_avg_sq=b[4] if opt.amsgrad else None, n_threads=1, **kw)
        for nt in (1, 2):
            bufs = [copies(b) for b in multi]
            fa.functional.adam([b[0] for b in bufs], [b[1] for b in bufs],
                               [b[2] for b in bufs], [b[3] for b in bufs], steps=steps,
                               max_exp_avg_sqs=[b[4] for b in bufs] if opt.amsgrad else None,
                               n_threads=nt, **kw)
            for b, e in zip(bufs, single):
                assert_bitwise(b, e, f"multi x{nt} vs single")


def test_multi_array_mixed_dtypes():
    a32 = make_state(100, np.float32)
    a64 = make_state(50, np.float64, seed=3)
    e32, e64 = copies(a32), copies(a64)
    fa.functional.adam([a32[0], a64[0]], [a32[1], a64[1]], [a32[2], a64[2]],
                       [a32[3], a64[3]], steps=[2, 4], lr=0.1)
    fa.adam_step(*e32[:4], step=2, lr=0.1)
    fa.adam_step(*e64[:4], step=4, lr=0.1)
    assert_bitwise(a32, e32)
    assert_bitwise(a64, e64)


def test_multidim_and_readonly_grad(dtype):
    p, g, m, v, _ = make_state(0, dtype, shape=(4, 5, 6))
    e = copies([p, g, m, v])
    g.flags.writeable = False
    fa.adamw_step(p, g, m, v, step=1)
    ref.adamw(e[0], e[1], e[2], e[3], step=1)
    assert_close([p, m, v], [e[0], e[2], e[3]], dtype)


def test_adamw_defaults_and_example():
    p = np.ones(3)
    fa.adamw_step(p, np.ones(3), np.zeros(3), np.zeros(3), step=1, lr=0.1)
    # decay first: 1 * (1 - 0.1*0.01) = 0.999, then the Adam step of size lr
    np.testing.assert_allclose(p, 0.999 - 0.1 / (1 + 1e-8), rtol=1e-12)


def test_grad_norm(dtype, use_isa):
    gs = [make_state(n, dtype, seed=n)[1] for n in (0, 1, 17, 70000, 2**20 + 3)]
    expect = ref.grad_norm(gs)
    got1 = fa.grad_norm(gs, n_threads=1)
    got2 = fa.grad_norm(gs, n_threads=2)
    assert got1 == got2  # bitwise for any thread count
    assert got1 == pytest.approx(expect, rel=1e-12)
    for isa in importable_isas():
        use_isa(isa)
        assert fa.grad_norm(gs, n_threads=2) == got1, isa
    bad = gs[3].copy()
    bad[123] = np.inf
    assert fa.grad_norm([gs[1], bad]) == np.inf
    bad[7] = np.nan
    assert np.isnan(fa.grad_norm([bad]))
    assert fa.grad_norm([]) == 0.0
    assert fa.grad_norm(np.array([3.0, 4.0])) == 5.0


def test_grad_norm_fp64_overflow_rescales():
    g = np.full(4, 1e200)
    assert fa.grad_norm([g]) == pytest.approx(2e200, rel=1e-12)


def test_empty_is_noop(dtype):
    p, g, m, v, vm = make_state(0, dtype)
    fa.adam_step(p, g, m, v, step=1, amsgrad=True, max_exp_avg_sq=vm)
    fa.functional.adam([], [], [], [], steps=1)


@pytest.mark.parametrize("step", [10**5, 10**7])
def test_long_run_variant_bc2_sqrt_is_one(dtype, step, use_isa):
    """Once fl(sqrt(1 - b2**t)) == 1 a division-free variant runs: same bits."""
    b2 = 0.999
    assert np.asarray(np.sqrt(1 - b2 ** step), dtype) == 1  # the special path is taken
    kw = dict(lr=1e-2, betas=(0.9, b2), eps=1e-6, weight_decay=0.0,
              decoupled_weight_decay=False, amsgrad=True, maximize=False, grad_scale=None)
    a = make_state(1000, dtype)
    e = copies(a)
    fa.adam_step(a[0], a[1], a[2], a[3], step=step, max_exp_avg_sq=a[4],
                 **{k: v for k, v in kw.items() if k != "max_exp_avg_sq"})
    ref.adam(e[0], e[1], e[2], e[3], step=step, max_exp_avg_sq=e[4], **kw)
    assert_close([a[0], a[2], a[3], a[4]], [e[0], e[2], e[3], e[4]], dtype)
    results = []
    for isa in importable_isas():
        use_isa(isa)
        b = make_state(1000, dtype)
        fa.adam_step(b[0], b[1], b[2], b[3], step=step, max_exp_avg_sq=b[4], n_threads=1,
                     **{k: v for k, v in kw.items() if k != "max_exp_avg_sq"})
        results.append(b)
    for b in results:
        assert_bitwise(b, a)


def test_multi_array_kernel_bitwise_across_isa_modules(dtype, use_isa):
    sizes = [1, 17, 5000, 2**17 + 3]
    results = []
    for isa in importable_isas():
        use_isa(isa)
        for nt in (1, 2):
            bufs = [make_state(n, dtype, seed=n) for n in sizes]
            fa.functional.adam(*([b[j] for b in bufs] for j in range(4)), steps=[1, 2, 3, 40],
                               lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01, amsgrad=True,
                               max_exp_avg_sqs=[b[4] for b in bufs], maximize=True,
                               grad_scale=4.0, n_threads=nt)
            results.append((isa, nt, bufs))
    for isa, nt, bufs in results[1:]:
        for b, e in zip(bufs, results[0][2]):
            assert_bitwise(b, e, f"{isa} x{nt}")
    # and it moved every array
    assert not np.array_equal(results[0][2][0][0], make_state(1, dtype, seed=1)[0])


@pytest.mark.parametrize("limit", [0, 1 << 20, 64 << 20])
def test_thread_split_changes_no_bit(dtype, limit):
    """The fixed/dynamic work split (``dense_tune``) decides only which thread takes
    which chunk: the same bits on one thread, two threads fixed, two dynamic."""
    from fastadam import _plan
    K = _plan.KERNELS.module
    n = 2**18 + 7
    kw = _kw(PLAIN)
    one = make_state(n, dtype)
    _steps(one, kw, 2, n_threads=1)
    old = K.dense_tune()
    try:
        assert K.dense_tune(limit) == limit
        two = make_state(n, dtype)
        _steps(two, kw, 2, n_threads=2)
    finally:
        K.dense_tune(old)
    assert K.dense_tune() == old
    assert_bitwise(two, one, f"2 threads, fixed split up to {limit} B vs 1 thread")
