"""The native validation fast paths (``_runtime.dense_scan`` / ``scan_lists``)
for every kernel dtype: they accept exactly what the Python checks accept,
pick the same kernel, give the same bits, and a call they cannot vouch for
still gets the Python checks' error with nothing written."""
import itertools

import numpy as np
import pytest
from conftest import assert_bitwise, assert_rejected, copies

import fastadam as fa
from fastadam import _plan, _runtime
from fastadam import functional as F
from fastadam._validate import SCAN_DTYPES

DTS = list(SCAN_DTYPES)
IDX = {dt: i for i, dt in enumerate(DTS)}
NAMES = [dt.name for dt in DTS]
COMBOS = list(itertools.product(DTS, repeat=3))


def _bufs(pdt, gdt, sdt, n=37, seed=0, amsgrad=False):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(pdt)
    g = (rng.standard_normal(n) * 0.1).astype(gdt)
    m = (rng.standard_normal(n) * 0.01).astype(sdt)
    v = (rng.random(n) * 1e-3).astype(sdt)
    vm = (v.astype(np.float64) * 1.5).astype(sdt) if amsgrad else None
    return p, g, m, v, vm


def _code(pdt, gdt, sdt):
    return IDX[pdt] + 8 * IDX[gdt] + 64 * IDX[sdt]


@pytest.mark.parametrize("pdt,gdt,sdt", COMBOS,
                         ids=["-".join(d.name for d in c) for c in COMBOS])
def test_dense_scan_code_and_kernel_for_every_dtype_triple(pdt, gdt, sdt):
    p, g, m, v, _ = _bufs(pdt, gdt, sdt)
    code = _runtime.dense_scan(p, g, m, v, None)
    assert code == _code(pdt, gdt, sdt)
    K = _plan.KERNELS
    for op in ("adam", "adam_multi"):
        fn = K.scanned(op, code)
        if K.has(op, pdt, gdt, sdt):
            assert fn is K.get(op, pdt, gdt, sdt)
        else:
            assert fn is None
            with pytest.raises(TypeError):
                K.get(op, pdt, gdt, sdt)


def _bad_cases():
    bf16 = next(dt for dt in DTS if dt.name == "bfloat16") if "bfloat16" in NAMES else None
    f16 = np.dtype(np.float16)
    yield "byte-swapped float16", lambda b: (b[0].astype(f16.newbyteorder(">")),) + b[1:]
    yield "strided param", lambda b: (np.repeat(b[0], 2)[::2],) + b[1:]
    yield "read-only param", lambda b: (_ro(b[0]),) + b[1:]
    yield "exp_avg_sq of another dtype", lambda b: b[:3] + (b[3].astype(np.float32),) + b[4:]
    yield "grad of another shape", lambda b: (b[0], b[1][:-1]) + b[2:]
    yield "exp_avg is the param", lambda b: (b[0], b[1], b[0], b[3], b[4])
    yield "uint8 param", lambda b: (b[0].view(np.uint8)[:b[0].size],) + b[1:]
    if bf16 is not None:
        yield "max_exp_avg_sq of another dtype", lambda b: b[:4] + (b[3].astype(np.float32),)


def _ro(a):
    a = a.copy()
    a.setflags(write=False)
    return a


@pytest.mark.parametrize("case", [c for c, _ in _bad_cases()])
def test_dense_scan_declines_what_the_python_checks_must_word(case):
    make = dict(_bad_cases())[case]
    p, g, m, v, vm = make(_bufs(np.float16, np.float16, np.float16, amsgrad=True))
    assert _runtime.dense_scan(p, g, m, v, vm) == -1


def _combos_with_kernels():
    return [(op, c) for op in ("adam",) for c in COMBOS if _plan.KERNELS.has(op, *c)]


@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("pdt,gdt,sdt", [c for _, c in _combos_with_kernels()],
                         ids=["-".join(d.name for d in c) for _, c in _combos_with_kernels()])
def test_fast_and_checked_paths_give_the_same_bits(monkeypatch, pdt, gdt, sdt, amsgrad):
    fast = _bufs(pdt, gdt, sdt, n=1000, amsgrad=amsgrad)
    slow = copies(fast)
    kw = dict(lr=1e-2, weight_decay=0.01, amsgrad=amsgrad, max_exp_avg_sq=fast[4])
    for step in (1, 2, 3):
        fa.adam_step(*fast[:4], step=step, **kw)
    with monkeypatch.context() as mp:
        mp.setattr(_runtime, "dense_scan", lambda *a: -1)     # the Python checks only
        kw["max_exp_avg_sq"] = slow[4]
        for step in (1, 2, 3):
            fa.adam_step(*slow[:4], step=step, **kw)
    assert_bitwise(fast, slow, f"{pdt}/{gdt}/{sdt}")


@pytest.mark.parametrize("dt", DTS, ids=NAMES)
def test_scan_lists_homogeneous_lists_of_every_dtype(monkeypatch, dt):
    sizes_in = [5, 300, 17]
    ents = [_bufs(dt, dt, dt, n=k, seed=i) for i, k in enumerate(sizes_in)]
    lists = [[e[j] for e in ents] for j in range(4)]
    ptrs = np.empty((5, 3), np.int64)
    sizes = np.empty(3, np.int64)
    key_of = np.empty(3, np.int8)
    assert _runtime.scan_lists(*lists, None, ptrs, sizes, key_of) == -1
    assert list(sizes) == sizes_in and set(key_of) == {IDX[dt]}
    assert ptrs[0, 1] == lists[0][1].ctypes.data and ptrs[3, 2] == lists[3][2].ctypes.data
    # the list API through the scan == through the Python entry checks
    fast = copies([a for lst in lists for a in lst])
    F.adam(*[fast[j * 3:(j + 1) * 3] for j in range(4)], steps=[1, 2, 3], lr=1e-2)
    slow = copies([a for lst in lists for a in lst])
    with monkeypatch.context() as mp:
        mp.setattr(_runtime, "scan_lists", lambda *a: 0)
        F.adam(*[slow[j * 3:(j + 1) * 3] for j in range(4)], steps=[1, 2, 3], lr=1e-2)
    assert_bitwise(fast, slow, dt.name)
    assert not all(np.array_equal(a.view(np.uint8), b.view(np.uint8))
                   for a, b in zip(fast, copies([a for lst in lists for a in lst])))


def test_scan_lists_stops_at_a_mixed_entry():
    a = _bufs(np.float32, np.float32, np.float32)
    b = _bufs(np.float16, np.float16, np.float32)        # a kernel, but not homogeneous
    lists = [[a[j], b[j]] for j in range(4)]
    out = np.empty((5, 2), np.int64), np.empty(2, np.int64), np.empty(2, np.int8)
    assert _runtime.scan_lists(*lists, None, *out) == 1


def test_scanned_combination_without_a_kernel_is_rejected_unwritten():
    missing = next(c for c in COMBOS if not _plan.KERNELS.has("adam", *c))
    bufs = _bufs(*missing)[:4]
    assert _runtime.dense_scan(*bufs, None) >= 0       # the scan itself accepts the buffers
    assert_rejected(TypeError, "no kernel", bufs, fa.adam_step, *bufs, step=1)
    assert_rejected(TypeError, "no kernel", bufs, F.adam, *[[b] * 1 for b in bufs], steps=1)
    two = [[b, b.copy()] for b in bufs]
    flat = [a for lst in two for a in lst]
    assert_rejected(TypeError, "no kernel", flat, F.adam, *two, steps=1)


def test_set_scan_types_bounds():
    with pytest.raises(ValueError, match="1 to 8"):
        _runtime.set_scan_types(())
    with pytest.raises(ValueError, match="1 to 8"):
        _runtime.set_scan_types(tuple(range(9)))


def test_every_scan_dtype_has_the_list_kernel():
    # plan_adam trusts scan_lists' one-dtype entries only where this holds
    assert _plan.KERNELS.homogeneous("adam_multi")
    assert not _plan.KERNELS.homogeneous("adam_q8_multi")


@pytest.mark.parametrize("dt", [d for d in DTS if d.itemsize == 2], ids=lambda d: d.name)
def test_optimizer_bad_lr_in_a_later_group_writes_nothing(dt):
    # fastadam.Adam plans both 16-bit groups (native scan) before running either
    ps = [_bufs(dt, dt, dt, n=n, seed=i)[0] for i, n in enumerate((40, 300, 7))]
    gs = [_bufs(dt, dt, dt, n=p.size, seed=9 + i)[1] for i, p in enumerate(ps)]
    opt = fa.AdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": 1e-2}], lr=1e-3)
    opt.step(gs)
    state = [a for st in opt.state.values() for a in (st["exp_avg"], st["exp_avg_sq"])]
    steps = [st["step"] for st in opt.state.values()]
    opt.param_groups[1]["lr"] = -1.0
    assert_rejected(ValueError, "lr", ps + state, opt.step, gs)
    assert [st["step"] for st in opt.state.values()] == steps
