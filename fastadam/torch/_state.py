"""Design: state dicts in torch's layout (layer 4, ``fastadam.torch``).

Contract: :func:`to_torch_state_dict` turns any optimizer state dict of the
family -- numpy layout (``fastadam.load``, fastadam's numpy optimizers:
ndarrays, ``step`` an int) or torch's -- into what ``torch.optim``'s
``load_state_dict`` expects: tensors (sharing memory with the arrays, as
torch's own ``load_state_dict`` shares the tensors it is given), ``step`` a
scalar float tensor in Adam-family groups and an int in SparseAdam groups,
``betas`` tuples, plain Python numbers. The ``fastadam.torch`` drop-ins call
it in their ``load_state_dict``; users call it for torch's own optimizers
(or use ``fastadam.load(path, as_torch=True)``).
"""
from typing import Any

import numpy as np
import torch

from .._validate import check_bool, check_hyper, check_state_step
from ._views import check_q8_rows_loaded, scalar_dtype, step_value

__all__ = ["to_torch_state_dict", "resolve_fused"]


def load_checked(opt: Any, base_load: Any, state_dict: Any, sparse: bool) -> None:
    """``opt.load_state_dict``: :func:`prepare_load` (pre-hooks, conversion, every
    check) first, then torch's ``load_state_dict`` (``base_load``) on the checked
    dict with the pre-hooks held back (they have run); its post-hooks run as usual.
    A rejected dict changes nothing: params, state, param_groups, steps."""
    sd = prepare_load(opt, state_dict, sparse)
    hooks = opt._optimizer_load_state_dict_pre_hooks
    opt._optimizer_load_state_dict_pre_hooks = type(hooks)()
    try:
        opt._fa_views = {}  # drop views and records of the replaced state tensors
        opt._fa_fast = {}
        opt._fa_dups = {}
        base_load(sd)
    finally:
        opt._optimizer_load_state_dict_pre_hooks = hooks


def _is_sparse_group(group: Any) -> bool:
    # Every Adam-family group (torch's, the drop-ins', fastadam's numpy ones) records
    # "foreach"; SparseAdam groups (torch's and fastadam's) never do.
    return isinstance(group, dict) and "foreach" not in group


def _tensor(a: np.ndarray) -> torch.Tensor:
    if a.dtype.kind == "V" and a.dtype.name == "bfloat16":     # ml_dtypes.bfloat16
        return _tensor(a.view(np.int16)).view(torch.bfloat16)
    if a.flags.writeable and a.dtype.isnative and a.flags.c_contiguous:
        return torch.from_numpy(a)          # zero copy
    return torch.tensor(np.ascontiguousarray(a, a.dtype.newbyteorder("=")))


def _group_value(key: str, v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if key == "betas" and isinstance(v, list):
        return tuple(_group_value("", b) for b in v)
    return v


def to_torch_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Return ``state_dict`` in torch's layout, for ``torch.optim``'s ``load_state_dict``.

    Parameters
    ----------
    state_dict : dict
        An optimizer state dict from :func:`fastadam.load`, from
        ``fastadam.Adam``/``AdamW``/``SparseAdam.state_dict()`` (numpy
        arrays, ``step`` an int) or already in torch's layout.

    Returns
    -------
    dict
        A new dict (the input is not modified): ndarrays become CPU tensors
        sharing their memory (copied only if read-only or byte-swapped);
        ``step`` becomes a 0-d float tensor (float32, or float64 under a
        float64 default dtype, as torch creates it) in Adam/AdamW groups and
        an int in SparseAdam groups (the groups without ``foreach``); tensors
        already there are kept; numpy scalars become Python numbers and
        ``betas`` a tuple.

    Examples
    --------
    >>> import numpy as np, torch, fastadam as fa
    >>> from fastadam.torch import to_torch_state_dict
    >>> w = np.zeros(4, np.float32); opt = fa.AdamW([w]); opt.step([np.ones(4, np.float32)])
    >>> p = torch.nn.Parameter(torch.from_numpy(w.copy()))
    >>> topt = torch.optim.AdamW([p], fused=True)
    >>> topt.load_state_dict(to_torch_state_dict(opt.state_dict()))
    >>> topt.state[p]["step"], topt.param_groups[0]["fused"]
    (tensor(1.), True)
    """
    groups = state_dict["param_groups"]
    owner: dict[Any, Any] = {}
    for g in groups:
        for i in g["params"]:
            owner[i] = g
    state = {}
    for key, st in state_dict["state"].items():
        g = owner.get(key)
        if g is None and isinstance(key, str) and key.isdigit():
            g = owner.get(int(key))
        sparse = _is_sparse_group(g)
        ns = {}
        for k, v in st.items():
            if k == "step":
                if isinstance(v, torch.Tensor) and (v.numel() != 1 or v.is_meta):
                    raise ValueError(f"state {key} 'step' must be a scalar with a value, got "
                                     f"a tensor of shape {tuple(v.shape)} on {v.device}")
                if sparse:
                    v = check_state_step(v, f"state {key} 'step'")
                elif not isinstance(v, torch.Tensor):
                    v = torch.tensor(float(check_state_step(v, f"state {key} 'step'")),
                                     dtype=scalar_dtype())
            elif isinstance(v, np.ndarray):
                v = _tensor(v)
            ns[k] = v
        state[key] = ns
    out_groups = []
    for g in groups:
        gd = {k: _group_value(k, v) for k, v in g.items() if k != "params"}
        gd["params"] = list(g["params"])
        out_groups.append(gd)
    return {"state": state, "param_groups": out_groups}


def resolve_fused(group: dict[str, Any]) -> None:
    """Record ``fused=True`` in an Adam-family group unless its owner said otherwise.

    fastadam's dense arithmetic is torch's fused kernel's, so a checkpoint
    should tell ``torch.optim`` to continue with ``fused=True``. Left alone:
    an explicit ``fused`` (True/False), ``foreach=True`` (torch refuses both
    True) and groups with complex or non-floating parameters (torch's fused
    kernel rejects them).
    """
    if group.get("fused") is not None or group.get("foreach"):
        return
    for p in group.get("params", ()):
        if isinstance(p, torch.Tensor) and not p.is_floating_point():
            return
    group["fused"] = True


_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_SPARSE_KEYS = ("exp_avg", "exp_avg_sq")
_BOOLS = ("amsgrad", "maximize", "decoupled_weight_decay")
_OPTIONAL_BOOLS = ("foreach", "fused", "capturable", "differentiable")


def prepare_load(opt: Any, state_dict: Any, sparse: bool) -> dict[str, Any]:
    """What ``opt.load_state_dict(state_dict)`` should hand to torch's: the dict after
    ``opt``'s load pre-hooks (run here, once), in torch's layout, and checked
    against ``opt`` so that torch's ``load_state_dict`` cannot fail half-way.

    Raises a ValueError/TypeError naming the first problem: the layout (``state``
    and ``param_groups``), the number and sizes of the groups, the parameter ids
    (unique; state only for them), each group's hyperparameters (construction's
    checks) and options (bools), each state's keys (``step`` and the moments;
    nothing unknown), ``step`` (an integer >= 0) and every state tensor (the
    parameter's shape, a floating dtype -- complex for complex parameters --
    strided, not on the meta device). Changes nothing.
    """
    cls = type(opt).__name__
    where = f"{cls}.load_state_dict"
    if not isinstance(state_dict, dict):
        raise TypeError(f"{where}: state_dict must be a dict, got {type(state_dict).__name__}")
    state_dict = state_dict.copy()     # as torch: hooks get a shallow copy
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        res = hook(opt, state_dict)
        if res is not None:
            state_dict = res
    missing = [k for k in ("state", "param_groups") if k not in state_dict]
    if missing:
        raise ValueError(f"{where}: state_dict lacks {missing} (a dict from "
                         "Optimizer.state_dict() or fastadam.load is expected)")
    groups, states = state_dict["param_groups"], state_dict["state"]
    if not isinstance(groups, (list, tuple)) or not isinstance(states, dict):
        raise TypeError(f"{where}: state_dict['param_groups'] must be a list and "
                        "state_dict['state'] a dict")
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"{where}: loaded state dict has a different number of parameter "
                         f"groups ({len(groups)}, the optimizer has {len(opt.param_groups)})")
    for gi, (g, sg) in enumerate(zip(opt.param_groups, groups)):
        if not isinstance(sg, dict) or not isinstance(sg.get("params"), (list, tuple)):
            raise TypeError(f"{where}: param group {gi} must be a dict with a 'params' list")
        if len(sg["params"]) != len(g["params"]):
            raise ValueError(f"{where}: loaded state dict contains a parameter group that "
                             f"doesn't match the size of optimizer's group (group {gi}: "
                             f"{len(sg['params'])} params, the optimizer's has "
                             f"{len(g['params'])})")
    sd = to_torch_state_dict(state_dict)   # pure; checks non-tensor steps
    id_map: dict[Any, Any] = {}
    ams_of: dict[Any, bool] = {}
    for gi, (g, sg) in enumerate(zip(opt.param_groups, sd["param_groups"])):
        _check_group(where, gi, sg, sparse)
        for pid, p in zip(sg["params"], g["params"]):
            try:
                dup = pid in id_map
            except TypeError:
                raise TypeError(f"{where}: param group {gi} 'params' holds an unhashable "
                                f"{type(pid).__name__}") from None
            if dup:
                raise ValueError(f"{where}: parameter id {pid!r} is listed twice in the "
                                 "state dict's param groups")
            id_map[pid] = p
            ams_of[pid] = bool(sg.get("amsgrad", False))
    for key, st in sd["state"].items():
        if key not in id_map:
            raise ValueError(f"{where}: state key {key!r} is no parameter id of the state "
                             f"dict's param groups")
        _check_param_state(f"{where}: state {key!r}", st, id_map[key], sparse)
    return sd


def _check_group(where: str, gi: int, sg: dict[str, Any], sparse: bool) -> None:
    need = ("lr", "betas", "eps") if sparse else ("lr", "betas", "eps", "weight_decay")
    lacks = [k for k in need if k not in sg]
    if lacks:
        raise ValueError(f"{where}: param group {gi} lacks {lacks}")
    try:
        betas = sg["betas"]
        if isinstance(betas, torch.Tensor) or isinstance(betas, (str, bytes)) \
                or not hasattr(betas, "__len__") or len(betas) != 2:
            raise TypeError(f"betas must be a pair of real numbers, got {betas!r:.40}")
        b = tuple(_number(x, f"betas[{i}]") for i, x in enumerate(betas))
        check_hyper(_number(sg["lr"], "lr"), b, _number(sg["eps"], "eps"),
                    0.0 if sparse else _number(sg["weight_decay"], "weight_decay"))
        for k in _BOOLS:
            if k in sg:
                check_bool(sg[k], f"'{k}'")
        for k in _OPTIONAL_BOOLS:
            if sg.get(k) is not None:
                check_bool(sg[k], f"'{k}'")
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: param group {gi}: {e}") from None
    for k in ("capturable", "differentiable"):
        if sg.get(k):
            raise ValueError(f"{where}: param group {gi} has {k}=True, which fastadam does "
                             "not support")


def _number(x: Any, name: str) -> Any:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.is_meta:
            raise ValueError(f"{name} must be a number or a 1-element tensor with a value, "
                             f"got a tensor of shape {tuple(x.shape)} on {x.device}")
        return x.item()
    return x


def _check_param_state(name: str, st: Any, p: Any, sparse: bool) -> None:
    if not isinstance(st, dict):
        raise TypeError(f"{name} must be a dict, got {type(st).__name__}")
    if not st:
        return                      # no state yet: created at the first step
    if sparse and ("exp_avg_absmax" in st or "exp_avg_sq_absmax" in st):
        check_q8_rows_loaded(name, st, p)       # 8-bit row state (state_dtype='q8')
        return
    keys = _SPARSE_KEYS if sparse else _ADAM_KEYS
    unknown = [k for k in st if k != "step" and k not in keys]
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown} (expected 'step', "
                         f"{', '.join(repr(k) for k in keys)})")
    for k in ("step",) + _SPARSE_KEYS:
        if k not in st:
            raise ValueError(f"{name} lacks {k!r}")
    check_state_step(step_value(st["step"], f"{name} 'step'"), f"{name} 'step'")
    for k in keys:
        if k not in st:
            continue
        t = st[k]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} {k!r} must be a tensor (or ndarray), got "
                            f"{type(t).__name__}")
        if t.is_meta:
            raise ValueError(f"{name} {k!r} is on the meta device (it holds no values); "
                             "load a checkpoint of materialised tensors")
        if t.layout != torch.strided:
            raise ValueError(f"{name} {k!r} has layout {t.layout}; dense tensors expected")
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{name} {k!r} has shape {tuple(t.shape)}, the parameter "
                             f"{tuple(p.shape)} (a checkpoint of another model?)")
        want_complex = p.is_complex()
        if not (t.is_complex() if want_complex else t.is_floating_point()):
            kind = "complex" if want_complex else "real floating-point"
            raise TypeError(f"{name} {k!r} has dtype {t.dtype}; a {kind} dtype is needed "
                            f"for a {p.dtype} parameter")
