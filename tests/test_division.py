"""The kernels' divider-free ``sqrt(u) / bc2_sqrt`` equals true division, bit for bit.

The dense kernels replace the division by the per-call constant ``c = bc2_sqrt``
with ``rc = fl(1/c)`` and two FMA corrections (``_div_bc`` in the kernel
template). Its correctness does not depend on the exponent of ``x`` (no
overflow or underflow can occur for x = sqrt(u)), so for float32 checking every
significand of one binade is exhaustive for a given ``c``; other binades,
special values and float64 are sampled.
"""
import numpy as np
import pytest
from conftest import importable_isas, isa_module

BETA2S = [0.999, 0.99, 0.9999, 0.95, 0.5, 1 - 1e-12]
STEPS = [1, 2, 3, 10, 100, 1000, 10000]


def _cs(dtype):
    cs = {float(dtype(np.sqrt(1 - b2 ** t))) for b2 in BETA2S for t in STEPS}
    one_below = float(np.nextafter(dtype(1), dtype(0)))
    all_ones = float(np.nextafter(dtype(1), dtype(0)) * dtype(0.5))  # significand all ones
    cs |= {one_below, all_ones, 0.75, 2.0 ** -12, float(dtype(np.sqrt(2.0 ** -53)))}
    return sorted(c for c in cs if c < 1.0)


def _check(mod, dtype, x, c):
    out = np.empty_like(x)
    getattr(mod, "div_bc" + ("32" if dtype == np.float32 else "64"))(x, out, c)
    with np.errstate(all="ignore"):
        want = x / dtype(c)
    iv = np.uint32 if dtype == np.float32 else np.uint64
    bad = np.flatnonzero(out.view(iv) != want.view(iv))
    assert bad.size == 0, (f"c={c!r}: {bad.size} quotients differ, first x={x[bad[0]]!r}: "
                           f"{out[bad[0]]!r} != {want[bad[0]]!r}")


SPECIALS = [0.0, np.inf, np.nan, 1.0, 2.0]


@pytest.mark.parametrize("isa", importable_isas())
def test_float32_every_significand(isa):
    mod = isa_module(isa)
    bits = np.arange(2 ** 23, dtype=np.uint32) | np.uint32(127 << 23)  # [1, 2)
    x = bits.view(np.float32)
    sq_max = np.sqrt(np.finfo(np.float32).max, dtype=np.float32)
    sq_min = np.sqrt(np.float32(np.finfo(np.float32).smallest_subnormal))
    rng = np.random.default_rng(1)
    # every binade a sqrt can land in, from sqrt(smallest subnormal) to sqrt(max)
    other = rng.random(1 << 16).astype(np.float32) + np.float32(1)
    other = np.ldexp(other, rng.integers(-75, 64, other.size)).astype(np.float32)
    edges = np.array(SPECIALS + [sq_max, sq_min, np.nextafter(sq_max, np.float32(0))],
                     np.float32)
    for c in _cs(np.float32):
        _check(mod, np.float32, x, c)
        _check(mod, np.float32, np.concatenate([other, edges]), c)


@pytest.mark.parametrize("isa", importable_isas())
def test_float64_sampled(isa):
    mod = isa_module(isa)
    rng = np.random.default_rng(2)
    x = rng.random(1 << 20) + 1.0
    x = np.ldexp(x, rng.integers(-537, 512, x.size))
    # significands next to binade edges and with long runs of ones / zeros
    edge = np.array([1.0, np.nextafter(2.0, 0.0), 1.5, 1.0 + 2.0 ** -52, np.sqrt(2.0)])
    specials = np.array(SPECIALS + [np.sqrt(np.finfo(np.float64).max),
                                    np.sqrt(np.finfo(np.float64).smallest_subnormal)])
    for c in _cs(np.float64):
        _check(mod, np.float64, np.concatenate([x, edge, specials]), c)
