"""Plain-numpy oracle of every fastadam update (layer 5): the readable spec.

Slow, allocating, obviously correct. Tests compare every kernel against these
functions. Each scalar is computed in double and rounded once to the array
dtype (``fl``). ``_fma(a, b, c)`` is a fused multiply-add: exact for float32
up to a rare double rounding (the product of two float32 is exact in float64);
for float64 numpy has no fma, so it is ``a*b + c`` rounded twice -- tests
compare float64 to a few ulp, float32 to a few ulp.
"""
import math

import numpy as np


def _fl(dtype, x):
    return np.asarray(x, dtype=np.float64).astype(dtype)


def _fma(a, b, c):
    dt = np.result_type(a, b, c)
    if dt == np.float32:
        return (np.asarray(a, np.float64) * np.asarray(b, np.float64)
                + np.asarray(c, np.float64)).astype(np.float32)
    return a * b + c


# ------------------------------------------------------- 16-bit formats (issue 12)
#
# bfloat16 (``ml_dtypes.bfloat16``) and float16 (``np.float16``) buffers are
# widened exactly to float32, the step is computed in float32, and each
# result is rounded once to the buffer's format: round to nearest even
# (:func:`round_rne`), or stochastically (:func:`round_sr`, bfloat16 only)
# with the bits of :func:`sr_bits`.

_M32 = np.uint32(0xFFFFFFFF)


def compute_dtype(dtype):
    """The arithmetic dtype of a buffer dtype: float64 for float64, else float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _is_bf16(dtype):
    return np.dtype(dtype).name == "bfloat16"


def round_rne(x, dtype, tail=None):
    """float32 ``x`` rounded to nearest even in ``dtype`` (bfloat16/float16;
    float32/float64: a cast). NaN becomes torch's NaN: for bfloat16 0xffff
    in torch's vector loop and 0x7fc0 in its scalar tail (``tail``: a
    boolean mask of the tail elements); for float16 F16C's (and torch's)
    quiet NaN: sign | 0x7e00 | the top 10 bits of the payload."""
    dtype = np.dtype(dtype)
    if dtype in (np.float32, np.float64):
        return np.asarray(x).astype(dtype)
    x = np.asarray(x, np.float32)
    if _is_bf16(dtype):
        u = x.view(np.uint32).astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.uint16(0xFFFF) if tail is None else np.where(tail, np.uint16(0x7FC0),
                                                              np.uint16(0xFFFF))
        return np.where(np.isnan(x), nan, r).astype(np.uint16).view(dtype)
    with np.errstate(all="ignore"):
        h = x.astype(np.float16)                     # numpy: RNE, subnormals, inf
    u = x.view(np.uint32)
    sign = (u >> 16).astype(np.uint16) & np.uint16(0x8000)
    payload = ((u >> 13) & 0x3FF).astype(np.uint16)  # F16C: quieted, top 10 bits kept
    return np.where(np.isnan(x), sign | np.uint16(0x7E00) | payload,
                    h.view(np.uint16)).astype(np.uint16).view(np.float16)


def _mix32(x):
    x = np.asarray(x, np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def sr_bits(key, n, start=0):
    """The kernels' 32 random bits ``h`` of elements ``start .. start + n - 1``
    of an array with 64-bit key ``key`` (``fastadam._plan.sr_key(seed, step)``),
    and ``h2 = mix32(h ^ 0x9e3779b9)``. Each element's param rounds with
    ``h >> 16``, its exp_avg with ``h & 0xffff``, exp_avg_sq with
    ``h2 >> 16``, max_exp_avg_sq with ``h2 & 0xffff``::

        h = mix32(lo32(i) ^ mix32(hi32(key) ^ hi32(i)) ^ lo32(key))

    with mix32 the "lowbias32" integer hash (two xor-shift-multiply rounds);
    the kernels mix the key part once per span, so one mix32 per element
    (two for ``h2``).
    """
    idx = np.arange(start, start + n, dtype=np.uint64)
    lo = (idx & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (idx >> np.uint64(32)).astype(np.uint32)
    klo = np.uint32(key & 0xFFFFFFFF)
    khi = np.uint32(key >> 32)
    h = _mix32(lo ^ (_mix32(hi ^ khi) ^ klo))
    return h, _mix32(h ^ np.uint32(0x9E3779B9))


def round_sr(x, r16):
    """float32 ``x`` rounded stochastically to bfloat16 with 16 random bits
    ``r16`` per element: the bits of ``x`` plus ``r16``, truncated to the upper
    half -- rounds up with probability (discarded part) / 2**16, so the
    expected value is ``x``. A finite ``x`` never becomes inf (the largest
    finite bfloat16 instead); inf and NaN round as :func:`round_rne`."""
    import ml_dtypes
    x = np.asarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    t = ((u + np.asarray(r16, np.uint64)) >> 16).astype(np.uint32)
    t = np.where((t & 0x7FFF) == 0x7F80, t - 1, t).astype(np.uint16)
    rne = round_rne(x, ml_dtypes.bfloat16).view(np.uint16)
    return np.where(np.isfinite(x), t, rne).astype(np.uint16).view(ml_dtypes.bfloat16)


def _torch_lanes(dtype, vector_bytes):
    """torch's ``Vectorized<scalar_t>::size()``: elements per vector of ``vector_bytes``."""
    if vector_bytes is None:
        from ._plan import VECTOR_BYTES as vector_bytes
    return max(1, int(vector_bytes) // np.dtype(dtype).itemsize)


def _vmax(vmax, v):
    """amsgrad's running maximum as the kernels take it: ``v if v > vmax else
    vmax`` -- a NaN ``v`` leaves ``vmax`` as it was, a NaN ``vmax`` stays NaN
    (``np.maximum`` would propagate either; equal for all other values)."""
    return np.where(v > vmax, v, vmax)


def adam(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
         weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, max_exp_avg_sq=None,
         maximize=False, grad_scale=None, vector_bytes=None, param_copy=None,
         stochastic_rounding=False, seed=0):
    """Dense Adam/AdamW step (torch fused arithmetic), in place on the arrays given.

    torch's CPU kernel (``FusedAdamKernel.cpp``, ``adam_math``) runs a vector
    loop over the first ``n - n % lanes`` elements (``lanes =
    vector_bytes / itemsize``; ``vector_bytes`` None: the width fastadam
    chose for this machine, ``fastadam._plan.VECTOR_BYTES``) and a scalar loop
    over the last ``n % lanes``. Both compute, with ``w = fl(1 - beta1)``::

        m = fma(w, g - m, m)          if |w| < 0.5   (exp_avg.lerp_(grad, w))
        m = fma(w - 1, g - m, g)      otherwise      (lerp's other formula)

    and differ only in the second moment: the vector loop
    ``v = fma(c2 * g, g, v * b2)``, the scalar tail ``v = fma(v, b2, (c2 * g) * g)``.

    16-bit buffers are widened to float32 and every result is rounded once,
    at the end, to its buffer's format (the arithmetic uses the unrounded
    values, as torch does); ``lanes`` counts elements of the param's dtype.
    ``param_copy``: also write the new param, rounded to nearest even, there.
    ``stochastic_rounding``: round the bfloat16 buffers with
    :func:`round_sr` and the bits of ``sr_bits(sr_key(seed, step), n)``.
    """
    dt = compute_dtype(param.dtype)
    b1, b2 = betas
    n = param.size
    tail = np.zeros(param.shape, dtype=bool)
    tail.reshape(-1)[n - n % _torch_lanes(param.dtype, vector_bytes):] = True
    bufs = (param, exp_avg, exp_avg_sq, max_exp_avg_sq)
    param, exp_avg, exp_avg_sq, max_exp_avg_sq = (
        None if b is None else np.asarray(b).astype(dt) for b in bufs)
    g = np.array(np.asarray(grad).astype(dt), copy=True)
    if maximize:
        g = -g
    if grad_scale is not None:
        g = g / _fl(dt, grad_scale)
    p = param.copy()
    if decoupled_weight_decay:
        p = p * _fl(dt, 1.0 - lr * weight_decay)
    elif weight_decay != 0.0:
        g = _fma(p, _fl(dt, weight_decay), g)
    w = _fl(dt, 1.0 - b1)
    if abs(w) < 0.5:                                                  # torch lerp_
        m = _fma(w, g - exp_avg, exp_avg)
    else:
        m = _fma(w - dt.type(1), g - exp_avg, g)
    c2, fb2 = _fl(dt, 1.0 - b2), _fl(dt, b2)
    v = np.where(tail, _fma(exp_avg_sq, fb2, (c2 * g) * g),          # scalar tail
                 _fma(c2 * g, g, exp_avg_sq * fb2))                   # vector loop
    if amsgrad:
        u = _vmax(max_exp_avg_sq, v)
    else:
        u = v
    bc1 = 1.0 - b1 ** step
    bc2 = 1.0 - b2 ** step
    step_size = lr / bc1
    denom = np.sqrt(u) / _fl(dt, math.sqrt(bc2)) + _fl(dt, eps)
    p = p + (_fl(dt, -step_size) * m) / denom
    if stochastic_rounding:
        from ._plan import sr_key
        h, h2 = sr_bits(sr_key(seed, step), n)
        r = {0: h >> 16, 1: h & 0xFFFF, 2: h2 >> 16, 3: h2 & 0xFFFF}
    outs = (p, m, v, u if amsgrad else None)
    for k, (buf, val) in enumerate(zip(bufs, outs)):
        if buf is None or val is None:
            continue
        if stochastic_rounding and _is_bf16(buf.dtype):
            buf[...] = round_sr(val.reshape(-1), r[k]).reshape(buf.shape)
        else:
            buf[...] = round_rne(val, buf.dtype, tail)
    if param_copy is not None:
        param_copy[...] = round_rne(p, param_copy.dtype, tail)


def adamw(param, grad, exp_avg, exp_avg_sq, *, step, weight_decay=1e-2, **kw):
    adam(param, grad, exp_avg, exp_avg_sq, step=step, weight_decay=weight_decay,
         decoupled_weight_decay=True, **kw)


def grad_norm(grads):
    """L2 norm of all gradients together, accumulated in float64."""
    return math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads))


# ----------------------------------------------------------------- sparse (issue 4)

def sparse_merge(indices, grad_rows):
    """Unique ids in first-occurrence order and their summed gradient rows.

    Each unique id's rows are added strictly in batch order, starting from
    its first row: ``((g_a + g_b) + g_c) + ...`` -- the order the kernel uses.
    """
    idx = np.asarray(indices, dtype=np.int64)
    g = np.asarray(grad_rows)
    if idx.size == 0:
        return idx, g[:0].copy()
    uniq, first, inverse = np.unique(idx, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")          # unique ids by first occurrence
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(order.size)
    slot = rank_of[inverse.reshape(-1)]                # batch position -> unique slot
    ids = uniq[order]
    pos = np.argsort(slot, kind="stable")              # positions grouped by slot, batch order
    counts = np.bincount(slot, minlength=ids.size)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    acc = g[pos[starts]].copy()
    for r in range(1, int(counts.max())):              # r-th occurrence of each id, in order
        live = np.flatnonzero(counts > r)
        acc[live] = acc[live] + g[pos[starts[live] + r]]
    return ids, acc


def _rowwise_mean_sq(g):
    """Mean of g*g over each row: double sum over 16 fixed lanes (the kernel's order)."""
    n, dim = g.shape
    d = g.astype(np.float64)
    n16 = dim - dim % 16
    acc = np.zeros((n, 16))
    for j in range(0, n16, 16):
        acc = acc + d[:, j:j + 16] * d[:, j:j + 16]
    rest = dim - n16
    if rest:
        acc[:, :rest] = acc[:, :rest] + d[:, n16:] * d[:, n16:]
    total = np.zeros(n)
    for lane in range(16):
        total = total + acc[:, lane]
    return (total / dim).astype(g.dtype)


def sparse_adam(table, indices, grad_rows, exp_avg, exp_avg_sq, *, step=None, lr=1e-3,
                betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                amsgrad=False, max_exp_avg_sq=None, maximize=False, row_step=None):
    """Sparse ("lazy", torch SparseAdam) step, in place on the arrays given.

    Duplicates summed in batch order (:func:`sparse_merge`), then per touched
    row, no fma::

        g = -g (maximize); p = p*fl(1-lr*wd) (decoupled) | g = g + p*fl(wd) (L2)
        m = m + (g - m)*fl(1-b1);  v = v + (g*g - v)*fl(1-b2)
        u = vmax = max(vmax, v) (amsgrad)
        p = p + fl(-lr*sqrt(bc2)/bc1) * (m / (sqrt(u) + fl(eps)))

    ``exp_avg_sq`` of shape (n_rows,) is the row-wise variant: v per row from
    the mean of g*g. ``row_step`` (int64, n_rows): per-row step counts.
    """
    dt = compute_dtype(table.dtype)       # 16-bit rows: float32 arithmetic, RNE stores
    b1, b2 = betas
    ids, g = sparse_merge(indices, np.asarray(grad_rows).astype(dt))
    if ids.size == 0:
        return
    g = g.astype(dt, copy=False)
    if maximize:
        g = -g
    rowwise = exp_avg_sq.ndim == 1
    p = table[ids].astype(dt)
    m = exp_avg[ids].astype(dt)
    v = exp_avg_sq[ids].astype(dt)
    if row_step is not None:
        t = row_step[ids] + 1
        row_step[ids] = t
        neg_step_size = np.array([-(lr * math.sqrt(1.0 - b2 ** float(s)) / (1.0 - b1 ** float(s)))
                        for s in t]).astype(dt)[:, None]
    else:
        bc1 = 1.0 - b1 ** step
        bc2 = 1.0 - b2 ** step
        neg_step_size = _fl(dt, -(lr * math.sqrt(bc2) / bc1))
    if decoupled_weight_decay:
        p = p * _fl(dt, 1.0 - lr * weight_decay)
    elif weight_decay != 0.0:
        g = g + p * _fl(dt, weight_decay)
    m = m + (g - m) * _fl(dt, 1.0 - b1)
    if rowwise:
        v = v + (_rowwise_mean_sq(g) - v) * _fl(dt, 1.0 - b2)
    else:
        v = v + (g * g - v) * _fl(dt, 1.0 - b2)
    if amsgrad:
        u = _vmax(max_exp_avg_sq[ids].astype(dt), v)
        max_exp_avg_sq[ids] = round_rne(u, max_exp_avg_sq.dtype)
    else:
        u = v
    denom = np.sqrt(u) + _fl(dt, eps)
    if rowwise:
        denom = denom[:, None]
    p = p + neg_step_size * (m / denom)
    table[ids] = round_rne(p, table.dtype)
    exp_avg[ids] = round_rne(m, exp_avg.dtype)
    exp_avg_sq[ids] = round_rne(v, exp_avg_sq.dtype)


# ----------------------------------------------------- 8-bit state (issue 13)

def adam8bit(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, *, step,
             lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
             decoupled_weight_decay=False, maximize=False, grad_scale=None):
    """Dense Adam/AdamW step with 8-bit blockwise state, in place.

    m and v dequantised (:func:`fastadam._quant.dequantize`), the float32
    update of :func:`adam` with every element on the vector-loop formula (no
    torch scalar tail: ``vector_bytes`` = one element), then the new m and v
    requantised per block (:func:`fastadam._quant.quantize`: new absmax,
    exact nearest code).
    """
    from . import _quant as Q
    m = Q.dequantize(exp_avg, exp_avg_absmax, signed=True)
    v = Q.dequantize(exp_avg_sq, exp_avg_sq_absmax, signed=False)
    adam(param, grad, m, v, step=step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
         decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
         grad_scale=grad_scale, vector_bytes=param.dtype.itemsize)
    exp_avg[...], exp_avg_absmax[...] = Q.quantize(m, signed=True)
    exp_avg_sq[...], exp_avg_sq_absmax[...] = Q.quantize(v, signed=False)


def adamw8bit(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, *, step,
              weight_decay=1e-2, **kw):
    adam8bit(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, step=step,
             weight_decay=weight_decay, decoupled_weight_decay=True, **kw)


def _row_blocks(x):
    """``(k, dim)`` rows zero-padded to whole blocks: ``(k, nb * BLOCK)``."""
    from . import _quant as Q
    k, dim = x.shape
    out = np.zeros((k, Q.n_blocks(dim) * Q.BLOCK), np.float32)
    out[:, :dim] = x
    return out


def quantize_rows(x, signed=True):
    """8-bit row state of float32 rows ``x`` (k, dim): each row in blocks of
    its own (:func:`fastadam._quant.quantize` on the rows padded to whole
    blocks; zero padding changes no absmax). Returns ``(codes (k, dim),
    absmax (k, ceil(dim / 256)))``."""
    from . import _quant as Q
    k, dim = x.shape
    codes, absmax = Q.quantize(_row_blocks(x), signed=signed)
    return codes[:, :dim], absmax.reshape(k, Q.n_blocks(dim))


def dequantize_rows(codes, absmax, signed=True):
    """``fl(map[code] * absmax of its row's block)`` of 8-bit row state."""
    from . import _quant as Q
    k, dim = codes.shape
    blk = np.arange(dim) // Q.BLOCK
    a = np.asarray(absmax, np.float32).reshape(k, -1)
    return (Q.dynamic_map(signed)[codes] * a[:, blk]).astype(np.float32)


def sparse_adam8bit(table, indices, grad_rows, exp_avg, exp_avg_sq, exp_avg_absmax,
                    exp_avg_sq_absmax, *, step=None, row_step=None, **kw):
    """Sparse step with 8-bit row state, in place: the touched rows' m and v
    dequantised (:func:`dequantize_rows`), :func:`sparse_adam` on them, then
    requantised per block of each row (:func:`quantize_rows`). Untouched rows
    and their state are not written."""
    ids = np.unique(np.asarray(indices, np.int64))
    if ids.size == 0:
        return
    m = dequantize_rows(exp_avg, exp_avg_absmax, signed=True)
    v = dequantize_rows(exp_avg_sq, exp_avg_sq_absmax, signed=False)
    sparse_adam(table, indices, grad_rows, m, v, step=step, row_step=row_step, **kw)
    exp_avg[ids], exp_avg_absmax[ids] = quantize_rows(m[ids], signed=True)
    exp_avg_sq[ids], exp_avg_sq_absmax[ids] = quantize_rows(v[ids], signed=False)
