"""Design: ``Adam8bit`` / ``AdamW8bit``, torch.optim drop-ins with 8-bit blockwise state.

Contract: ``torch.optim.Adam``/``AdamW``'s constructor arguments and defaults
(``amsgrad``, ``capturable``, ``differentiable`` are refused: no 8-bit
``max_exp_avg_sq``), torch's ``param_groups`` plus ``state_dtype="q8"``, and
per parameter of 4096+ elements the state of
:func:`fastadam.functional.new_state8bit` as tensors -- ``step`` (a float32
scalar tensor, as torch), ``exp_avg`` / ``exp_avg_sq`` (uint8 codes, the
parameter's shape), ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` (float32, one
per block of 256); smaller parameters keep torch's ``exp_avg`` /
``exp_avg_sq`` in the parameter's dtype. float32, bfloat16 and float16
parameters (the gradient of the parameter's dtype). The step: zero-copy
numpy views, every group planned
(:func:`fastadam.functional.plan_adam8bit` for the 8-bit parameters, one
native call; :func:`fastadam.functional.plan_adam` for the rest) before any
is run. ``load_state_dict`` checks the 8-bit state and keeps its dtypes
(torch's own would cast the uint8 codes to the parameter's dtype).
Parameters with sparse gradients (``nn.Embedding(sparse=True)``) take the
lazy sparse path (torch ``SparseAdam``'s arithmetic) with 8-bit **row**
state (:func:`fastadam.functional.plan_sparse_adam8bit`: the scales of shape
``(rows, ceil(width / 256))``, a row's blocks its own), float32 state under
4096 elements.

:func:`to_bitsandbytes_state` / :func:`from_bitsandbytes_state` convert one
parameter's state to and from ``bitsandbytes.optim.Adam8bit``'s
(``state1``/``state2``/``absmax1``/``absmax2``/``qmap1``/``qmap2``): the
same maps, block size and absmax placement, so the codes carry over as they
are.
"""
from typing import Any

import numpy as np
import torch
from torch.optim.optimizer import Optimizer

from .. import _interface, _quant, _threads
from .. import functional as _F
from .._validate import check_grad_scale, check_hyper, check_state_step
from . import _views as V
from ._state import to_torch_state_dict
from ._stepper import Stepper

__all__ = ["Adam8bit", "AdamW8bit", "to_bitsandbytes_state", "from_bitsandbytes_state"]

_Q8 = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")
_F32 = ("exp_avg", "exp_avg_sq")


def _q8_state(p):
    """Fresh 8-bit state tensors of ``p`` (all representing zero)."""
    return {k: torch.from_numpy(a) for k, a in _F.new_state8bit(tuple(p.shape)).items()}


# parameter dtypes with 8-bit state kernels (torch gradients have the param's dtype)
_Q8_DTYPES = tuple(dt for dt in (torch.float32, torch.bfloat16, torch.float16)
                   if dt in V.SUPPORTED
                   and ("adam_q8",) + (V.dtype_name(dt),) * 2 + ("uint8",) in _interface.KERNELS)


def _is_q8(p):
    return p.dtype in _Q8_DTYPES and p.numel() >= _quant.MIN_SIZE


def _check_q8_tensors(name, st, p):
    """The 8-bit state tensors of ``p``: uint8 codes of its shape, float32 block
    scales of ``(ceil(numel / 256),)``, CPU, contiguous."""
    nb = (_quant.n_blocks(p.numel()),)
    for k in _Q8:
        if k not in st:
            raise ValueError(f"{name} lacks {k!r} (8-bit state)")
        t = st[k]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} {k!r} must be a tensor, got {type(t).__name__}")
        want = torch.uint8 if k in _F32 else torch.float32
        shape = tuple(p.shape) if k in _F32 else nb
        if t.dtype != want or tuple(t.shape) != shape or t.device.type != "cpu":
            raise TypeError(f"{name} {k!r} must be a CPU {want} tensor of shape {shape} "
                            f"(8-bit state), got {t.dtype} {tuple(t.shape)} on {t.device}")
        if k not in _F32 and t.numel() and not bool(torch.isfinite(t).all() and t.min() >= 0):
            raise ValueError(f"{name} {k!r} must hold finite values >= 0 (block scales)")


class Adam8bit(Stepper, Optimizer):
    r"""Drop-in for ``torch.optim.Adam`` with 8-bit blockwise state (fused, CPU).

    The arguments and defaults are ``torch.optim.Adam``'s; ``amsgrad``,
    ``capturable`` and ``differentiable`` must stay False, ``foreach`` and
    ``fused`` are recorded and ignored. Extra keyword: ``n_threads``.
    float32, bfloat16 and float16 CPU parameters of 4096+ elements get 8-bit
    state (about 2 bytes per parameter instead of 8, or 4 for 16-bit
    parameters: see the docs' "8-bit optimizer state"), smaller ones (and
    float64 ones) state of the parameter's dtype; 16-bit parameters are
    rounded to nearest even. The update is
    :func:`fastadam.functional.adam8bit_step`'s: torch fused's arithmetic on
    the dequantised moments, which are then requantised to the exact nearest
    code; it follows ``torch.optim.Adam`` to the quantisation error, not bit
    for bit. Works with ``GradScaler`` (the gradients are unscaled inside the
    kernel) and ``lr_scheduler``. Parameters with sparse gradients
    (``nn.Embedding(sparse=True)``) are stepped lazily (only the rows present
    change, ``torch.optim.SparseAdam``'s arithmetic, as in
    :class:`fastadam.torch.Adam`) with 8-bit row state: ``exp_avg_absmax`` /
    ``exp_avg_sq_absmax`` of shape ``(rows, ceil(width / 256))`` (see
    :func:`fastadam.functional.sparse_adam8bit_step`).
    """

    _decoupled_default = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 n_threads=None):
        cls = type(self).__name__
        V.check_torch_hyper(lr, betas, eps, weight_decay)
        for name, val in (("amsgrad", amsgrad), ("capturable", capturable),
                          ("differentiable", differentiable)):
            if val:
                raise ValueError(f"{cls}: {name}=True is not supported with 8-bit state")
        check_hyper(V.num(lr), tuple(V.num(b) for b in betas), eps, weight_decay)
        self.n_threads = _threads.check(n_threads)
        self._init_lock()
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=False, maximize=maximize, foreach=foreach, capturable=False,
                        differentiable=False, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, state_dtype="q8")
        super().__init__(params, defaults)
        self._step_supports_amp_scaling = True

    def add_param_group(self, param_group):
        """torch's ``add_param_group``, then fastadam's parameter checks (a rejected
        group is not added); ``state_dtype`` must be ``"q8"``, ``amsgrad`` False."""
        n = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            g = self.param_groups[-1]
            if g.get("state_dtype") != "q8" or g.get("amsgrad"):
                raise ValueError(f"{type(self).__name__}: param group {n} needs "
                                 "state_dtype='q8' and amsgrad=False")
            for i, p in enumerate(g["params"]):
                V.check_param(type(self).__name__, p, f"parameter {i} of param group {n}",
                              device=False)
                if p.is_complex():
                    raise TypeError(f"{type(self).__name__}: parameter {i} of param group "
                                    f"{n} is complex; 8-bit state is for real parameters")
        except Exception:
            del self.param_groups[n:]
            raise

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("n_threads", None)
        self._init_lock()
        self._step_supports_amp_scaling = True

    # -- checkpoints ---------------------------------------------------------
    def load_state_dict(self, state_dict):
        """torch's ``load_state_dict`` (numpy-layout dicts from ``fastadam.load``
        and ``fastadam.AdamW(state_dtype='q8').state_dict()`` are converted), with
        the 8-bit state checked first (uint8 codes of the parameter's shape,
        finite non-negative float32 block scales; a rejected dict changes
        nothing) and kept in its dtypes afterwards. Holds the step lock."""
        with self._lock:
            return self._load_state_dict(state_dict)

    def _load_state_dict(self, state_dict):
        cls = type(self).__name__
        sd = to_torch_state_dict(state_dict)
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{cls}.load_state_dict: {len(groups)} param groups, the "
                             f"optimizer has {len(self.param_groups)}")
        params: dict[Any, Any] = {}
        for gi, (g, sg) in enumerate(zip(self.param_groups, groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"{cls}.load_state_dict: param group {gi} has "
                                 f"{len(sg['params'])} params, the optimizer's "
                                 f"{len(g['params'])}")
            if sg.get("amsgrad"):
                raise ValueError(f"{cls}.load_state_dict: param group {gi} has amsgrad=True "
                                 "(not supported with 8-bit state)")
            check_hyper(V.num(sg["lr"]), tuple(V.num(b) for b in sg["betas"]), sg["eps"],
                        sg["weight_decay"])
            params.update(zip(sg["params"], g["params"]))
        q8 = []
        for key, st in sd["state"].items():
            p = params.get(key)
            if p is None:
                raise ValueError(f"{cls}.load_state_dict: state key {key!r} is no parameter "
                                 "id of the param groups")
            name = f"{cls}.load_state_dict: state {key!r}"
            check_state_step(V.step_value(st.get("step", 0), name), f"{name} 'step'")
            if "exp_avg_absmax" in st:
                if getattr(st["exp_avg_absmax"], "dim", lambda: 1)() == 2:
                    V.check_q8_rows_loaded(name, st, p)      # 8-bit row state (sparse)
                else:
                    _check_q8_tensors(name, st, p)
                q8.append(key)
        for g in groups:
            g["state_dtype"] = "q8"
        # torch casts every state tensor to the parameter's dtype (lossy for the
        # float32 block scales of a 16-bit parameter): the 8-bit state is put back
        kept = {params[key]: {k: sd["state"][key][k].detach().clone() for k in _Q8}
                for key in q8}
        super().load_state_dict(sd)
        for p, tensors in kept.items():
            self.state[p].update(tensors)

    # -- the step -------------------------------------------------------------
    def _gather(self, gi, group):
        cls = type(self).__name__
        # per kind: params, grads, state lists, step views, labels
        q8: tuple[list[Any], ...] = ([], [], [[] for _ in _Q8], [], [])
        f32: tuple[list[Any], ...] = ([], [], [[] for _ in _F32], [], [])
        tparams = []
        sparse = []
        for i, p, g in V.stepped(cls, {}, gi, group["params"]):
            where = f"parameter {i} of param group {gi}"
            V.check_param(cls, p, where)
            if g.is_sparse:
                sparse.append(self._gather_sparse(p, g, where))
                continue
            if g.layout != torch.strided:
                raise ValueError(f"{cls}: the gradient of {where} has layout {g.layout}; "
                                 "dense (strided) or sparse COO gradients only")
            if g.dtype != p.dtype or g.shape != p.shape or g.device.type != "cpu":
                raise TypeError(f"{cls}: the gradient of {where} is {g.dtype} "
                                f"{tuple(g.shape)} on {g.device}, the parameter {p.dtype} "
                                f"{tuple(p.shape)}")
            if not p.is_contiguous():
                raise ValueError(f"{cls}: {where} is not contiguous; 8-bit state steps "
                                 "contiguous parameters")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=V.scalar_dtype())
                state.update(_q8_state(p) if _is_q8(p) else V.new_state(p, _F32))
            sv = V.step_view(state, where)
            keys: tuple[str, ...]
            if "exp_avg_absmax" in state:
                _check_q8_tensors(f"{cls}: state of {where}", state, p)
                dst, keys = q8, _Q8
            else:
                dst, keys = f32, _F32
                for k in keys:
                    t = state[k]
                    if t.dtype != p.dtype or t.shape != p.shape or not t.is_contiguous():
                        raise TypeError(f"{cls}: state {k!r} of {where} is {t.dtype} "
                                        f"{tuple(t.shape)}, the parameter {p.dtype} "
                                        f"{tuple(p.shape)}")
            dst[0].append(V.np_view(p))
            dst[1].append(V.np_view(g.contiguous()))
            for lst, k in zip(dst[2], keys):
                lst.append(V.np_view(state[k]))
            dst[3].append(sv)
            dst[4].append(i)
            tparams.append(p)
        return q8, f32, tparams, sparse

    def _gather_sparse(self, p, g, where):
        """A parameter with a sparse gradient: ``(p, step view, numpy views)``,
        the views ``(table, ids, grad rows)`` + 8-bit row state (7) or float32
        ``exp_avg``, ``exp_avg_sq`` (5); state created on the first step."""
        cls = type(self).__name__
        if g.device.type != "cpu":
            raise ValueError(f"{cls}: the gradient of {where} is on device '{g.device}'; "
                             "fastadam steps CPU tensors only")
        table, ids, vals = V.sparse_operands(cls, p, g, where)
        shape = tuple(table.shape)
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=V.scalar_dtype())
            state.update(V.new_q8_rows(p, shape) if V.q8_rows_eligible(p)
                         else V.new_state(p, _F32))
        sv = V.step_view(state, where)
        ops = (table.numpy(), ids.numpy(), vals.detach().numpy())
        if "exp_avg_absmax" in state:
            V.check_q8_rows(cls, state, p, shape, where)
            return p, sv, ops + V.q8_row_views(state, shape)
        V.check_state(cls, state, _F32, p, where)
        for k in _F32:
            V.as_state_layout(state, k, p, "contiguous")
        return p, sv, ops + tuple(state[k].view(shape).numpy() for k in _F32)

    @torch.no_grad()
    def _step(self, closure=None):
        """One optimization step (optionally re-evaluating ``closure``); returns its
        loss (``step()`` adds torch's hooks and the per-optimizer lock, see
        :class:`fastadam.torch._stepper.Stepper`). Every group is checked and
        planned before any is written; with
        ``GradScaler``, ``found_inf`` skips the step and ``grad_scale`` divides
        the gradients inside the kernel."""
        loss = V.run_closure(closure)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        gathered = [self._gather(gi, g) for gi, g in enumerate(self.param_groups)]
        if found_inf is not None and V.num(found_inf) != 0.0:
            return loss
        gs_val = None if grad_scale is None else V.num(grad_scale)
        if gs_val is not None:
            check_grad_scale(gs_val)
        plan, counted, tparams = [], [], []
        for group, (q8, f32, tp, sparse) in zip(self.param_groups, gathered):
            b1, b2 = group["betas"]
            kw = dict(lr=V.num(group["lr"]), betas=(V.num(b1), V.num(b2)), eps=group["eps"],
                      weight_decay=group["weight_decay"],
                      decoupled_weight_decay=group["decoupled_weight_decay"],
                      maximize=group["maximize"], grad_scale=gs_val, n_threads=self.n_threads)
            for (ps, gs, sts, svs, labels), planner in ((q8, _F.plan_adam8bit),
                                                        (f32, _F.plan_adam)):
                if not ps:
                    continue
                steps = [int(sv) + 1 for sv in svs]
                plan += planner(ps, gs, *sts, steps=steps, labels=labels, **kw)
                counted.append((svs, steps))
            kw.pop("grad_scale")
            for p, sv, views in sparse:
                if gs_val is not None:     # the sparse path takes unscaled rows
                    views = views[:2] + ((views[2] / gs_val).astype(views[2].dtype),) + views[3:]
                sparse_planner: Any = (_F.plan_sparse_adam8bit if len(views) == 7
                                       else _F.plan_sparse_adam)
                step = int(sv) + 1
                plan += sparse_planner(*views, step=step, **kw)
                counted.append(([sv], [step]))
                tparams.append(p)
            tparams += tp
        _F.run(plan)
        for svs, steps in counted:
            for sv, s in zip(svs, steps):
                sv[()] = s
        V.bump_versions(tparams)
        return loss


class AdamW8bit(Adam8bit):
    """Drop-in for ``torch.optim.AdamW`` with 8-bit state: :class:`Adam8bit` with
    decoupled weight decay (default ``weight_decay=1e-2``)."""

    _decoupled_default = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, n_threads=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, n_threads=n_threads)


# ----------------------------------------------------------- bitsandbytes

def _as_tensor(x):
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


def to_bitsandbytes_state(state: dict[str, Any]) -> dict[str, Any]:
    """One parameter's fastadam state (tensors or numpy arrays, 8-bit or
    float32) in ``bitsandbytes.optim.Adam8bit``/``AdamW8bit``'s layout.

    8-bit: ``state1``/``state2`` = ``exp_avg``/``exp_avg_sq`` (uint8 codes),
    ``absmax1``/``absmax2`` = the block scales, ``qmap1``/``qmap2`` = the
    signed / unsigned dynamic maps (bitsandbytes' own, bit for bit); float32
    state (arrays under 4096 elements, which bitsandbytes keeps in 32 bits
    too): ``state1``/``state2``. ``step`` becomes an int. Tensors share the
    input's memory (``torch.from_numpy`` for arrays).

    Examples
    --------
    >>> import torch, fastadam.torch as fat
    >>> p = torch.nn.Parameter(torch.zeros(5000)); p.grad = torch.ones(5000)
    >>> opt = fat.AdamW8bit([p]); opt.step()
    >>> st = fat.to_bitsandbytes_state(opt.state[p])
    >>> sorted(st)
    ['absmax1', 'absmax2', 'qmap1', 'qmap2', 'state1', 'state2', 'step']
    >>> st["state1"].dtype, st["absmax1"].shape
    (torch.uint8, torch.Size([20]))
    """
    step = state.get("step", 0)
    out: dict[str, Any] = {"step": int(V.num(step) if isinstance(step, torch.Tensor)
                                       else check_state_step(step, "state 'step'"))}
    out["state1"] = _as_tensor(state["exp_avg"])
    out["state2"] = _as_tensor(state["exp_avg_sq"])
    if "exp_avg_absmax" in state:
        out["absmax1"] = _as_tensor(state["exp_avg_absmax"])
        out["absmax2"] = _as_tensor(state["exp_avg_sq_absmax"])
        out["qmap1"] = torch.from_numpy(_quant.dynamic_map(True))
        out["qmap2"] = torch.from_numpy(_quant.dynamic_map(False))
    return out


def from_bitsandbytes_state(state: dict[str, Any]) -> dict[str, Any]:
    """One parameter's ``bitsandbytes`` Adam8bit/AdamW8bit state (blockwise,
    256-element blocks, the default dynamic maps) as :class:`Adam8bit`'s state
    (``step`` a float32 scalar tensor). Raises ValueError for a layout fastadam
    cannot step: other maps (``qmap1``/``qmap2`` not bitsandbytes' default
    dynamic maps), non-blockwise scales or ``state1`` of another dtype."""
    step = state.get("step", 0)
    n = check_state_step(V.step_value(step, "state 'step'"), "state 'step'")
    out: dict[str, Any] = {"step": torch.tensor(float(n), dtype=V.scalar_dtype())}
    s1, s2 = _as_tensor(state["state1"]), _as_tensor(state["state2"])
    if s1.dtype == torch.uint8:
        for k, signed in (("qmap1", True), ("qmap2", False)):
            q = _as_tensor(state[k]).detach().cpu().to(torch.float32).numpy()
            if not np.array_equal(q.view(np.uint32), _quant.dynamic_map(signed).view(np.uint32)):
                raise ValueError(f"bitsandbytes state '{k}' is not the default "
                                 f"{'signed' if signed else 'unsigned'} dynamic map")
        nb = (_quant.n_blocks(s1.numel()),)
        for k in ("absmax1", "absmax2"):
            a = _as_tensor(state[k])
            if tuple(a.shape) != nb or a.dtype != torch.float32:
                raise ValueError(f"bitsandbytes state '{k}' is {a.dtype} {tuple(a.shape)}; "
                                 f"blockwise float32 scales of shape {nb} expected (256-element "
                                 "blocks)")
        out.update(exp_avg=s1, exp_avg_sq=s2, exp_avg_absmax=_as_tensor(state["absmax1"]),
                   exp_avg_sq_absmax=_as_tensor(state["absmax2"]))
    elif s1.is_floating_point():
        out.update(exp_avg=s1, exp_avg_sq=s2)
    else:
        raise ValueError(f"bitsandbytes state 'state1' has dtype {s1.dtype}; uint8 (8-bit) "
                         "or a float dtype expected")
    return out
