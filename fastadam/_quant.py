"""8-bit blockwise optimizer state (issue 13): the maps, the kernels' lookup
tables and the plain-numpy reference quantiser.

The format (docs/guide/q8.md has the full description):

* ``exp_avg`` is held as uint8 codes into the **signed** dynamic map,
  ``exp_avg_sq`` as codes into the **unsigned** dynamic map: the 256-value
  maps of Dettmers et al. 2021, "8-bit Optimizers via Block-wise
  Quantization", exactly as ``bitsandbytes.functional.create_dynamic_map``
  (signed=True / False, max_exponent_bits=7, total_bits=8) builds them.
  Both are sorted ascending; the signed map has 127 negative values, 0.0
  (code 127), 127 positive values and 1.0 (code 255); the unsigned map has
  0.0 (code 0), 254 values in (0, 1) and 1.0 (code 255). Each map's values
  are its positive half mirrored, so the map is stored as float32 bits here
  (bitsandbytes computes them with torch's float32 ``linspace``, whose
  vectorised rounding numpy does not reproduce); a test checks them bit for
  bit against bitsandbytes.
* Blocks of :data:`BLOCK` = 256 consecutive elements (in C order; the last
  block may be shorter) share one float32 ``absmax`` = max |x| over the
  block (NaN ignored). A value x is stored as the code whose map value is
  NEAREST to ``y = fl(x * fl(1 / absmax))`` (float32 products; when
  ``1 / absmax`` overflows -- a subnormal absmax -- ``y = fl(x / absmax)``;
  absmax 0: y = 0), compared exactly (the midpoints of adjacent map values
  are exact in double). Ties go to the value of smaller magnitude. So an
  exact zero stays zero (code 127 / 0), and the sign of x is kept: a
  negative x gets a negative code or zero, never a positive one. |y| above
  1 (rounding) takes the largest magnitude; NaN takes the largest magnitude
  with NaN's sign bit (deterministic, not meaningful).
* Dequantised value: ``fl(map[code] * absmax)``.
* Arrays under :data:`MIN_SIZE` = 4096 elements keep float32 state in the
  optimizers (the functional entries take any size).

The kernels do not search the map: :func:`tables` builds a two-level
lookup (a key from the exponent and top 7 or 8 mantissa bits of |y| selects
one table entry: the nearest magnitude of the key's lowest value and the
low bits of the one threshold inside the key's interval, if any -- every
key interval holds at most one, checked when the tables are built; one
integer compare with it gives the exact nearest magnitude), checked against
the reference quantiser here (:func:`quantize`, which searches the exact
midpoints in double) in the tests.
"""
from functools import cache

import numpy as np

from . import _interface as I

__all__ = ["BLOCK", "MIN_SIZE", "dynamic_map", "n_blocks", "quantize", "dequantize",
           "tables", "SIGNED_ZERO", "UNSIGNED_ZERO"]

BLOCK = I.Q8_BLOCK
MIN_SIZE = I.Q8_MIN_SIZE
#: the code of 0.0 in the signed map (``exp_avg``) and in the unsigned map (``exp_avg_sq``)
SIGNED_ZERO = 127
UNSIGNED_ZERO = 0

# float32 bits of bitsandbytes.functional.create_dynamic_map(signed=True), sorted
_SIGNED_HEX = (
    "bf7e3333bf7a999abf770000bf736666bf6fcccdbf6c3333bf68999abf650000bf616666bf5dcccdbf5a3333bf56999a"
    "bf530000bf4f6666bf4bcccdbf483333bf44999abf410000bf3d6666bf39cccdbf363334bf32999abf2f0000bf2b6666"
    "bf27cccdbf243334bf20999abf1d0000bf196666bf15cccdbf123334bf0e999abf0b0000bf076666bf03ccccbf003333"
    "bef93332bef20000beeaccccbee3999abedc6666bed53333bece0000bec6ccccbebf999abeb86666beb13333beaa0000"
    "bea2ccccbe9b999abe946666be8d3334be860000be7d9999be6f3333be60cccdbe526666be440000be35999abe273333"
    "be18cccdbe0a6666bdf80000bddb3334bdc9eb85bdc428f7bdbe6667bdb8a3d7bdb2e148bdad1eb8bda75c2abda1999a"
    "bd9bd70abd96147bbd9051ebbd8a8f5dbd84cccdbd7e147bbd728f5dbd670a3dbd5b851fbd500000bd447ae1bd38f5c3"
    "bd2d70a3bd21eb85bd166667bd0ae148bcfeb852bce7ae15bcd0a3d7bcb9999abca28f5dbc8b851fbc68f5c3bc3ae148"
    "bc1f3b64bc160418bc0ccccdbc039581bbf4bc6abbe24dd3bbcfdf3bbbbd70a4bbab020dbb989374bb8624ddbb676c8a"
    "bb428f5cbb1db22dbaf1a9fcbaa7ef9dba7765ffba59e83eba3c6a80ba1eecc1ba016f01b9c7e283b98ce705b923d70b"
    "b8ba1f4bb88aefb3b8378034b7b24206b70205ffb65a1a94b513a3b7000000003513a3b7365a1a94370205ff37b24206"
    "38378034388aefb338ba1f4b3923d70b398ce70539c7e2833a016f013a1eecc13a3c6a803a59e83e3a7765ff3aa7ef9d"
    "3af1a9fc3b1db22d3b428f5c3b676c8a3b8624dd3b9893743bab020d3bbd70a43bcfdf3b3be24dd33bf4bc6a3c039581"
    "3c0ccccd3c1604183c1f3b643c3ae1483c68f5c33c8b851f3ca28f5d3cb9999a3cd0a3d73ce7ae153cfeb8523d0ae148"
    "3d1666673d21eb853d2d70a33d38f5c33d447ae13d5000003d5b851f3d670a3d3d728f5d3d7e147b3d84cccd3d8a8f5d"
    "3d9051eb3d96147b3d9bd70a3da1999a3da75c2a3dad1eb83db2e1483db8a3d73dbe66673dc428f73dc9eb853ddb3334"
    "3df800003e0a66663e18cccd3e2733333e35999a3e4400003e5266663e60cccd3e6f33333e7d99993e8600003e8d3334"
    "3e9466663e9b999a3ea2cccc3eaa00003eb133333eb866663ebf999a3ec6cccc3ece00003ed533333edc66663ee3999a"
    "3eeacccc3ef200003ef933323f0033333f03cccc3f0766663f0b00003f0e999a3f1233343f15cccd3f1966663f1d0000"
    "3f20999a3f2433343f27cccd3f2b66663f2f00003f32999a3f3633343f39cccd3f3d66663f4100003f44999a3f483333"
    "3f4bcccd3f4f66663f5300003f56999a3f5a33333f5dcccd3f6166663f6500003f68999a3f6c33333f6fcccd3f736666"
    "3f7700003f7a999a3f7e33333f800000"
)
# ... and of create_dynamic_map(signed=False)
_UNSIGNED_HEX = (
    "0000000034ae7baa35500998360e9b383692ccf636de4c513714e5d53783126e37e171a0381fe868384f1800387e479a"
    "3896bb9938ae536438c5eb313906594b394154ca397c5049399ba5e439b923a239d6a16339f41f223a08ce713a178d50"
    "3a264c303a350b103a43c9ef3a5288d03a6147af3a70068e3a7ec56e3a9581063aba5e353adf3b643b020c4a3b147ae1"
    "3b26e9783b3958103b4bc6a73b5e35403b70a3d73b8189373b8ac0823b93f7cf3b9d2f1a3ba666663baf9db23bb8d4fd"
    "3bc20c4a3bcb43953bd47ae13bddb22e3be6e9783bf020c53bf9580f3c0147ae3c05e3543c0a7ef93c0f1aa03c13b645"
    "3c1851eb3c1ced923c2189373c2f5c2a3c4666673c5d70a33c747ae23c85c28f3c9147af3c9ccccd3ca851eb3cb3d70b"
    "3cbf5c293ccae1473cd666673ce1eb873ced70a33cf8f5c33d023d703d0800003d0dc28f3d13851f3d1947af3d1f0a3d"
    "3d24cccd3d2a8f5c3d3051eb3d36147b3d3bd70a3d41999a3d475c283d4d1eb83d52e1473d58a3d73d5e66673d6428f7"
    "3d69eb873d6fae153d7570a33d7b33333d807ae23d835c2a3d863d713d891eb83d8c00003d8ee1483d91c2903d94a3d7"
    "3d97851f3d9a66673d9d47af3da028f63da30a3e3da5eb853da8cccd3dabae153dae8f5c3db170a43db451eb3db73333"
    "3dba147b3dbcf5c33dbfd70b3dc2b8523dc5999a3dc87ae23dcb5c293dd400003de266663df0cccd3dff33333e06cccc"
    "3e0e00003e1533343e1c66663e23999a3e2acccc3e3200003e3933343e4066663e47999a3e4ecccc3e5600003e5d3334"
    "3e6466663e6b999a3e72cccc3e7a00003e8099993e8433333e87cccd3e8b66663e8f00003e92999a3e9633333e99cccc"
    "3e9d66663ea100003ea4999a3ea833333eabcccc3eaf66663eb300003eb6999a3eba33333ebdcccc3ec166663ec50000"
    "3ec8999a3ecc33333ecfcccc3ed366663ed700003eda999a3ede33333ee1cccc3ee566663ee900003eec999a3ef03333"
    "3ef3cccc3ef766663efb00003efe99993f01199a3f02e6663f04b3333f0680003f084ccc3f0a199a3f0be6663f0db334"
    "3f0f80003f114ccd3f13199a3f14e6663f16b3343f1880003f1a4ccd3f1c199a3f1de6663f1fb3343f2180003f234ccd"
    "3f25199a3f26e6663f28b3343f2a80003f2c4ccd3f2e199a3f2fe6663f31b3343f3380003f354ccd3f37199a3f38e666"
    "3f3ab3343f3c80003f3e4ccd3f40199a3f41e6663f43b3343f4580003f474ccc3f49199a3f4ae6663f4cb3343f4e8000"
    "3f504ccc3f52199a3f53e6663f55b3343f5780003f594ccc3f5b199a3f5ce6663f5eb3343f6080003f624ccc3f64199a"
    "3f65e6663f67b3343f6980003f6b4ccc3f6d199a3f6ee6663f70b3343f7280003f744ccc3f76199a3f77e6663f79b334"
    "3f7b80003f7d4ccc3f7f199a3f800000"
)


@cache
def _map(signed):
    h = "".join(_SIGNED_HEX if signed else _UNSIGNED_HEX)
    bits = np.array([int(h[i:i + 8], 16) for i in range(0, len(h), 8)], dtype=np.uint32)
    m = bits.view(np.float32)
    m.flags.writeable = False
    return m


def dynamic_map(signed=True):
    """The 256-value dynamic map (float32, sorted ascending): signed for
    ``exp_avg``, unsigned for ``exp_avg_sq`` (a fresh copy)."""
    return _map(bool(signed)).copy()


def n_blocks(n):
    """Number of absmax blocks of an array of ``n`` elements: ``ceil(n / 256)``."""
    return -(-int(n) // BLOCK)


@cache
def _magnitudes(signed):
    """Magnitude table: signed map -> 0, p1..p127, 1.0 (129 values); unsigned -> the map."""
    m = _map(signed)
    return m[SIGNED_ZERO:].astype(np.float64) if signed else m.astype(np.float64)


@cache
def _midpoints(signed):
    """The exact midpoints of adjacent magnitudes (float64: exact for float32 neighbours)."""
    mag = _magnitudes(signed)
    mid = (mag[:-1] + mag[1:]) / 2
    assert np.all(mid * 2 - mag[:-1] == mag[1:]), "midpoints are exact"
    return mid


def _up_thresholds(signed):
    """float32 bits (uint32): |y| with bits >= thr[j] is nearer magnitude
    j + 1 than j (the smallest float32 above the midpoint: ties stay at j);
    padded with +inf's bits to 256."""
    mid = _midpoints(signed)
    f = mid.astype(np.float32)
    f = np.where(f.astype(np.float64) <= mid, np.nextafter(f, np.float32(np.inf)), f)
    thr = np.full(256, np.inf, np.float32)
    thr[:f.size] = f
    return thr.view(np.uint32)


def _lut(signed):
    """Per key (``_interface.Q8_KEYS``): ``j | (t << 8)``, j the nearest
    magnitude of the key's lowest |y|, t the low ``shift`` bits of the one
    threshold inside the key's interval (|y| with low bits >= t is nearer
    j + 1), or ``1 << shift`` (never) where the interval holds none."""
    shift, base, nk = I.Q8_KEYS["signed" if signed else "unsigned"]
    thr = _up_thresholds(signed)[:_magnitudes(signed).size - 1].astype(np.int64)
    keys = np.arange(nk, dtype=np.int64)
    lo = np.where(keys == 0, 0, (keys + base) << shift)
    hi = np.minimum(((keys + base + 1) << shift) - 1, 0x3F800000)
    j_lo = np.searchsorted(thr, lo, side="right")
    j_hi = np.searchsorted(thr, hi, side="right")
    if np.any(j_hi - j_lo > 1):
        raise AssertionError("a key interval holds two thresholds: use more mantissa bits")
    cross = j_hi > j_lo
    t = np.where(cross, thr[np.minimum(j_lo, thr.size - 1)] & ((1 << shift) - 1), 1 << shift)
    if np.any(cross & (keys == 0)):
        raise AssertionError("key 0 (|y| < 2**-24 and the clamp) must hold no threshold")
    return (j_lo | (t << 8)).astype(np.int32)


@cache
def tables():
    """The kernels' ``qtables`` buffer (uint8, read-only): float32 map1[256]
    (signed), map2[256] (unsigned), int32 lut1[nkeys signed], lut2[nkeys
    unsigned] (see :func:`_lut`) -- the layout of ``fa_q8tab`` in ``_q8.pxi.tp``."""
    parts = [_map(True).view(np.uint8), _map(False).view(np.uint8),
             _lut(True).view(np.uint8), _lut(False).view(np.uint8)]
    buf = np.concatenate(parts)
    buf.flags.writeable = False
    return buf


# ------------------------------------------------------ the reference quantiser

def _blocks(x):
    """``x`` (any shape) as float32 rows of BLOCK (zero-padded) and its size."""
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    n = flat.size
    out = np.zeros((n_blocks(n), BLOCK), np.float32)
    out.reshape(-1)[:n] = flat
    return out, n


def quantize(x, signed=True):
    """Reference blockwise quantiser: ``(codes uint8 of x's shape, absmax
    float32 (n_blocks,))`` by the rules in the module docstring (exact
    midpoints searched in double; independent of the kernels' tables)."""
    xb, n = _blocks(x)
    a = np.abs(xb)
    absmax = np.where(np.isnan(a), np.float32(0), a).max(axis=1, initial=np.float32(0))
    absmax = absmax.astype(np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        r = np.where(absmax > 0, np.float32(1) / absmax, np.float32(0)).astype(np.float32)
        y = xb * r[:, None]
        tiny = ~np.isfinite(r)                       # subnormal absmax: true division
        if tiny.any():
            y[tiny] = xb[tiny] / absmax[tiny, None]
    mag = np.abs(y).astype(np.float64)
    j = np.searchsorted(_midpoints(signed), mag, side="left")     # ties: the smaller
    if signed:
        neg = np.signbit(y)
        codes = np.where(neg, SIGNED_ZERO - np.minimum(j, SIGNED_ZERO), SIGNED_ZERO + j)
    else:
        codes = j
    codes = codes.astype(np.uint8).reshape(-1)[:n].reshape(np.shape(x))
    return codes, absmax


def dequantize(codes, absmax, signed=True):
    """``fl(map[code] * absmax of its block)``, float32 of ``codes``' shape."""
    c = np.asarray(codes).reshape(-1)
    blk = np.arange(c.size) // BLOCK
    out = _map(signed)[c] * np.asarray(absmax, np.float32)[blk]
    return out.astype(np.float32).reshape(np.shape(codes))
