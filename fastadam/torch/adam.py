"""Design: ``Adam`` and ``AdamW``, the torch.optim drop-ins (layer 4, ``fastadam.torch``).

Contract: torch's constructor arguments, defaults, ``param_groups`` and state
vocabulary (``step`` as a scalar float tensor, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``), so that ``torch.optim.lr_scheduler``, ``GradScaler``,
``ZeroRedundancyOptimizer``, DDP and checkpoints written by either library
work unchanged. The update is fastadam's: CPU tensors are handed to the
functional layer as zero-copy numpy views, ONE native call per param group
(per dtype) for the dense parameters; parameters whose gradient is sparse
(``nn.Embedding(sparse=True)``) take the lazy sparse path
(:func:`fastadam.functional.plan_sparse_adam`, torch ``SparseAdam`` arithmetic)
inside the same optimizer.

A step plans before it writes: every group's tensors are checked and viewed,
then every group's native calls are planned (:func:`fastadam.functional.plan_adam`,
:func:`fastadam.functional.plan_sparse_adam`: hyperparameters, ``grad_scale`` and
row ids validated), and only then are all plans run and the steps counted. A
rejected step leaves every parameter, state value and ``step`` bit-identical
(state created for a first step may remain, zeroed, as with torch).
"""
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from .. import _plan, _threads
from .. import functional as _F
from .._validate import check_grad_scale, check_hyper
from ..functional import plan_sparse_adam
from ..optim import precision_defaults
from . import _fast
from . import _views as V
from ._state import load_checked, resolve_fused
from ._stepper import Stepper

__all__ = ["Adam", "AdamW"]

_SUPPORTED = V.SUPPORTED
_COMPLEX = V.COMPLEX
_num = V.num


class Adam(Stepper, Optimizer):
    r"""Drop-in for ``torch.optim.Adam`` whose step runs fastadam's fused CPU kernel.

    Arguments, defaults, ``param_groups``, ``state`` and ``state_dict()`` are
    torch's. ``foreach`` and ``fused`` are accepted and recorded; the update is
    always fastadam's, which is bitwise equal to ``torch.optim.Adam(fused=True)``
    on AVX2/AVX-512 CPUs, so groups record ``fused=True`` unless ``fused=False``
    or ``foreach=True`` was passed (or the group has complex parameters): a
    checkpoint loaded into ``torch.optim`` continues with torch's fused kernel.
    Extra keyword: ``n_threads`` (None: fastadam's default, resolved at each
    step; it follows the OpenMP runtime that torch shares, see
    :func:`fastadam.set_num_threads`).

    Parameters may be on any device (e.g. ``meta``, for deferred init) when
    the optimizer is built; they must be CPU tensors when stepped. A tensor
    listed twice in a group gets torch's warning and is stepped once.
    ``load_state_dict`` also takes numpy-layout dicts (``fastadam.load``).

    Dense parameters of a param group are stepped in ONE native call (per
    dtype) on zero-copy numpy views of the parameter, gradient and state
    tensors. Parameters whose gradient is sparse (``nn.Embedding(sparse=True)``)
    are stepped with the lazy sparse path: only the rows present in the
    gradient change, with ``torch.optim.SparseAdam``'s arithmetic (see
    the README), so one optimizer replaces torch's Adam + SparseAdam pair.

    Supported: CPU float32/float64/bfloat16/float16 (and complex64/complex128
    as real pairs, as torch does; bfloat16 needs ``ml_dtypes``); all-bfloat16
    and all-float16 steps equal torch fused on that dtype bit for bit.
    ``capturable`` and ``differentiable`` are not (ValueError). Extra
    keywords (group keys, kept in ``state_dict``): ``state_dtype`` (e.g.
    ``torch.bfloat16`` or ``"bf16"`` moments for float32 parameters),
    ``stochastic_rounding`` and ``seed`` (bfloat16 params/state rounded
    stochastically; see :class:`fastadam.Adam`).
    """

    _decoupled_default = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 n_threads=None, state_dtype=None, stochastic_rounding=False, seed=None):
        V.check_torch_hyper(lr, betas, eps, weight_decay)
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
        check_hyper(_num(lr), tuple(_num(b) for b in betas), eps, weight_decay)
        self.n_threads = _threads.check(n_threads)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        defaults.update(precision_defaults(state_dtype, stochastic_rounding, seed))
        self._init_lock()
        self._fa_fast = {}
        self._fa_dups = {}
        super().__init__(params, defaults)
        # GradScaler hands us grad_scale/found_inf instead of unscaling the grads.
        self._step_supports_amp_scaling = True

    def add_param_group(self, param_group):
        """torch's ``add_param_group`` (its checks, defaults and duplicate warning), then
        fastadam's parameter checks; a rejected group is not added. Records
        ``fused=True`` unless ``fused``/``foreach`` say otherwise (see
        :func:`fastadam.torch.resolve_fused`): fastadam's arithmetic is torch fused's."""
        n = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            if self.param_groups[-1].get("state_dtype") == "q8":
                raise ValueError(f"{type(self).__name__}: state_dtype='q8' (8-bit state) is "
                                 "stepped by fastadam.torch.Adam8bit / AdamW8bit, which take "
                                 "torch.optim.Adam's / AdamW's arguments (sparse-gradient "
                                 "parameters included: 8-bit row state)")
            for i, p in enumerate(self.param_groups[-1]["params"]):
                V.check_param(type(self).__name__, p, f"parameter {i} of param group {n}",
                              device=False)
        except Exception:
            del self.param_groups[n:]
            raise
        resolve_fused(self.param_groups[-1])

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
            for p in group["params"]:   # torch's Adam converts a non-tensor step here too
                st = self.state.get(p)
                if st and "step" in st and not isinstance(st["step"], torch.Tensor):
                    V.step_view(st)
        self.__dict__.setdefault("n_threads", None)
        self._init_lock()
        self._fa_fast = {}
        self._fa_dups = {}
        self._step_supports_amp_scaling = True

    def __getstate__(self):
        d = super().__getstate__()
        d["n_threads"] = self.n_threads   # the cached numpy views are not pickled
        return d

    def load_state_dict(self, state_dict):
        """torch's ``load_state_dict``; also takes numpy-layout dicts (``fastadam.load``,
        ``fastadam.Adam.state_dict()``), converted by :func:`fastadam.torch.to_torch_state_dict`.
        A group whose ``fused`` is None is recorded as ``fused=True`` (as at construction).

        Everything is checked before anything changes (torch's own applies the
        param groups before it looks at the state): the layout, group count and
        sizes, hyperparameters and options, state keys, ``step`` values and
        each state tensor's shape, dtype kind and device (not ``meta``); a
        rejected dict raises a ValueError/TypeError naming the problem and
        leaves params, state, param_groups and steps as they were."""
        with self._lock:
            load_checked(self, super().load_state_dict, state_dict, sparse=False)
            for group in self.param_groups:
                resolve_fused(group)
                # torch's load casts state to the parameter's dtype: back to the group's
                for p in group["params"] if group.get("state_dtype") else ():
                    st = self.state.get(p) or {}
                    sdt = V.state_dtype(p, group["state_dtype"])
                    for k in _KEYS_AMS:
                        if k in st and st[k].dtype != sdt:
                            st[k] = st[k].to(sdt)

    # -- the step ---------------------------------------------------------
    def _new_state(self, p, amsgrad, group=None):
        st = {"step": torch.tensor(0.0, dtype=V.scalar_dtype())}
        sdt = V.state_dtype(p, None if group is None else group.get("state_dtype"))
        st.update(V.new_state(p, _KEYS_AMS if amsgrad else _KEYS, sdt))
        return st

    def _gather_group(self, gi, group):
        """Check one group's tensors and gather zero-copy views of them.

        Writes nothing but new state (and state re-laid out, values kept).
        Returns ``(ps, gs, ms, vs, vmaxs, step_views, labels, tparams,
        copy_back, sparse)``: numpy views of the dense parameters, their
        0-d ``step`` views, each one's index in the group, the tensors, the
        (parameter, contiguous copy) pairs to copy back after the step, and
        ``(p, state, step_view, (table, ids, vals))`` per sparse gradient.
        """
        cls = type(self).__name__
        amsgrad = bool(group["amsgrad"])
        keys = _KEYS_AMS if amsgrad else _KEYS
        ps, gs, ms, vs, vmaxs, states, labels, tparams = [], [], [], [], [], [], [], []
        copy_back = []
        sparse = []
        params = group["params"]
        for i, p, g in V.stepped(cls, self._fa_dups, gi, params):
            where = f"parameter {i} of param group {gi}"
            if p.device.type != "cpu" or (p.dtype not in _SUPPORTED and p.dtype not in _COMPLEX):
                V.check_param(cls, p, where)
            if g.device.type != "cpu":
                raise ValueError(f"{cls}: the gradient of {where} is on device '{g.device}'; "
                                 "fastadam steps CPU tensors only")
            state = self.state[p]
            if len(state) == 0:
                state.update(self._new_state(p, amsgrad, group))
            elif amsgrad and "max_exp_avg_sq" not in state:
                state.update(V.new_state(p, ("max_exp_avg_sq",), state["exp_avg_sq"].dtype))
            step_view = V.step_view(state, where)   # converts an int/float step to a tensor
            if g.is_sparse:
                ops = V.sparse_operands(cls, p, g, where)
                V.check_state(cls, state, keys, p, where, "",
                              V.state_dtype(p, group.get("state_dtype")))
                for k in keys:
                    V.as_state_layout(state, k, p, "contiguous")
                sparse.append((p, state, step_view, ops))
                continue
            if g.layout != torch.strided:
                raise ValueError(f"{cls}: the gradient of {where} has layout {g.layout}; "
                                 "dense (strided) or sparse COO gradients only")
            if g.dtype != p.dtype or g.shape != p.shape:
                raise TypeError(f"{cls}: the gradient of {where} is {g.dtype} {tuple(g.shape)}, "
                                f"the parameter is {p.dtype} {tuple(p.shape)}")
            V.check_state(cls, state, keys, p, where,
                          " (load_state_dict from another model?)",
                          V.state_dtype(p, group.get("state_dtype")))
            sts = [state[k] for k in keys]
            if p.is_contiguous() and g.is_contiguous() and all(t.is_contiguous() for t in sts):
                pv, gv, tv = p, g, sts
                cvt = V.np_view
            elif V.is_dense(p):
                # Permuted but gap-free (e.g. a transposed or channels_last weight):
                # step the memory block in place; grad/state must share p's layout.
                tv = [V.as_state_layout(state, k, p, "dense") for k in keys]
                gv = g if V.same_layout(g, p) else \
                    torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)
                pv = p
                cvt = V.flat_np_view
            else:
                # A view with gaps (e.g. a slice of a larger tensor): step a
                # contiguous copy and copy it back after the native call.
                tv = [V.as_state_layout(state, k, p, "contiguous") for k in keys]
                gv = g.contiguous()
                pv = p.detach().clone(memory_format=torch.contiguous_format)
                copy_back.append((p, pv))
                cvt = V.np_view
            if p.is_complex():
                pv, gv = V.real(pv), V.real(gv)
                tv = [V.real(t) for t in tv]
            ps.append(cvt(pv))
            gs.append(cvt(gv))
            ms.append(cvt(tv[0]))
            vs.append(cvt(tv[1]))
            if amsgrad:
                vmaxs.append(cvt(tv[2]))
            states.append(step_view)
            labels.append(i)
            tparams.append(p)
        return ps, gs, ms, vs, vmaxs, states, labels, tparams, copy_back, sparse

    def _plan(self, groups, gathered, gs_val):
        """Plan every group's native calls (validating hyperparameters, ``grad_scale``
        and row ids) without writing. Returns ``(plan, finish)``: the calls for
        :func:`fastadam.functional.run` and, per group, what to count afterwards."""
        plan = []
        finish = []
        n_threads = self.n_threads
        if gs_val is not None:
            check_grad_scale(gs_val)   # the sparse path divides by it
        for gi, (group, (ps, gs, ms, vs, vmaxs, states, labels, tparams, copy_back,
                         sparse)) in enumerate(zip(groups, gathered)):
            lr = _num(group["lr"])
            b1, b2 = group["betas"]
            betas = (_num(b1), _num(b2))
            amsgrad = group["amsgrad"]
            steps: Any = None
            if ps:
                steps = [int(sv) + 1 for sv in states]   # states: 0-d views of 'step'
                s0 = steps[0]
                if steps.count(s0) == len(steps):
                    steps = s0              # one int: validated once
                plan += _F.plan_adam(
                    ps, gs, ms, vs, steps=steps, lr=lr, betas=betas, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=amsgrad,
                    max_exp_avg_sqs=vmaxs if amsgrad else None, maximize=group["maximize"],
                    grad_scale=gs_val, n_threads=n_threads, labels=labels,
                    stochastic_rounding=group.get("stochastic_rounding", False),
                    seed=_plan.array_seed(group.get("seed", 0), 2**32 + gi))
            for _p, state, sv, (table, ids, vals) in sparse:
                vals = V.grad_rows(vals)
                if gs_val is not None:
                    vals = vals / gs_val
                shape = table.shape
                plan += plan_sparse_adam(
                    V.np_view(table), ids.numpy(), vals.detach().numpy(),
                    V.np_view(state["exp_avg"].view(shape)),
                    V.np_view(state["exp_avg_sq"].view(shape)),
                    step=int(sv) + 1, lr=lr, betas=betas, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=amsgrad,
                    max_exp_avg_sq=V.np_view(state["max_exp_avg_sq"].view(shape)) if amsgrad
                    else None,
                    maximize=group["maximize"], n_threads=n_threads)
            finish.append((states, steps, tparams, copy_back, sparse))
        return plan, finish

    def _step(self, closure=None):
        """The step (``step()`` adds torch's hooks and the lock, see
        :class:`fastadam.torch._stepper.Stepper`).

        Parameters whose ``grad`` is None are skipped. With ``GradScaler``,
        gradients are unscaled inside the kernel (``grad_scale``) and the
        whole step is skipped when ``found_inf`` is set, as torch's fused Adam
        does. Every group is validated before any is written: a rejected step
        changes no parameter, state value or ``step``. A group stepped before
        takes its recorded fast step (:mod:`fastadam.torch._fast`) while
        nothing changed; otherwise the checked path steps it and records it.
        """
        loss = V.run_closure(closure)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        gs_val = None if grad_scale is None else _num(grad_scale)
        records = self._fa_fast
        state_of = self.state
        n_threads = self.n_threads
        ready = []
        slow = None
        for gi, group in enumerate(self.param_groups):
            rec = records.get(gi)
            r = None if rec is None else rec.prepare(group, state_of, gs_val, n_threads)
            if r is None:
                slow = [] if slow is None else slow
                slow.append(gi)
            else:
                ready.append(r)
        if slow is not None:
            with torch.no_grad():
                self._checked_step(slow, ready, gs_val, found_inf)
            return loss
        if found_inf is not None and _num(found_inf) != 0.0:
            return loss  # overflow: skip the update, steps unchanged (torch fused semantics)
        for r in ready:
            r.run()
        return loss

    def _checked_step(self, slow, ready, gs_val, found_inf):
        """Step groups ``slow`` by the checked path (gather, plan, run) and the
        prepared ``ready`` ones, then record the checked groups for fast steps."""
        groups = [self.param_groups[gi] for gi in slow]
        gathered = [self._gather_group(gi, g) for gi, g in zip(slow, groups)]
        if found_inf is not None and _num(found_inf) != 0.0:
            return  # overflow: skip the update, steps unchanged (torch fused semantics)
        plan, finish = self._plan(groups, gathered, gs_val)
        for r in ready:
            r.run()
        _F.run(plan)
        for states, steps, tparams, copy_back, sparse in finish:
            if steps is not None:
                if isinstance(steps, int):
                    for sv in states:
                        sv[()] = steps
                else:
                    for sv, s in zip(states, steps):
                        sv[()] = s
                for p, pv in copy_back:
                    p.copy_(pv)
                V.bump_versions(tparams)
            if sparse:
                for _, _, sv, _ in sparse:
                    sv[()] += 1
                V.bump_versions([p for p, _, _, _ in sparse])
        for gi, group, (ps, _, _, _, _, _, _, tparams, copy_back, sparse) in zip(
                slow, groups, gathered):
            rec = None
            if not copy_back:
                try:   # the step has run: a group that cannot be recorded steps checked
                    rec = _fast.build(gi, group, self.state, tparams, ps, sparse,
                                      V.duplicates(self._fa_dups, gi, group["params"]))
                except (TypeError, ValueError, RuntimeError, KeyError, AttributeError):
                    rec = None
            self._fa_fast[gi] = rec


_KEYS = ("exp_avg", "exp_avg_sq")
_KEYS_AMS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class AdamW(Adam):
    """Drop-in for ``torch.optim.AdamW``: :class:`Adam` with decoupled weight decay
    (default ``weight_decay=1e-2``)."""

    _decoupled_default = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, n_threads=None, state_dtype=None,
                 stochastic_rounding=False, seed=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, n_threads=n_threads,
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
                         seed=seed)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
