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

from .._validate import check_state_step
from ._views import scalar_dtype

__all__ = ["to_torch_state_dict", "resolve_fused"]


def _is_sparse_group(group: Any) -> bool:
    # Every Adam-family group (torch's, the drop-ins', fastadam's numpy ones) records
    # "foreach"; SparseAdam groups (torch's and fastadam's) never do.
    return isinstance(group, dict) and "foreach" not in group


def _tensor(a: np.ndarray) -> torch.Tensor:
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
