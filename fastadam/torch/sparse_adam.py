"""Design: ``SparseAdam``, the torch.optim drop-in (layer 4, ``fastadam.torch``).

Contract: ``torch.optim.SparseAdam``'s arguments, defaults, errors and state
(``step`` an int, ``exp_avg``, ``exp_avg_sq``), stepped by fastadam's sparse
kernel on zero-copy numpy views; only the rows present in a gradient change.
A step plans before it writes: every parameter's tensors are checked, every
call is planned with :func:`fastadam.functional.plan_sparse_adam` (hyperparameters
and row ids validated), and only then are all plans run and the steps
counted, so a rejected step leaves every table, state value and ``step``
bit-identical (state created for a first step may remain, zeroed, as with
torch). With one table the single call is :func:`fastadam.sparse_adam_step`,
which validates everything (ids in its merge pass) before it writes.

``state_dtype="q8"`` (a group key): float32 tables of 4096+ elements keep
8-bit row state (:func:`fastadam.functional.sparse_adam8bit_step`); those
parameters take the checked path every step (no cached views).
"""

import numpy as np
import torch
from torch.optim.optimizer import Optimizer

from .. import _plan, _runtime, _threads
from .. import functional as _F
from .._validate import check_state_step
from ..functional import plan_sparse_adam, sparse_adam_step
from . import _views as V
from ._state import load_checked
from ._stepper import Stepper

__all__ = ["SparseAdam"]

_num = V.num
_BF16 = torch.bfloat16
_IDS_LIKE = np.empty(0, dtype=np.int64)   # view_at's template of the ids


class SparseAdam(Stepper, Optimizer):
    r"""Drop-in for ``torch.optim.SparseAdam`` on fastadam's sparse kernel.

    Same arguments, defaults, errors and state (``step`` an int, ``exp_avg``,
    ``exp_avg_sq``) as torch. Each step touches only the rows present in the
    sparse gradient; duplicate row ids are summed inside the kernel (torch
    coalesces first). Extra keyword: ``n_threads``. Parameters may be on any
    device when the optimizer is built (deferred init), must be CPU tensors
    when stepped; a tensor listed twice gets torch's warning and is stepped
    once. ``load_state_dict`` also takes numpy-layout dicts (``fastadam.load``).

    ``state_dtype="q8"`` (extra keyword and group key): float32 tables of 4096+
    elements keep 8-bit **row** state -- ``exp_avg`` / ``exp_avg_sq`` uint8
    codes of the parameter's shape, ``exp_avg_absmax`` / ``exp_avg_sq_absmax``
    float32 ``(rows, ceil(width / 256))``, each row in blocks of its own (see
    :func:`fastadam.functional.sparse_adam8bit_step`); smaller ones float32.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False, *,
                 n_threads=None, state_dtype=None):
        V.check_torch_hyper(lr, betas, eps, strict=True)
        self.n_threads = _threads.check(n_threads)
        self._init_lock()
        self._fa_views = {}
        self._fa_dups = {}
        defaults = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
        if state_dtype is not None:
            defaults["state_dtype"] = _check_state_dtype(state_dtype, "state_dtype")
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

    def add_param_group(self, param_group):
        """torch's ``add_param_group`` (its checks, defaults and duplicate warning), then
        fastadam's parameter checks (any device: deferred init); a rejected group is
        not added."""
        n = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            for i, p in enumerate(self.param_groups[-1]["params"]):
                if not p.is_sparse:   # sparse params: torch's ValueError in __init__
                    V.check_param("SparseAdam", p, f"parameter {i} of param group {n}",
                                  device=False)
        except Exception:
            del self.param_groups[n:]
            raise

    def __getstate__(self):
        d = super().__getstate__()
        d["n_threads"] = self.n_threads
        return d

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("n_threads", None)
        self._init_lock()
        self._fa_views = {}
        self._fa_dups = {}

    def load_state_dict(self, state_dict):
        """torch's ``load_state_dict``; also takes numpy-layout dicts (``fastadam.load``,
        ``fastadam.SparseAdam.state_dict()``), converted by
        :func:`fastadam.torch.to_torch_state_dict`. Everything (layout, groups,
        hyperparameters, state keys, ``step``, each state tensor's shape, dtype
        kind and device) is checked before anything changes: a rejected dict
        raises naming the problem and leaves the optimizer as it was."""
        base = super().load_state_dict

        def load(sd):
            # a group's state_dtype: the dict's, else the optimizer's; checked first
            for gi, (g, sg) in enumerate(zip(self.param_groups, sd["param_groups"])):
                if "state_dtype" not in sg and g.get("state_dtype") is not None:
                    sg["state_dtype"] = g["state_dtype"]
                if sg.get("state_dtype") is not None:
                    sg["state_dtype"] = _check_state_dtype(
                        sg["state_dtype"], f"{type(self).__name__}.load_state_dict: param "
                        f"group {gi} 'state_dtype'")
            base(sd)
            for g in self.param_groups:   # torch casts the uint8 codes to the param's dtype
                for p in g["params"]:
                    st = self.state.get(p)
                    if st and "exp_avg_absmax" in st:
                        for k in ("exp_avg", "exp_avg_sq"):
                            st[k] = st[k].to(torch.uint8)

        with self._lock:
            load_checked(self, load, state_dict, sparse=True)

    def _step(self, closure=None):
        """The step (``step()`` adds torch's hooks and the lock, see
        :class:`fastadam.torch._stepper.Stepper`: threads sharing the optimizer
        serialise).

        Every parameter is validated before any is written: a rejected step
        changes no table, state value or ``step``. bfloat16 tables (bfloat16
        state) take their gradient rows widened to float32 (exact; O(nnz)).
        """
        loss = V.run_closure(closure)
        work = []
        cache = self._fa_views
        state_of = self.state
        coo = torch.sparse_coo
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            for i, p, g in V.stepped("SparseAdam", self._fa_dups, gi, params):
                # Fast path: p stepped before, same state tensors, same memory, a
                # COO gradient over the first dimension (nn.Embedding's): reuse the
                # validated numpy views; only the gradient is viewed afresh, by
                # address (_runtime.view_at: no Tensor.numpy()). Every torch call
                # counts here: the kernel leaves the caches cold (~5-15 us each).
                # No autograd op runs on this path (no no_grad context needed).
                c = cache.get(p)
                if c is not None:
                    state = state_of.get(p)
                    if (state is not None and c.m is state.get("exp_avg")
                            and c.v is state.get("exp_avg_sq")
                            and c.ptrs == V.state_ptrs(c.m, c.v)
                            and c.data_ptr == p.data_ptr() and c.dtype is p.dtype
                            and c.shape == p.shape and g.layout is coo and g.dtype is p.dtype
                            and g.is_cpu and g.sparse_dim() == 1 and g.shape == p.shape):
                        ix = g._indices()
                        vals = g._values()
                        if ix.is_contiguous() and vals.is_contiguous():
                            nnz = vals.shape[0]
                            vp, ip = vals.data_ptr(), ix.data_ptr()
                            if c.dtype is not _BF16 and nnz == ix.shape[1] and vp and ip:
                                vn = _runtime.view_at(vp, c.vlike, vals, nnz)
                                ids = _runtime.view_at(ip, _IDS_LIKE, ix, nnz)
                            else:            # bfloat16 rows widened, or no rows
                                vals = vals.detach()
                                vn = (vals.float() if c.dtype is _BF16 else vals).numpy()
                                vn = vn.reshape(vn.shape[0], c.table_np.shape[1])
                                ids = ix.numpy()[0]
                            if type(state["step"]) is not int:
                                _int_step(state, gi, i)
                            work.append((group, state, (c.table_np, ids, vn,
                                                        c.m_np, c.v_np), p))
                            continue
                    del cache[p]
                self._checked_param(gi, i, group, p, g, cache, work)
        n_threads = self.n_threads
        if len(work) == 1:
            # One table: sparse_adam_step validates everything before it writes (the
            # ids in its merge pass), so the plan's separate id pass is not needed.
            group, state, views, _ = work[0]
            if len(views) == 7:
                _F.sparse_adam8bit_step(*views, **_kwargs(group, state, n_threads))
            else:
                table, ids, vals, m, v = views
                b1, b2 = group["betas"]
                sparse_adam_step(table, ids, vals, m, v, step=int(state["step"]) + 1,
                                 lr=_num(group["lr"]), betas=(_num(b1), _num(b2)),
                                 eps=group["eps"], maximize=group.get("maximize", False),
                                 n_threads=n_threads)
        else:
            plan = []
            for group, state, views, _ in work:
                planner = _F.plan_sparse_adam8bit if len(views) == 7 else plan_sparse_adam
                plan += planner(*views, **_kwargs(group, state, n_threads))
            _F.run(plan)
        for _, state, _, _ in work:
            state["step"] = int(state["step"]) + 1
        V.bump_versions([p for _, _, _, p in work])
        return loss

    @torch.no_grad()
    def _checked_param(self, gi, i, group, p, g, cache, work):
        """The checked path of one parameter (its views cached for the fast path)."""
        where = f"parameter {i} of param group {gi}"
        if not g.is_sparse:
            raise RuntimeError("SparseAdam does not support dense gradients, please "
                               "consider Adam instead")
        V.check_param("SparseAdam", p, where)
        if g.device.type != "cpu":
            raise ValueError(f"SparseAdam: the gradient of {where} is on device "
                             f"'{g.device}'; fastadam steps CPU tensors only")
        table, ids, vals = V.sparse_operands("SparseAdam", p, g, where)
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            if group.get("state_dtype") == _plan.Q8 and V.q8_rows_eligible(p):
                state.update(V.new_q8_rows(p, tuple(table.shape)))
            else:
                state.update(V.new_state(p, ("exp_avg", "exp_avg_sq")))
        elif type(state["step"]) is not int:
            _int_step(state, gi, i)
        if "exp_avg_absmax" in state:        # 8-bit row state: no cached views
            V.check_q8_rows("SparseAdam", state, p, tuple(table.shape), where)
            views = (table.numpy(), ids.numpy(), vals.detach().numpy()) + \
                V.q8_row_views(state, tuple(table.shape))
            work.append((group, state, views, p))
            return
        for k in ("exp_avg", "exp_avg_sq"):
            t = state[k]
            if t.shape != p.shape or t.dtype != p.dtype or not t.is_contiguous():
                state[k] = t = t.to(dtype=p.dtype).contiguous()
                if t.shape != p.shape:
                    raise ValueError(f"SparseAdam: state '{k}' of {where} has shape "
                                     f"{tuple(t.shape)}, expected {tuple(p.shape)}")
        views = (V.np_view(table), ids.numpy(), V.grad_rows(vals).detach().numpy(),
                 V.np_view(state["exp_avg"].view(table.shape)),
                 V.np_view(state["exp_avg_sq"].view(table.shape)))
        if g.sparse_dim() == 1:
            cache[p] = V.SViews(state["exp_avg"], state["exp_avg_sq"], p.data_ptr(),
                               p.dtype, p.shape, views[0], views[3], views[4],
                               V.state_ptrs(state["exp_avg"], state["exp_avg_sq"]),
                               views[0][:0])
        work.append((group, state, views, p))


def _kwargs(group, state, n_threads):
    """The keyword arguments of one table's sparse step."""
    b1, b2 = group["betas"]
    return dict(step=int(state["step"]) + 1, lr=_num(group["lr"]), betas=(_num(b1), _num(b2)),
                eps=group["eps"], maximize=group.get("maximize", False), n_threads=n_threads)


def _check_state_dtype(value, name):
    """A SparseAdam ``state_dtype``: None or ``"q8"`` (8-bit row state)."""
    try:
        v = _plan.state_dtype_name(value)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None
    if v != _plan.Q8:
        raise ValueError(f"{name} must be None (float state of the table's dtype) or 'q8' "
                         f"(8-bit row state), got {value!r:.40}")
    return v


def _int_step(state, gi, i):
    """state['step'] as torch's SparseAdam keeps it, an int (from a float, numpy
    scalar or 0-d tensor of the same integral value); a value that is no count
    raises naming it, before anything is written."""
    name = f"state 'step' of parameter {i} of param group {gi}"
    state["step"] = check_state_step(V.step_value(state["step"], f"SparseAdam: {name}"), name)
