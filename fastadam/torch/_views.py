"""Design: tensor glue of the torch drop-ins (layer 4, ``fastadam.torch``).

Contract: turn CPU tensors into the zero-copy numpy views that the
functional layer (:func:`fastadam.functional.plan_adam`,
:func:`fastadam.functional.plan_sparse_adam`) plans on, and back: parameter
checks with torch-style messages, memory-layout tests, the one place that
creates optimizer state tensors (:func:`new_state`), re-laying state loaded
for another layout, the ``step`` scalar view and autograd version bumps.
Nothing here steps anything; the only writes are new or re-laid state
tensors (values preserved) and version counters after a step has run.
"""
import math
from collections import namedtuple
from typing import Optional

import torch

from .. import _interface
from .._validate import KERNEL_DTYPES, check_state_keys, check_state_step


def dtype_name(dtype):
    """The numpy / kernel-table name of a torch dtype (``torch.float32`` -> ``"float32"``)."""
    return str(dtype).rsplit(".", 1)[-1]


def np_dtype(dtype):
    """The numpy dtype of a torch dtype's kernel buffers (bfloat16: ml_dtypes')."""
    return KERNEL_DTYPES[dtype_name(dtype)]


# The parameter dtypes the drop-ins step: those with a kernel for (param, grad,
# state) all of that dtype in the kernel table (fastadam._interface.KERNELS) --
# a combination added there is stepped here without another list to edit --
# and a numpy dtype here (bfloat16 views need ml_dtypes).
SUPPORTED = tuple(dt for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
                  if ("adam",) + (dtype_name(dt),) * 3 in _interface.KERNELS
                  and dtype_name(dt) in KERNEL_DTYPES)
COMPLEX = {c: r for c, r in ((torch.complex64, torch.float32),
                             (torch.complex128, torch.float64)) if r in SUPPORTED}
# A state ``step`` is a 0-d tensor of one of these (torch: float32, float64 under a
# float64 default dtype); the fast step reads and writes them natively.
STEP_DTYPES = (torch.float32, torch.float64)


# SparseAdam's validated zero-copy numpy views of a table (rows, row width) and its
# state, reused while the identity/layout fields still match. ``ptrs`` holds the
# data addresses of the state tensors the views were made from: ``t.data = other``
# keeps a tensor's identity but moves its storage, and must send the step back to
# the checked, re-viewed path.
# vlike: table_np[:0], the template of the per-step gradient rows view (view_at)
SViews = namedtuple("SViews", "m v data_ptr dtype shape table_np m_np v_np ptrs vlike")



def step_value(step, name):
    """A state ``step`` as a plain value for ``check_state_step``: a 1-element
    tensor with a value becomes 0-d on the CPU; anything else passes as is."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_meta:
            raise ValueError(f"{name} must be a scalar with a value, got a tensor of shape "
                             f"{tuple(step.shape)} on {step.device}")
        return step.detach().cpu().reshape(())
    return step

def state_ptrs(m, v, vmax=None, step=None):
    """The data addresses of a parameter's state tensors (0 for None), compared by
    the view caches (written out: this runs once per parameter and step)."""
    return (m.data_ptr(), v.data_ptr(), 0 if vmax is None else vmax.data_ptr(),
            0 if step is None else step.data_ptr())



def check_torch_hyper(lr, betas, eps, weight_decay=None, *, strict=False):
    """torch.optim's constructor checks, with torch's messages: ``Adam``/``AdamW``
    (lr, eps, weight_decay >= 0) or, with ``strict``, ``SparseAdam`` (lr, eps > 0;
    no weight_decay). fastadam's own checks (``_validate.check_hyper``) follow."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not (0.0 < lr if strict else 0.0 <= lr):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not (0.0 < eps if strict else 0.0 <= eps):
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if weight_decay is not None and not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")

def scalar_dtype():
    """dtype of a new ``step`` tensor (torch's: float32 unless the default is float64)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def run_closure(closure):
    """The loss of ``closure()`` evaluated with grad enabled, or None (torch's
    ``step(closure)`` protocol)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def num(x):
    """A hyperparameter (float or 1-element tensor) as a Python float."""
    if isinstance(x, torch.Tensor):
        return float(x.item())
    return float(x)


def new_state(p, keys, dtype=None):
    """Zeroed state tensors for ``p``, one per name in ``keys``, laid out like ``p``.

    ``dtype`` defaults to the parameter's. Every state tensor of the drop-ins
    is created here (``step`` aside).
    """
    return {k: torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            for k in keys}


def check_param(cls, p, where, device=True):
    """Raise a clear error for a parameter fastadam cannot step.

    ``device=False`` (at construction) accepts any device: parameters may be
    built on ``meta`` and materialised later (deferred init); the step checks
    the device.
    """
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{cls}: {where} must be a torch.Tensor, got {type(p).__name__}")
    if device and p.device.type != "cpu":
        raise ValueError(f"{cls}: {where} is on device '{p.device}'; fastadam steps CPU tensors "
                         "only (use torch.optim's fused optimizers on accelerators)")
    if p.layout != torch.strided:
        raise ValueError(f"{cls}: {where} has layout {p.layout}; parameters must be dense "
                         "(strided) tensors")
    dt = p.dtype
    if dt in SUPPORTED or dt in COMPLEX:
        return
    if dt is torch.bfloat16:
        raise TypeError(f"{cls}: {where} has dtype {dt}: bfloat16 parameters need the "
                        "ml_dtypes package (pip install ml_dtypes, or fastadam[bf16])")
    raise TypeError(f"{cls}: {where} has dtype {dt}; fastadam steps "
                    f"{'/'.join(dtype_name(d) for d in SUPPORTED)} "
                    "(and complex64/complex128) parameters only")


def check_not_meta(cls, p, where):
    """At step time: a parameter without a gradient may be skipped, unless it is
    still on the meta device (it could never be stepped: a stale Parameter)."""
    if p.is_meta:
        raise ValueError(
            f"{cls}: {where} is still on the meta device at step time. Materialise the "
            "parameters the optimizer holds: call "
            "torch.__future__.set_swap_module_params_on_conversion(True) before "
            "model.to_empty(device='cpu') (it keeps the Parameter objects), or build the "
            "optimizer after to_empty")


def duplicates(cache, gi, params):
    """True if the list ``params`` holds a tensor twice (cached per group while the
    list object and its length stay the same: no hashing on every step)."""
    c = cache.get(gi)
    if c is not None and c[0] is params and c[1] == len(params):
        return c[2]
    dup = len({id(p) for p in params}) != len(params)
    cache[gi] = (params, len(params), dup)
    return dup


def stepped(cls, cache, gi, params):
    """``(i, p, grad)`` for the parameters of group ``gi`` that have a gradient:
    a parameter still on ``meta`` is an error even without one, and a duplicate
    (torch warned when the group was added) comes once."""
    seen: Optional[set[int]] = set() if duplicates(cache, gi, params) else None
    for i, p in enumerate(params):
        g = p.grad
        if g is None:
            if p.is_meta:
                check_not_meta(cls, p, f"parameter {i} of param group {gi}")
            continue
        if seen is not None:
            if id(p) in seen:
                continue
            seen.add(id(p))
        yield i, p, g


def is_dense(t):
    """True if ``t`` covers one gap-free block of memory (any dimension order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for st, sz in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if st != expected:
            return False
        expected *= sz
    return True


def same_layout(a, b):
    """Same shape and the same element -> memory offset map (size-1 dims ignored)."""
    if a.shape != b.shape:
        return False
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def np_view(t):
    """Zero-copy numpy view of a contiguous CPU tensor (any shape); a bfloat16
    tensor as an ``ml_dtypes.bfloat16`` array over the same memory."""
    t = t.detach() if t.requires_grad else t
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(_BF16)
    return t.numpy()


def grad_rows(vals):
    """The rows of a sparse gradient as the sparse kernels take them: 16-bit rows
    widened to float32 (the kernels of 16-bit tables take float32 gradient rows; an
    O(nnz) copy, exact, made before any unscaling), other dtypes as they are."""
    if vals.dtype in (torch.bfloat16, torch.float16):
        return vals.detach().float()
    return vals


def flat_np_view(t):
    """Zero-copy 1-D numpy view, in memory order, of a dense (permuted) tensor."""
    return np_view(t.detach().as_strided((t.numel(),), (1,)))


_BF16 = KERNEL_DTYPES.get("bfloat16")


def state_dtype(p, name):
    """The torch dtype of the state of parameter ``p`` for a group's
    ``state_dtype`` (None: the parameter's), checked by ``_plan.state_dtype``."""
    if name is None:
        return None
    from .. import _plan
    return getattr(torch, _plan.state_dtype(np_dtype(p.dtype), name).name)


def bump_versions(tensors):
    """Tell autograd the tensors were modified in place (we write through numpy),
    so a stale saved tensor raises like after torch's own in-place optimizer step."""
    if tensors:
        _increment_version(tensors)


def _increment_version_fallback(tensors):
    for t in tensors:
        torch.autograd.graph.increment_version(t)


try:
    _increment_version = torch._C._increment_version
    _increment_version([torch.zeros(1)])
except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - older torch
    _increment_version = _increment_version_fallback


def step_view(state, where="the parameter"):
    """0-d numpy view of state['step'] (a CPU scalar tensor): read and written without
    a torch dispatch per parameter. A step that is not such a tensor (an int, float,
    numpy scalar, integer-dtype or 1-element tensor: torch's ``__setstate__`` converts
    them) becomes one, same value; a value that is no count (negative, fractional,
    NaN, a string) raises a ValueError/TypeError naming it, before anything is written."""
    st = state["step"]
    if (not isinstance(st, torch.Tensor) or st.device.type != "cpu" or st.dim() != 0
            or st.dtype not in STEP_DTYPES):
        if isinstance(st, torch.Tensor):
            if st.numel() != 1 or st.is_meta:
                raise ValueError(f"state 'step' of {where} must be a scalar, got a tensor "
                                 f"of shape {tuple(st.shape)} on {st.device}")
            st = st.detach().cpu().reshape(())
        n = check_state_step(st, f"state 'step' of {where}")
        st = state["step"] = torch.tensor(float(n), dtype=scalar_dtype())
    return st.numpy()


def sparse_operands(cls, p, g, where):
    """(table2d, row_ids, grad_rows) tensors for a COO gradient ``g`` of ``p``.

    Sparse dimensions are linearised into one row id, dense dimensions into one
    row of the table; duplicate ids are left for the kernel to sum.
    """
    if g.dtype != p.dtype:
        raise TypeError(f"{cls}: the sparse gradient of {where} has dtype {g.dtype}, the "
                        f"parameter has {p.dtype}")
    if p.dtype == torch.float16:
        raise TypeError(f"{cls}: {where} is float16 with a sparse gradient; sparse tables "
                        "are float32, float64 or bfloat16 (float16 is dense-only)")
    if p.is_complex():
        raise TypeError(f"{cls}: sparse gradients of complex parameters are not supported "
                        f"({where})")
    if not p.is_contiguous():
        raise ValueError(f"{cls}: {where} gets sparse gradients and must be contiguous "
                         f"(strides {tuple(p.stride())} for shape {tuple(p.shape)})")
    sd = g.sparse_dim()
    shape = tuple(p.shape)
    rows = math.prod(shape[:sd])
    width = math.prod(shape[sd:])
    idx = g._indices()
    vals = g._values()
    nnz = vals.shape[0]
    if sd == 1:
        ids = idx[0]
    else:
        mult = torch.tensor([math.prod(shape[k + 1:sd]) for k in range(sd)], dtype=torch.int64)
        ids = (idx * mult.unsqueeze(1)).sum(0)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    vals = vals.reshape(nnz, width)
    if not vals.is_contiguous():
        vals = vals.contiguous()
    table = p.detach().view(rows, width)
    return table, ids, vals


def check_state(cls, state, keys, p, where, hint="", dtype=None):
    """Raise if a state tensor of ``p`` has another shape or dtype (``dtype``,
    default the parameter's), or is not on the CPU."""
    dtype = p.dtype if dtype is None else dtype
    for k in keys:
        t = state[k]
        if t.shape != p.shape or t.dtype != dtype or t.device.type != "cpu":
            raise ValueError(f"{cls}: state '{k}' of {where} is {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}; expected {dtype} "
                             f"{tuple(p.shape)} on cpu{hint}")


def as_state_layout(state, key, p, view):
    """Return state[key] laid out like ``view`` (contiguous or p's dense layout).

    A state tensor whose layout differs (e.g. loaded from a checkpoint saved
    for a contiguous parameter) is re-laid out ONCE (values kept) and stored back.
    """
    t = state[key]
    if t.is_contiguous() if view == "contiguous" else same_layout(t, p):
        return t
    nt = torch.empty_like(p, dtype=t.dtype, memory_format=torch.preserve_format) \
        if view == "dense" else torch.empty(p.shape, dtype=t.dtype)
    nt.copy_(t)
    state[key] = nt
    return nt


# ------------------------------------------------ 8-bit row state (sparse, issue 13)

Q8_ROW_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")


def q8_rows_eligible(p):
    """Whether a parameter stepped by sparse gradients gets 8-bit row state in a
    ``'q8'`` group: float32 with 4096+ elements (smaller ones keep float32 state)."""
    return p.dtype == torch.float32 and p.numel() >= _interface.Q8_MIN_SIZE


def new_q8_rows(p, table_shape):
    """Fresh 8-bit row state tensors of ``p`` stepped as a table of ``table_shape``
    (:func:`fastadam.functional.new_sparse_state8bit`): codes of ``p``'s shape,
    block scales ``(rows, ceil(width / 256))``, all zero."""
    from .. import functional as F
    st = F.new_sparse_state8bit(table_shape)
    return {k: torch.from_numpy(a).view(p.shape) if a.dtype.kind == "u"
            else torch.from_numpy(a) for k, a in st.items()}


def check_q8_rows(cls, st, p, table_shape, where):
    """Raise unless ``st`` holds 8-bit row state for ``p`` stepped as a table of
    ``table_shape``: CPU contiguous uint8 codes of ``p``'s shape and float32
    scales ``(rows, ceil(width / 256))``."""
    rows, width = table_shape
    nb = (rows, -(-width // _interface.Q8_BLOCK))
    for k in Q8_ROW_KEYS:
        t = st.get(k)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{cls}: state of {where} lacks {k!r} (8-bit row state)")
        codes = k in ("exp_avg", "exp_avg_sq")
        want, shape = (torch.uint8, tuple(p.shape)) if codes else (torch.float32, nb)
        if (t.dtype != want or tuple(t.shape) != shape or t.device.type != "cpu"
                or not t.is_contiguous()):
            hint = "" if codes or t.dim() == 2 else \
                " (dense 8-bit state, whose blocks span rows, cannot take sparse gradients)"
            raise ValueError(f"{cls}: state {k!r} of {where} is {t.dtype} {tuple(t.shape)} on "
                             f"{t.device}; 8-bit row state needs a contiguous CPU {want} "
                             f"tensor of shape {shape}{hint}")


def q8_row_views(st, table_shape):
    """Zero-copy numpy views of 8-bit row state, codes as ``table_shape``."""
    return tuple((st[k].view(table_shape) if k in ("exp_avg", "exp_avg_sq") else st[k]).numpy()
                 for k in Q8_ROW_KEYS)


def check_q8_rows_loaded(name, st, p):
    """A checkpoint's 8-bit row state of ``p`` (tensors): ``step`` and the four
    keys only, uint8 codes of ``p``'s shape, float32 scales ``(rows, nb)``
    with ``rows`` dividing ``p.numel()`` and ``nb = ceil(numel / rows / 256)``,
    finite and >= 0. The table shape follows from the scales."""
    check_state_keys(name, st, Q8_ROW_KEYS, "8-bit row state")
    check_state_step(step_value(st["step"], f"{name} 'step'"), f"{name} 'step'")
    for k in Q8_ROW_KEYS:
        if not isinstance(st[k], torch.Tensor) or st[k].is_meta:
            raise TypeError(f"{name} {k!r} must be a tensor with values (8-bit row state)")
    a = st["exp_avg_absmax"]
    rows = a.shape[0] if a.dim() == 2 else -1
    n = p.numel()
    if rows < 1 or n % rows:
        raise ValueError(f"{name} 'exp_avg_absmax' has shape {tuple(a.shape)}: 8-bit row "
                         f"state needs (rows, ceil(width / 256)) with rows * width = {n}")
    table_shape = (rows, n // rows)
    nb = (rows, -(-table_shape[1] // _interface.Q8_BLOCK))
    for k in Q8_ROW_KEYS:
        t = st[k]
        codes = k in ("exp_avg", "exp_avg_sq")
        want, shape = (torch.uint8, tuple(p.shape)) if codes else (torch.float32, nb)
        if t.dtype != want or tuple(t.shape) != shape:
            raise TypeError(f"{name} {k!r} must be a {want} tensor of shape {shape} "
                            f"(8-bit row state), got {t.dtype} {tuple(t.shape)}")
        if not codes and t.numel() and not bool(torch.isfinite(t).all() and t.min() >= 0):
            raise ValueError(f"{name} {k!r} must hold finite values >= 0 (block scales)")
