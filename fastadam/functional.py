"""Functional API (layer 2): validate, build the kernel call, run it.

Dense and sparse entries side by side. Every function validates ALL inputs
before any kernel runs (a rejected call leaves every buffer bit-identical),
has ``fastadam._plan`` build the kernel's ``args``/``flags`` in double
precision once per call, selects the kernel by (param, grad, state) dtype
with one dict lookup and calls it once. ``plan_adam`` / ``plan_sparse_adam``
do all of that except the call and return a plan; optimizers plan every
param group first and :func:`run` the plans after, so a bad value anywhere
writes nothing anywhere.
"""
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

from . import _plan, _quant, _runtime, _threads
from ._validate import (
    F32,
    F64,
    MAX_STEP,
    SCAN_DTYPES,
    check_bool,
    check_buffer,
    check_grad_scale,
    check_hyper,
    check_step,
    describe,
    id_out_of_range,
    negative_row_step,
    no_overlap,
    same_dtype,
    same_shape,
)

__all__ = ["adam_step", "adamw_step", "adam", "adamw", "sparse_adam_step", "grad_norm",
           "plan_adam", "plan_sparse_adam", "run", "CatchUpHistory", "sparse_adam_catchup_step",
           "sparse_adam_catch_up",
           "adam8bit_step", "adamw8bit_step",
           "adam8bit", "adamw8bit", "plan_adam8bit", "new_state8bit",
           "sparse_adam8bit_step", "plan_sparse_adam8bit", "new_sparse_state8bit"]

Array = npt.NDArray[Any]
Real = Union[float, int]
Betas = tuple[Real, Real]
Steps = Union[int, Sequence[int]]
#: What ``plan_adam``/``plan_sparse_adam`` return and :func:`run` runs.
Plan = list[tuple[Callable[..., Any], tuple[Any, ...]]]

_SINGLE_NAMES = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")
_LIST_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
_EMPTY_I64 = np.zeros(0, dtype=np.int64)
# the dtype combinations ``_runtime.sparse_scan`` recognises (its result)
_SCAN_KEYS = ((F32, F32, F32), (F64, F64, F64))
# ``_runtime.scan_lists`` accepts entries of one dtype, any of SCAN_DTYPES
# (``key_of``: its index there): those keys and their item sizes
_LIST_KEYS = tuple((dt, dt, dt) for dt in SCAN_DTYPES)
_LIST_ITEMSIZE = np.array([dt.itemsize for dt in SCAN_DTYPES], dtype=np.int64)


def _kernels():
    # the kernel table of the ISA module in use, read at call time: rebinding
    # ``_plan.KERNELS`` to ``_plan.Kernels(module)`` runs another built module
    # through the same validation and argument builder
    return _plan.KERNELS


# ------------------------------------------------------------------ dense

def adam_step(param: Array, grad: Array, exp_avg: Array, exp_avg_sq: Array, *, step: int,
              lr: Real = 1e-3, betas: Betas = (0.9, 0.999), eps: Real = 1e-8,
              weight_decay: Real = 0.0, decoupled_weight_decay: bool = False,
              amsgrad: bool = False, max_exp_avg_sq: Optional[Array] = None,
              maximize: bool = False, grad_scale: Optional[Real] = None,
              n_threads: Optional[int] = None, param_copy: Optional[Array] = None,
              stochastic_rounding: bool = False, seed: int = 0) -> None:
    """One fused Adam (or AdamW) step over one buffer, in place.

    Parameters
    ----------
    param, exp_avg, exp_avg_sq : ndarray
        C-contiguous, writable, all of one shape; float32, float64,
        ``ml_dtypes.bfloat16`` or ``np.float16`` in a combination that has a
        kernel (docs: Precision): one dtype throughout, or float32 params with
        bfloat16/float16 grads and/or bfloat16 state. Updated in place.
    grad : ndarray
        Same shape, C-contiguous; may be read-only. Never written.
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
    param_copy : ndarray, optional
        bfloat16 or float16 buffer of the param's shape (float32 params):
        the updated param is also written there, rounded to nearest even, in
        the same pass (the low-precision copy a ZeRO-Offload loop sends back).
    stochastic_rounding : bool
        Round the bfloat16 params and/or state stochastically instead of to
        nearest even (unbiased); the bits come from a hash of ``(seed,
        step, element index)``: reproducible for any thread count and ISA.
    seed : int
        The stochastic-rounding seed (an int in ``[0, 2**64)``).

    Notes
    -----
    Arithmetic is float32 for 16-bit buffers (widened exactly on load,
    rounded once on store); all-bfloat16 and all-float16 steps equal
    ``torch.optim.Adam(fused=True)`` on that dtype bit for bit.

    With t = ``step``, ``bc1 = 1 - b1**t``, ``bc2 = 1 - b2**t``, per element::

        g = -g if maximize;  g = g / grad_scale
        p = p * (1 - lr*wd)                  (decoupled)   | g = g + wd*p  (L2)
        m = m + (1-b1) * (g - m)
        v = b2 * v + (1-b2) * g*g
        vmax = max(vmax, v) (amsgrad)
        p = p - (lr/bc1) * m / (sqrt(v or vmax) / sqrt(bc2) + eps)

    rounded exactly like ``torch.optim.Adam(fused=True)`` (docs: Semantics):
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
    run(_plan_single(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
                     decoupled_weight_decay, amsgrad, max_exp_avg_sq, maximize, grad_scale,
                     n_threads, param_copy=param_copy,
                     stochastic_rounding=stochastic_rounding, seed=seed))


def _plan_single(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
                 decoupled_weight_decay, amsgrad, max_exp_avg_sq, maximize, grad_scale,
                 n_threads, names=_SINGLE_NAMES, op="adam", param_copy=None,
                 stochastic_rounding=False, seed=0, copy_name="param_copy"):
    """Validate one buffer's step; return its plan without running it.

    ``names``: what messages call (param, grad, exp_avg, exp_avg_sq,
    max_exp_avg_sq, step) -- list entries when called for a one-array list.
    ``op``: the kernel-table op (a variant with Adam's buffers reuses all of
    this validation). ``param_copy`` / ``stochastic_rounding`` select the
    copy / stochastic-rounding kernels (op ``adam_copy`` / ``adam_sr``).
    """
    _check_flags(decoupled_weight_decay, amsgrad, maximize)
    if amsgrad and max_exp_avg_sq is None:
        raise ValueError(f"amsgrad=True needs {names[4]} (a buffer like {names[3]})")
    if not amsgrad:
        max_exp_avg_sq = None
    extra = _extra_kind(param_copy, stochastic_rounding, copy_name)
    fast = -1 if extra else _runtime.dense_scan(param, grad, exp_avg, exp_avg_sq,
                                                max_exp_avg_sq)
    kernel = _kernels().scanned(op, fast) if fast >= 0 else None
    if kernel is not None:      # the usual call, checked natively in one go
        pdt = SCAN_DTYPES[fast & 7]
    else:              # anything else: the Python checks word the error
        pdt, kernel = _check_single(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, names,
                                    _extra_op(op, extra), param_copy, copy_name)
    if not (type(step) is int and 1 <= step <= MAX_STEP):
        step = check_step(step, names[5])
    lr, b1, b2, eps, wd = check_hyper(lr, betas, eps, weight_decay)
    scaled, scale = check_grad_scale(grad_scale, pdt)
    nt = _threads.resolve(n_threads, param.size * (_threads.FP64_COST if pdt is F64 else 1))
    args, flags = _plan.hyper_args(lr, b1, b2, eps, wd, decoupled_weight_decay, maximize,
                                   scale if scaled else None)
    args = _plan.with_step(args, *_plan.dense_step_scalars(step, lr, b1, b2))
    if extra == "sr":
        key = _plan.sr_key(_check_seed(seed), step)
        return [(kernel, (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, key, args, flags,
                          nt))]
    if extra == "copy":
        return [(kernel, (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_copy, args,
                          flags, nt))]
    return [(kernel, (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, args, flags, nt))]


def _extra_kind(param_copy, stochastic_rounding, copy_name="param_copy"):
    """Which extra kernel family a call needs: "" (none), "copy" or "sr"."""
    if type(stochastic_rounding) is not bool:
        check_bool(stochastic_rounding, "stochastic_rounding")
    if param_copy is not None and stochastic_rounding:
        raise ValueError(f"{copy_name} and stochastic_rounding=True cannot be combined: the "
                         "copy is of a float32 master, which is rounded to nearest even")
    return "copy" if param_copy is not None else ("sr" if stochastic_rounding else "")


def _extra_op(op, extra):
    """The kernel-table op of ``op`` (``adam``/``adam_multi``) for an extra family."""
    return op if not extra else op.replace("adam", f"adam_{extra}", 1)


def _check_seed(seed, name="seed"):
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {seed}")
    return int(seed)


def _sr_kernel_error(op, pdt, gdt, sdt, names):
    """The TypeError for stochastic rounding asked of a combination without it."""
    have = ", ".join("(" + ", ".join(k[1:4]) + ")" for k in _plan.I.KERNELS if k[0] == op)
    return TypeError(f"stochastic_rounding=True: no kernel for {names[0]} {pdt}, {names[1]} "
                     f"{gdt}, {names[2]} {sdt}; it rounds bfloat16 params and/or state "
                     f"(supported (param, grad, state): {have})")


def _check_single(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, names, op,
                  param_copy=None, copy_name="param_copy"):
    """The buffer checks of :func:`_plan_single`, each with its message;
    returns ``(param dtype, kernel)``."""
    n_p, n_g, n_m, n_v, n_vm, _ = names
    pdt = check_buffer(n_p, param)
    gdt = check_buffer(n_g, grad, writable=False)
    sdt = check_buffer(n_m, exp_avg)
    same_dtype(n_v, check_buffer(n_v, exp_avg_sq), n_m, sdt)
    if param_copy is not None:
        cdt = check_buffer(copy_name, param_copy)
        kernel = _kernels().get(op, pdt, gdt, sdt, (n_p, n_g, n_m, copy_name), copy=cdt)
        if param_copy.shape != param.shape:
            same_shape(copy_name, param_copy, n_p, param)
    elif op.startswith("adam_sr"):
        try:
            kernel = _kernels().get(op, pdt, gdt, sdt, (n_p, n_g, n_m))
        except TypeError:
            raise _sr_kernel_error(op, pdt, gdt, sdt, (n_p, n_g, n_m)) from None
    else:
        kernel = _kernels().get(op, pdt, gdt, sdt, (n_p, n_g, n_m))
    shape = param.shape
    if grad.shape != shape:
        same_shape(n_g, grad, n_p, param)
    if exp_avg.shape != shape:
        same_shape(n_m, exp_avg, n_p, param)
    if exp_avg_sq.shape != shape:
        same_shape(n_v, exp_avg_sq, n_p, param)
    if max_exp_avg_sq is not None:
        same_dtype(n_vm, check_buffer(n_vm, max_exp_avg_sq), n_m, sdt)
        if max_exp_avg_sq.shape != shape:
            same_shape(n_vm, max_exp_avg_sq, n_p, param)
    bufs = (param, exp_avg, exp_avg_sq, max_exp_avg_sq, param_copy, grad)
    if _runtime.first_overlap(bufs) is not None:
        no_overlap((n_p, n_m, n_v, n_vm, copy_name, n_g), bufs)
    return pdt, kernel


def adamw_step(param: Array, grad: Array, exp_avg: Array, exp_avg_sq: Array, *, step: int,
               lr: Real = 1e-3, betas: Betas = (0.9, 0.999), eps: Real = 1e-8,
               weight_decay: Real = 1e-2, amsgrad: bool = False,
               max_exp_avg_sq: Optional[Array] = None, maximize: bool = False,
               grad_scale: Optional[Real] = None, n_threads: Optional[int] = None,
               param_copy: Optional[Array] = None, stochastic_rounding: bool = False,
               seed: int = 0) -> None:
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
              n_threads=n_threads, param_copy=param_copy,
              stochastic_rounding=stochastic_rounding, seed=seed)


def _check_flags(decoupled_weight_decay, amsgrad, maximize):
    """The boolean options must be bools (``maximize="false"`` is an error)."""
    if type(decoupled_weight_decay) is not bool:
        check_bool(decoupled_weight_decay, "decoupled_weight_decay")
    if type(amsgrad) is not bool:
        check_bool(amsgrad, "amsgrad")
    if type(maximize) is not bool:
        check_bool(maximize, "maximize")


def _as_list(name: str, x: Any, n: Optional[int] = None) -> list[Any]:
    if isinstance(x, np.ndarray) or not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of numpy arrays, got {type(x).__name__}")
    if n is not None and len(x) != n:
        raise ValueError(f"{name} must have {n} entries (one per param), got {len(x)}")
    return list(x)


def adam(params: Sequence[Array], grads: Sequence[Array], exp_avgs: Sequence[Array],
         exp_avg_sqs: Sequence[Array], *, steps: Steps, lr: Real = 1e-3,
         betas: Betas = (0.9, 0.999), eps: Real = 1e-8, weight_decay: Real = 0.0,
         decoupled_weight_decay: bool = False, amsgrad: bool = False,
         max_exp_avg_sqs: Optional[Sequence[Array]] = None, maximize: bool = False,
         grad_scale: Optional[Real] = None, n_threads: Optional[int] = None,
         param_copies: Optional[Sequence[Array]] = None, stochastic_rounding: bool = False,
         seed: int = 0) -> None:
    """Step a list of arrays of any lengths in ONE native call (per dtype).

    Same update as :func:`adam_step`, applied to ``params[i]`` with
    ``grads[i]``, ``exp_avgs[i]``, ``exp_avg_sqs[i]`` (and
    ``max_exp_avg_sqs[i]`` with amsgrad). ``steps`` is one int for all
    arrays or a list of one int per array (torch keeps a step per parameter).
    The total work is split across threads in chunks that ignore array
    boundaries, so hundreds of small tensors still use every core.
    Dtype combinations may be mixed across entries (one call per
    combination); within an entry the buffers form a combination of
    :func:`adam_step`. ``param_copies`` (one 16-bit buffer per entry) and
    ``stochastic_rounding`` as in :func:`adam_step`; entry ``i`` rounds with
    its own seed, ``fastadam._plan.array_seed(seed, i)``.

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
    run(plan_adam(params, grads, exp_avgs, exp_avg_sqs, steps=steps, lr=lr, betas=betas,
                  eps=eps, weight_decay=weight_decay,
                  decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                  max_exp_avg_sqs=max_exp_avg_sqs, maximize=maximize, grad_scale=grad_scale,
                  n_threads=n_threads, param_copies=param_copies,
                  stochastic_rounding=stochastic_rounding, seed=seed))


def adamw(params: Sequence[Array], grads: Sequence[Array], exp_avgs: Sequence[Array],
          exp_avg_sqs: Sequence[Array], *, steps: Steps, weight_decay: Real = 1e-2,
          **kwargs: Any) -> None:
    """AdamW over lists: :func:`adam` with ``decoupled_weight_decay=True``."""
    adam(params, grads, exp_avgs, exp_avg_sqs, steps=steps, weight_decay=weight_decay,
         decoupled_weight_decay=True, **kwargs)


def run(plan: Plan) -> None:
    """Run the native calls of a plan from :func:`plan_adam` or
    :func:`plan_sparse_adam` (validated already: nothing here can reject)."""
    for kernel, args in plan:
        kernel(*args)


def plan_adam(params: Sequence[Array], grads: Sequence[Array], exp_avgs: Sequence[Array],
              exp_avg_sqs: Sequence[Array], *, steps: Steps, lr: Real = 1e-3,
              betas: Betas = (0.9, 0.999), eps: Real = 1e-8, weight_decay: Real = 0.0,
              decoupled_weight_decay: bool = False, amsgrad: bool = False,
              max_exp_avg_sqs: Optional[Sequence[Array]] = None, maximize: bool = False,
              grad_scale: Optional[Real] = None, n_threads: Optional[int] = None,
              labels: Optional[Sequence[int]] = None, _op: str = "adam",
              param_copies: Optional[Sequence[Array]] = None,
              stochastic_rounding: bool = False, seed: int = 0) -> Plan:
    """Validate everything for :func:`adam` and return its plan -- one native
    call per dtype combination -- without running it (see :func:`run`).

    Optimizers validate all their param groups this way before writing any.
    ``labels[i]`` is the index that error messages give entry ``i`` (default
    ``i``; an optimizer passes each parameter's index among all its grads).
    """
    lab = (lambda i: i) if labels is None else labels.__getitem__
    _check_flags(decoupled_weight_decay, amsgrad, maximize)
    extra = _extra_kind(param_copies, stochastic_rounding, "param_copies")
    params = _as_list("params", params)
    n = len(params)
    copies: list[Any] = []
    if extra:
        if extra == "copy":
            copies = _as_list("param_copies", param_copies, n)
        seed = _check_seed(seed)
    if n == 1 and type(grads) is list and type(exp_avgs) is list and len(grads) == 1 \
            and type(exp_avg_sqs) is list and len(exp_avgs) == 1 and len(exp_avg_sqs) == 1 \
            and (not amsgrad or (type(max_exp_avg_sqs) is list and len(max_exp_avg_sqs) == 1)):
        # one array: the single-buffer kernel, no pointer tables (per-call overhead)
        s0 = steps[0] if isinstance(steps, (list, tuple)) and len(steps) == 1 else steps
        names = _EntryNames(lab(0))
        return _plan_single(params[0], grads[0], exp_avgs[0], exp_avg_sqs[0], s0, lr, betas,
                            eps, weight_decay, decoupled_weight_decay, amsgrad,
                            max_exp_avg_sqs[0] if amsgrad and max_exp_avg_sqs else None,
                            maximize, grad_scale,
                            n_threads, names, op=_op,
                            param_copy=copies[0] if extra == "copy" else None,
                            stochastic_rounding=extra == "sr",
                            seed=_plan.array_seed(seed, lab(0)) if extra == "sr" else 0,
                            copy_name=f"param_copies[{lab(0)}]")
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
    scaled, scale = check_grad_scale(grad_scale)
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([vmaxs] if vmaxs is not None else [])
    ptrs = np.empty((5, n), dtype=np.int64)
    sizes = np.empty(n, dtype=np.int64)
    key_of = np.empty(n, dtype=np.int8)
    keys = _LIST_KEYS
    bad = 0 if extra else _runtime.scan_lists(params, grads, exp_avgs, exp_avg_sqs, vmaxs, ptrs,
                                              sizes, key_of)
    mop = f"{_op}_multi"
    if bad < 0 and not _kernels().homogeneous(mop):
        bad = 0     # a dtype may lack this op's kernel: the Python checks word the error
    if bad >= 0:
        # not the homogeneous fast case: check every entry in Python (this
        # raises the precise error, or accepts a mixed-dtype combination)
        keys = _scan_entries(lists, ptrs, sizes, key_of, lab, _extra_op(_op, extra),
                             copies if extra == "copy" else None)
    row_names = list(_LIST_NAMES[:len(lists)])
    if extra == "copy":     # the copies' pointers: the row after the state's
        crow = np.array([a.ctypes.data for a in copies], dtype=np.int64).reshape(1, n)
        if vmaxs is None:
            ptrs[4] = crow
        else:
            ptrs = np.concatenate([ptrs, crow])
        lists = lists + [copies]
        row_names.append("param_copies")
    nl = len(lists)
    span = np.empty((nl, n), dtype=np.int64)      # bytes of every buffer
    if bad < 0:
        span[...] = sizes * _LIST_ITEMSIZE[key_of]  # (np.tile leaks in numpy 2.4)
    else:
        for j, lst in enumerate(lists):
            span[j] = [a.nbytes for a in lst]
    nbytes = span.ravel()
    is_out = np.ones(nl * n, dtype=np.int8)
    is_out[n:2 * n] = 0  # grads are only read
    hit = _runtime.first_conflict(ptrs[:nl].ravel(), nbytes, is_out)
    if hit is not None:
        a, b = (f"{row_names[k // n]}[{lab(k % n)}]" for k in hit)
        raise ValueError(f"{a} and {b} share memory; outputs must not alias each other "
                         "or any gradient")
    nt_arg = _threads.check(n_threads)
    args, flags = _plan.hyper_args(lr, b1, b2, eps, wd, decoupled_weight_decay, maximize,
                                   scale if scaled else None)
    if len(set(step_list)) == 1:
        s0 = _plan.dense_step_scalars(step_list[0], lr, b1, b2)
        neg_step_all, bc2s_all = np.full(n, s0[0]), np.full(n, s0[1])
    else:
        scal = {s: _plan.dense_step_scalars(s, lr, b1, b2) for s in set(step_list)}
        neg_step_all = np.array([scal[s][0] for s in step_list])
        bc2s_all = np.array([scal[s][1] for s in step_list])
    if extra == "sr":
        sr_all = np.array([_plan.sr_key(_plan.array_seed(seed, lab(i)), s)
                           for i, s in enumerate(step_list)], dtype=np.uint64).view(np.int64)
    plan = []
    for ki, key in enumerate(keys):
        pdt, gdt, sdt = key[:3]
        cdt = key[3] if len(key) > 3 else None
        if n == 0:
            break
        mask = key_of == ki
        if mask.all():
            sel = ptrs, sizes, neg_step_all, bc2s_all, mask
        elif mask.any():
            sel = (np.ascontiguousarray(ptrs[:, mask]), sizes[mask], neg_step_all[mask],
                   bc2s_all[mask], mask)
        else:
            continue
        p_, sz, neg_steps, bc2s, mask = sel
        if scaled:
            check_grad_scale(scale, pdt)     # in the range of this call's arithmetic
        offsets = np.zeros(len(sz) + 1, dtype=np.int64)
        np.cumsum(sz, out=offsets[1:])
        nt = _threads.resolve(nt_arg, int(offsets[-1]) * (_threads.FP64_COST if pdt is F64 else 1))
        kernel = _kernels().get(_extra_op(mop, extra), pdt, gdt, sdt, copy=cdt)
        tail = ((np.ascontiguousarray(p_[nl - 1]),) if extra == "copy"
                else (np.ascontiguousarray(sr_all[mask]),) if extra == "sr" else ())
        plan.append((kernel, (p_[0], p_[1], p_[2], p_[3],
                              p_[4] if vmaxs is not None else _EMPTY_I64, offsets, neg_steps, bc2s)
                     + tail + (_plan.with_step(args, 0.0, 1.0), flags, nt)))
    return plan


class _EntryNames:
    """The names entry ``label`` of the lists goes by in messages
    (``params[3]``, ..., ``steps[3]``), formatted only when a message needs one."""

    __slots__ = ("label",)
    _NAMES = _LIST_NAMES + ("steps",)

    def __init__(self, label):
        self.label = label

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self._NAMES))))
        return f"{self._NAMES[i]}[{self.label}]"

    def __len__(self):
        return len(self._NAMES)


def _scan_entries(lists, ptrs, sizes, key_of, lab, op="adam", copies=None):
    """The Python check of every list entry (what the native scan does for
    the homogeneous combinations, for any combination the kernel table has):
    fills ``ptrs``, ``sizes``, ``key_of`` and returns the list of keys
    (``(param, grad, state)`` dtypes; with ``copies``, + the copy's)."""
    keys = []
    mop = f"{op}_multi"
    for i in range(len(lists[0])):
        label = lab(i)
        names = [f"{name}[{label}]" for name in _LIST_NAMES]
        p = lists[0][i]
        pdt = check_buffer(names[0], p)
        gdt = check_buffer(names[1], lists[1][i], writable=False)
        sdt = check_buffer(names[2], lists[2][i])
        for j in range(3, len(lists)):
            same_dtype(names[j], check_buffer(names[j], lists[j][i]), names[2], sdt)
        key: tuple[Any, ...] = (pdt, gdt, sdt)
        if copies is not None:
            cname = f"param_copies[{label}]"
            cdt = check_buffer(cname, copies[i])
            _kernels().get(mop, pdt, gdt, sdt, names[:3] + [cname], copy=cdt)
            same_shape(cname, copies[i], names[0], p)
            key = (pdt, gdt, sdt, cdt)
        elif op.startswith("adam_sr"):
            try:
                _kernels().get(mop, pdt, gdt, sdt, names[:3])
            except TypeError:
                raise _sr_kernel_error(mop, pdt, gdt, sdt, names[:3]) from None
        else:
            _kernels().get(mop, pdt, gdt, sdt, names[:3])
        for j in range(1, len(lists)):
            same_shape(names[j], lists[j][i], names[0], p)
        if key not in keys:
            keys.append(key)
        key_of[i] = keys.index(key)
        sizes[i] = p.size
        for j, lst in enumerate(lists):
            ptrs[j, i] = lst[i].ctypes.data
    return keys


def grad_norm(grads: Union[Array, Sequence[Array]], *,
              n_threads: Optional[int] = None) -> float:
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
    groups: dict[np.dtype, list[Array]] = {}
    for i, g in enumerate(grads):
        dt = check_buffer(f"grads[{i}]", g, writable=False)
        groups.setdefault(dt, []).append(g)
    _threads.check(n_threads)
    total = 0.0
    for dt, arrays in groups.items():
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(np.fromiter((g.size for g in arrays), dtype=np.int64, count=len(arrays)),
                  out=offsets[1:])
        nt = _threads.resolve(n_threads, int(offsets[-1]))
        ptrs = np.empty(len(arrays), dtype=np.int64)
        _runtime.addresses(arrays, ptrs)
        total += _kernels().norm(dt)(ptrs, offsets, nt)
    if math.isinf(total):
        # Squares overflowed double (|g| > 1e154) or an element is inf: rescale.
        amax = max((float(np.max(np.abs(g))) for g in grads if g.size), default=0.0)
        if math.isfinite(amax) and amax > 0.0:
            return amax * math.sqrt(sum(float(np.sum(np.square(g / amax, dtype=np.float64)))
                                        for g in grads))
    return math.sqrt(total)


# ----------------------------------------------------------------- sparse

_I32 = np.dtype(np.int32)
_I64 = np.dtype(np.int64)
_SPARSE_OUT_NAMES = ("table", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "row_step")
_SPARSE_BAD_ID = 1
# 16-bit dtypes of gradient rows, widened to float32 before the sparse kernel
_ROWS16 = tuple(dt for name, dt in _plan.DTYPES.items() if name in ("bfloat16", "float16"))


def sparse_adam_step(table: Array, indices: Array, grad_rows: Array, exp_avg: Array,
                     exp_avg_sq: Array, *, step: Optional[int] = None, lr: Real = 1e-3,
                     betas: Betas = (0.9, 0.999), eps: Real = 1e-8, weight_decay: Real = 0.0,
                     decoupled_weight_decay: bool = False, amsgrad: bool = False,
                     max_exp_avg_sq: Optional[Array] = None, maximize: bool = False,
                     row_step: Optional[Array] = None,
                     n_threads: Optional[int] = None) -> None:
    """One sparse ("lazy") Adam step of the rows of ``table`` that a batch touched, in place.

    Duplicate ids are summed first (in native code, in batch order, so the
    result is bitwise identical for any thread count), then every touched
    row is updated once; all other rows of the table and of its state stay
    bit-identical. The default arithmetic is ``torch.optim.SparseAdam``'s.

    Parameters
    ----------
    table : ndarray, shape (n_rows, dim)
        float32, float64 or ``ml_dtypes.bfloat16``, C-contiguous, writable
        (``np.memmap`` works: only touched rows are read or written). float32
        tables may keep bfloat16 state (``exp_avg``...), bfloat16 tables keep
        bfloat16 state; 16-bit ``grad_rows`` are widened to float32 first.
    indices : ndarray, shape (k,)
        int32 or int64 row ids in ``[0, n_rows)``, any order, duplicates
        allowed (other integer dtypes are converted). May be read-only.
    grad_rows : ndarray, shape (k, dim)
        The gradient row for each id (``grad_rows[i]`` belongs to
        ``indices[i]``), same dtype as ``table``, C-contiguous; may be read-only.
    exp_avg : ndarray, shape (n_rows, dim)
        First moment, same dtype; updated in place on touched rows.
    exp_avg_sq : ndarray, shape (n_rows, dim) or (n_rows,)
        Second moment. Shape ``(n_rows,)`` selects the **row-wise** second
        moment (one value per row; see Notes).
    step : int
        The 1-based count of the update being applied (torch's global
        ``state['step']`` after its increment). Used for bias correction
        unless ``row_step`` is given (then it may be omitted).
    lr, betas, eps : float
        As ``torch.optim.SparseAdam``. Note where ``eps`` sits (Notes).
    weight_decay : float
        Weight decay applied to touched rows only (off by default).
    decoupled_weight_decay : bool
        False: L2, ``g += wd * p``. True: AdamW-style ``p *= 1 - lr * wd``.
    amsgrad : bool
        Use the running maximum of the second moment, kept in
        ``max_exp_avg_sq`` (same shape as ``exp_avg_sq``).
    max_exp_avg_sq : ndarray, optional
        Required when ``amsgrad``; ignored otherwise.
    maximize : bool
        Ascend instead of descend (the merged gradient is negated).
    row_step : ndarray of int64, shape (n_rows,), optional
        Per-row step counts: each touched row's count is incremented and
        used for that row's bias correction (rows that are rarely touched
        keep a strong correction). Off (None) by default.
    n_threads : int, optional
        Threads; ``None`` resolves at call time. Small batches run serially.

    Raises
    ------
    TypeError
        Wrong types or dtypes (float32/float64 mixed, non-integer indices).
    ValueError
        Bad shapes, non-contiguous or read-only outputs, aliasing buffers,
        hyperparameters out of range.
    IndexError
        An id outside ``[0, n_rows)``; the message names the first bad id
        and its position.

    Every check runs before anything is written: a rejected call leaves
    every buffer bit-identical. An empty batch is a no-op.

    Notes
    -----
    With g the sum of the batch's gradient rows for a touched row (in batch
    order), t = ``step`` (or the row's count with ``row_step``),
    ``bc1 = 1 - b1**t``, ``bc2 = 1 - b2**t``, and ``fl()`` rounding a
    double to the array dtype, per element of the row (no fma)::

        g = -g                                  if maximize
        p = p * fl(1 - lr*wd)                   if decoupled weight decay
        g = g + p * fl(wd)                      if L2 weight decay
        m = m + (g - m) * fl(1 - b1)
        v = v + (g*g - v) * fl(1 - b2)
        u = vmax = max(vmax, v)                 if amsgrad, else u = v
        p = p + fl(-lr*sqrt(bc2)/bc1) * (m / (sqrt(u) + fl(eps)))

    Differences from dense Adam (:func:`fastadam.adam_step`): untouched rows
    keep their moments (no decay while absent, "lazy"); ``eps`` is added to
    ``sqrt(v)`` *before* the bias correction (sparse eps = dense eps x
    sqrt(bc2)), as torch's SparseAdam does; weight decay, if enabled, only
    reaches touched rows.

    Row-wise second moment (``exp_avg_sq`` of shape ``(n_rows,)``, as
    FBGEMM's partial-rowwise Adam): per touched row, ``gm`` = the mean over
    the row of ``g*g`` (summed in double), then ``v = v + (gm - v) * fl(1 -
    b2)`` once for the row, and every element uses ``sqrt(v) + eps``. The
    optimizer state falls from 2x to about 1x the table.

    Examples
    --------
    >>> import numpy as np, fastadam as fa
    >>> table = np.zeros((5, 2), np.float32)
    >>> m = np.zeros_like(table); v = np.zeros_like(table)
    >>> ids = np.array([3, 1, 3])                     # id 3 twice: grads summed
    >>> g = np.ones((3, 2), np.float32)
    >>> fa.sparse_adam_step(table, ids, g, m, v, step=1, lr=0.1)
    >>> np.round(table, 4)
    array([[ 0. ,  0. ],
           [-0.1, -0.1],
           [ 0. ,  0. ],
           [-0.1, -0.1],
           [ 0. ,  0. ]], dtype=float32)
    >>> m[3]                                          # (1 - 0.9) * (1 + 1)
    array([0.2, 0.2], dtype=float32)
    """
    # the ids' range is checked inside the kernel's merge, before any write
    run(_plan_sparse(table, indices, grad_rows, exp_avg, exp_avg_sq, step, lr, betas, eps,
                     weight_decay, decoupled_weight_decay, amsgrad, max_exp_avg_sq, maximize,
                     row_step, n_threads))


def plan_sparse_adam(table: Array, indices: Array, grad_rows: Array, exp_avg: Array,
                     exp_avg_sq: Array, *, step: Optional[int] = None, lr: Real = 1e-3,
                     betas: Betas = (0.9, 0.999), eps: Real = 1e-8, weight_decay: Real = 0.0,
                     decoupled_weight_decay: bool = False, amsgrad: bool = False,
                     max_exp_avg_sq: Optional[Array] = None, maximize: bool = False,
                     row_step: Optional[Array] = None,
                     n_threads: Optional[int] = None) -> Plan:
    """Validate a :func:`sparse_adam_step` call completely -- row ids and per-row
    counts included -- and return its plan (run it with
    :func:`fastadam.functional.run`) without writing anything.

    Optimizers that step several tables (or dense and sparse parameters
    together) plan every call first, so a bad id in a later table leaves
    every earlier one untouched. :func:`sparse_adam_step` itself leaves the
    id check to the kernel's merge (one pass fewer).
    """
    plan = _plan_sparse(table, indices, grad_rows, exp_avg, exp_avg_sq, step, lr, betas, eps,
                        weight_decay, decoupled_weight_decay, amsgrad, max_exp_avg_sq,
                        maximize, row_step, n_threads)
    if not plan:
        return plan
    _, (_, args) = plan[0]
    _check_ids(args[0], args[1], args[6])
    return plan


def _check_ids(table, ids, rs):
    """Raise for the first id outside the table or whose row count is negative or at
    its maximum (the planned call's table, ids and row_step), before any write."""
    n_rows = table.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= n_rows:
        raise id_out_of_range(ids, int(np.flatnonzero((ids < 0) | (ids >= n_rows))[0]), n_rows)
    if rs is not None:
        c = rs[ids]
        neg = np.flatnonzero((c < 0) | (c == np.iinfo(np.int64).max))
        if neg.size:
            raise negative_row_step(ids, int(neg[0]), rs)


def _sparse_status(kernel, args, rs_at):
    """Run one planned sparse kernel call (row_step at ``args[rs_at]``); turn its
    status into the error."""
    status, pos, _ = kernel(*args)
    if status == 0:
        return
    table, indices = args[0], args[1]
    if status == _SPARSE_BAD_ID:
        raise id_out_of_range(indices, pos, table.shape[0])
    raise negative_row_step(indices, pos, args[rs_at])


def _run_sparse(kernel, args):
    """Run one planned sparse kernel call; turn its status into the error."""
    _sparse_status(kernel, args, 6)


def _plan_sparse(table, indices, grad_rows, exp_avg, exp_avg_sq, step, lr, betas, eps,
                 weight_decay, decoupled_weight_decay, amsgrad, max_exp_avg_sq, maximize,
                 row_step, n_threads):
    """Every check of :func:`sparse_adam_step` but the ids' range (the
    kernel's merge checks it before writing); returns the plan (empty for an
    empty batch)."""
    _check_flags(decoupled_weight_decay, amsgrad, maximize)
    if isinstance(grad_rows, np.ndarray) and grad_rows.dtype in _ROWS16:
        # 16-bit gradient rows: summed in float32 by the kernel (a batch-sized copy)
        grad_rows = grad_rows.astype(np.float32)
    fast = -1
    if not amsgrad and row_step is None:
        # one native check of the usual call (elementwise, no extension); any
        # problem is explained by the Python checks
        fast = _runtime.sparse_scan(table, indices, grad_rows, exp_avg, exp_avg_sq)
    if fast >= 0:
        kernel = _kernels().get("sparse_adam", *_SCAN_KEYS[fast])
        dim = table.shape[1]
        k = indices.shape[0]
        rowwise = False
        max_exp_avg_sq = None
    else:
        kernel, dim, indices, k, rowwise, max_exp_avg_sq = _check_sparse_arrays(
            table, indices, grad_rows, exp_avg, exp_avg_sq, amsgrad, max_exp_avg_sq, row_step)
    if step is None:
        if row_step is None:
            raise TypeError("sparse_adam_step() needs step= (the 1-based count of the update "
                            "being applied) unless row_step is given")
    else:
        step = check_step(step)
    lr, b1, b2, eps, wd = check_hyper(lr, betas, eps, weight_decay)
    nt = _threads.resolve(n_threads, k * dim, _threads.SPARSE_SERIAL_THRESHOLD)
    if k == 0:
        return []
    args, flags = _plan.hyper_args(lr, b1, b2, eps, wd, decoupled_weight_decay, maximize, None,
                                   rowwise=rowwise)
    neg_step_size = 0.0 if step is None else _plan.sparse_neg_step_size(step, lr, b1, b2)
    args = _plan.with_step(args, neg_step_size)
    return [(_run_sparse, (kernel, (table, indices, grad_rows, exp_avg, exp_avg_sq,
                                    max_exp_avg_sq, row_step, args, flags, nt)))]


def _check_indices(indices, n_rows):
    """Return ``indices`` as a C-contiguous native int32/int64 1-D array (no copy if it is one)."""
    if not isinstance(indices, np.ndarray):
        raise TypeError(f"indices must be a 1-D numpy.ndarray of int32 or int64, got "
                        f"{describe(indices)}")
    dt = indices.dtype
    if dt.kind not in "iu":
        raise TypeError(f"indices must have an integer dtype (int32 or int64), got {dt}")
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D (one row id per gradient row), got shape "
                         f"{indices.shape}")
    if (dt == _I32 or dt == _I64) and dt.isnative and indices.flags.c_contiguous \
            and indices.flags.aligned:
        return indices
    if dt.kind == "u" and dt.itemsize == 8 and indices.size:
        big = np.flatnonzero(indices > np.iinfo(np.int64).max)
        if big.size:
            raise id_out_of_range(indices, int(big[0]), n_rows)
    # np.array copies: np.ascontiguousarray would return an unaligned int64 array as it is
    # (it only ensures C order), and the merge reads the ids as int64_t (UB when misaligned)
    return np.array(indices, dtype=np.int64, order="C")


def check_row_step(row_step: Any, n_rows: int, name: str = "row_step") -> None:
    """Check a per-row step-count buffer: int64, ``(n_rows,)``, contiguous, writable."""
    if not isinstance(row_step, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of int64, got {describe(row_step)}")
    if row_step.dtype != _I64 or not row_step.dtype.isnative:
        raise TypeError(f"{name} must have dtype int64, got {row_step.dtype}")
    if row_step.shape != (n_rows,):
        raise ValueError(f"{name} must have shape ({n_rows},) (one count per table row), "
                         f"got {row_step.shape}")
    if not row_step.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got strides {row_step.strides}")
    if not row_step.flags.aligned:
        raise ValueError(f"{name} is not aligned: its data address is not a multiple of 8 "
                         "(copy it into a fresh array)")
    if not row_step.flags.writeable:
        raise ValueError(f"{name} is read-only; it is updated in place and must be writable")


def _check_sparse_arrays(table, indices, grad_rows, exp_avg, exp_avg_sq, amsgrad,
                         max_exp_avg_sq, row_step, row_step_name="row_step"):
    """The buffer checks of :func:`sparse_adam_step`, each with its message.

    Returns ``(kernel, dim, indices, k, rowwise, max_exp_avg_sq)``
    (``indices`` as a contiguous int32/int64 array, ``max_exp_avg_sq`` None
    unless amsgrad).
    """
    pdt = check_buffer("table", table)
    if table.ndim != 2:
        raise ValueError(f"table must be 2-D (n_rows, dim), got shape {table.shape}")
    n_rows, dim = table.shape
    indices = _check_indices(indices, n_rows)
    k = indices.shape[0]
    gdt = check_buffer("grad_rows", grad_rows, writable=False)
    if grad_rows.shape != (k, dim):
        raise ValueError(f"grad_rows must have shape (len(indices), dim) = ({k}, {dim}), "
                         f"got {grad_rows.shape}")
    sdt = check_buffer("exp_avg", exp_avg)
    kernel = _kernels().get("sparse_adam", pdt, gdt, sdt, ("table", "grad_rows", "exp_avg"))
    if exp_avg.shape != table.shape:
        raise ValueError(f"exp_avg must have the shape of table {table.shape}, got "
                         f"{exp_avg.shape}")
    same_dtype("exp_avg_sq", check_buffer("exp_avg_sq", exp_avg_sq), "exp_avg", sdt)
    if exp_avg_sq.shape == table.shape:
        rowwise = False
    elif exp_avg_sq.shape == (n_rows,):
        rowwise = True
    else:
        raise ValueError(f"exp_avg_sq must have shape {table.shape} (elementwise) or "
                         f"({n_rows},) (row-wise), got {exp_avg_sq.shape}")
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("amsgrad=True needs max_exp_avg_sq (a buffer like exp_avg_sq)")
        same_dtype("max_exp_avg_sq", check_buffer("max_exp_avg_sq", max_exp_avg_sq),
                   "exp_avg", sdt)
        if max_exp_avg_sq.shape != exp_avg_sq.shape:
            raise ValueError(f"max_exp_avg_sq must have the shape of exp_avg_sq "
                             f"{exp_avg_sq.shape}, got {max_exp_avg_sq.shape}")
    else:
        max_exp_avg_sq = None
    if row_step is not None:
        check_row_step(row_step, n_rows, row_step_name)
    outs = (table, exp_avg, exp_avg_sq, max_exp_avg_sq, row_step)
    names = _SPARSE_OUT_NAMES[:-1] + (row_step_name,)
    no_overlap(names + ("grad_rows",), outs + (grad_rows,), "the inputs")
    no_overlap(names + ("indices",), outs + (indices,), "the inputs")
    return kernel, dim, indices, k, rowwise, max_exp_avg_sq


# ------------------------------------------------ sparse, dense-equivalent

class CatchUpHistory:
    """The per-step record of the dense-equivalent sparse mode.

    One row per step (amortised O(1) :meth:`append`): ``lr / (1 - b1**t)``,
    ``sqrt(1 - b2**t)``, the decoupled decay ``1 - lr * weight_decay``, the
    cumulative sum of ``log(decay)`` and the running maximum of ``lr``. A row
    that comes back after k skipped steps replays exactly the steps it
    missed, with the lr each of them had (an lr schedule is replayed as it
    was), from this record.

    Parameters
    ----------
    betas : (float, float)
        Adam's betas (fixed for the run).
    weight_decay : float
        Decoupled (AdamW) weight decay; 0 for Adam.

    Examples
    --------
    >>> from fastadam.functional import CatchUpHistory
    >>> h = CatchUpHistory((0.9, 0.999), weight_decay=0.01)
    >>> h.append(1e-3); h.append(5e-4)
    >>> h.step
    2
    """

    def __init__(self, betas: Betas = (0.9, 0.999), weight_decay: Real = 0.0) -> None:
        _, self.beta1, self.beta2, _, self.weight_decay = check_hyper(1e-3, betas, 1e-8,
                                                                      weight_decay)
        self.step = 0
        self._rows = np.zeros((16, 5), np.float64)
        self._lrs = np.zeros(16, np.float64)

    @property
    def table(self) -> Array:
        """The record through the current step: ``(step + 1, 5)`` float64 (a view)."""
        return self._rows[: self.step + 1]

    @property
    def lrs(self) -> Array:
        """The lr of every step so far (``lrs[t - 1]``: step t), a float64 view."""
        return self._lrs[: self.step]

    def truncate(self, step: int) -> None:
        """Forget the steps after ``step`` (an optimizer undoing a rejected step)."""
        if not 0 <= step <= self.step:
            raise ValueError(f"step must be in [0, {self.step}], got {step}")
        self.step = step

    def append(self, lr: Real) -> None:
        """Record the next step's ``lr`` (call once per step, before the step)."""
        lr = check_hyper(lr, (self.beta1, self.beta2), 1e-8, self.weight_decay)[0]
        if lr * self.weight_decay >= 1.0:
            raise ValueError(f"lr * weight_decay = {lr * self.weight_decay!r} must be < 1 "
                             "(the decoupled decay 1 - lr * weight_decay must stay positive)")
        t = self.step + 1
        if t >= self._rows.shape[0]:
            grown = np.zeros((2 * self._rows.shape[0], 5), np.float64)
            grown[: t] = self._rows[: t]
            self._rows = grown
            lrs = np.zeros(grown.shape[0], np.float64)
            lrs[: t - 1] = self._lrs[: t - 1]
            self._lrs = lrs
        self._lrs[t - 1] = lr
        prev = self._rows[t - 1]
        row = self._rows[t]
        row[0] = lr / (1.0 - self.beta1 ** t)
        row[1] = math.sqrt(1.0 - self.beta2 ** t)
        row[2] = 1.0 - lr * self.weight_decay
        row[3] = prev[3] + math.log1p(-lr * self.weight_decay)
        row[4] = max(prev[4], lr)
        self.step = t



def sparse_adam_catchup_step(table: Array, indices: Array, grad_rows: Array, exp_avg: Array,
                             exp_avg_sq: Array, last_step: Array, history: CatchUpHistory, *,
                             eps: Real = 1e-8, amsgrad: bool = False,
                             max_exp_avg_sq: Optional[Array] = None, maximize: bool = False,
                             n_threads: Optional[int] = None) -> None:
    """One dense-equivalent sparse Adam/AdamW step: dense results at sparse cost.

    The rows of ``table`` that the batch touches first catch up every step
    they missed since ``last_step[row]`` -- with a zero gradient, as dense
    ``torch.optim.AdamW(fused=True)`` (``Adam`` when ``weight_decay`` is 0)
    stepping the whole table would have applied them: m and v decay by
    beta**k, p gets the k bias-corrected ``m / (sqrt(v) + eps)`` updates and
    the decoupled weight decay, each with the lr that step had -- then take
    step ``history.step`` with their (summed) gradient, and ``last_step[row]``
    becomes that step. Other rows are not read or written: they lag until
    they are touched or :func:`sparse_adam_catch_up` brings them up to date.

    Parameters
    ----------
    table, indices, grad_rows, exp_avg, exp_avg_sq
        As :func:`sparse_adam_step` (``exp_avg_sq`` elementwise only).
    last_step : ndarray of int64, shape (n_rows,)
        Per row, the step through which it is current (zeros for a fresh
        table); every touched row's must be in ``[0, history.step)``.
    history : CatchUpHistory
        The run's record, with this step's ``lr`` already appended
        (``history.step`` is the step being applied); it carries the betas
        and the weight decay.
    eps, amsgrad, max_exp_avg_sq, maximize, n_threads
        As :func:`fastadam.adamw_step`.

    Raises
    ------
    TypeError, ValueError, IndexError
        As :func:`sparse_adam_step`; ValueError for a ``last_step`` outside
        ``[0, history.step)`` (naming the row). Nothing is written then.

    Notes
    -----
    Accuracy: the replay is exact step by step except that the missed
    steps' updates, which shrink geometrically (by ``beta1 / sqrt(beta2)``
    per step), are replayed one by one only until the rest provably sums to
    less than 2**-24 (float32; 2**-52 float64) of the row's largest ``|p|``
    (or of the largest step size); the steps after that only decay p (one
    multiplication). Within rtol 1e-5 (float32) / 1e-12 (float64) of torch
    over 200+ steps (tests). Cost per touched element: about one division
    per replayed step (~100 steps for a long-absent float32 row with the
    default betas, fewer for recent ones); see docs/guide/sparse.md.

    Examples
    --------
    >>> import numpy as np
    >>> from fastadam.functional import CatchUpHistory, sparse_adam_catchup_step
    >>> table = np.ones((3, 2), np.float32)
    >>> m, v = np.zeros_like(table), np.zeros_like(table)
    >>> last = np.zeros(3, np.int64)
    >>> h = CatchUpHistory(weight_decay=0.1)
    >>> for ids in ([0], [1], [0]):
    ...     h.append(1e-2)
    ...     sparse_adam_catchup_step(table, np.array(ids), np.ones((1, 2), np.float32),
    ...                              m, v, last, h)
    >>> last.tolist()
    [3, 2, 0]
    """
    run(_plan_catchup(table, indices, grad_rows, exp_avg, exp_avg_sq, last_step, history, eps,
                      amsgrad, max_exp_avg_sq, maximize, n_threads))


def sparse_adam_catch_up(table: Array, exp_avg: Array, exp_avg_sq: Array, last_step: Array,
                         history: CatchUpHistory, *, eps: Real = 1e-8, amsgrad: bool = False,
                         max_exp_avg_sq: Optional[Array] = None, maximize: bool = False,
                         n_threads: Optional[int] = None, block_rows: int = 65536) -> None:
    """Bring every row of a dense-equivalent table up to ``history.step``.

    Rows behind take the missed steps with a zero gradient (the last one
    included), so the whole table then equals dense Adam/AdamW's. Reads
    ``last_step`` whole (O(n_rows)); the rows behind are stepped
    ``block_rows`` at a time with one zero gradient block. Call it before
    evaluating or exporting the table.
    """
    t = history.step
    if t == 0:
        return
    check_buffer("table", table)
    if table.ndim != 2:
        raise ValueError(f"table must be 2-D (n_rows, dim), got shape {table.shape}")
    check_row_step(last_step, table.shape[0], "last_step")
    if type(block_rows) is not int or block_rows < 1:
        raise ValueError(f"block_rows must be an int >= 1, got {block_rows!r}")
    zeros = None
    for lo in range(0, last_step.shape[0], block_rows):
        ids = np.flatnonzero(last_step[lo: lo + block_rows] < t)
        if ids.size == 0:
            continue
        ids += lo
        if zeros is None or zeros.shape[0] < ids.size:
            zeros = np.zeros((ids.size, table.shape[1]), table.dtype)
        sparse_adam_catchup_step(table, ids, zeros[: ids.size], exp_avg, exp_avg_sq, last_step,
                                 history, eps=eps, amsgrad=amsgrad,
                                 max_exp_avg_sq=max_exp_avg_sq, maximize=maximize,
                                 n_threads=n_threads)


def _run_catchup(kernel, args):
    status, pos, _ = kernel(*args)
    if status == 0:
        return
    table, indices, last_step, history = args[0], args[1], args[6], args[7]
    if status == _SPARSE_BAD_ID:
        raise id_out_of_range(indices, pos, table.shape[0])
    r = int(indices[pos])
    raise ValueError(f"last_step[{r}] = {int(last_step[r])} (row id indices[{pos}]) must be in "
                     f"[0, {history.shape[0] - 1}): the step through which the row is current, "
                     "before the step being applied")


def _plan_catchup(table, indices, grad_rows, exp_avg, exp_avg_sq, last_step, history, eps,
                  amsgrad, max_exp_avg_sq, maximize, n_threads):
    """Every check of :func:`sparse_adam_catchup_step` but the ids' and
    ``last_step``'s values (the kernel's merge checks them before writing)."""
    _check_flags(False, amsgrad, maximize)
    if not isinstance(history, CatchUpHistory):
        raise TypeError(f"history must be a fastadam.functional.CatchUpHistory, got "
                        f"{describe(history)}")
    if history.step < 1:
        raise ValueError("history is empty: append the step's lr before the step")
    _, dim, indices, k, rowwise, max_exp_avg_sq = _check_sparse_arrays(
        table, indices, grad_rows, exp_avg, exp_avg_sq, amsgrad, max_exp_avg_sq, last_step,
        "last_step")
    if rowwise:
        raise ValueError("the dense-equivalent mode needs an elementwise exp_avg_sq (shape "
                         f"{table.shape}); dense Adam has no row-wise second moment")
    kernel = _kernels().get("sparse_adam_catchup", table.dtype, grad_rows.dtype, exp_avg.dtype,
                            ("table", "grad_rows", "exp_avg"))
    b1, b2, wd = history.beta1, history.beta2, history.weight_decay
    eps = check_hyper(1e-3, (b1, b2), eps, wd)[3]
    nt = _threads.resolve(n_threads, k * dim, _threads.SPARSE_SERIAL_THRESHOLD)
    if k == 0:
        return []
    args, flags = _plan.hyper_args(1e-3, b1, b2, eps, wd, True, maximize, None)
    args = _plan.with_step(args, 0.0)
    return [(_run_catchup, (kernel, (table, indices, grad_rows, exp_avg, exp_avg_sq,
                                     max_exp_avg_sq, last_step, history.table, args, flags, nt)))]

# ------------------------------------------------- dense, 8-bit state (issue 13)

_U8 = np.dtype(np.uint8)
_Q8_STATE = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")
_Q8_LIST_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "exp_avg_absmaxes",
                  "exp_avg_sq_absmaxes")


def new_state8bit(shape: Union[int, tuple[int, ...]]) -> dict[str, Array]:
    """Fresh 8-bit state for a parameter of ``shape``: the four buffers
    :func:`adam8bit_step` takes, all representing zero.

    ``exp_avg`` (uint8 codes of the signed map: 127 is 0.0) and
    ``exp_avg_sq`` (unsigned map: 0 is 0.0) have the parameter's shape;
    ``exp_avg_absmax`` and ``exp_avg_sq_absmax`` (float32) one value per
    block of 256 elements (``ceil(size / 256)``), all 0.

    Examples
    --------
    >>> import fastadam as fa
    >>> st = fa.functional.new_state8bit((3, 100))
    >>> st["exp_avg"].dtype, st["exp_avg_absmax"].shape
    (dtype('uint8'), (2,))
    """
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nb = _quant.n_blocks(math.prod(shape))
    return {"exp_avg": np.full(shape, _quant.SIGNED_ZERO, np.uint8),
            "exp_avg_sq": np.full(shape, _quant.UNSIGNED_ZERO, np.uint8),
            "exp_avg_absmax": np.zeros(nb, np.float32),
            "exp_avg_sq_absmax": np.zeros(nb, np.float32)}


def _check_q8_state(names, bufs, param):
    """The four 8-bit state buffers of ``param``: uint8 codes of its shape,
    float32 absmax of ``(n_blocks,)``; C-contiguous, writable."""
    nb = _quant.n_blocks(param.size)
    for name, a, dt, shape in zip(names, bufs, (_U8, _U8, F32, F32),
                                  (param.shape, param.shape, (nb,), (nb,))):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray of {dt}, got {describe(a)}")
        if a.dtype != dt or not a.dtype.isnative:
            raise TypeError(f"{name} must have dtype {dt} (8-bit state: uint8 codes, float32 "
                            f"absmax per block of {_quant.BLOCK}), got {a.dtype}")
        if a.shape != shape:
            what = "the shape of the param" if shape == param.shape else \
                f"one value per block of {_quant.BLOCK} elements"
            raise ValueError(f"{name} must have shape {shape} ({what}), got {a.shape}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous, got strides {a.strides}")
        if not a.flags.aligned:
            raise ValueError(f"{name} is not aligned; copy it into a fresh array")
        if not a.flags.writeable:
            raise ValueError(f"{name} is read-only; it is updated in place and must be writable")


def _q8_entry(names, param, grad, state):
    """Check one parameter's buffers for an 8-bit step; return its kernel key's
    dtypes ``(param dtype, grad dtype)``."""
    pdt = check_buffer(names[0], param)
    gdt = check_buffer(names[1], grad, writable=False)
    _kernels().get("adam_q8", pdt, gdt, _U8, names[:3])
    if grad.shape != param.shape:
        same_shape(names[1], grad, names[0], param)
    _check_q8_state(names[2:6], state, param)
    return pdt, gdt


def adam8bit_step(param: Array, grad: Array, exp_avg: Array, exp_avg_sq: Array,
                  exp_avg_absmax: Array, exp_avg_sq_absmax: Array, *, step: int,
                  lr: Real = 1e-3, betas: Betas = (0.9, 0.999), eps: Real = 1e-8,
                  weight_decay: Real = 0.0, decoupled_weight_decay: bool = False,
                  maximize: bool = False, grad_scale: Optional[Real] = None,
                  n_threads: Optional[int] = None) -> None:
    """One fused Adam (or AdamW) step with 8-bit blockwise state, in place.

    Parameters
    ----------
    param : ndarray
        float32, bfloat16 (``ml_dtypes.bfloat16``) or float16, C-contiguous,
        writable. Updated in place (16-bit: rounded to nearest even).
    grad : ndarray
        Of the param's shape and dtype (float32 params also take bfloat16 or
        float16 gradients), C-contiguous; may be read-only.
    exp_avg, exp_avg_sq : ndarray of uint8
        The moments as codes (param's shape): ``exp_avg`` into the signed,
        ``exp_avg_sq`` into the unsigned dynamic map
        (:func:`fastadam._quant.dynamic_map`). Updated in place.
    exp_avg_absmax, exp_avg_sq_absmax : ndarray of float32, shape (ceil(size / 256),)
        Each block's scale (max |value| of its 256 elements). Updated in place.
        :func:`new_state8bit` makes all four, zero.
    step, lr, betas, eps, weight_decay, decoupled_weight_decay, maximize, grad_scale, n_threads
        As :func:`fastadam.adam_step` (there is no ``amsgrad``).

    Notes
    -----
    Per block of 256 elements, in one pass: m and v dequantised
    (``map[code] * absmax``), the float32 update of :func:`fastadam.adam_step`
    (same fmas and correctly rounded divisions; every element takes torch's
    vector-loop formula; 16-bit params and grads widened exactly, the new
    param rounded once to nearest even), p written, the block's new absmax of m and v, m and
    v requantised to the exact nearest code (docs: "8-bit optimizer state").
    Bitwise identical for every thread count and ISA module. Any size is
    accepted here; the optimizers keep float32 state below 4096 elements.

    Examples
    --------
    >>> import numpy as np, fastadam as fa
    >>> p = np.ones(300, np.float32); g = np.full(300, 0.5, np.float32)
    >>> st = fa.functional.new_state8bit(p.shape)
    >>> fa.functional.adam8bit_step(p, g, **st, step=1, lr=0.1)
    >>> float(p[0]), int(st["exp_avg"][0]), float(st["exp_avg_absmax"][0])
    (0.9000000357627869, 255, 0.05000000074505806)
    """
    run(plan_adam8bit([param], [grad], [exp_avg], [exp_avg_sq], [exp_avg_absmax],
                      [exp_avg_sq_absmax], steps=step, lr=lr, betas=betas, eps=eps,
                      weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                      maximize=maximize, grad_scale=grad_scale, n_threads=n_threads,
                      _single=True))


def adamw8bit_step(param: Array, grad: Array, exp_avg: Array, exp_avg_sq: Array,
                   exp_avg_absmax: Array, exp_avg_sq_absmax: Array, *, step: int,
                   weight_decay: Real = 1e-2, **kwargs: Any) -> None:
    """AdamW with 8-bit state: :func:`adam8bit_step` with decoupled weight decay
    (default ``weight_decay=1e-2``)."""
    adam8bit_step(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax,
                  step=step, weight_decay=weight_decay, decoupled_weight_decay=True, **kwargs)


def adam8bit(params: Sequence[Array], grads: Sequence[Array], exp_avgs: Sequence[Array],
             exp_avg_sqs: Sequence[Array], exp_avg_absmaxes: Sequence[Array],
             exp_avg_sq_absmaxes: Sequence[Array], *, steps: Steps, **kwargs: Any) -> None:
    """Step a list of arrays with 8-bit state in ONE native call (per dtype
    combination): :func:`adam8bit_step` per entry; ``steps`` one int or one per
    array; the other keywords as :func:`adam8bit_step`. Threads take chunks of
    blocks across array boundaries."""
    run(plan_adam8bit(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                      exp_avg_sq_absmaxes, steps=steps, **kwargs))


def adamw8bit(params: Sequence[Array], grads: Sequence[Array], exp_avgs: Sequence[Array],
              exp_avg_sqs: Sequence[Array], exp_avg_absmaxes: Sequence[Array],
              exp_avg_sq_absmaxes: Sequence[Array], *, steps: Steps,
              weight_decay: Real = 1e-2, **kwargs: Any) -> None:
    """AdamW over lists with 8-bit state: :func:`adam8bit`, decoupled decay."""
    adam8bit(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes,
             steps=steps, weight_decay=weight_decay, decoupled_weight_decay=True, **kwargs)


def plan_adam8bit(params: Sequence[Array], grads: Sequence[Array], exp_avgs: Sequence[Array],
                  exp_avg_sqs: Sequence[Array], exp_avg_absmaxes: Sequence[Array],
                  exp_avg_sq_absmaxes: Sequence[Array], *, steps: Steps, lr: Real = 1e-3,
                  betas: Betas = (0.9, 0.999), eps: Real = 1e-8, weight_decay: Real = 0.0,
                  decoupled_weight_decay: bool = False, maximize: bool = False,
                  grad_scale: Optional[Real] = None, n_threads: Optional[int] = None,
                  labels: Optional[Sequence[int]] = None, _single: bool = False) -> Plan:
    """Validate everything for :func:`adam8bit` and return its plan (one
    native call per dtype combination) without running it (see :func:`run`).
    ``labels`` as :func:`plan_adam`."""
    lab = (lambda i: i) if labels is None else labels.__getitem__
    _check_flags(decoupled_weight_decay, False, maximize)
    params = _as_list("params", params)
    n = len(params)
    lists = [params] + [_as_list(name, x, n) for name, x in zip(
        _Q8_LIST_NAMES[1:], (grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                             exp_avg_sq_absmaxes))]
    if _single:
        names = ("param", "grad") + _Q8_STATE
        step_names = ["step"]
    else:
        names = None
        step_names = [f"steps[{lab(i)}]" for i in range(n)]
    if isinstance(steps, (list, tuple, np.ndarray)):
        if len(steps) != n:
            raise ValueError(f"steps must be one int or {n} ints (one per param), got {len(steps)}")
        step_list = [check_step(s, step_names[i]) for i, s in enumerate(steps)]
    else:
        step_list = [check_step(steps, step_names[0] if _single else "steps")] * n
    keys: dict[tuple[Any, Any], list[int]] = {}
    for i in range(n):
        nm = names or tuple(f"{name}[{lab(i)}]" for name in _Q8_LIST_NAMES)
        key = _q8_entry(nm, lists[0][i], lists[1][i], [lst[i] for lst in lists[2:]])
        keys.setdefault(key, []).append(i)
    lr, b1, b2, eps, wd = check_hyper(lr, betas, eps, weight_decay)
    scaled, scale = check_grad_scale(grad_scale)
    flat = [a for lst in lists for a in lst]
    if len(flat) > 1:
        ptrs = np.empty(len(flat), np.int64)
        _runtime.addresses(flat, ptrs)
        nbytes = np.fromiter((a.nbytes for a in flat), np.int64, len(flat))
        is_out = np.ones(len(flat), np.int8)
        is_out[n:2 * n] = 0                                     # grads are only read
        hit = _runtime.first_conflict(ptrs, nbytes, is_out)
        if hit is not None:
            a, b = ((names[k // n] if names else f"{_Q8_LIST_NAMES[k // n]}[{lab(k % n)}]")
                    for k in hit)
            raise ValueError(f"{a} and {b} share memory; outputs must not alias each other "
                             "or any gradient")
    nt_arg = _threads.check(n_threads)
    args, flags = _plan.hyper_args(lr, b1, b2, eps, wd, decoupled_weight_decay, maximize,
                                   scale if scaled else None)
    scal = {s: _plan.dense_step_scalars(s, lr, b1, b2) for s in set(step_list)}
    tables = _quant.tables()
    plan: Plan = []
    for (pdt, gdt), idx in keys.items():
        sizes = np.array([params[i].size for i in idx], np.int64)
        total = int(sizes.sum())
        if total == 0:
            continue
        nt = _threads.resolve(nt_arg, total)
        if _single:
            kernel = _kernels().get("adam_q8", pdt, gdt, _U8)
            full = _plan.with_step(args, *scal[step_list[0]])
            plan.append((kernel, tuple(lst[0] for lst in lists) + (tables, full, flags, nt)))
            continue
        ptrs = np.empty((6, len(idx)), np.int64)
        for j, lst in enumerate(lists):
            _runtime.addresses([lst[i] for i in idx], ptrs[j])
        offsets = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        neg_steps = np.array([scal[step_list[i]][0] for i in idx])
        bc2s = np.array([scal[step_list[i]][1] for i in idx])
        kernel = _kernels().get("adam_q8_multi", pdt, gdt, _U8)
        plan.append((kernel, (ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], ptrs[5], offsets,
                              neg_steps, bc2s, tables, _plan.with_step(args, 0.0, 1.0), flags,
                              nt)))
    return plan


# ------------------------------------------- sparse, 8-bit row state (issue 13)

_SQ8_NAMES = ("table", "exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax",
              "row_step")


def new_sparse_state8bit(shape: tuple[int, int]) -> dict[str, Array]:
    """Fresh 8-bit **row** state for an embedding table of ``shape`` ``(n_rows,
    dim)``: the four buffers :func:`sparse_adam8bit_step` takes, all zero.

    Each row is split into ``nb = ceil(dim / 256)`` blocks of its own (a block
    never spans two rows). ``exp_avg`` (uint8 codes of the signed map: 127 is
    0.0, as in :func:`new_state8bit`) and ``exp_avg_sq`` (unsigned map: 0 is
    0.0) have the table's shape; ``exp_avg_absmax`` and ``exp_avg_sq_absmax``
    (float32) shape ``(n_rows, nb)``, all 0. ``exp_avg_sq`` and the scales
    are ``np.zeros`` (pages materialised when touched); ``exp_avg`` is
    written (code 127).

    Examples
    --------
    >>> import fastadam as fa
    >>> st = fa.functional.new_sparse_state8bit((1000, 64))
    >>> st["exp_avg"].shape, st["exp_avg_absmax"].shape
    ((1000, 64), (1000, 1))
    """
    dims = tuple(int(s) for s in shape)
    if len(dims) != 2 or min(dims) < 0:
        raise ValueError(f"shape must be (n_rows, dim) with both >= 0, got {dims}")
    n_rows, dim = dims
    nb = (n_rows, _quant.n_blocks(dim))
    return {"exp_avg": np.full(dims, _quant.SIGNED_ZERO, np.uint8),
            "exp_avg_sq": np.zeros(dims, np.uint8),
            "exp_avg_absmax": np.zeros(nb, np.float32),
            "exp_avg_sq_absmax": np.zeros(nb, np.float32)}


def _check_sparse_q8_state(names, bufs, table_shape):
    """The four 8-bit row-state buffers of a table of ``table_shape``: uint8
    codes of its shape, float32 scales of ``(n_rows, ceil(dim / 256))``;
    C-contiguous, aligned, writable."""
    n_rows, dim = table_shape
    nb = (n_rows, _quant.n_blocks(dim))
    for name, a, dt, shape in zip(names, bufs, (_U8, _U8, F32, F32),
                                  (table_shape, table_shape, nb, nb)):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray of {dt}, got {describe(a)}")
        if a.dtype != dt or not a.dtype.isnative:
            raise TypeError(f"{name} must have dtype {dt} (8-bit row state: uint8 codes, "
                            f"float32 absmax per block of {_quant.BLOCK} of each row), got "
                            f"{a.dtype}")
        if a.shape != shape:
            what = "the table's shape" if shape == table_shape else \
                f"(n_rows, ceil(dim / {_quant.BLOCK})): one value per block of each row"
            raise ValueError(f"{name} must have shape {shape} ({what}), got {a.shape}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous, got strides {a.strides}")
        if not a.flags.aligned:
            raise ValueError(f"{name} is not aligned; copy it into a fresh array")
        if not a.flags.writeable:
            raise ValueError(f"{name} is read-only; it is updated in place and must be writable")


def sparse_adam8bit_step(table: Array, indices: Array, grad_rows: Array, exp_avg: Array,
                         exp_avg_sq: Array, exp_avg_absmax: Array, exp_avg_sq_absmax: Array,
                         *, step: Optional[int] = None, lr: Real = 1e-3,
                         betas: Betas = (0.9, 0.999), eps: Real = 1e-8,
                         weight_decay: Real = 0.0, decoupled_weight_decay: bool = False,
                         maximize: bool = False, row_step: Optional[Array] = None,
                         n_threads: Optional[int] = None) -> None:
    """One sparse ("lazy") Adam step of the touched rows of ``table`` with 8-bit
    row state, in place.

    :func:`sparse_adam_step` (torch ``SparseAdam``'s arithmetic, duplicates
    summed in batch order, untouched rows and their state bit-identical) with
    the moments held as 8-bit codes and one float32 scale per block of 256
    elements of each row (:func:`new_sparse_state8bit` makes the state).

    Parameters
    ----------
    table : ndarray of float32, shape (n_rows, dim)
        C-contiguous, writable (``np.memmap`` works).
    indices : ndarray, shape (k,)
        Row ids in ``[0, n_rows)``, any order, duplicates allowed.
    grad_rows : ndarray of float32, shape (k, dim)
        The gradient row of each id (16-bit rows are widened to float32 first).
    exp_avg, exp_avg_sq : ndarray of uint8, shape (n_rows, dim)
        The moments as codes into the signed (``exp_avg``) and unsigned
        (``exp_avg_sq``) dynamic maps. Updated in place on touched rows.
    exp_avg_absmax, exp_avg_sq_absmax : ndarray of float32, shape (n_rows, ceil(dim / 256))
        Row r's block b scales elements ``[256 b, min(256 (b + 1), dim))`` of
        row r. Updated in place on touched rows.
    step, lr, betas, eps, weight_decay, decoupled_weight_decay, maximize, row_step, n_threads
        As :func:`sparse_adam_step` (there is no ``amsgrad`` and no row-wise
        second moment with 8-bit state).

    Raises
    ------
    TypeError, ValueError, IndexError
        As :func:`sparse_adam_step`; every check (ids included) runs before
        anything is written.

    Notes
    -----
    Per touched row and per block of it, in one pass: m and v dequantised
    (``fl(map[code] * absmax)``), the float32 sparse update (g the batch-order
    sum of the row's gradient rows; no fma)::

        g = -g                                  if maximize
        p = p * fl(1 - lr*wd)                   if decoupled weight decay
        g = g + p * fl(wd)                      if L2 weight decay
        m = m + (g - m) * fl(1 - b1)
        v = v + (g*g - v) * fl(1 - b2)
        p = p + fl(-lr*sqrt(bc2)/bc1) * (m / (sqrt(v) + fl(eps)))

    -- the float32-state kernel's, so the result is :func:`sparse_adam_step`'s
    on the dequantised state -- then the block's new absmax of m and v and m,
    v requantised to the exact nearest code (docs: "8-bit optimizer state").
    Bitwise identical for every thread count and ISA module.

    Examples
    --------
    >>> import numpy as np, fastadam as fa
    >>> table = np.ones((10, 64), np.float32)
    >>> st = fa.functional.new_sparse_state8bit(table.shape)
    >>> ids = np.array([3, 7, 3]); g = np.full((3, 64), 0.5, np.float32)
    >>> fa.functional.sparse_adam8bit_step(table, ids, g, **st, step=1, lr=0.1)
    >>> float(table[3, 0]), float(table[0, 0]), int(st["exp_avg"][3, 0])
    (0.9000000357627869, 1.0, 255)
    >>> float(st["exp_avg_absmax"][3, 0])                # (1 - 0.9) * (0.5 + 0.5)
    0.10000000149011612
    """
    run(_plan_sparse8bit(table, indices, grad_rows, exp_avg, exp_avg_sq, exp_avg_absmax,
                         exp_avg_sq_absmax, step, lr, betas, eps, weight_decay,
                         decoupled_weight_decay, maximize, row_step, n_threads))


def plan_sparse_adam8bit(table: Array, indices: Array, grad_rows: Array, exp_avg: Array,
                         exp_avg_sq: Array, exp_avg_absmax: Array, exp_avg_sq_absmax: Array,
                         *, step: Optional[int] = None, lr: Real = 1e-3,
                         betas: Betas = (0.9, 0.999), eps: Real = 1e-8,
                         weight_decay: Real = 0.0, decoupled_weight_decay: bool = False,
                         maximize: bool = False, row_step: Optional[Array] = None,
                         n_threads: Optional[int] = None) -> Plan:
    """Validate a :func:`sparse_adam8bit_step` call completely (row ids and
    per-row counts included) and return its plan without writing anything
    (run it with :func:`run`); as :func:`plan_sparse_adam`."""
    plan = _plan_sparse8bit(table, indices, grad_rows, exp_avg, exp_avg_sq, exp_avg_absmax,
                            exp_avg_sq_absmax, step, lr, betas, eps, weight_decay,
                            decoupled_weight_decay, maximize, row_step, n_threads)
    if not plan:
        return plan
    _, (_, args) = plan[0]
    _check_ids(args[0], args[1], args[7])
    return plan


def _run_sparse8bit(kernel, args):
    """Run one planned 8-bit sparse kernel call; turn its status into the error."""
    _sparse_status(kernel, args, 7)


def _plan_sparse8bit(table, indices, grad_rows, exp_avg, exp_avg_sq, exp_avg_absmax,
                     exp_avg_sq_absmax, step, lr, betas, eps, weight_decay,
                     decoupled_weight_decay, maximize, row_step, n_threads):
    """Every check of :func:`sparse_adam8bit_step` but the ids' range (the
    kernel's merge checks it before writing); the plan (empty for an empty batch)."""
    _check_flags(decoupled_weight_decay, False, maximize)
    pdt = check_buffer("table", table)
    if table.ndim != 2:
        raise ValueError(f"table must be 2-D (n_rows, dim), got shape {table.shape}")
    n_rows, dim = table.shape
    indices = _check_indices(indices, n_rows)
    k = indices.shape[0]
    if isinstance(grad_rows, np.ndarray) and grad_rows.dtype in _ROWS16:
        grad_rows = grad_rows.astype(np.float32)   # summed in float32 (a batch-sized copy)
    gdt = check_buffer("grad_rows", grad_rows, writable=False)
    if grad_rows.shape != (k, dim):
        raise ValueError(f"grad_rows must have shape (len(indices), dim) = ({k}, {dim}), "
                         f"got {grad_rows.shape}")
    kernel = _kernels().get("sparse_adam_q8", pdt, gdt, _U8, ("table", "grad_rows", "exp_avg"))
    state = (exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax)
    _check_sparse_q8_state(_SQ8_NAMES[1:5], state, table.shape)
    if row_step is not None:
        check_row_step(row_step, n_rows)
    outs = (table,) + state + (row_step,)
    no_overlap(_SQ8_NAMES + ("grad_rows",), outs + (grad_rows,), "the inputs")
    no_overlap(_SQ8_NAMES + ("indices",), outs + (indices,), "the inputs")
    if step is None:
        if row_step is None:
            raise TypeError("sparse_adam8bit_step() needs step= (the 1-based count of the "
                            "update being applied) unless row_step is given")
    else:
        step = check_step(step)
    lr, b1, b2, eps, wd = check_hyper(lr, betas, eps, weight_decay)
    nt = _threads.resolve(n_threads, k * dim, _threads.SPARSE_SERIAL_THRESHOLD)
    if k == 0:
        return []
    args, flags = _plan.hyper_args(lr, b1, b2, eps, wd, decoupled_weight_decay, maximize, None)
    neg_step_size = 0.0 if step is None else _plan.sparse_neg_step_size(step, lr, b1, b2)
    args = _plan.with_step(args, neg_step_size)
    return [(_run_sparse8bit, (kernel, (table, indices, grad_rows) + state
                               + (row_step, _quant.tables(), args, flags, nt)))]
