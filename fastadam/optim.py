"""Stateful numpy optimizers (layer 3) over ``fastadam.functional``.

``Adam`` / ``AdamW`` mirror ``torch.optim.Adam`` / ``AdamW``: param groups with
per-group hyperparameters, state created lazily on the first step, integer
step counts per parameter, and ``state_dict()`` / ``load_state_dict()`` in
torch's layout (``state`` keyed by parameter index with ``step``,
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; ``param_groups`` with torch's
keys and ``params`` as index lists), holding numpy arrays and an int ``step``
(:func:`fastadam.torch.to_torch_state_dict` turns it into tensors for
``torch.optim``). ``SparseAdam`` mirrors ``torch.optim.SparseAdam`` for one
embedding table. :mod:`fastadam.checkpoint` (``fastadam.save``/``load``)
writes such a dict to a ``.npz`` file (no pickle); resuming from it is
bit-identical. Every ``step`` plans all its kernel calls before running any.
"""
import secrets
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

from . import _plan, _runtime, _threads
from . import functional as F
from ._validate import (
    check_bool,
    check_buffer,
    check_grad_scale,
    check_hyper,
    check_state_keys,
    check_state_step,
    same_dtype,
    to_numpy,
    to_scalar,
)
from .checkpoint import load, save  # noqa: F401  (the names' old home)

__all__ = ["Adam", "AdamW", "SparseAdam", "save", "load", "new_state"]

Array = npt.NDArray[Any]
StateDict = dict[str, Any]
# the 16-bit float formats numpy cannot call floating (ml_dtypes.bfloat16)
_LOWP = tuple(dt for dt in _plan.DTYPES.values() if dt.kind != "f")

_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
               "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay",
               "state_dtype", "stochastic_rounding", "seed")
# the precision options (issue 12): in a group's dict only when not the default,
# so a default optimizer's state dict stays torch's
_PRECISION_DEFAULTS = {"state_dtype": None, "stochastic_rounding": False, "seed": 0}


def new_state(shape: tuple[int, ...], dtype: npt.DTypeLike, amsgrad: bool = False,
              rowwise_shape: Optional[tuple[int, ...]] = None) -> dict[str, Any]:
    """Fresh zeroed optimizer state for a parameter: ``step`` 0, ``exp_avg``,
    ``exp_avg_sq`` (of ``rowwise_shape`` if given) and, with amsgrad,
    ``max_exp_avg_sq``, all of ``dtype`` (``np.zeros``: pages are only
    materialised when touched). ``dtype="q8"``: 8-bit state
    (:func:`fastadam.functional.new_state8bit`: uint8 ``exp_avg``,
    ``exp_avg_sq``, float32 ``exp_avg_absmax``, ``exp_avg_sq_absmax``). The
    one place the numpy layers create state."""
    if isinstance(dtype, str) and dtype == _plan.Q8:
        return {"step": 0, **F.new_state8bit(shape)}
    vshape = shape if rowwise_shape is None else rowwise_shape
    st = {"step": 0, "exp_avg": np.zeros(shape, dtype), "exp_avg_sq": np.zeros(vshape, dtype)}
    if amsgrad:
        st["max_exp_avg_sq"] = np.zeros(vshape, dtype)
    return st


class _Locked:
    """A per-optimizer lock around ``step`` and ``load_state_dict`` (threads
    sharing one optimizer serialise); pickle and deepcopy drop the lock and
    the copy gets its own."""

    _lock: threading.RLock

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("_lock", None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.RLock()


class Adam(_Locked):
    """Adam over numpy arrays, stepped in place, one native call per param group.

    Parameters
    ----------
    params : list of ndarray, or list of dict
        Arrays (float32/float64, C-contiguous, writable), or param groups
        ``{"params": [...], "lr": ..., ...}`` with per-group hyperparameters.
    lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay
        As ``torch.optim.Adam`` (defaults identical).
    n_threads : int, optional
        Threads per step (``None``: :func:`fastadam.get_num_threads` at call time).
    state_dtype : dtype or str, optional
        The dtype of ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` (default:
        the param's): e.g. ``"bf16"`` or ``ml_dtypes.bfloat16`` for float32
        params (half the state memory; see docs: Precision), or ``"q8"``:
        8-bit blockwise state (docs: "8-bit optimizer state") for float32,
        bfloat16 or float16 parameters of 4096+ elements -- ``exp_avg``/
        ``exp_avg_sq`` uint8 codes plus float32 ``exp_avg_absmax``/
        ``exp_avg_sq_absmax`` (one per block of 256), about 2 bytes per
        parameter instead of 8 (or 4); smaller arrays keep state of the
        param's dtype; no amsgrad, no ``param_copies``, no
        ``stochastic_rounding``. A group key.
    stochastic_rounding : bool
        Round bfloat16 params and/or state stochastically (unbiased) instead
        of to nearest even. A group key.
    seed : int, optional
        The stochastic-rounding seed (drawn at random when None and
        ``stochastic_rounding``); parameter ``i`` (over all groups) draws
        from ``fastadam._plan.array_seed(seed, i)``. Kept in the state dict.

    Notes
    -----
    Param groups carry torch's keys; ``fused`` is recorded as True (the
    arithmetic is ``torch.optim.Adam(fused=True)``'s), so a checkpoint
    loaded into ``torch.optim`` continues on torch's fused kernel. The state
    dict holds numpy arrays and int steps: ``fastadam.save``/``load`` it, or
    :func:`fastadam.torch.to_torch_state_dict` it for ``torch.optim``.

    Thread safety: :meth:`step` and :meth:`load_state_dict` hold a
    per-optimizer lock, so Python threads sharing one optimizer serialise
    (no lost steps); different optimizers step concurrently (the kernels
    release the GIL).

    Per parameter and step t (see :func:`fastadam.adam_step`)::

        m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
        p -= lr/(1-b1**t) * m / (sqrt(v)/sqrt(1-b2**t) + eps)

    Examples
    --------
    >>> import numpy as np, fastadam as fa
    >>> w = np.zeros(3, np.float32)
    >>> opt = fa.Adam([w], lr=0.1)
    >>> opt.step([np.ones(3, np.float32)])
    >>> w.round(6)
    array([-0.1, -0.1, -0.1], dtype=float32)
    >>> opt.state_dict()["state"][0]["step"]
    1
    """

    _defaults_wd = 0.0
    _decoupled = False

    def __init__(self, params: Iterable[Union[Array, dict[str, Any]]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: Optional[float] = None, amsgrad: bool = False, *,
                 maximize: bool = False, decoupled_weight_decay: Optional[bool] = None,
                 n_threads: Optional[int] = None, state_dtype: Any = None,
                 stochastic_rounding: bool = False, seed: Optional[int] = None) -> None:
        if weight_decay is None:
            weight_decay = self._defaults_wd
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled
        check_hyper(lr, betas, eps, weight_decay)
        _threads.check(n_threads)
        self.defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             amsgrad=check_bool(amsgrad, "amsgrad"),
                             maximize=check_bool(maximize, "maximize"), foreach=None,
                             capturable=False, differentiable=False, fused=True,
                             decoupled_weight_decay=check_bool(decoupled_weight_decay,
                                                               "decoupled_weight_decay"))
        self.defaults.update(precision_defaults(state_dtype, stochastic_rounding, seed))
        self.n_threads = n_threads
        self._lock = threading.RLock()
        plist = list(params)
        if not plist:
            raise ValueError("optimizer got an empty parameter list")
        groups: list[Any] = plist if isinstance(plist[0], dict) else [{"params": plist}]
        self.param_groups: list[dict[str, Any]] = []
        # state by id() of the parameter array
        self.state: dict[int, dict[str, Any]] = {}
        for g in groups:
            self.add_param_group(g)

    # -- groups and state ------------------------------------------------
    def add_param_group(self, group: dict[str, Any]) -> None:
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a param group must be a dict with a 'params' list")
        group = dict(group)
        ps = group["params"]
        ps = [ps] if isinstance(ps, np.ndarray) else list(ps)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(ps):
            check_buffer(f"params[{i}]", p)
            if id(p) in seen:
                raise ValueError("some parameters appear in more than one parameter group")
            seen.add(id(p))
        group["params"] = ps
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        group["betas"] = tuple(group["betas"])
        check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        prec = _check_precision("param group: ", {k: group[k] for k in _PRECISION_DEFAULTS
                                                  if k in group})
        for k, v in prec.items():
            group[k] = v
        sdt = group.get("state_dtype")
        if sdt == _plan.Q8:
            _check_q8_group(group, ps)
        elif sdt is not None:
            for p in ps:
                _plan.state_dtype(p.dtype, sdt)
        _no_param_overlap(self._all_params() + ps)
        self.param_groups.append(group)

    def _all_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _init_state(self, p, amsgrad, group=None):
        sdt = None if group is None else group.get("state_dtype")
        return new_state(p.shape, _plan.state_format(p.dtype, p.size, sdt), amsgrad)

    # -- the step ---------------------------------------------------------
    def step(self, grads: Sequence[Optional[Array]], *,
             grad_scale: Optional[float] = None,
             param_copies: Optional[Sequence[Optional[Array]]] = None) -> None:
        """Apply one update. ``grads`` aligns with the parameters (all groups, in
        order); a ``None`` entry skips that parameter (as torch skips
        ``grad is None``). ``grad_scale`` divides every gradient (AMP).
        ``param_copies`` (aligned like ``grads``): a bfloat16/float16 buffer
        per float32 parameter that receives the updated parameter, rounded to
        nearest even, in the same pass (within a group: all or none).
        """
        with self._lock:
            grads = list(grads)
            nparams = sum(len(g["params"]) for g in self.param_groups)
            if len(grads) != nparams:
                raise ValueError(f"grads must have {nparams} entries (one per parameter), "
                                 f"got {len(grads)}")
            check_grad_scale(grad_scale)
            if param_copies is not None:
                param_copies = list(param_copies)
                if len(param_copies) != nparams:
                    raise ValueError(f"param_copies must have {nparams} entries (one per "
                                     f"parameter), got {len(param_copies)}")
            # Validate every group before writing anything: plan all, then run all.
            plans = []
            k = 0
            for group in self.param_groups:
                ps = group["params"]
                base, k = k, k + len(ps)
                group_grads = grads[base:k]
                pairs = [(p, g) for p, g in zip(ps, group_grads) if g is not None]
                labels = [base + i for i, g in enumerate(group_grads) if g is not None]
                if not pairs:
                    continue
                ams = group["amsgrad"]
                sts = [self.state.get(id(p)) or self._init_state(p, ams, group)
                       for p, _ in pairs]
                steps = [st["step"] + 1 for st in sts]
                copies: Optional[list[Any]] = None
                if param_copies is not None:
                    copies = [param_copies[i] for i in labels]
                    if all(c is None for c in copies):
                        copies = None
                    elif any(c is None for c in copies):
                        raise ValueError("param_copies: within a param group, give a copy "
                                         "for every parameter with a gradient or for none")
                if group.get("state_dtype") == _plan.Q8:    # 8-bit state: its own plan
                    is_q8 = ["exp_avg_absmax" in st for st in sts]
                    if any(is_q8):
                        if copies is not None:
                            raise ValueError("param_copies: not supported for parameters "
                                             "with 8-bit state (state_dtype='q8')")
                        qp, qs, qsteps, qlab = (_take(xs, is_q8, True)
                                                for xs in (pairs, sts, steps, labels))
                        plans.append((F.plan_adam8bit(
                            [p for p, _ in qp], [g for _, g in qp],
                            *[[st[k] for st in qs] for k in F._Q8_STATE], steps=qsteps,
                            lr=group["lr"], betas=group["betas"], eps=group["eps"],
                            weight_decay=group["weight_decay"],
                            decoupled_weight_decay=group["decoupled_weight_decay"],
                            maximize=group["maximize"], grad_scale=grad_scale,
                            n_threads=self.n_threads, labels=qlab), qp, qs, qsteps, qlab))
                        pairs, sts, steps, labels = (_take(xs, is_q8, False)
                                                     for xs in (pairs, sts, steps, labels))
                        if not pairs:
                            continue
                plan = F.plan_adam(
                    [p for p, _ in pairs], [g for _, g in pairs],
                    [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts],
                    steps=steps, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=ams,
                    max_exp_avg_sqs=[self._vmax(st, p) for st, (p, _) in zip(sts, pairs)]
                    if ams else None,
                    maximize=group["maximize"], grad_scale=grad_scale,
                    n_threads=self.n_threads, labels=labels, param_copies=copies,
                    stochastic_rounding=group.get("stochastic_rounding", False),
                    seed=group.get("seed", 0))
                plans.append((plan, pairs, sts, steps, labels))
            if len(plans) > 1:
                _no_cross_group_alias(plans)
            for plan, pairs, sts, steps, _ in plans:
                F.run(plan)
                for (p, _), st, s in zip(pairs, sts, steps):
                    st["step"] = s
                    self.state[id(p)] = st

    @staticmethod
    def _vmax(st, p):
        if "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = np.zeros_like(st["exp_avg_sq"])
        return st["max_exp_avg_sq"]

    def zero_grad(self) -> None:  # numpy grads are owned by the caller
        pass

    # -- checkpoints --------------------------------------------------------
    def state_dict(self) -> StateDict:
        """torch layout: ``{'state': {i: {...}}, 'param_groups': [{..., 'params': [i...]}]}``.

        Arrays are the live state buffers (like torch); copy or ``save`` them.
        """
        index: dict[int, int] = {}
        groups = []
        for g in self.param_groups:
            gd = {k: v for k, v in g.items() if k != "params"}
            gd["params"] = []
            for p in g["params"]:
                index[id(p)] = len(index)
                gd["params"].append(index[id(p)])
            groups.append(gd)
        state = {index[pid]: dict(st) for pid, st in self.state.items() if pid in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: StateDict) -> None:
        """Load a state dict from :meth:`state_dict`, :func:`load` or
        ``torch.optim.Adam.state_dict()`` converted to numpy (tensors are
        accepted via ``numpy()``). Values are copied into fresh buffers.

        Everything is validated before anything changes (a rejected dict
        leaves the optimizer's groups and state bit-identical): the layout,
        each group's hyperparameters (the checks of construction; options
        must be bools), the parameter indices (together a permutation of
        ``0..n-1`` matching the groups' sizes; state only for those), each
        state's ``step`` (an integer >= 0) and the buffers the group's
        options need (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` with
        amsgrad), of the parameter's shape, real-valued and representable
        in the state dtype (second moments >= 0 or NaN).
        """
        with self._lock:
            updates, new_state = self._check_state_dict(state_dict)
            for g, upd in zip(self.param_groups, updates):
                g.update(upd)
                if g["fused"] is None and not g["foreach"]:
                    g["fused"] = True      # fastadam's arithmetic is torch fused's
            self.state = new_state

    def _check_state_dict(self, state_dict):
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict \
                or "state" not in state_dict:
            raise TypeError("state_dict must be a dict with 'state' and 'param_groups'")
        groups, states = state_dict["param_groups"], state_dict["state"]
        if not isinstance(groups, (list, tuple)) or not isinstance(states, dict):
            raise TypeError("state_dict['param_groups'] must be a list and "
                            "state_dict['state'] a dict")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, optimizer has "
                             f"{len(self.param_groups)}")
        params = self._all_params()
        order: list[int] = []
        updates = []
        for gi, (g, sg) in enumerate(zip(self.param_groups, groups)):
            if not isinstance(sg, dict) or "params" not in sg:
                raise TypeError(f"state_dict param group {gi} must be a dict with 'params'")
            idx = sg["params"]
            if isinstance(idx, (str, bytes)) or not hasattr(idx, "__len__"):
                raise TypeError(f"param group {gi} 'params' must be a list of indices")
            if len(idx) != len(g["params"]):
                raise ValueError("state_dict param group sizes do not match the optimizer's: "
                                 f"group {gi} has {len(idx)} params, optimizer's "
                                 f"{len(g['params'])}")
            for i in idx:
                if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                    raise TypeError(f"param group {gi} 'params' entries must be ints, got "
                                    f"{type(i).__name__}")
                order.append(int(i))
            updates.append(_check_group(gi, g, sg))
        if sorted(order) != list(range(len(params))):
            raise ValueError(f"state_dict param indices {order} are not a permutation of "
                             f"0..{len(params) - 1}")
        keys: dict[int, Any] = {}
        for key in states:
            try:
                ki = int(key) if not isinstance(key, (bool, np.bool_, float)) else None
            except (TypeError, ValueError):
                ki = None
            if ki is None or not 0 <= ki < len(params) or ki in keys:
                raise ValueError(f"state_dict state key {key!r} is not a parameter index "
                                 f"(0..{len(params) - 1}), or is given twice")
            keys[ki] = key
        pos = 0
        new_state = {}
        for g, upd in zip(self.param_groups, updates):
            ams = upd.get("amsgrad", g["amsgrad"])
            sdt = upd.get("state_dtype", g.get("state_dtype"))
            for p in g["params"]:
                i = order[pos]
                pos += 1
                if i not in keys:
                    continue
                new_state[id(p)] = _check_param_state(f"state {i}", states[keys[i]], p, ams,
                                                      sdt)
        return updates, new_state


def _no_param_overlap(params):
    """No two parameters (of any groups) may share memory: each would be
    updated twice per step. ``params[i]`` is the i-th over all groups."""
    if len(params) < 2:
        return
    ptrs = np.empty(len(params), np.int64)
    _runtime.addresses(params, ptrs)
    nbytes = np.fromiter((p.nbytes for p in params), np.int64, len(params))
    hit = _runtime.first_conflict(ptrs, nbytes, np.ones(len(params), np.int8))
    if hit is not None:
        i, j = sorted(hit)
        raise ValueError(f"params[{i}] and params[{j}] share memory (an array and a view of "
                         "it?); each parameter must be its own memory, or it is updated twice")


def _no_cross_group_alias(plans):
    """Each group's plan checked its own buffers; this checks all groups'
    together: no output (param or state) may share memory with any other
    buffer of the step (e.g. an array in one group and a view of it in
    another would be updated twice)."""
    arrays, names, out = [], [], []
    for _, pairs, sts, _, labels in plans:
        for (p, g), st, lab in zip(pairs, sts, labels):
            arrays += [p, g]
            names += [f"params[{lab}]", f"grads[{lab}]"]
            out += [1, 0]
            for k in _STATE_KEYS + _Q8_KEYS:
                if k in st:
                    arrays.append(st[k])
                    names.append(f"the {k} of params[{lab}]")
                    out.append(1)
    ptrs = np.empty(len(arrays), np.int64)
    _runtime.addresses(arrays, ptrs)
    nbytes = np.fromiter((a.nbytes for a in arrays), np.int64, len(arrays))
    hit = _runtime.first_conflict(ptrs, nbytes, np.array(out, np.int8))
    if hit is not None:
        i, j = hit
        raise ValueError(f"{names[i]} and {names[j]} share memory (in different param "
                         "groups); outputs must not alias each other or any gradient")


_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_Q8_KEYS = ("exp_avg_absmax", "exp_avg_sq_absmax")     # 8-bit state (with uint8 exp_avg[_sq])


def _take(xs, mask, keep):
    """The entries of ``xs`` whose ``mask`` entry is ``keep``."""
    return [x for x, m in zip(xs, mask) if m is keep]


def _check_q8_group(group, params):
    """A group with ``state_dtype='q8'``: a kernel for every param's dtype, no
    amsgrad, no stochastic rounding."""
    if group["amsgrad"]:
        raise ValueError("amsgrad=True is not supported with state_dtype='q8' (no 8-bit "
                         "max_exp_avg_sq)")
    if group.get("stochastic_rounding", False):
        raise ValueError("stochastic_rounding=True is not supported with state_dtype='q8' "
                         "(the 8-bit kernels round 16-bit parameters to nearest even)")
    for i, p in enumerate(params):
        try:
            _plan.state_dtype(p.dtype, group["state_dtype"])
        except TypeError as e:
            raise TypeError(f"params[{i}]: {e}") from None
_BOOL_KEYS = ("amsgrad", "maximize", "decoupled_weight_decay")
_OPT_BOOL_KEYS = ("foreach", "capturable", "differentiable", "fused")


def _check_group(gi, g, sg):
    """A checkpoint's param group: the validated values to set on ``g``."""
    upd: dict[str, Any] = {}
    for k in _GROUP_KEYS:
        if k not in sg:
            continue
        v = sg[k]
        if k in _BOOL_KEYS:
            v = check_bool(to_scalar(v), f"param group {gi} '{k}'")
        elif k in _OPT_BOOL_KEYS:
            if v is not None:
                v = check_bool(to_scalar(v), f"param group {gi} '{k}'")
        elif k == "betas":
            if isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
                raise TypeError(f"param group {gi} 'betas' must be a pair of real numbers, "
                                f"got {v!r:.40}")
            v = tuple(to_scalar(b) for b in v)
        else:
            v = to_scalar(v)
        upd[k] = v
    prec = {k: upd.pop(k) for k in _PRECISION_DEFAULTS if k in upd}
    upd.update(_check_precision(f"param group {gi}: ", prec))
    if upd.get("state_dtype") is not None and upd["state_dtype"] != _plan.Q8:
        for p in g["params"]:
            try:
                _plan.state_dtype(p.dtype, upd["state_dtype"])
            except TypeError as e:
                raise TypeError(f"param group {gi}: {e}") from None
    h = {k: upd.get(k, g[k]) for k in ("lr", "betas", "eps", "weight_decay")}
    try:
        check_hyper(h["lr"], h["betas"], h["eps"], h["weight_decay"])
    except (TypeError, ValueError) as e:
        raise type(e)(f"param group {gi}: {e}") from None
    if "lr" in upd:
        upd["lr"] = _to_number(upd["lr"])
    merged = {**g, **upd}
    if merged.get("state_dtype") == _plan.Q8:
        try:
            _check_q8_group(merged, g["params"])
        except (TypeError, ValueError) as e:
            raise type(e)(f"param group {gi}: {e}") from None
    return upd


def _check_precision(where, opts):
    """Validated precision options (any of ``state_dtype``, ``stochastic_rounding``,
    ``seed``); ``state_dtype`` becomes its interface name (JSON-able)."""
    out: dict[str, Any] = {}
    if "state_dtype" in opts:
        v = opts["state_dtype"]
        try:
            out["state_dtype"] = None if v is None else _plan.state_dtype_name(v)
        except TypeError as e:
            raise TypeError(f"{where}{e}") from None
    if "stochastic_rounding" in opts:
        out["stochastic_rounding"] = check_bool(to_scalar(opts["stochastic_rounding"]),
                                                f"{where}stochastic_rounding")
    if "seed" in opts:
        v = to_scalar(opts["seed"])
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) \
                or not 0 <= int(v) < 2**64:
            raise (TypeError if not isinstance(v, (int, np.integer)) else ValueError)(
                f"{where}seed must be an int in [0, 2**64), got {v!r:.40}")
        out["seed"] = int(v)
    return out


def precision_defaults(state_dtype=None, stochastic_rounding=False, seed=None):
    """The precision options of an optimizer's defaults, validated: only those
    not at their default (so a default optimizer's groups stay torch's); a
    seed is drawn when stochastic rounding is on and none is given."""
    if seed is None and stochastic_rounding is True:
        seed = secrets.randbits(63)
    precision = _check_precision("", dict(state_dtype=state_dtype,
                                          stochastic_rounding=stochastic_rounding,
                                          seed=0 if seed is None else seed))
    return {k: v for k, v in precision.items() if v != _PRECISION_DEFAULTS[k]}


def _check_param_state(name, st, p, amsgrad, state_dtype=None):
    """A checkpoint's state of parameter ``p``: fresh, validated buffers
    (8-bit state -- ``exp_avg_absmax`` present -- only in a ``q8`` group)."""
    if not isinstance(st, dict):
        raise TypeError(f"{name} must be a dict, got {type(st).__name__}")
    if any(k in st for k in _Q8_KEYS):
        if state_dtype != _plan.Q8:
            raise ValueError(f"{name} holds 8-bit state ({', '.join(_Q8_KEYS)}) but its "
                             "param group's state_dtype is not 'q8'")
        return _check_q8_state(name, st, p)
    unknown = [k for k in st if k != "step" and k not in _STATE_KEYS]
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown} (expected step, "
                         f"{', '.join(_STATE_KEYS)})")
    need = ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    for k in need:
        if k not in st:
            raise ValueError(f"{name} lacks '{k}', needed by the group's options")
    ns: dict[str, Any] = {"step": check_state_step(st["step"], f"{name} 'step'")}
    sdt = _plan.state_dtype(p.dtype, state_dtype)
    if sdt is _plan.Q8:         # float state in a 'q8' group (small array, or loaded)
        sdt = np.dtype(p.dtype)
    for k in _STATE_KEYS:
        if k in st:
            ns[k] = _state_array(f"{name} '{k}'", st[k], p.shape, sdt,
                                 nonneg=k != "exp_avg")
    return ns


def _check_q8_state(name, st, p):
    """A checkpoint's 8-bit state of ``p``: ``step``, uint8 ``exp_avg`` /
    ``exp_avg_sq`` of its shape (any code is valid), float32 finite >= 0
    ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` of one value per block."""
    keys = ("exp_avg", "exp_avg_sq") + _Q8_KEYS
    check_state_keys(name, st, keys, "8-bit state")
    ns: dict[str, Any] = {"step": check_state_step(st["step"], f"{name} 'step'")}
    nb = (F._quant.n_blocks(p.size),)
    for k in keys:
        arr = to_numpy(st[k])
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name} '{k}' must be an array, got {type(arr).__name__}")
        want = np.dtype(np.uint8) if k in ("exp_avg", "exp_avg_sq") else np.dtype(np.float32)
        if arr.dtype != want:
            raise TypeError(f"{name} '{k}' must have dtype {want} (8-bit state), got {arr.dtype}")
        shape = p.shape if want == np.uint8 else nb
        if arr.shape != shape:
            raise ValueError(f"{name} '{k}' has shape {arr.shape}, expected {shape}")
        if want == np.float32 and arr.size and not (np.all(np.isfinite(arr)) and arr.min() >= 0):
            raise ValueError(f"{name} '{k}' must hold finite values >= 0 (block scales)")
        ns[k] = np.array(arr, order="C", copy=True)
    return ns


def _state_array(name, val, shape, dtype, nonneg=False, copy=True):
    """A checkpoint buffer as a C-contiguous array of ``dtype`` and ``shape``:
    real-valued, no finite value overflowing the conversion, and (``nonneg``)
    no negative value. ``copy=False`` may return ``val``'s own data."""
    try:
        arr = to_numpy(val)
    except Exception as e:
        raise TypeError(f"{name} is not convertible to a numpy array ({e})") from None
    if not isinstance(arr, np.ndarray) or (arr.dtype.kind not in "fiu"
                                           and arr.dtype not in _LOWP):
        raise TypeError(f"{name} must hold real numbers, got "
                        f"{getattr(arr, 'dtype', type(arr).__name__)}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape}, expected {tuple(shape)}")
    dtype = np.dtype(dtype)
    if dtype.kind == "f" or dtype in _LOWP:
        with np.errstate(all="ignore"):
            out = np.array(arr, dtype=dtype, order="C", copy=True if copy else None)
        if (arr.dtype.kind == "f" or arr.dtype in _LOWP) and arr.dtype.itemsize > dtype.itemsize:
            if np.count_nonzero(np.isinf(out)) != np.count_nonzero(np.isinf(arr)):
                raise ValueError(f"{name} has values too large for {dtype}")
        if nonneg and out.size and np.any(out < np.zeros(1, out.dtype)):   # NaN: allowed
            raise ValueError(f"{name} has negative values (a second moment is >= 0)")
    else:
        if arr.dtype.kind == "f":
            raise TypeError(f"{name} must hold integers, got {arr.dtype}")
        ii = np.iinfo(dtype)
        if arr.size and (int(arr.min()) < max(ii.min, 0 if nonneg else ii.min)
                         or int(arr.max()) > ii.max):
            raise ValueError(f"{name} has values out of range (0 <= count <= {ii.max})"
                             if nonneg else f"{name} has values out of range for {dtype}")
        out = np.array(arr, dtype=dtype, order="C", copy=True if copy else None)
    return out


class AdamW(Adam):
    """AdamW: :class:`Adam` with decoupled weight decay, default ``weight_decay=1e-2``.

    Examples
    --------
    >>> import numpy as np, fastadam as fa
    >>> w = np.ones(2)
    >>> fa.AdamW([w], lr=0.1, weight_decay=0.5).step([np.zeros(2)])
    >>> w
    array([0.95, 0.95])
    """

    _defaults_wd = 1e-2
    _decoupled = True


class SparseAdam(_Locked):
    """Sparse ("lazy") Adam for one embedding table, stepped in place.

    A numpy counterpart of ``torch.optim.SparseAdam`` for one table: state
    (``exp_avg``, ``exp_avg_sq``) is created on the first step, one global
    ``step`` counter is incremented on every :meth:`step` call -- even for an
    empty batch, like torch -- and :meth:`state_dict` uses torch's layout.

    Parameters
    ----------
    table : ndarray, shape (n_rows, dim)
        float32/float64, C-contiguous, writable (``np.memmap`` works).
    lr, betas, eps, maximize
        As ``torch.optim.SparseAdam`` (defaults identical).
    weight_decay, decoupled_weight_decay, amsgrad : optional
        Extensions, off by default (see :func:`sparse_adam_step`).
    rowwise : bool
        Keep one second-moment value per row (state ~1x the table, not 2x).
    per_row_step : bool
        Keep an int64 step count per row, used for that row's bias correction.
    dense_equivalent : bool
        Dense Adam/AdamW results at sparse cost (off by default): a touched
        row first catches up the steps it missed, as dense
        ``torch.optim.AdamW(fused=True)`` on the whole table would have
        stepped it with zero gradients (see
        :func:`fastadam.functional.sparse_adam_catchup_step`); call
        :meth:`catch_up` before reading untouched rows. Weight decay is
        decoupled (``decoupled_weight_decay=True``) or 0; ``lr`` may change
        between steps (each step's lr is recorded and replayed). State:
        ``last_step`` (int64 per row) and ``lr_history`` (float64 per step).
    exp_avg, exp_avg_sq, max_exp_avg_sq, row_step : ndarray, optional
        Supply the state buffers yourself (e.g. ``np.memmap`` files for
        tables larger than RAM); they are used in place. Otherwise they are
        created, zeroed, on the first step (``np.zeros``: pages are only
        materialised when touched).
    state_dtype : dtype or str, optional
        ``"q8"``: 8-bit **row** state for a float32 table of 4096+ elements
        (:func:`fastadam.functional.sparse_adam8bit_step`: ``exp_avg`` /
        ``exp_avg_sq`` uint8 codes of the table's shape, ``exp_avg_absmax``
        / ``exp_avg_sq_absmax`` float32 ``(n_rows, ceil(dim / 256))``: each
        row in blocks of its own); smaller tables keep float32 state. Not with
        ``amsgrad``, ``rowwise`` or ``dense_equivalent``. Another dtype
        (e.g. ``"bf16"``) sets the dtype of the state rows.
    exp_avg_absmax, exp_avg_sq_absmax : ndarray, optional
        With ``state_dtype="q8"``: your own block-scale buffers (with your
        own uint8 ``exp_avg`` / ``exp_avg_sq``), used in place.
    n_threads : int, optional
        Threads per step (``None``: resolve at call time).

    Notes
    -----
    Thread safety: :meth:`step` and :meth:`load_state_dict` hold a
    per-optimizer lock (threads sharing one optimizer serialise).

    With all extensions off the state dict is exactly torch's::

        {'state': {0: {'step': int, 'exp_avg': ..., 'exp_avg_sq': ...}},
         'param_groups': [{'lr', 'betas', 'eps', 'maximize', 'params': [0]}]}

    With extensions, the group also carries ``weight_decay``,
    ``decoupled_weight_decay``, ``amsgrad``, ``rowwise``, ``per_row_step``,
    and the state ``max_exp_avg_sq`` / ``row_step``.

    Examples
    --------
    >>> import numpy as np, fastadam as fa
    >>> emb = np.zeros((4, 3), np.float32)
    >>> opt = fa.SparseAdam(emb, lr=0.5)
    >>> opt.step(np.array([2, 2]), np.ones((2, 3), np.float32))
    >>> np.round(emb[2], 4)
    array([-0.5, -0.5, -0.5], dtype=float32)
    >>> opt.state_dict()["state"][0]["step"]
    1
    """

    _EXT = (("weight_decay", 0.0), ("decoupled_weight_decay", False), ("amsgrad", False),
            ("rowwise", False), ("per_row_step", False), ("dense_equivalent", False))

    def __init__(self, table: Array, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, maximize: bool = False, *, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, amsgrad: bool = False,
                 rowwise: bool = False, per_row_step: bool = False,
                 dense_equivalent: bool = False,
                 exp_avg: Optional[Array] = None, exp_avg_sq: Optional[Array] = None,
                 max_exp_avg_sq: Optional[Array] = None, row_step: Optional[Array] = None,
                 n_threads: Optional[int] = None, state_dtype: Any = None,
                 exp_avg_absmax: Optional[Array] = None,
                 exp_avg_sq_absmax: Optional[Array] = None) -> None:
        check_buffer("table", table)
        if table.ndim != 2:
            raise ValueError(f"table must be 2-D (n_rows, dim), got shape {table.shape}")
        check_hyper(lr, betas, eps, weight_decay)
        _threads.check(n_threads)
        self._lock = threading.RLock()
        self.table = table
        self.n_threads = n_threads
        group: dict[str, Any] = {"lr": lr, "betas": tuple(betas), "eps": eps,
                                 "maximize": check_bool(maximize, "maximize")}
        ext = dict(weight_decay=weight_decay,
                   decoupled_weight_decay=check_bool(decoupled_weight_decay,
                                                     "decoupled_weight_decay"),
                   amsgrad=check_bool(amsgrad, "amsgrad"), rowwise=check_bool(rowwise, "rowwise"),
                   per_row_step=check_bool(per_row_step, "per_row_step"),
                   dense_equivalent=check_bool(dense_equivalent, "dense_equivalent"))
        _check_dense_equivalent(ext)
        group.update(ext)
        if state_dtype is not None:      # e.g. "bf16" rows of state (a group key when set)
            group["state_dtype"] = _plan.state_dtype_name(state_dtype)
            _plan.state_dtype(table.dtype, group["state_dtype"], op="sparse_adam")
            _check_sparse_q8_group(group)
        self._hist: Optional[F.CatchUpHistory] = None
        self._hist_view: Any = None
        self.param_groups = [group]
        self.state = {}
        supplied = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq,
                    "max_exp_avg_sq": max_exp_avg_sq, "row_step": row_step,
                    "exp_avg_absmax": exp_avg_absmax, "exp_avg_sq_absmax": exp_avg_sq_absmax}
        if any(b is not None for b in supplied.values()):
            st = self._new_state()
            for key, buf in supplied.items():
                if buf is not None:
                    if key not in st:
                        raise ValueError(f"{key} was given but the options do not use it")
                    st[key] = buf
            self._check_state(st)
            self.state = st

    # -- state --------------------------------------------------------------
    @property
    def defaults(self):
        return {k: v for k, v in self.param_groups[0].items() if k != "params"}

    def _vshape(self):
        t = self.table
        return (t.shape[0],) if self.param_groups[0]["rowwise"] else t.shape

    def _q8(self, group=None):
        """Whether the table gets 8-bit row state (``state_dtype='q8'``, 4096+ elements)."""
        g = self.param_groups[0] if group is None else group
        t = self.table
        return _plan.state_format(t.dtype, t.size, g.get("state_dtype"),
                                  op="sparse_adam") is _plan.Q8

    def _new_state(self):
        g = self.param_groups[0]
        t = self.table
        if self._q8():
            st = {"step": 0, **F.new_sparse_state8bit(t.shape)}
            if g["per_row_step"]:
                st["row_step"] = np.zeros(t.shape[0], np.int64)
            return st
        # a table under 4096 elements in a 'q8' group keeps float state of its dtype
        st = new_state(t.shape, _plan.state_format(t.dtype, 0, g.get("state_dtype"),
                                                   op="sparse_adam"), g["amsgrad"],
                       self._vshape())
        if g["per_row_step"]:
            st["row_step"] = np.zeros(t.shape[0], np.int64)
        if g["dense_equivalent"]:
            st["last_step"] = np.zeros(t.shape[0], np.int64)
            st["lr_history"] = np.zeros(0, np.float64)
        return st

    def _history(self, st):
        """The catch-up record of ``st`` (rebuilt from ``lr_history`` after a load)."""
        g = self.param_groups[0]
        h = self._hist
        if h is None or st["lr_history"] is not self._hist_view or h.step != st["step"]:
            h = F.CatchUpHistory(g["betas"], g["weight_decay"])
            for lr in np.asarray(st["lr_history"]).tolist():
                h.append(lr)
            self._hist = h
            self._hist_view = st["lr_history"]
        return h

    def _check_state(self, st):
        t = self.table
        if "exp_avg_absmax" in st:
            F._check_sparse_q8_state(("exp_avg", "exp_avg_sq") + _Q8_KEYS,
                                     [st[k] for k in ("exp_avg", "exp_avg_sq") + _Q8_KEYS],
                                     t.shape)
            if "row_step" in st:
                F.check_row_step(st["row_step"], t.shape[0])
            return
        sdt = check_buffer("exp_avg", st["exp_avg"])
        _plan.KERNELS.get("sparse_adam", t.dtype, t.dtype, sdt, ("table", "grad", "exp_avg"))
        if st["exp_avg"].shape != t.shape:
            raise ValueError(f"exp_avg must have shape {t.shape}, got {st['exp_avg'].shape}")
        for key in ("exp_avg_sq", "max_exp_avg_sq"):
            if key in st:
                same_dtype(key, check_buffer(key, st[key]), "exp_avg", sdt)
                if st[key].shape != self._vshape():
                    raise ValueError(f"{key} must have shape {self._vshape()}, got "
                                     f"{st[key].shape}")
        if "row_step" in st:
            F.check_row_step(st["row_step"], t.shape[0])
        if "last_step" in st:
            F.check_row_step(st["last_step"], t.shape[0], "last_step")

    # -- the step -----------------------------------------------------------
    def step(self, indices: Array, grad_rows: Array) -> None:
        """Apply one update for the rows ``indices`` with gradients ``grad_rows``.

        The global step is incremented even when the batch is empty (torch
        does the same). Everything is validated before the state or the
        step counter change.
        """
        with self._lock:
            g = self.param_groups[0]
            st = self.state if self.state else self._new_state()
            t = st["step"] + 1
            if g["dense_equivalent"]:
                h = self._history(st)
                h.append(g["lr"])
                try:
                    F.sparse_adam_catchup_step(
                        self.table, indices, grad_rows, st["exp_avg"], st["exp_avg_sq"],
                        st["last_step"], h, eps=g["eps"], amsgrad=g["amsgrad"],
                        max_exp_avg_sq=st.get("max_exp_avg_sq"), maximize=g["maximize"],
                        n_threads=self.n_threads)
                except BaseException:
                    h.truncate(t - 1)
                    raise
                st["lr_history"] = self._hist_view = h.lrs
                st["step"] = t
                self.state = st
                return
            if "exp_avg_absmax" in st:
                F.sparse_adam8bit_step(
                    self.table, indices, grad_rows, st["exp_avg"], st["exp_avg_sq"],
                    st["exp_avg_absmax"], st["exp_avg_sq_absmax"], step=t, lr=g["lr"],
                    betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"],
                    decoupled_weight_decay=g["decoupled_weight_decay"], maximize=g["maximize"],
                    row_step=st.get("row_step"), n_threads=self.n_threads)
                st["step"] = t
                self.state = st
                return
            F.sparse_adam_step(self.table, indices, grad_rows, st["exp_avg"], st["exp_avg_sq"],
                             step=t, lr=g["lr"], betas=g["betas"], eps=g["eps"],
                             weight_decay=g["weight_decay"],
                             decoupled_weight_decay=g["decoupled_weight_decay"],
                             amsgrad=g["amsgrad"], max_exp_avg_sq=st.get("max_exp_avg_sq"),
                             maximize=g["maximize"], row_step=st.get("row_step"),
                             n_threads=self.n_threads)
            st["step"] = t
            self.state = st

    def catch_up(self) -> None:
        """``dense_equivalent``: bring every row up to the current step (the
        rows not touched since take their missed zero-gradient steps), so the
        whole table and state equal dense AdamW's. O(n_rows); before reading
        or exporting the table. A no-op in the other modes."""
        with self._lock:
            g = self.param_groups[0]
            if not g["dense_equivalent"] or not self.state:
                return
            st = self.state
            F.sparse_adam_catch_up(self.table, st["exp_avg"], st["exp_avg_sq"], st["last_step"],
                                   self._history(st), eps=g["eps"], amsgrad=g["amsgrad"],
                                   max_exp_avg_sq=st.get("max_exp_avg_sq"),
                                   maximize=g["maximize"], n_threads=self.n_threads)

    def zero_grad(self) -> None:  # numpy grads are owned by the caller
        pass

    # -- checkpoints --------------------------------------------------------
    def state_dict(self) -> StateDict:
        """torch's layout; arrays are the live buffers (copy or ``fastadam.save`` them)."""
        g = self.param_groups[0]
        gd = {"lr": g["lr"], "betas": g["betas"], "eps": g["eps"], "maximize": g["maximize"]}
        if any(g[k] != d for k, d in self._EXT):
            gd.update({k: g[k] for k, _ in self._EXT})
        if g.get("state_dtype") is not None:
            gd["state_dtype"] = g["state_dtype"]
        gd["params"] = [0]
        state = {0: dict(self.state)} if self.state else {}
        return {"state": state, "param_groups": [gd]}

    def load_state_dict(self, state_dict: StateDict) -> None:
        """Load from :meth:`state_dict`, :func:`fastadam.load` or a
        ``torch.optim.SparseAdam`` state dict (tensors accepted).

        Hyperparameters and options are taken from the dict (missing
        extension keys mean "off"); arrays are copied into fresh buffers
        unless this optimizer was given its own buffers (then copied into
        them, e.g. into memmaps). Everything -- hyperparameters, options
        (bools), ``step``, the buffers the options need (shapes,
        convertible values) -- is validated before anything is copied or
        set: a rejected dict changes nothing.
        """
        with self._lock:
            new_group, ns = self._check_state_dict(state_dict)
            if ns is None:
                self.param_groups = [new_group]
                self.state = {}
                return
            old_state = self.state
            fresh = ns.pop("_fresh")
            out = {"step": ns.pop("step")}
            for key, arr in ns.items():
                dst = old_state.get(key) if old_state else None
                if (dst is not None and dst.shape == arr.shape and dst.dtype == arr.dtype
                        and dst.flags.writeable and dst.flags.c_contiguous
                        and not np.may_share_memory(dst, arr)):
                    np.copyto(dst, arr)        # keep user buffers (memmaps); cannot fail
                    out[key] = dst
                else:
                    out[key] = arr if fresh[key] else arr.copy()
            self.param_groups = [new_group]
            self.state = out

    def _check_state_dict(self, state_dict):
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise TypeError("state_dict must be a dict with 'state' and 'param_groups'")
        groups = state_dict["param_groups"]
        if (not isinstance(groups, (list, tuple)) or len(groups) != 1
                or not isinstance(groups[0], dict)
                or len(groups[0].get("params", [0])) != 1):
            raise ValueError("a SparseAdam state dict must have one group with one param")
        sg = groups[0]
        for k in ("lr", "betas", "eps"):
            if k not in sg:
                raise ValueError(f"the state dict's param group lacks '{k}'")
        betas = sg["betas"]
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__"):
            raise TypeError(f"param group 'betas' must be a pair of real numbers, got "
                            f"{betas!r:.40}")
        new_group = {"lr": to_scalar(sg["lr"]), "betas": tuple(to_scalar(b) for b in betas),
                     "eps": to_scalar(sg["eps"]),
                     "maximize": check_bool(to_scalar(sg.get("maximize", False)),
                                            "param group 'maximize'")}
        for k, d in self._EXT:
            v = to_scalar(sg.get(k, d))
            new_group[k] = check_bool(v, f"param group '{k}'") if type(d) is bool else v
        check_hyper(new_group["lr"], new_group["betas"], new_group["eps"],
                    new_group["weight_decay"])
        sdt_name = _check_precision("param group: ", {"state_dtype": sg.get(
            "state_dtype", self.param_groups[0].get("state_dtype"))})["state_dtype"]
        if sdt_name is not None:
            new_group["state_dtype"] = sdt_name
        states = state_dict.get("state", {})
        if not isinstance(states, dict):
            raise TypeError("state_dict['state'] must be a dict")
        pid = sg.get("params", [0])[0]
        src = states.get(pid, states.get(str(pid))) if states else None
        extra = [k for k in states if k not in (pid, str(pid))]
        if extra:
            raise ValueError(f"state_dict state keys {extra} do not match the group's "
                             f"param {pid!r}")
        if src is None:
            return new_group, None
        if not isinstance(src, dict):
            raise TypeError(f"state {pid!r} must be a dict, got {type(src).__name__}")
        step = check_state_step(src.get("step", 0), "state 'step'")
        if new_group.get("state_dtype") == _plan.Q8:
            _check_sparse_q8_group(new_group)
        q8 = self._q8(new_group)
        if not q8 and any(k in src for k in _Q8_KEYS):
            raise ValueError(f"state dict has 8-bit row state ({', '.join(_Q8_KEYS)}) but the "
                             "param group's state_dtype is not 'q8' (or the table is under "
                             f"{F._quant.MIN_SIZE} elements)")
        need = ["exp_avg", "exp_avg_sq"] + (list(_Q8_KEYS) if q8 else [])
        if new_group["amsgrad"]:
            need.append("max_exp_avg_sq")
        if new_group["per_row_step"]:
            need.append("row_step")
        if new_group["dense_equivalent"]:
            need += ["last_step", "lr_history"]
        _check_dense_equivalent(new_group)
        unknown = [k for k in src if k != "step" and k not in need]
        if unknown:
            raise ValueError(f"state dict has keys {unknown} that the options do not use")
        n_rows = self.table.shape[0]
        vshape = (n_rows,) if new_group["rowwise"] else self.table.shape
        sdt = _plan.state_format(self.table.dtype, 0, new_group.get("state_dtype"),
                                 op="sparse_adam")
        ns: dict[str, Any] = {"step": step}
        fresh = {}
        for key in need:          # validate (and convert) everything before copying anything
            if key not in src:
                raise ValueError(f"state dict lacks '{key}' needed by the options")
            orig = src[key]
            if key in ("row_step", "last_step"):
                ns[key] = _state_array(f"state '{key}'", src[key], (n_rows,),
                                       np.int64, nonneg=True, copy=False)
                if key == "last_step" and ns[key].size and int(ns[key].max()) > step:
                    raise ValueError(f"state 'last_step' has values above the state's step "
                                     f"{step}")
            elif q8 and key in ("exp_avg", "exp_avg_sq") + _Q8_KEYS:
                ns[key] = _q8_row_array(f"state '{key}'", src[key], self.table.shape, key)
            elif key == "lr_history":
                ns[key] = _state_array("state 'lr_history'", src[key], (step,), np.float64,
                                       copy=False)
                for lr in ns[key].tolist():
                    check_hyper(lr, new_group["betas"], new_group["eps"],
                                new_group["weight_decay"])
            else:
                ns[key] = _state_array(f"state '{key}'", src[key],
                                       self.table.shape if key == "exp_avg" else vshape, sdt,
                                       nonneg=key != "exp_avg", copy=False)
            o = to_numpy(orig)
            fresh[key] = ns[key] is not o and not np.may_share_memory(ns[key], o)
        ns["_fresh"] = fresh
        return new_group, ns


def _check_sparse_q8_group(group):
    """A SparseAdam group with ``state_dtype='q8'``: the options 8-bit row state has."""
    if group.get("state_dtype") != _plan.Q8:
        return
    for k, what in (("amsgrad", "no 8-bit max_exp_avg_sq"),
                    ("rowwise", "row-wise v is one float per row already"),
                    ("dense_equivalent", "its catch-up keeps float state")):
        if group[k]:
            raise ValueError(f"{k}=True is not supported with state_dtype='q8' ({what})")


def _q8_row_array(name, val, table_shape, key):
    """A checkpoint's 8-bit row-state buffer: uint8 codes of the table's shape
    (any code is valid) or float32 block scales ``(n_rows, ceil(dim / 256))``,
    finite and >= 0; C-contiguous (``val``'s own data where it can be)."""
    try:
        arr = to_numpy(val)
    except Exception as e:
        raise TypeError(f"{name} is not convertible to a numpy array ({e})") from None
    codes = key in ("exp_avg", "exp_avg_sq")
    want = np.dtype(np.uint8) if codes else np.dtype(np.float32)
    if not isinstance(arr, np.ndarray) or arr.dtype != want:
        raise TypeError(f"{name} must have dtype {want} (8-bit row state), got "
                        f"{getattr(arr, 'dtype', type(arr).__name__)}")
    shape = tuple(table_shape) if codes else (table_shape[0],
                                              F._quant.n_blocks(table_shape[1]))
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    if not codes and arr.size and not (np.all(np.isfinite(arr)) and arr.min() >= 0):
        raise ValueError(f"{name} must hold finite values >= 0 (block scales)")
    return np.array(arr, dtype=want, order="C", copy=None)


def _check_dense_equivalent(group):
    """The options the dense-equivalent mode supports (dense AdamW/Adam)."""
    if not group["dense_equivalent"]:
        return
    if group["weight_decay"] and not group["decoupled_weight_decay"]:
        raise ValueError("dense_equivalent=True needs decoupled_weight_decay=True (AdamW) or "
                         "weight_decay=0: with L2 decay an absent row's gradient is not zero")
    for k in ("rowwise", "per_row_step"):
        if group[k]:
            raise ValueError(f"dense_equivalent=True cannot be combined with {k}=True "
                             "(dense Adam has neither)")


def _to_number(x):
    x = to_scalar(x)
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x
