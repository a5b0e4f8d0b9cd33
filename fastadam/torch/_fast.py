"""Design: the per-group fast step of the Adam drop-ins (layer 4, ``fastadam.torch``).

Contract: once a param group has been stepped by the checked path
(``Adam._gather_group`` + ``Adam._plan``: every tensor checked, every buffer
planned), :func:`build` records what that step used -- the parameters, their
state tensors' addresses, the kernel, the pointer tables -- in a
:class:`GroupRecord`. Each later step calls :meth:`GroupRecord.prepare`,
which revalidates the group in ONE pass over its parameters and returns the
native calls to run, or None when anything differs (then the checked path
steps the group, words any error, and records it afresh).

What a step revalidates, per parameter (about 1 us each, all torch attribute
reads): the same tensor in the same place of ``group["params"]``; its
``data_ptr()`` (``p.data = ...`` moves it); ``grad`` present exactly where it
was, strided (a sparse one: its own checks), of the parameter's dtype and
shape, C-contiguous, not null; ``opt.state[p]`` holding ``exp_avg``,
``exp_avg_sq`` (``max_exp_avg_sq``) and ``step`` tensors at the recorded
addresses (a replaced tensor or a ``t.data = ...`` swap both move the
address). Per group: the hyperparameters (re-checked only when they change:
an lr scheduler's new ``lr`` costs one ``check_hyper``), the step counters
(read natively: all equal and a whole number, else the checked path handles
per-parameter steps), and -- when a gradient moved -- that no gradient
overlaps a parameter or state buffer (one native binary search per grad).

A parameter given a same-address view of its memory (``p.data =
p.data.view(...)``) keeps being stepped as the memory it was; nothing else
is assumed. Nothing here writes before every group of the step has been
prepared: :meth:`Prepared.run` is called by the optimizer after all groups
passed.
"""
import math
from typing import Any, Optional

import numpy as np
import torch

from .. import _plan, _runtime, _threads
from .._validate import MAX_STEP, check_grad_scale, check_hyper
from ..functional import plan_sparse_adam
from . import _views as V

__all__ = ["GroupRecord", "build"]

_EMPTY = np.empty(0, dtype=np.int64)
_ERRORS = (KeyError, TypeError, AttributeError, RuntimeError, ValueError)


class Prepared:
    """The validated native calls of one group's step, and what to count after."""

    __slots__ = ("rec", "calls", "step", "sparse")

    def __init__(self, rec, calls, step, sparse):
        self.rec, self.calls, self.step, self.sparse = rec, calls, step, sparse

    def run(self):
        rec = self.rec
        for kernel, args in self.calls:
            kernel(*args)
        if rec.sptrs is not None:
            _runtime.set_steps(rec.sptrs, rec.s64, float(self.step))
            V.bump_versions(rec.tparams)
        for sv, plan in self.sparse:
            for kernel, args in plan:
                kernel(*args)
            sv[()] += 1
        if self.sparse:
            V.bump_versions(rec.sparse_params)


class GroupRecord:
    """What one group's last checked step used; see the module docstring."""

    __slots__ = ("params", "n_params", "entries", "amsgrad", "pdt", "np_dtype", "single",
                 "kernel", "tparams", "ptrs", "offsets", "negs", "bc2s", "sptrs", "s64",
                 "out_lo", "out_hi_max", "gbytes", "last_gptrs", "garr", "work", "views",
                 "glike",
                 "hkey", "hval", "sparse", "sparse_params")

    params: Any
    n_params: Any
    entries: Any
    amsgrad: Any
    pdt: Any
    np_dtype: Any
    single: Any
    kernel: Any
    tparams: Any
    ptrs: Any
    offsets: Any
    negs: Any
    bc2s: Any
    sptrs: Any
    s64: Any
    out_lo: Any
    out_hi_max: Any
    gbytes: Any
    last_gptrs: Any
    garr: Any
    work: Any
    views: Any
    glike: Any
    hkey: Any
    hval: Any
    sparse: Any
    sparse_params: Any

    def prepare(self, group, state_of, grad_scale, n_threads):
        """The group's step as a :class:`Prepared`, or None (use the checked path)."""
        params = group["params"]
        if params is not self.params or len(params) != self.n_params:
            return None
        amsgrad = group["amsgrad"]
        if amsgrad is not self.amsgrad and bool(amsgrad) != self.amsgrad:
            return None
        try:
            gptrs, sparse_g = self._check(params, state_of)
        except _ERRORS:
            return None
        if gptrs is None:
            return None
        hv = self._hyper(group, grad_scale)
        if hv is None:
            return None
        args, flags, lr, b1, b2 = hv
        calls: list[Any] = []
        step = None
        if self.sptrs is not None:
            s = _runtime.common_step(self.sptrs, self.s64)
            if not (s >= 0.0 and s.is_integer() and s < MAX_STEP):
                return None   # differing, fractional or negative steps: the checked path
            step = int(s) + 1
            neg, bc2 = _plan.dense_step_scalars(step, lr, b1, b2)
            if gptrs != self.last_gptrs:
                garr = np.array(gptrs, dtype=np.int64)
                if _runtime.first_hit(self.out_lo, self.out_hi_max, garr, self.gbytes) >= 0:
                    return None   # a gradient overlaps an output: the checked path says so
                self.garr, self.last_gptrs = garr, gptrs
            nt = _threads.resolve(n_threads, self.work)
            if self.single:
                pv, mv, vv, xv = self.views
                # the grad's address, dtype, shape and layout were checked above:
                # a view like the param's over it (Tensor.numpy() costs ~2 us)
                gv = _runtime.view_at(gptrs[0], self.glike, self.tparams[0].grad)
                calls.append((self.kernel, (pv, gv, mv, vv, xv, args + (neg, bc2), flags, nt)))
            else:
                self.negs.fill(neg)
                self.bc2s.fill(bc2)
                p = self.ptrs
                calls.append((self.kernel, (p[0], self.garr, p[2], p[3],
                                            p[4] if self.amsgrad else _EMPTY, self.offsets,
                                            self.negs, self.bc2s, args + (0.0, 1.0), flags,
                                            nt)))
        sparse = []
        for (p, where, sv, table, mv, vv, xv), g in zip(self.sparse, sparse_g):
            try:
                plan = self._sparse_plan(group, p, g, where, sv, table, mv, vv, xv, lr,
                                         (b1, b2), grad_scale, n_threads)
            except _ERRORS:
                return None
            sparse.append((sv, plan))
        return Prepared(self, calls, step, sparse)

    def _check(self, params, state_of):
        """``(grad pointers, sparse grads)`` if every parameter is as recorded, else
        ``(None, None)``; may raise one of ``_ERRORS`` (also: use the checked path)."""
        gptrs: list[int] = []
        add = gptrs.append
        sparse_g = []
        for p, e in zip(params, self.entries):
            g = p.grad
            if e is None:             # stepped nothing last time: no grad, not on meta
                if g is None and not p.is_meta:
                    continue
                return None, None
            if g is None:
                return None, None
            cp, pptr, shape, pdt, mptr, vptr, xptr, sptr, layout, sparse_dim = e
            st = state_of.get(p)
            if (p is not cp or p.data_ptr() != pptr
                    or st["exp_avg"].data_ptr() != mptr or st["exp_avg_sq"].data_ptr() != vptr
                    or st["step"].data_ptr() != sptr
                    or (xptr and st["max_exp_avg_sq"].data_ptr() != xptr)):
                return None, None
            if sparse_dim:
                if not g.is_sparse or g.sparse_dim() != sparse_dim:
                    return None, None
                sparse_g.append(g)
                continue
            gp = g.data_ptr()
            if (not gp or g.dtype is not pdt or g.shape != shape
                    or not (g.is_contiguous() if layout is None else g.stride() == layout)):
                return None, None
            add(gp)
        return gptrs, sparse_g

    def _hyper(self, group, grad_scale):
        """``(args, flags, lr, beta1, beta2)`` of the group's hyperparameters, re-checked
        only when they changed; None if they are not plain valid numbers."""
        lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        key = (lr, betas, eps, wd, group["maximize"], group["decoupled_weight_decay"],
               grad_scale)
        if key == self.hkey:
            return self.hval
        try:
            lr, b1, b2, eps, wd = check_hyper(lr, betas, eps, wd)   # plain floats only
            maximize, dec = key[4], key[5]
            if type(maximize) is not bool or type(dec) is not bool:
                return None
            scale = None
            if grad_scale is not None:
                scale = check_grad_scale(grad_scale, self.np_dtype)[1]
        except (TypeError, ValueError):
            return None
        args, flags = _plan.hyper_args(lr, b1, b2, eps, wd, dec, maximize, scale)
        hv = (args, flags, lr, b1, b2)
        if (type(key[0]) is float and type(betas) is tuple and type(betas[0]) is float
                and type(betas[1]) is float):   # tensors can change in place: not cached
            self.hkey, self.hval = key, hv
        return hv

    def _sparse_plan(self, group, p, g, where, sv, table, mv, vv, xv, lr, betas, grad_scale,
                     n_threads):
        """The checked path's sparse step for one parameter (row ids validated)."""
        _, ids, vals = V.sparse_operands("Adam", p, g, where)
        vals = V.grad_rows(vals)
        if grad_scale is not None:
            vals = vals / grad_scale
        return plan_sparse_adam(
            table, ids.numpy(), vals.detach().numpy(), mv, vv, step=int(sv) + 1, lr=lr,
            betas=betas, eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=self.amsgrad, max_exp_avg_sq=xv, maximize=group["maximize"],
            n_threads=n_threads)


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def build(gi, group, state_of, tparams, ps, sparse, dups) -> Optional[GroupRecord]:
    """A :class:`GroupRecord` of group ``gi`` just stepped by the checked path, or
    None when it does not fit the fast step (a parameter listed twice, complex,
    permuted or strided ones, mixed dtypes, differing steps).

    ``tparams``/``ps``: the dense parameters stepped and their numpy views (in
    group order); ``sparse``: the checked path's ``(p, state, step_view, ops)``
    of the sparse ones.
    """
    params = group["params"]
    if dups or len(params) > len({id(p) for p in params}) or group.get("stochastic_rounding"):
        return None             # (stochastic rounding: a key per step, the checked path)
    amsgrad = bool(group["amsgrad"])
    rec = GroupRecord()
    rec.params, rec.n_params, rec.amsgrad = params, len(params), amsgrad
    rec.hkey = rec.hval = rec.np_dtype = None
    dense = {id(p) for p in tparams}
    sparse_ids = {id(sp[0]) for sp in sparse}
    pdts = {p.dtype for p in tparams}
    if len(pdts) > 1:
        return None
    entries: list[Any] = []
    rec.sparse, rec.sparse_params = [], []
    for i, p in enumerate(params):
        if id(p) not in dense and id(p) not in sparse_ids:
            entries.append(None)
            continue
        st = state_of[p]
        m, v, s = st["exp_avg"], st["exp_avg_sq"], st["step"]
        x = st["max_exp_avg_sq"] if amsgrad else None
        sts: Any = (m, v) if x is None else (m, v, x)
        if p.is_complex() or s.dtype not in V.STEP_DTYPES or any(t.dtype is not p.dtype
                                                               for t in sts):
            return None
        is_sparse = id(p) in sparse_ids
        if p.is_contiguous() and all(t.is_contiguous() for t in sts):
            layout = None
        elif not is_sparse and V.is_dense(p) and all(V.same_layout(t, p) for t in sts):
            layout = p.stride()     # permuted but gap-free (channels_last): grads alike
        else:
            return None
        entries.append((p, p.data_ptr(), p.shape, p.dtype, m.data_ptr(), v.data_ptr(),
                        _ptr(x), s.data_ptr(), layout, p.grad.sparse_dim() if is_sparse else 0))
        if is_sparse:
            rows = math.prod(p.shape[:p.grad.sparse_dim()])
            table = V.np_view(p).reshape(rows, -1)
            shape = table.shape
            rec.sparse.append((p, f"parameter {i} of param group {gi}", s.numpy(), table,
                               V.np_view(m).reshape(shape), V.np_view(v).reshape(shape),
                               None if x is None else V.np_view(x).reshape(shape)))
            rec.sparse_params.append(p)
    rec.entries = tuple(entries)
    rec.tparams = list(tparams)
    n = len(tparams)
    rec.sptrs = None
    if n == 0:
        return rec
    pdt = next(iter(pdts))
    rec.pdt = pdt
    rec.np_dtype = V.np_dtype(pdt)
    rec.single = n == 1
    rec.kernel = _plan.KERNELS.get("adam" if n == 1 else "adam_multi", rec.np_dtype,
                                   rec.np_dtype, rec.np_dtype)
    sts = [state_of[p] for p in tparams]
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
    rec.ptrs = np.zeros((5, n), dtype=np.int64)
    for j, p in enumerate(tparams):
        rec.ptrs[0, j] = p.data_ptr()
        for k, key in enumerate(keys):
            rec.ptrs[2 + k, j] = sts[j][key].data_ptr()
    steps = [st["step"] for st in sts]
    rec.sptrs = np.array([s.data_ptr() for s in steps], dtype=np.int64)
    rec.s64 = np.array([s.dtype == torch.float64 for s in steps], dtype=np.int8)
    sizes = np.array([p.numel() for p in tparams], dtype=np.int64)
    rec.offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=rec.offsets[1:])
    item = rec.np_dtype.itemsize
    rec.gbytes = sizes * item
    outs = rec.ptrs[[0, 2, 3, 4] if amsgrad else [0, 2, 3]].ravel()
    nb = np.tile(rec.gbytes, len(outs) // n)
    order = np.argsort(outs, kind="stable")
    rec.out_lo = np.ascontiguousarray(outs[order])
    rec.out_hi_max = np.maximum.accumulate(rec.out_lo + nb[order])
    rec.last_gptrs = None
    rec.garr = None
    rec.negs = np.empty(n)
    rec.bc2s = np.empty(n)
    rec.work = int(rec.offsets[-1]) * (_threads.FP64_COST if item == 8 else 1)
    if rec.single:
        st = sts[0]
        cvt = V.np_view if tparams[0].is_contiguous() else V.flat_np_view
        rec.views = (ps[0], cvt(st["exp_avg"]), cvt(st["exp_avg_sq"]),
                     cvt(st["max_exp_avg_sq"]) if amsgrad else None)
        # the template of the per-step grad view (runtime.view_at): C-contiguous
        rec.glike = ps[0] if ps[0].flags.c_contiguous else V.flat_np_view(tparams[0])
    return rec
