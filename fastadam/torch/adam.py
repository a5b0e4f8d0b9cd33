"""PyTorch drop-ins (layer 4): ``Adam``, ``AdamW``, ``SparseAdam``.

Subclasses of ``torch.optim.Optimizer`` with torch's constructor arguments,
defaults, ``param_groups`` and state vocabulary (``step`` as a scalar float
tensor, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so that
``torch.optim.lr_scheduler``, ``GradScaler``, ``ZeroRedundancyOptimizer``,
DDP and checkpoints written by either library work unchanged. The update
itself is fastadam's: CPU tensors are handed to :func:`fastadam.functional.adam`
as zero-copy numpy views, ONE native call per param group (per dtype) for the
dense parameters; parameters whose gradient is sparse (``nn.Embedding(sparse=True)``)
take :func:`fastadam.sparse_adam_step` (lazy rows, torch ``SparseAdam``
arithmetic) inside the same optimizer.

This is the only module of fastadam that imports torch; ``import fastadam``
does not.
"""
import math
from collections import namedtuple

try:
    import torch
    from torch.optim.optimizer import Optimizer
except ImportError as _e:  # torch is an optional extra
    raise ImportError("fastadam.torch needs PyTorch (an optional extra): "
                      "pip install torch  (or pip install 'fastadam[torch]')") from _e

import fastadam as _fa

from .. import functional as _F

__all__ = ["Adam", "AdamW", "SparseAdam"]

_SUPPORTED = (torch.float32, torch.float64)
_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}


# Validated zero-copy numpy views of a contiguous parameter and its state,
# reused while the identity/layout fields still match (saves ~7 us per tensor).
_Views = namedtuple("_Views", "m v vmax data_ptr stride dtype step p_np m_np v_np vmax_np "
                              "amsgrad step_view")
# The same for SparseAdam: the (rows, row width) table view and its state's.
_SViews = namedtuple("_SViews", "m v data_ptr dtype shape table_np m_np v_np")


def _scalar_dtype():
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _num(x):
    """A hyperparameter (float or 1-element tensor) as a Python float."""
    if isinstance(x, torch.Tensor):
        return float(x.item())
    return float(x)


def _check_param(cls, p, where):
    """Raise a clear error for a parameter fastadam cannot step."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{cls}: {where} must be a torch.Tensor, got {type(p).__name__}")
    if p.device.type != "cpu":
        raise ValueError(f"{cls}: {where} is on device '{p.device}'; fastadam steps CPU tensors "
                         "only (use torch.optim's fused optimizers on accelerators)")
    if p.layout != torch.strided:
        raise ValueError(f"{cls}: {where} has layout {p.layout}; parameters must be dense "
                         "(strided) tensors")
    dt = p.dtype
    if dt in _SUPPORTED or dt in _COMPLEX:
        return
    if dt in (torch.float16, torch.bfloat16):
        raise TypeError(f"{cls}: {where} has dtype {dt}, which fastadam does not support yet "
                        "(float32 and float64 only; keep float32 master weights, e.g. with "
                        "torch.autocast, for mixed precision)")
    raise TypeError(f"{cls}: {where} has dtype {dt}; fastadam steps float32/float64 "
                    "(and complex64/complex128) parameters only")


def _is_dense(t):
    """True if ``t`` covers one gap-free block of memory (any dimension order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for st, sz in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if st != expected:
            return False
        expected *= sz
    return True


def _same_layout(a, b):
    """Same shape and the same element -> memory offset map (size-1 dims ignored)."""
    if a.shape != b.shape:
        return False
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def _real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def _np(t):
    """Zero-copy numpy view of a contiguous CPU tensor (any shape)."""
    return t.detach().numpy()


def _flat_np(t):
    """Zero-copy 1-D numpy view, in memory order, of a dense (permuted) tensor."""
    return t.detach().as_strided((t.numel(),), (1,)).numpy()


def _bump_versions(tensors):
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


def _step_view(state):
    """0-d numpy view of state['step'] (a CPU scalar tensor): read and written without
    a torch dispatch per parameter."""
    st = state["step"]
    if st.device.type != "cpu" or st.dim() != 0 or st.dtype not in _SUPPORTED:
        st = state["step"] = torch.tensor(float(st), dtype=_scalar_dtype())
    return st.numpy()


def _sparse_kernel(cls):
    fn = getattr(_fa, "sparse_adam_step", None)
    if fn is None:
        raise RuntimeError(f"{cls}: sparse gradients need fastadam.sparse_adam_step, which this "
                           "build of fastadam does not provide")
    return fn


def _sparse_operands(cls, p, g, where):
    """(table2d, row_ids, grad_rows) numpy views for a COO gradient of ``p``.

    Sparse dimensions are linearised into one row id, dense dimensions into one
    row of the table; duplicate ids are left for the kernel to sum.
    """
    if g.dtype != p.dtype:
        raise TypeError(f"{cls}: the sparse gradient of {where} has dtype {g.dtype}, the "
                        f"parameter has {p.dtype}")
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


def _as_state_layout(state, key, p, view):
    """Return state[key] laid out like ``view`` (contiguous or p's dense layout).

    A state tensor whose layout differs (e.g. loaded from a checkpoint saved
    for a contiguous parameter) is re-laid out ONCE and stored back.
    """
    t = state[key]
    if t.is_contiguous() if view == "contiguous" else _same_layout(t, p):
        return t
    nt = torch.empty_like(p, memory_format=torch.preserve_format) if view == "dense" \
        else torch.empty(p.shape, dtype=p.dtype)
    nt.copy_(t)
    state[key] = nt
    return nt


class Adam(Optimizer):
    r"""Drop-in for ``torch.optim.Adam`` whose step runs fastadam's fused CPU kernel.

    Arguments, defaults, ``param_groups``, ``state`` and ``state_dict()`` are
    torch's (``foreach`` and ``fused`` are accepted and recorded; the update is
    always fastadam's, which is bitwise equal to ``torch.optim.Adam(fused=True)``
    on AVX2/AVX-512 CPUs). Extra keyword: ``n_threads`` (None: fastadam's
    default, resolved at each step).

    Dense parameters of a param group are stepped in ONE native call (per
    dtype) on zero-copy numpy views of the parameter, gradient and state
    tensors. Parameters whose gradient is sparse (``nn.Embedding(sparse=True)``)
    are stepped with the lazy sparse path: only the rows present in the
    gradient change, with ``torch.optim.SparseAdam``'s arithmetic (see
    the README), so one optimizer replaces torch's Adam + SparseAdam pair.

    Supported: CPU float32/float64 (and complex64/complex128 as real pairs, as
    torch does); ``capturable`` and ``differentiable`` are not (ValueError);
    float16/bfloat16 raise TypeError.
    """

    _decoupled_default = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 n_threads=None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if capturable:
            raise ValueError(f"{type(self).__name__}: capturable=True (CUDA graph capture) is "
                             "not supported; fastadam steps CPU tensors")
        if differentiable:
            raise ValueError(f"{type(self).__name__}: differentiable=True is not supported "
                             "(the fused kernel is not differentiable)")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        betas = tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() else b
                      for b in betas)
        _F.check_hyper(_num(lr), tuple(_num(b) for b in betas), eps, weight_decay)
        if n_threads is not None:
            from .. import _threads
            _threads.resolve(n_threads, 0)  # validate now
        self.n_threads = n_threads
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        self._fa_views = {}
        super().__init__(params, defaults)
        # GradScaler hands us grad_scale/found_inf instead of unscaling the grads.
        self._step_supports_amp_scaling = True

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        for i, p in enumerate(self.param_groups[-1]["params"]):
            _check_param(type(self).__name__, p, f"parameter {i} of param group {gi}")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", self._decoupled_default)
        self.__dict__.setdefault("n_threads", None)
        self._fa_views = {}
        self._step_supports_amp_scaling = True

    def __getstate__(self):
        d = super().__getstate__()
        d["n_threads"] = self.n_threads   # the cached numpy views are not pickled
        return d

    def load_state_dict(self, state_dict):
        self._fa_views = {}  # drop views of the replaced state tensors
        super().load_state_dict(state_dict)

    # -- the step ---------------------------------------------------------
    def _new_state(self, p, amsgrad):
        st = {"step": torch.tensor(0.0, dtype=_scalar_dtype()),
              "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
              "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        if amsgrad:
            st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _plan_group(self, gi, group):
        """Validate one group and gather zero-copy views. Writes nothing but new state."""
        cls = type(self).__name__
        amsgrad = bool(group["amsgrad"])
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
        ps, gs, ms, vs, vmaxs, states, tparams = [], [], [], [], [], [], []
        copy_back = []
        sparse = []
        cache = self._fa_views
        state_of = self.state
        strided = torch.strided
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            # Fast path: a contiguous real parameter stepped before, same state tensors,
            # same memory: reuse the validated numpy views of p and its state; only the
            # gradient (a new tensor after zero_grad) is checked and viewed afresh.
            c = cache.get(p)
            if c is not None:
                state = state_of.get(p)
                if (state is not None and c.m is state.get("exp_avg")
                        and c.v is state.get("exp_avg_sq")
                        and c.amsgrad is amsgrad
                        and c.vmax is (state.get("max_exp_avg_sq") if amsgrad else None)
                        and c.data_ptr == p.data_ptr() and c.stride == p.stride()
                        and c.dtype is p.dtype and c.step is state.get("step")
                        and g.layout is strided and g.dtype is p.dtype and g.is_cpu
                        and g.is_contiguous() and g.shape == p.shape):
                    ps.append(c.p_np)
                    gs.append((g.detach() if g.requires_grad else g).numpy())
                    ms.append(c.m_np)
                    vs.append(c.v_np)
                    if amsgrad:
                        vmaxs.append(c.vmax_np)
                    states.append(c.step_view)
                    tparams.append(p)
                    continue
                del cache[p]
            where = f"parameter {i} of param group {gi}"
            if p.device.type != "cpu" or (p.dtype not in _SUPPORTED and p.dtype not in _COMPLEX):
                _check_param(cls, p, where)
            if g.device.type != "cpu":
                raise ValueError(f"{cls}: the gradient of {where} is on device '{g.device}'; "
                                 "fastadam steps CPU tensors only")
            state = self.state[p]
            if len(state) == 0:
                state.update(self._new_state(p, amsgrad))
            elif amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step_view = _step_view(state)   # converts an int/float step to a tensor
            if g.is_sparse:
                ops = _sparse_operands(cls, p, g, where)
                for k in keys:
                    t = state[k]
                    if t.shape != p.shape or t.dtype != p.dtype or t.device.type != "cpu":
                        raise ValueError(f"{cls}: state '{k}' of {where} is {t.dtype} "
                                         f"{tuple(t.shape)} on {t.device}; expected {p.dtype} "
                                         f"{tuple(p.shape)} on cpu")
                    _as_state_layout(state, k, p, "contiguous")
                sparse.append((p, state, ops))
                continue
            if g.layout != torch.strided:
                raise ValueError(f"{cls}: the gradient of {where} has layout {g.layout}; "
                                 "dense (strided) or sparse COO gradients only")
            if g.dtype != p.dtype or g.shape != p.shape:
                raise TypeError(f"{cls}: the gradient of {where} is {g.dtype} {tuple(g.shape)}, "
                                f"the parameter is {p.dtype} {tuple(p.shape)}")
            for k in keys:
                t = state[k]
                if t.shape != p.shape or t.dtype != p.dtype or t.device.type != "cpu":
                    raise ValueError(f"{cls}: state '{k}' of {where} is {t.dtype} "
                                     f"{tuple(t.shape)} on {t.device}; expected {p.dtype} "
                                     f"{tuple(p.shape)} on cpu (load_state_dict from another "
                                     "model?)")
            sts = [state[k] for k in keys]
            if p.is_contiguous() and g.is_contiguous() and all(t.is_contiguous() for t in sts):
                pv, gv, tv = p, g, sts
                cvt = _np
                if not p.is_complex():
                    views = [cvt(t) for t in tv]
                    cache[p] = _Views(sts[0], sts[1], sts[2] if amsgrad else None,
                                      p.data_ptr(), p.stride(), p.dtype, state["step"], cvt(p),
                                      views[0], views[1], views[2] if amsgrad else None,
                                      amsgrad, step_view)
            elif _is_dense(p):
                # Permuted but gap-free (e.g. a transposed or channels_last weight):
                # step the memory block in place; grad/state must share p's layout.
                tv = [_as_state_layout(state, k, p, "dense") for k in keys]
                gv = g if _same_layout(g, p) else \
                    torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)
                pv = p
                cvt = _flat_np
            else:
                # A view with gaps (e.g. a slice of a larger tensor): step a
                # contiguous copy and copy it back after the native call.
                tv = [_as_state_layout(state, k, p, "contiguous") for k in keys]
                gv = g.contiguous()
                pv = p.detach().clone(memory_format=torch.contiguous_format)
                copy_back.append((p, pv))
                cvt = _np
            if p.is_complex():
                pv, gv = _real(pv), _real(gv)
                tv = [_real(t) for t in tv]
            ps.append(cvt(pv))
            gs.append(cvt(gv))
            ms.append(cvt(tv[0]))
            vs.append(cvt(tv[1]))
            if amsgrad:
                vmaxs.append(cvt(tv[2]))
            states.append(step_view)
            tparams.append(p)
        return ps, gs, ms, vs, vmaxs, states, tparams, copy_back, sparse

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (optionally re-evaluating ``closure``).

        Returns the closure's loss, like torch. Parameters whose ``grad`` is
        None are skipped. With ``GradScaler``, gradients are unscaled inside
        the kernel (``grad_scale``) and the whole step is skipped when
        ``found_inf`` is set, as torch's fused Adam does.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        plans = [self._plan_group(gi, g) for gi, g in enumerate(self.param_groups)]
        if found_inf is not None and _num(found_inf) != 0.0:
            return loss  # overflow: skip the update, steps unchanged (torch fused semantics)
        gs_val = None if grad_scale is None else _num(grad_scale)
        for group, (ps, gs, ms, vs, vmaxs, states, tparams, copy_back, sparse) in zip(
                self.param_groups, plans):
            lr = _num(group["lr"])
            b1, b2 = group["betas"]
            betas = (_num(b1), _num(b2))
            amsgrad = group["amsgrad"]
            if ps:
                steps = [int(sv) + 1 for sv in states]   # states: 0-d views of 'step'
                s0 = steps[0]
                if steps.count(s0) == len(steps):
                    steps = s0              # one int: validated once
                _F.adam(ps, gs, ms, vs, steps=steps, lr=lr, betas=betas, eps=group["eps"],
                        weight_decay=group["weight_decay"],
                        decoupled_weight_decay=group["decoupled_weight_decay"],
                        amsgrad=amsgrad, max_exp_avg_sqs=vmaxs if amsgrad else None,
                        maximize=group["maximize"], grad_scale=gs_val,
                        n_threads=self.n_threads)
                if isinstance(steps, int):
                    for sv in states:
                        sv[()] = steps
                else:
                    for sv, s in zip(states, steps):
                        sv[()] = s
                for p, pv in copy_back:
                    p.copy_(pv)
                _bump_versions(tparams)
            for p, state, ops in sparse:
                self._sparse_step(p, state, ops, group, lr, betas, gs_val)
        return loss

    def _sparse_step(self, p, state, ops, group, lr, betas, gs_val):
        cls = type(self).__name__
        table, ids, vals = ops
        if gs_val is not None:
            vals = vals / gs_val
        amsgrad = group["amsgrad"]
        step = int(state["step"].item()) + 1
        _sparse_kernel(cls)(
            table.numpy(), ids.numpy(), vals.detach().numpy(),
            state["exp_avg"].view(table.shape).numpy(),
            state["exp_avg_sq"].view(table.shape).numpy(),
            step=step, lr=lr, betas=betas, eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=amsgrad,
            max_exp_avg_sq=state["max_exp_avg_sq"].view(table.shape).numpy() if amsgrad
            else None,
            maximize=group["maximize"], n_threads=self.n_threads)
        state["step"].add_(1.0)
        _bump_versions([p])


class AdamW(Adam):
    """Drop-in for ``torch.optim.AdamW``: :class:`Adam` with decoupled weight decay
    (default ``weight_decay=1e-2``)."""

    _decoupled_default = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, n_threads=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, n_threads=n_threads)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class SparseAdam(Optimizer):
    r"""Drop-in for ``torch.optim.SparseAdam`` on fastadam's sparse kernel.

    Same arguments, defaults, errors and state (``step`` an int, ``exp_avg``,
    ``exp_avg_sq``) as torch. Each step touches only the rows present in the
    sparse gradient; duplicate row ids are summed inside the kernel (torch
    coalesces first). Extra keyword: ``n_threads``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False, *,
                 n_threads=None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        self.n_threads = n_threads
        self._fa_views = {}
        defaults = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
        super().__init__(params, defaults)
        sparse_params = []
        complex_params = []
        for index, param_group in enumerate(self.param_groups):
            for d_index, d_param in enumerate(param_group["params"]):
                if d_param.is_sparse:
                    sparse_params.append([index, d_index])
                if d_param.is_complex():
                    complex_params.append([index, d_index])
        if sparse_params:
            raise ValueError(f"Sparse params at indices {sparse_params}: SparseAdam requires "
                             "dense parameter tensors")
        if complex_params:
            raise ValueError(f"Complex params at indices {complex_params}: SparseAdam does not "
                             "support complex parameters")
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                _check_param("SparseAdam", p, f"parameter {i} of param group {gi}")

    def __getstate__(self):
        d = super().__getstate__()
        d["n_threads"] = self.n_threads
        return d

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("n_threads", None)
        self._fa_views = {}

    def load_state_dict(self, state_dict):
        self._fa_views = {}  # drop views of the replaced state tensors
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (optionally re-evaluating ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        cache = self._fa_views
        state_of = self.state
        coo = torch.sparse_coo
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                # Fast path: p stepped before, same state tensors, same memory, a
                # COO gradient over the first dimension (nn.Embedding's): reuse the
                # validated numpy views; only the gradient is viewed afresh. Every
                # torch call counts here: the kernel leaves the caches cold.
                c = cache.get(p)
                if c is not None:
                    state = state_of.get(p)
                    if (state is not None and c.m is state.get("exp_avg")
                            and c.v is state.get("exp_avg_sq")
                            and c.data_ptr == p.data_ptr() and c.dtype is p.dtype
                            and c.shape == p.shape and g.layout is coo and g.dtype is p.dtype
                            and g.is_cpu and g.sparse_dim() == 1 and g.shape == p.shape):
                        ix = g._indices()
                        vals = g._values()
                        if ix.is_contiguous() and vals.is_contiguous():
                            vn = (vals.detach() if vals.requires_grad else vals).numpy()
                            vn = vn.reshape(vn.shape[0], c.table_np.shape[1])
                            work.append((group, state, (c.table_np, ix.numpy()[0], vn,
                                                        c.m_np, c.v_np), p))
                            continue
                    del cache[p]
                where = f"parameter {i} of param group {gi}"
                if not g.is_sparse:
                    raise RuntimeError("SparseAdam does not support dense gradients, please "
                                       "consider Adam instead")
                _check_param("SparseAdam", p, where)
                if g.device.type != "cpu":
                    raise ValueError(f"SparseAdam: the gradient of {where} is on device "
                                     f"'{g.device}'; fastadam steps CPU tensors only")
                table, ids, vals = _sparse_operands("SparseAdam", p, g, where)
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                for k in ("exp_avg", "exp_avg_sq"):
                    t = state[k]
                    if t.shape != p.shape or t.dtype != p.dtype or not t.is_contiguous():
                        state[k] = t = t.to(dtype=p.dtype).contiguous()
                        if t.shape != p.shape:
                            raise ValueError(f"SparseAdam: state '{k}' of {where} has shape "
                                             f"{tuple(t.shape)}, expected {tuple(p.shape)}")
                views = (table.numpy(), ids.numpy(), vals.detach().numpy(),
                         state["exp_avg"].view(table.shape).numpy(),
                         state["exp_avg_sq"].view(table.shape).numpy())
                if g.sparse_dim() == 1:
                    cache[p] = _SViews(state["exp_avg"], state["exp_avg_sq"], p.data_ptr(),
                                       p.dtype, p.shape, views[0], views[3], views[4])
                work.append((group, state, views, p))
        if work:
            kernel = _sparse_kernel("SparseAdam")
        for group, state, (table, ids, vals, m, v), _ in work:
            step = int(state["step"]) + 1
            b1, b2 = group["betas"]
            kernel(table, ids, vals, m, v, step=step, lr=_num(group["lr"]),
                   betas=(_num(b1), _num(b2)), eps=group["eps"],
                   maximize=group.get("maximize", False), n_threads=self.n_threads)
            state["step"] = step
        _bump_versions([p for _, _, _, p in work])
        return loss
