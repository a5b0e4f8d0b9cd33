"""Functional API (layer 2): validate, compute the scalars once, dispatch.

Every function validates ALL inputs before any kernel runs (a rejected call
leaves every buffer bit-identical), computes the per-call scalars in double
precision, picks the float32/float64 kernel by a dict lookup and calls it
once. Kernels live in the ISA module chosen at import (``fastadam._dispatch``).
"""
import math

import numpy as np

from . import _dispatch, _runtime, _threads
from ._validate import (F32, F64, check_grad_scale, check_hyper, check_step, float_array,
                        no_overlap, same_shape)

__all__ = ["adam_step", "adamw_step", "adam", "adamw", "plan_adam", "run", "grad_norm",
           "adam_scalars"]

_K = _dispatch.kernels
_ADAM = {F32: _K.adam32, F64: _K.adam64}
_ADAM_MULTI = {F32: _K.adam_multi32, F64: _K.adam_multi64}
_SUMSQ = {F32: _K.sumsq_multi32, F64: _K.sumsq_multi64}
_SINGLE_NAMES = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")
_LIST_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
_EMPTY_I64 = np.zeros(0, dtype=np.int64)


def adam_scalars(step, lr, beta1, beta2):
    """Per-step scalars in double: (-step_size, sqrt(bias_correction2)).

    ``bc1 = 1 - beta1**step``, ``bc2 = 1 - beta2**step``,
    ``step_size = lr / bc1`` -- exactly torch's fused Adam.
    """
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    return -(lr / bc1), math.sqrt(bc2)


def adam_step(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999),
              eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False,
              max_exp_avg_sq=None, maximize=False, grad_scale=None, n_threads=None):
    r"""One fused Adam (or AdamW) step over one buffer, in place.

    Parameters
    ----------
    param, exp_avg, exp_avg_sq : ndarray
        C-contiguous, writable, float32 or float64, all the same dtype and shape.
        Updated in place.
    grad : ndarray
        Same dtype and shape, C-contiguous; may be read-only. Never written.
    step : int
        The 1-based count of the update being applied (first call: 1).
    lr, betas, eps, weight_decay : float
        As ``torch.optim.Adam``.
    decoupled_weight_decay : bool
        False: L2 penalty added to the gradient (Adam). True: AdamW's
        ``p *= 1 - lr * weight_decay`` before the update.
    amsgrad : bool
        Use the running maximum of ``exp_avg_sq``, kept in ``max_exp_avg_sq``.
    maximize : bool
        Ascend instead of descend.
    grad_scale : float, optional
        Loss scale: the gradient is divided by it inside the same pass.
    n_threads : int, optional
        Threads; ``None`` resolves at call time (``set_num_threads``,
        ``OMP_NUM_THREADS``, ``threadpoolctl``). Small inputs run serially.

    Notes
    -----
    With t = ``step``, ``bc1 = 1 - b1**t``, ``bc2 = 1 - b2**t``, per element::

        g = -g if maximize;  g = g / grad_scale
        p = p * (1 - lr*wd)                  (decoupled)   | g = g + wd*p  (L2)
        m = m + (1-b1) * (g - m)
        v = b2 * v + (1-b2) * g*g
        vmax = max(vmax, v) (amsgrad)
        p = p - (lr/bc1) * m / (sqrt(v or vmax) / sqrt(bc2) + eps)

    rounded exactly like ``torch.optim.Adam(fused=True)`` (see DESIGN.md):
    the result is bitwise identical for every thread count and ISA module.
    Note that ``eps`` is added after dividing by ``sqrt(bc2)`` (torch's
    placement), unlike ``sparse_adam_step``.

    Examples
    --------
    >>> import numpy as np, fastadam as fa
    >>> p = np.ones(4, np.float32); g = np.full(4, 0.5, np.float32)
    >>> m = np.zeros_like(p); v = np.zeros_like(p)
    >>> fa.adam_step(p, g, m, v, step=1, lr=0.1)
    >>> p.round(6)
    array([0.9, 0.9, 0.9, 0.9], dtype=float32)
    """
    kernel, args = _plan_single(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps,
                                weight_decay, decoupled_weight_decay, amsgrad, max_exp_avg_sq,
                                maximize, grad_scale, n_threads)
    kernel(*args)


def _plan_single(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
                 decoupled_weight_decay, amsgrad, max_exp_avg_sq, maximize, grad_scale,
                 n_threads, names=_SINGLE_NAMES):
    """Validate one buffer's step; return (kernel, args) without running it.

    ``names``: what messages call (param, grad, exp_avg, exp_avg_sq,
    max_exp_avg_sq, step) -- list entries when called for a one-array list.
    """
    n_p, n_g, n_m, n_v, n_vm, n_step = names
    dt = float_array(n_p, param)
    float_array(n_g, grad, dt, writable=False)
    float_array(n_m, exp_avg, dt)
    float_array(n_v, exp_avg_sq, dt)
    shape = param.shape
    if grad.shape != shape:
        same_shape(n_g, grad, n_p, param)
    if exp_avg.shape != shape:
        same_shape(n_m, exp_avg, n_p, param)
    if exp_avg_sq.shape != shape:
        same_shape(n_v, exp_avg_sq, n_p, param)
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError(f"amsgrad=True needs {n_vm} (a buffer like {n_v})")
        float_array(n_vm, max_exp_avg_sq, dt)
        if max_exp_avg_sq.shape != shape:
            same_shape(n_vm, max_exp_avg_sq, n_p, param)
    else:
        max_exp_avg_sq = None
    if _runtime.first_overlap((param, exp_avg, exp_avg_sq, max_exp_avg_sq, grad)) is not None:
        no_overlap((n_p, n_m, n_v, n_vm, n_g), (param, exp_avg, exp_avg_sq, max_exp_avg_sq, grad))
    step = check_step(step, n_step)
    lr, b1, b2, eps, wd = check_hyper(lr, betas, eps, weight_decay)
    scaled, gs = check_grad_scale(grad_scale)
    nt = _threads.resolve(n_threads, param.size * (_threads.FP64_COST if dt is F64 else 1))
    nss, bc2s = adam_scalars(step, lr, b1, b2)
    if decoupled_weight_decay:
        decay, l2 = 1.0 - lr * wd, False
    else:
        decay, l2 = 1.0, wd != 0.0
    return _ADAM[dt], (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, nss, bc2s,
                       -1.0 if maximize else 1.0, gs, decay, wd, 1.0 - b1, 1.0 - b2, b2, eps,
                       l2, scaled, nt)


def adamw_step(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999),
               eps=1e-8, weight_decay=1e-2, amsgrad=False, max_exp_avg_sq=None,
               maximize=False, grad_scale=None, n_threads=None):
    """AdamW: ``adam_step`` with decoupled weight decay (default ``weight_decay=1e-2``).

    Examples
    --------
    >>> import numpy as np, fastadam as fa
    >>> p = np.ones(3); g = np.ones(3); m = np.zeros(3); v = np.zeros(3)
    >>> fa.adamw_step(p, g, m, v, step=1, lr=0.1, weight_decay=0.1)
    >>> np.round(p, 6)
    array([0.89, 0.89, 0.89])
    """
    adam_step(param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, betas=betas, eps=eps,
              weight_decay=weight_decay, decoupled_weight_decay=True, amsgrad=amsgrad,
              max_exp_avg_sq=max_exp_avg_sq, maximize=maximize, grad_scale=grad_scale,
              n_threads=n_threads)


def _as_list(name, x, n=None):
    if isinstance(x, np.ndarray) or not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of numpy arrays, got {type(x).__name__}")
    if n is not None and len(x) != n:
        raise ValueError(f"{name} must have {n} entries (one per param), got {len(x)}")
    return list(x)


def adam(params, grads, exp_avgs, exp_avg_sqs, *, steps, lr=1e-3, betas=(0.9, 0.999),
         eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False,
         max_exp_avg_sqs=None, maximize=False, grad_scale=None, n_threads=None):
    """Step a list of arrays of any lengths in ONE native call (per dtype).

    Same update as :func:`adam_step`, applied to ``params[i]`` with
    ``grads[i]``, ``exp_avgs[i]``, ``exp_avg_sqs[i]`` (and
    ``max_exp_avg_sqs[i]`` with amsgrad). ``steps`` is one int for all
    arrays or a list of one int per array (torch keeps a step per parameter).
    The total work is split across threads in chunks that ignore array
    boundaries, so hundreds of small tensors still use every core.
    Arrays of both float32 and float64 may be mixed across entries (one call
    per dtype); within an entry all buffers share the param's dtype.

    Examples
    --------
    >>> import numpy as np, fastadam as fa
    >>> ps = [np.ones(3, np.float32), np.ones(5, np.float32)]
    >>> gs = [np.ones_like(p) for p in ps]
    >>> ms = [np.zeros_like(p) for p in ps]; vs = [np.zeros_like(p) for p in ps]
    >>> fa.functional.adam(ps, gs, ms, vs, steps=1, lr=0.5)
    >>> round(float(ps[1][0]), 6)
    0.5
    """
    for call in plan_adam(params, grads, exp_avgs, exp_avg_sqs, steps=steps, lr=lr,
                          betas=betas, eps=eps, weight_decay=weight_decay,
                          decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                          max_exp_avg_sqs=max_exp_avg_sqs, maximize=maximize,
                          grad_scale=grad_scale, n_threads=n_threads):
        call[0](*call[1])


def run(plan):
    """Run the native calls of a plan from :func:`plan_adam` or
    :func:`plan_sparse_adam` (validated already: nothing here can reject)."""
    for kernel, args in plan:
        kernel(*args)


def plan_adam(params, grads, exp_avgs, exp_avg_sqs, *, steps, lr=1e-3, betas=(0.9, 0.999),
              eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False,
              max_exp_avg_sqs=None, maximize=False, grad_scale=None, n_threads=None,
              labels=None):
    """Validate everything for :func:`adam` and return its kernel calls
    (``(kernel, args)`` pairs, one per dtype) without running them.

    Optimizers validate all their param groups this way before writing any.
    ``labels[i]`` is the index that error messages give entry ``i`` (default
    ``i``; an optimizer passes each parameter's index among all its grads).
    """
    lab = (lambda i: i) if labels is None else labels.__getitem__
    params = _as_list("params", params)
    n = len(params)
    if n == 1 and type(grads) is list and type(exp_avgs) is list and len(grads) == 1 \
            and type(exp_avg_sqs) is list and len(exp_avgs) == 1 and len(exp_avg_sqs) == 1 \
            and (not amsgrad or (type(max_exp_avg_sqs) is list and len(max_exp_avg_sqs) == 1)):
        # one array: the single-buffer kernel, no pointer tables (per-call overhead)
        s0 = steps[0] if isinstance(steps, (list, tuple)) and len(steps) == 1 else steps
        names = tuple(f"{name}[{lab(0)}]" for name in _LIST_NAMES + ("steps",))
        return [_plan_single(params[0], grads[0], exp_avgs[0], exp_avg_sqs[0], s0, lr, betas,
                             eps, weight_decay, decoupled_weight_decay, amsgrad,
                             max_exp_avg_sqs[0] if amsgrad else None, maximize, grad_scale,
                             n_threads, names)]
    grads = _as_list("grads", grads, n)
    exp_avgs = _as_list("exp_avgs", exp_avgs, n)
    exp_avg_sqs = _as_list("exp_avg_sqs", exp_avg_sqs, n)
    if amsgrad:
        if max_exp_avg_sqs is None:
            raise ValueError("amsgrad=True needs max_exp_avg_sqs (one buffer per param)")
        vmaxs = _as_list("max_exp_avg_sqs", max_exp_avg_sqs, n)
    else:
        vmaxs = None
    if isinstance(steps, (list, tuple, np.ndarray)):
        if len(steps) != n:
            raise ValueError(f"steps must be one int or {n} ints (one per param), got {len(steps)}")
        step_list = [check_step(s, f"steps[{lab(i)}]") for i, s in enumerate(steps)]
    else:
        step_list = [check_step(steps, "steps")] * n
    lr, b1, b2, eps, wd = check_hyper(lr, betas, eps, weight_decay)
    scaled, gs = check_grad_scale(grad_scale)
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([vmaxs] if vmaxs is not None else [])
    ptrs = np.empty((5, n), dtype=np.int64)
    sizes = np.empty(n, dtype=np.int64)
    is64 = np.empty(n, dtype=np.int8)
    bad = _runtime.scan_lists(params, grads, exp_avgs, exp_avg_sqs, vmaxs, ptrs, sizes, is64)
    if bad >= 0:
        _explain_entry(lists, bad, lab(bad))
    nl = len(lists)
    itemsize = np.where(is64 != 0, 8, 4)
    nbytes = np.empty(nl * n, dtype=np.int64)
    nbytes.reshape(nl, n)[...] = sizes * itemsize  # (np.tile leaks in numpy 2.4)
    is_out = np.ones(nl * n, dtype=np.int8)
    is_out[n:2 * n] = 0  # grads are only read
    hit = _runtime.first_conflict(ptrs[:nl].ravel(), nbytes, is_out)
    if hit is not None:
        a, b = (f"{_LIST_NAMES[k // n]}[{lab(k % n)}]" for k in hit)
        raise ValueError(f"{a} and {b} share memory; outputs must not alias each other "
                         "or any gradient")
    nt_arg = n_threads
    _threads.resolve(nt_arg, 0)  # validate n_threads before any write
    if decoupled_weight_decay:
        decay, l2 = 1.0 - lr * wd, False
    else:
        decay, l2 = 1.0, wd != 0.0
    if len(set(step_list)) == 1:
        s0 = adam_scalars(step_list[0], lr, b1, b2)
        nss_all, bc2s_all = np.full(n, s0[0]), np.full(n, s0[1])
    else:
        scal = {s: adam_scalars(s, lr, b1, b2) for s in set(step_list)}
        nss_all = np.array([scal[s][0] for s in step_list])
        bc2s_all = np.array([scal[s][1] for s in step_list])
    calls = []
    for dt, flag in ((F32, 0), (F64, 1)):
        if n == 0:
            break
        mask = is64 == flag
        if mask.all():
            sel = ptrs, sizes, nss_all, bc2s_all
        elif mask.any():
            sel = (np.ascontiguousarray(ptrs[:, mask]), sizes[mask], nss_all[mask],
                   bc2s_all[mask])
        else:
            continue
        p_, sz, nss, bc2s = sel
        offsets = np.zeros(len(sz) + 1, dtype=np.int64)
        np.cumsum(sz, out=offsets[1:])
        nt = _threads.resolve(nt_arg, int(offsets[-1]) * (_threads.FP64_COST if flag else 1))
        calls.append((_ADAM_MULTI[dt], (p_[0], p_[1], p_[2], p_[3],
                      p_[4] if vmaxs is not None else _EMPTY_I64, offsets, nss, bc2s,
                      -1.0 if maximize else 1.0, gs, decay, wd, 1.0 - b1, 1.0 - b2, b2,
                      eps, l2, scaled, nt)))
    return calls



def _explain_entry(lists, i, label):
    """Raise the precise error for entry ``i`` (named ``label``) that the native
    scan rejected."""
    p = lists[0][i]
    dt = float_array(f"params[{label}]", p)
    for j in range(1, len(lists)):
        name = f"{_LIST_NAMES[j]}[{label}]"
        float_array(name, lists[j][i], dt, writable=j != 1)
        same_shape(name, lists[j][i], f"params[{label}]", p)
    raise ValueError(f"params[{label}]: invalid entry")  # pragma: no cover - scan and checks agree


def adamw(params, grads, exp_avgs, exp_avg_sqs, *, steps, weight_decay=1e-2, **kwargs):
    """AdamW over lists: :func:`adam` with ``decoupled_weight_decay=True``."""
    adam(params, grads, exp_avgs, exp_avg_sqs, steps=steps, weight_decay=weight_decay,
         decoupled_weight_decay=True, **kwargs)


def _pointers(arrays):
    out = np.empty(len(arrays), dtype=np.int64)
    _runtime.addresses(arrays, out)
    return out


def grad_norm(grads, *, n_threads=None):
    """L2 norm of all gradients together, in one threaded pass.

    Accumulates in double over fixed blocks (bitwise identical for any thread
    count and ISA module). Returns ``inf`` or ``nan`` when any element is
    non-finite, so AMP skip-on-overflow and gradient clipping need no extra
    numpy pass. Accepts one array or a list of float32/float64 arrays (may
    be read-only, must be C-contiguous).

    Examples
    --------
    >>> import numpy as np, fastadam as fa
    >>> fa.grad_norm([np.array([3.0, 0.0]), np.array([4.0], np.float32)])
    5.0
    """
    if isinstance(grads, np.ndarray):
        grads = [grads]
    grads = _as_list("grads", grads)
    groups = {}
    for i, g in enumerate(grads):
        dt = float_array(f"grads[{i}]", g, writable=False)
        groups.setdefault(dt, []).append(g)
    _threads.resolve(n_threads, 0)
    total = 0.0
    for dt in (F32, F64):
        gs = groups.get(dt)
        if not gs:
            continue
        offsets = np.zeros(len(gs) + 1, dtype=np.int64)
        np.cumsum(np.fromiter((g.size for g in gs), dtype=np.int64, count=len(gs)),
                  out=offsets[1:])
        nt = _threads.resolve(n_threads, int(offsets[-1]))
        total += _SUMSQ[dt](_pointers(gs), offsets, nt)
    if math.isinf(total):
        # Squares overflowed double (|g| > 1e154) or an element is inf: rescale.
        amax = max((float(np.max(np.abs(g))) for g in grads if g.size), default=0.0)
        if math.isfinite(amax) and amax > 0.0:
            return amax * math.sqrt(sum(float(np.sum(np.square(g / amax, dtype=np.float64)))
                                        for g in grads))
    return math.sqrt(total)
from .sparse import sparse_adam_step  # noqa: E402,F401  (issue 4: the sparse path)
