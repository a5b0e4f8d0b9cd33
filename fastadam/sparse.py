"""Sparse embedding path: update only the rows of a table that a batch touched.

``sparse_adam_step`` (functional, layer 2) validates everything, computes the
per-call scalars in double and makes ONE native call, which merges duplicate
ids (hash + batch-order sum, deterministic) and updates each touched row once,
in place, in one pass, on all cores. ``SparseAdam`` (layer 3) keeps the state
and a global step, with ``state_dict()`` in ``torch.optim.SparseAdam``'s layout.

Default semantics are ``torch.optim.SparseAdam``'s ("lazy" Adam; see
DESIGN.md "Sparse" and :func:`sparse_adam_step`). Cost is proportional to the
touched rows: nothing of size ``n_rows`` is allocated or scanned, so tables
may be ``np.memmap`` files larger than RAM.
"""
import math

import numpy as np

from . import _dispatch, _runtime, _threads
from ._validate import (F32, F64, check_hyper, check_step, describe, float_array,
                        to_numpy as _to_numpy, to_scalar as _num)

__all__ = ["sparse_adam_step", "plan_sparse_adam", "SparseAdam", "sparse_adam_scalars"]

_K = _dispatch.kernels
_SPARSE = {F32: _K.sparse_adam32, F64: _K.sparse_adam64}
_I32 = np.dtype(np.int32)
_I64 = np.dtype(np.int64)
_OUT_NAMES = ("table", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "row_step")


def sparse_adam_scalars(step, lr, beta1, beta2):
    """``-step_size`` in double: ``-(lr * sqrt(1 - b2**t) / (1 - b1**t))`` (torch SparseAdam)."""
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    return -(lr * math.sqrt(bc2) / bc1)


def _check_indices(indices, n_rows):
    """Return ``indices`` as a C-contiguous native int32/int64 1-D array (no copy if it is one)."""
    if not isinstance(indices, np.ndarray):
        raise TypeError(f"indices must be a 1-D numpy.ndarray of int32 or int64, got "
                        f"{describe(indices)}")
    dt = indices.dtype
    if dt.kind not in "iu":
        raise TypeError(f"indices must have an integer dtype (int32 or int64), got {dt}")
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D (one row id per gradient row), got shape "
                         f"{indices.shape}")
    if (dt == _I32 or dt == _I64) and dt.isnative and indices.flags.c_contiguous:
        return indices
    if dt.kind == "u" and dt.itemsize == 8 and indices.size:
        big = np.flatnonzero(indices > np.iinfo(np.int64).max)
        if big.size:
            j = int(big[0])
            raise IndexError(f"indices[{j}] = {int(indices[j])} is out of range for table "
                             f"with {n_rows} rows (valid ids: 0 <= id < {n_rows})")
    return np.ascontiguousarray(indices, dtype=np.int64)


def _check_row_step(row_step, n_rows):
    if not isinstance(row_step, np.ndarray):
        raise TypeError(f"row_step must be a numpy.ndarray of int64, got {describe(row_step)}")
    if row_step.dtype != _I64 or not row_step.dtype.isnative:
        raise TypeError(f"row_step must have dtype int64, got {row_step.dtype}")
    if row_step.shape != (n_rows,):
        raise ValueError(f"row_step must have shape ({n_rows},) (one count per table row), "
                         f"got {row_step.shape}")
    if not row_step.flags.c_contiguous:
        raise ValueError(f"row_step must be C-contiguous, got strides {row_step.strides}")
    if not row_step.flags.writeable:
        raise ValueError("row_step is read-only; it is updated in place and must be writable")


def _check_arrays(table, indices, grad_rows, exp_avg, exp_avg_sq, amsgrad, max_exp_avg_sq,
                  row_step):
    """The buffer checks of :func:`sparse_adam_step`, each with its message.

    Returns ``(dtype, n_rows, dim, indices, k, rowwise, max_exp_avg_sq)``
    (``indices`` as a contiguous int32/int64 array, ``max_exp_avg_sq`` None
    unless amsgrad).
    """
    dt = float_array("table", table)
    if table.ndim != 2:
        raise ValueError(f"table must be 2-D (n_rows, dim), got shape {table.shape}")
    n_rows, dim = table.shape
    indices = _check_indices(indices, n_rows)
    k = indices.shape[0]
    float_array("grad_rows", grad_rows, dt, writable=False)
    if grad_rows.shape != (k, dim):
        raise ValueError(f"grad_rows must have shape (len(indices), dim) = ({k}, {dim}), "
                         f"got {grad_rows.shape}")
    float_array("exp_avg", exp_avg, dt)
    if exp_avg.shape != table.shape:
        raise ValueError(f"exp_avg must have the shape of table {table.shape}, got "
                         f"{exp_avg.shape}")
    float_array("exp_avg_sq", exp_avg_sq, dt)
    if exp_avg_sq.shape == table.shape:
        rowwise = False
    elif exp_avg_sq.shape == (n_rows,):
        rowwise = True
    else:
        raise ValueError(f"exp_avg_sq must have shape {table.shape} (elementwise) or "
                         f"({n_rows},) (row-wise), got {exp_avg_sq.shape}")
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("amsgrad=True needs max_exp_avg_sq (a buffer like exp_avg_sq)")
        float_array("max_exp_avg_sq", max_exp_avg_sq, dt)
        if max_exp_avg_sq.shape != exp_avg_sq.shape:
            raise ValueError(f"max_exp_avg_sq must have the shape of exp_avg_sq "
                             f"{exp_avg_sq.shape}, got {max_exp_avg_sq.shape}")
    else:
        max_exp_avg_sq = None
    if row_step is not None:
        _check_row_step(row_step, n_rows)
    outs = (table, exp_avg, exp_avg_sq, max_exp_avg_sq, row_step)
    hit = _runtime.first_overlap(outs + (grad_rows,))
    if hit is None:
        hit = _runtime.first_overlap(outs + (indices,))
        names = _OUT_NAMES + ("indices",)
    else:
        names = _OUT_NAMES + ("grad_rows",)
    if hit is not None:
        i, j = hit
        raise ValueError(f"{names[i]} and {names[j]} share memory; outputs must not alias "
                         "each other or the inputs")
    return dt, n_rows, dim, indices, k, rowwise, max_exp_avg_sq


def sparse_adam_step(table, indices, grad_rows, exp_avg, exp_avg_sq, *, step=None, lr=1e-3,
                     betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                     decoupled_weight_decay=False, amsgrad=False, max_exp_avg_sq=None,
                     maximize=False, row_step=None, n_threads=None):
    r"""One sparse ("lazy") Adam step of the rows of ``table`` that a batch touched, in place.

    Duplicate ids are summed first (in native code, in batch order, so the
    result is bitwise identical for any thread count), then every touched
    row is updated once; all other rows of the table and of its state stay
    bit-identical. The default arithmetic is ``torch.optim.SparseAdam``'s.

    Parameters
    ----------
    table : ndarray, shape (n_rows, dim)
        float32 or float64, C-contiguous, writable (``np.memmap`` works: only
        touched rows are read or written).
    indices : ndarray, shape (k,)
        int32 or int64 row ids in ``[0, n_rows)``, any order, duplicates
        allowed (other integer dtypes are converted). May be read-only.
    grad_rows : ndarray, shape (k, dim)
        The gradient row for each id (``grad_rows[i]`` belongs to
        ``indices[i]``), same dtype as ``table``, C-contiguous; may be read-only.
    exp_avg : ndarray, shape (n_rows, dim)
        First moment, same dtype; updated in place on touched rows.
    exp_avg_sq : ndarray, shape (n_rows, dim) or (n_rows,)
        Second moment. Shape ``(n_rows,)`` selects the **row-wise** second
        moment (one value per row; see Notes).
    step : int
        The 1-based count of the update being applied (torch's global
        ``state['step']`` after its increment). Used for bias correction
        unless ``row_step`` is given (then it may be omitted).
    lr, betas, eps : float
        As ``torch.optim.SparseAdam``. Note where ``eps`` sits (Notes).
    weight_decay : float
        Weight decay applied to touched rows only (off by default).
    decoupled_weight_decay : bool
        False: L2, ``g += wd * p``. True: AdamW-style ``p *= 1 - lr * wd``.
    amsgrad : bool
        Use the running maximum of the second moment, kept in
        ``max_exp_avg_sq`` (same shape as ``exp_avg_sq``).
    max_exp_avg_sq : ndarray, optional
        Required when ``amsgrad``; ignored otherwise.
    maximize : bool
        Ascend instead of descend (the merged gradient is negated).
    row_step : ndarray of int64, shape (n_rows,), optional
        Per-row step counts: each touched row's count is incremented and
        used for that row's bias correction (rows that are rarely touched
        keep a strong correction). Off (None) by default.
    n_threads : int, optional
        Threads; ``None`` resolves at call time. Small batches run serially.

    Raises
    ------
    TypeError
        Wrong types or dtypes (float32/float64 mixed, non-integer indices).
    ValueError
        Bad shapes, non-contiguous or read-only outputs, aliasing buffers,
        hyperparameters out of range.
    IndexError
        An id outside ``[0, n_rows)``; the message names the first bad id
        and its position.

    Every check runs before anything is written: a rejected call leaves
    every buffer bit-identical. An empty batch is a no-op.

    Notes
    -----
    With g the sum of the batch's gradient rows for a touched row (in batch
    order), t = ``step`` (or the row's count with ``row_step``),
    ``bc1 = 1 - b1**t``, ``bc2 = 1 - b2**t``, and ``fl()`` rounding a
    double to the array dtype, per element of the row (no fma)::

        g = -g                                  if maximize
        p = p * fl(1 - lr*wd)                   if decoupled weight decay
        g = g + p * fl(wd)                      if L2 weight decay
        m = m + (g - m) * fl(1 - b1)
        v = v + (g*g - v) * fl(1 - b2)
        u = vmax = max(vmax, v)                 if amsgrad, else u = v
        p = p + fl(-lr*sqrt(bc2)/bc1) * (m / (sqrt(u) + fl(eps)))

    Differences from dense Adam (:func:`fastadam.adam_step`): untouched rows
    keep their moments (no decay while absent, "lazy"); ``eps`` is added to
    ``sqrt(v)`` *before* the bias correction (sparse eps = dense eps x
    sqrt(bc2)), as torch's SparseAdam does; weight decay, if enabled, only
    reaches touched rows.

    Row-wise second moment (``exp_avg_sq`` of shape ``(n_rows,)``, as
    FBGEMM's partial-rowwise Adam): per touched row, ``gm`` = the mean over
    the row of ``g*g`` (summed in double), then ``v = v + (gm - v) * fl(1 -
    b2)`` once for the row, and every element uses ``sqrt(v) + eps``. The
    optimizer state falls from 2x to about 1x the table.

    Examples
    --------
    >>> import numpy as np, fastadam as fa
    >>> table = np.zeros((5, 2), np.float32)
    >>> m = np.zeros_like(table); v = np.zeros_like(table)
    >>> ids = np.array([3, 1, 3])                     # id 3 twice: grads summed
    >>> g = np.ones((3, 2), np.float32)
    >>> fa.sparse_adam_step(table, ids, g, m, v, step=1, lr=0.1)
    >>> np.round(table, 4)
    array([[ 0. ,  0. ],
           [-0.1, -0.1],
           [ 0. ,  0. ],
           [-0.1, -0.1],
           [ 0. ,  0. ]], dtype=float32)
    >>> m[3]                                          # (1 - 0.9) * (1 + 1)
    array([0.2, 0.2], dtype=float32)
    """
    kernel, args = _plan_sparse(table, indices, grad_rows, exp_avg, exp_avg_sq, step, lr,
                                betas, eps, weight_decay, decoupled_weight_decay, amsgrad,
                                max_exp_avg_sq, maximize, row_step, n_threads)
    if kernel is not None:
        _run_sparse(kernel, args)


def _run_sparse(kernel, args):
    """Run one planned sparse kernel call; turn its status into the error."""
    status, pos, _ = kernel(*args)
    if status == 0:
        return
    indices, row_step, n_rows = args[1], args[6], args[0].shape[0]
    if status == 1:
        raise IndexError(f"indices[{pos}] = {int(indices[pos])} is out of range for table "
                         f"with {n_rows} rows (valid ids: 0 <= id < {n_rows})")
    r = int(indices[pos])
    raise ValueError(f"row_step[{r}] = {int(row_step[r])} is negative (row id "
                     f"indices[{pos}]); per-row step counts must be >= 0")


def plan_sparse_adam(table, indices, grad_rows, exp_avg, exp_avg_sq, *, step=None, lr=1e-3,
                     betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                     decoupled_weight_decay=False, amsgrad=False, max_exp_avg_sq=None,
                     maximize=False, row_step=None, n_threads=None):
    """Validate a :func:`sparse_adam_step` call completely -- row ids and per-row
    counts included -- and return its plan (run it with
    :func:`fastadam.functional.run`) without writing anything.

    Optimizers that step several tables (or dense and sparse parameters
    together) plan every call first, so a bad id in a later table leaves
    every earlier one untouched. :func:`sparse_adam_step` itself leaves the
    id check to the kernel's merge (one pass fewer).
    """
    kernel, args = _plan_sparse(table, indices, grad_rows, exp_avg, exp_avg_sq, step, lr,
                                betas, eps, weight_decay, decoupled_weight_decay, amsgrad,
                                max_exp_avg_sq, maximize, row_step, n_threads)
    if kernel is None:
        return []
    ids, n_rows = args[1], args[0].shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= n_rows:
        pos = int(np.flatnonzero((ids < 0) | (ids >= n_rows))[0])
        raise IndexError(f"indices[{pos}] = {int(ids[pos])} is out of range for table "
                         f"with {n_rows} rows (valid ids: 0 <= id < {n_rows})")
    rs = args[6]
    if rs is not None:
        neg = np.flatnonzero(rs[ids] < 0)
        if neg.size:
            pos = int(neg[0])
            r = int(ids[pos])
            raise ValueError(f"row_step[{r}] = {int(rs[r])} is negative (row id "
                             f"indices[{pos}]); per-row step counts must be >= 0")
    return [(_run_sparse, (kernel, args))]


def _plan_sparse(table, indices, grad_rows, exp_avg, exp_avg_sq, step, lr, betas, eps,
                 weight_decay, decoupled_weight_decay, amsgrad, max_exp_avg_sq, maximize,
                 row_step, n_threads):
    """Every check of :func:`sparse_adam_step` but the ids' range; returns
    ``(kernel, args)``, or ``(None, None)`` for an empty batch."""
    fast = -1
    if not amsgrad and row_step is None:
        # one native check of the usual call (elementwise, no extension); any
        # problem is explained by the Python checks
        fast = _runtime.sparse_scan(table, indices, grad_rows, exp_avg, exp_avg_sq)
    if fast >= 0:
        dt = F64 if fast else F32
        n_rows, dim = table.shape
        k = indices.shape[0]
        rowwise = False
        max_exp_avg_sq = None
    else:
        dt, n_rows, dim, indices, k, rowwise, max_exp_avg_sq = _check_arrays(
            table, indices, grad_rows, exp_avg, exp_avg_sq, amsgrad, max_exp_avg_sq, row_step)
    if step is None:
        if row_step is None:
            raise TypeError("sparse_adam_step() needs step= (the 1-based count of the update "
                            "being applied) unless row_step is given")
        nss = 0.0
    else:
        step = check_step(step)
    lr, b1, b2, eps, wd = check_hyper(lr, betas, eps, weight_decay)
    if step is not None:
        nss = sparse_adam_scalars(step, lr, b1, b2)
    nt = _threads.resolve(n_threads, k * dim, _threads.SPARSE_SERIAL_THRESHOLD)
    if k == 0:
        return None, None
    if decoupled_weight_decay:
        decay, l2 = 1.0 - lr * wd, False
    else:
        decay, l2 = 1.0, wd != 0.0
    return _SPARSE[dt], (table, indices, grad_rows, exp_avg, exp_avg_sq, max_exp_avg_sq,
                         row_step, rowwise, l2, nss, -1.0 if maximize else 1.0, decay, wd,
                         1.0 - b1, 1.0 - b2, eps, lr, b1, b2, nt)


class SparseAdam:
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
    exp_avg, exp_avg_sq, max_exp_avg_sq, row_step : ndarray, optional
        Supply the state buffers yourself (e.g. ``np.memmap`` files for
        tables larger than RAM); they are used in place. Otherwise they are
        created, zeroed, on the first step (``np.zeros``: pages are only
        materialised when touched).
    n_threads : int, optional
        Threads per step (``None``: resolve at call time).

    Notes
    -----
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
            ("rowwise", False), ("per_row_step", False))

    def __init__(self, table, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False, *,
                 weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, rowwise=False,
                 per_row_step=False, exp_avg=None, exp_avg_sq=None, max_exp_avg_sq=None,
                 row_step=None, n_threads=None):
        float_array("table", table)
        if table.ndim != 2:
            raise ValueError(f"table must be 2-D (n_rows, dim), got shape {table.shape}")
        check_hyper(lr, betas, eps, weight_decay)
        _threads.resolve(n_threads, 0)
        self.table = table
        self.n_threads = n_threads
        group = {"lr": lr, "betas": tuple(betas), "eps": eps, "maximize": bool(maximize)}
        ext = dict(weight_decay=weight_decay, decoupled_weight_decay=bool(decoupled_weight_decay),
                   amsgrad=bool(amsgrad), rowwise=bool(rowwise), per_row_step=bool(per_row_step))
        group.update(ext)
        self.param_groups = [group]
        self.state = {}
        supplied = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq,
                    "max_exp_avg_sq": max_exp_avg_sq, "row_step": row_step}
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

    def _new_state(self):
        g = self.param_groups[0]
        t = self.table
        st = {"step": 0, "exp_avg": np.zeros(t.shape, t.dtype),
              "exp_avg_sq": np.zeros(self._vshape(), t.dtype)}
        if g["amsgrad"]:
            st["max_exp_avg_sq"] = np.zeros(self._vshape(), t.dtype)
        if g["per_row_step"]:
            st["row_step"] = np.zeros(t.shape[0], np.int64)
        return st

    def _check_state(self, st):
        t = self.table
        dt = t.dtype
        float_array("exp_avg", st["exp_avg"], dt)
        if st["exp_avg"].shape != t.shape:
            raise ValueError(f"exp_avg must have shape {t.shape}, got {st['exp_avg'].shape}")
        for key in ("exp_avg_sq", "max_exp_avg_sq"):
            if key in st:
                float_array(key, st[key], dt)
                if st[key].shape != self._vshape():
                    raise ValueError(f"{key} must have shape {self._vshape()}, got "
                                     f"{st[key].shape}")
        if "row_step" in st:
            _check_row_step(st["row_step"], t.shape[0])

    # -- the step -----------------------------------------------------------
    def step(self, indices, grad_rows):
        """Apply one update for the rows ``indices`` with gradients ``grad_rows``.

        The global step is incremented even when the batch is empty (torch
        does the same). Everything is validated before the state or the
        step counter change.
        """
        g = self.param_groups[0]
        st = self.state if self.state else self._new_state()
        t = st["step"] + 1
        sparse_adam_step(self.table, indices, grad_rows, st["exp_avg"], st["exp_avg_sq"],
                         step=t, lr=g["lr"], betas=g["betas"], eps=g["eps"],
                         weight_decay=g["weight_decay"],
                         decoupled_weight_decay=g["decoupled_weight_decay"],
                         amsgrad=g["amsgrad"], max_exp_avg_sq=st.get("max_exp_avg_sq"),
                         maximize=g["maximize"], row_step=st.get("row_step"),
                         n_threads=self.n_threads)
        st["step"] = t
        self.state = st

    def zero_grad(self):  # numpy grads are owned by the caller
        pass

    # -- checkpoints --------------------------------------------------------
    def state_dict(self):
        """torch's layout; arrays are the live buffers (copy or ``fastadam.save`` them)."""
        g = self.param_groups[0]
        gd = {"lr": g["lr"], "betas": g["betas"], "eps": g["eps"], "maximize": g["maximize"]}
        if any(g[k] != d for k, d in self._EXT):
            gd.update({k: g[k] for k, _ in self._EXT})
        gd["params"] = [0]
        state = {0: dict(self.state)} if self.state else {}
        return {"state": state, "param_groups": [gd]}

    def load_state_dict(self, state_dict):
        """Load from :meth:`state_dict`, :func:`fastadam.load` or a
        ``torch.optim.SparseAdam`` state dict (tensors accepted).

        Hyperparameters and options are taken from the dict (missing
        extension keys mean "off"); arrays are copied into fresh buffers
        unless this optimizer was given its own buffers (then copied into
        them, e.g. into memmaps).
        """
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0].get("params", [0])) != 1:
            raise ValueError("a SparseAdam state dict must have one group with one param")
        sg = groups[0]
        new_group = {"lr": _num(sg["lr"]), "betas": tuple(_num(b) for b in sg["betas"]),
                     "eps": _num(sg["eps"]), "maximize": bool(sg.get("maximize", False))}
        for k, d in self._EXT:
            new_group[k] = type(d)(sg.get(k, d))
        check_hyper(new_group["lr"], new_group["betas"], new_group["eps"],
                    new_group["weight_decay"])
        pid = sg.get("params", [0])[0]
        states = state_dict["state"]
        src = states.get(pid, states.get(str(pid))) if states else None
        old_group, old_state = self.param_groups[0], self.state
        self.param_groups = [new_group]
        if src is None:
            self.state = {}
            return
        try:
            step = int(_num(src.get("step", 0)))
            if step < 0:
                raise ValueError(f"state step must be >= 0, got {step}")
            need = ["exp_avg", "exp_avg_sq"]
            if new_group["amsgrad"]:
                need.append("max_exp_avg_sq")
            if new_group["per_row_step"]:
                need.append("row_step")
            arrays = {}
            for key in need:          # validate everything before copying anything
                if key not in src:
                    raise ValueError(f"state dict lacks '{key}' needed by the options")
                arr = _to_numpy(src[key])
                want_shape = ((self.table.shape[0],) if key == "row_step"
                              else self.table.shape if key == "exp_avg" else self._vshape())
                if arr.shape != want_shape:
                    raise ValueError(f"state '{key}' has shape {arr.shape}, expected "
                                     f"{want_shape}")
                arrays[key] = arr
        except Exception:
            self.param_groups = [old_group]
            raise
        ns = {"step": step}
        for key, arr in arrays.items():
            want_dt = np.dtype(np.int64) if key == "row_step" else self.table.dtype
            dst = old_state.get(key) if old_state else None
            if (dst is not None and dst.shape == arr.shape and dst.dtype == want_dt
                    and dst.flags.writeable and dst.flags.c_contiguous
                    and not np.may_share_memory(dst, arr)):
                np.copyto(dst, arr, casting="unsafe")   # keep user buffers (memmaps)
                ns[key] = dst
            else:
                ns[key] = np.array(arr, dtype=want_dt, order="C", copy=True)
        self.state = ns
