"""Stateful numpy optimizers (layer 3) over ``fastadam.functional``.

``Adam`` / ``AdamW`` mirror ``torch.optim.Adam`` / ``AdamW``: param groups with
per-group hyperparameters, state created lazily on the first step, integer
step counts per parameter, and ``state_dict()`` / ``load_state_dict()`` in
torch's layout (``state`` keyed by parameter index with ``step``,
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; ``param_groups`` with torch's
keys and ``params`` as index lists). ``save``/``load`` write such a dict to a
``.npz`` file (no pickle); resuming from it is bit-identical.
"""
import copy
import json

import numpy as np

from . import functional as F
from ._validate import to_numpy as _to_numpy, to_scalar

_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
               "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


class Adam:
    """Adam over numpy arrays, stepped in place, one native call per param group.

    Parameters
    ----------
    params : list of ndarray, or list of dict
        Arrays (float32/float64, C-contiguous, writable), or param groups
        ``{"params": [...], "lr": ..., ...}`` with per-group hyperparameters.
    lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay
        As ``torch.optim.Adam`` (defaults identical).

    Notes
    -----
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

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=None,
                 amsgrad=False, *, maximize=False, decoupled_weight_decay=None,
                 n_threads=None):
        if weight_decay is None:
            weight_decay = self._defaults_wd
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled
        F.check_hyper(lr, betas, eps, weight_decay)
        self.defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             amsgrad=bool(amsgrad), maximize=bool(maximize), foreach=None,
                             capturable=False, differentiable=False, fused=None,
                             decoupled_weight_decay=bool(decoupled_weight_decay))
        self.n_threads = n_threads
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        self.param_groups = []
        self.state = {}
        for g in params:
            self.add_param_group(g)

    # -- groups and state ------------------------------------------------
    def add_param_group(self, group):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a param group must be a dict with a 'params' list")
        group = dict(group)
        ps = group["params"]
        ps = [ps] if isinstance(ps, np.ndarray) else list(ps)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(ps):
            F.float_array(f"params[{i}]", p)
            if id(p) in seen:
                raise ValueError("some parameters appear in more than one parameter group")
            seen.add(id(p))
        group["params"] = ps
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        group["betas"] = tuple(group["betas"])
        F.check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        self.param_groups.append(group)

    def _all_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _init_state(self, p, amsgrad):
        st = {"step": 0, "exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}
        if amsgrad:
            st["max_exp_avg_sq"] = np.zeros_like(p)
        return st

    # -- the step ---------------------------------------------------------
    def step(self, grads, *, grad_scale=None):
        """Apply one update. ``grads`` aligns with the parameters (all groups, in
        order); a ``None`` entry skips that parameter (as torch skips
        ``grad is None``). ``grad_scale`` divides every gradient (AMP).
        """
        grads = list(grads)
        nparams = sum(len(g["params"]) for g in self.param_groups)
        if len(grads) != nparams:
            raise ValueError(f"grads must have {nparams} entries (one per parameter), "
                             f"got {len(grads)}")
        F.check_grad_scale(grad_scale)
        # Validate every group before writing anything: plan all, then run all.
        plans = []
        k = 0
        for group in self.param_groups:
            ps = group["params"]
            base, k = k, k + len(ps)
            gs = grads[base:k]
            pairs = [(p, g) for p, g in zip(ps, gs) if g is not None]
            labels = [base + i for i, g in enumerate(gs) if g is not None]
            if not pairs:
                continue
            ams = group["amsgrad"]
            sts = [self.state.get(id(p)) or self._init_state(p, ams) for p, _ in pairs]
            steps = [st["step"] + 1 for st in sts]
            calls = F.plan_adam(
                [p for p, _ in pairs], [g for _, g in pairs],
                [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts],
                steps=steps, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=ams,
                max_exp_avg_sqs=[self._vmax(st, p) for st, (p, _) in zip(sts, pairs)]
                if ams else None,
                maximize=group["maximize"], grad_scale=grad_scale,
                n_threads=self.n_threads, labels=labels)
            plans.append((calls, pairs, sts, steps))
        for calls, pairs, sts, steps in plans:
            for kernel, args in calls:
                kernel(*args)
            for (p, _), st, s in zip(pairs, sts, steps):
                st["step"] = s
                self.state[id(p)] = st

    @staticmethod
    def _vmax(st, p):
        if "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = np.zeros_like(p)
        return st["max_exp_avg_sq"]

    def zero_grad(self):  # numpy grads are owned by the caller
        pass

    # -- checkpoints --------------------------------------------------------
    def state_dict(self):
        """torch layout: ``{'state': {i: {...}}, 'param_groups': [{..., 'params': [i...]}]}``.

        Arrays are the live state buffers (like torch); copy or ``save`` them.
        """
        index = {}
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

    def load_state_dict(self, state_dict):
        """Load a state dict from :meth:`state_dict`, :func:`load` or
        ``torch.optim.Adam.state_dict()`` converted to numpy (tensors are
        accepted via ``numpy()``). Values are copied into fresh buffers.
        """
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, optimizer has "
                             f"{len(self.param_groups)}")
        params = self._all_params()
        for g, sg in zip(self.param_groups, groups):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError("state_dict param group sizes do not match the optimizer's")
        new_state = {}
        order = [i for sg in groups for i in sg["params"]]
        for p, i in zip(params, order):
            st = state_dict["state"].get(i, state_dict["state"].get(str(i)))
            if st is None:
                continue
            ns = {}
            for key, val in st.items():
                if key == "step":
                    ns["step"] = F.check_step(_to_number(val), "step") if _to_number(val) else 0
                    continue
                arr = _to_numpy(val)
                if arr.shape != p.shape:
                    raise ValueError(f"state {i} '{key}' has shape {arr.shape}, parameter has "
                                     f"{p.shape}")
                ns[key] = np.array(arr, dtype=p.dtype, order="C", copy=True)
            new_state[id(p)] = ns
        for g, sg in zip(self.param_groups, groups):
            for k in _GROUP_KEYS:
                if k in sg:
                    g[k] = tuple(sg[k]) if k == "betas" else sg[k]
            g["lr"] = _to_number(g["lr"])
        self.state = new_state


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


def _to_number(x):
    x = to_scalar(x)
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


def save(state_dict, path):
    """Write an optimizer ``state_dict`` to ``path`` (``.npz``, no pickle).

    Examples
    --------
    >>> import numpy as np, fastadam as fa, tempfile, os
    >>> w = np.zeros(2); opt = fa.Adam([w]); opt.step([np.ones(2)])
    >>> f = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
    >>> fa.save(opt.state_dict(), f)
    >>> fa.load(f)["state"][0]["step"]
    1
    """
    arrays = {}
    state_meta = {}
    for i, st in state_dict["state"].items():
        meta = {}
        for k, v in st.items():
            if k == "step":
                meta["step"] = int(_to_number(v))
            else:
                arrays[f"state/{i}/{k}"] = _to_numpy(v)
                meta.setdefault("arrays", []).append(k)
        state_meta[str(i)] = meta
    header = {"state": state_meta, "param_groups": state_dict["param_groups"]}
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load(path):
    """Read a state dict written by :func:`save`."""
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(bytes(z["__header__"]).decode())
        state = {}
        for i, meta in header["state"].items():
            st = {"step": meta["step"]}
            for k in meta.get("arrays", []):
                st[k] = z[f"state/{i}/{k}"].copy()
            state[int(i)] = st
    groups = copy.deepcopy(header["param_groups"])
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}
