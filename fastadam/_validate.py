"""Input validation shared by every layer above the kernels.

Every public call validates ALL of its inputs with these helpers before any
kernel runs, so a rejected call leaves every buffer bit-identical. Messages
name the argument, what was expected and what was given. Which dtypes a
buffer may have comes from the kernel interface (``fastadam._interface``);
which combinations of them have a kernel is asked of ``fastadam._plan``.
"""
import math
import operator

import numpy as np

from . import _interface, _runtime

_INF = math.inf
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
def numpy_dtype(name):
    """The numpy dtype of an ``_interface.DTYPES`` name, or None where numpy
    cannot name it here: ``bfloat16`` is ``ml_dtypes.bfloat16`` (an optional
    dependency: ``pip install fastadam[bf16]``)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            return None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


#: every kernel dtype numpy can name here, by interface name
KERNEL_DTYPES = {name: dt for name in _interface.DTYPES if (dt := numpy_dtype(name)) is not None}
# ... by identity (``dtype is``) and by equality
_DTYPES = {dt: dt for dt in KERNEL_DTYPES.values()}
#: the dtypes the native scans (``_runtime.dense_scan`` / ``scan_lists``)
#: accept; a scan's code holds their indices here (float32 first)
SCAN_DTYPES = tuple(KERNEL_DTYPES.values())
_runtime.set_scan_types(tuple(dt.num for dt in SCAN_DTYPES))

_names = list(KERNEL_DTYPES)
_DTYPE_LIST = ", ".join(_names[:-1]) + " or " + _names[-1]


def describe(a):
    if isinstance(a, np.ndarray):
        return f"ndarray(dtype={a.dtype}, shape={a.shape})"
    return type(a).__name__


def check_buffer(name, a, *, writable=True):
    """Check ``a`` is a C-contiguous ndarray of a kernel dtype; return its dtype.

    ``writable``: outputs must be writable; read-only inputs are accepted.
    Whether the dtypes of a call's buffers go together is the kernel
    table's question (``_plan.Kernels.get``).
    """
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of {_DTYPE_LIST}, got {describe(a)}")
    dt = _DTYPES.get(a.dtype)
    if dt is None or not a.dtype.isnative:
        raise TypeError(f"{name} must have dtype {_DTYPE_LIST} (native byte order), "
                        f"got {a.dtype}")
    flags = a.flags
    if not flags.aligned:
        raise ValueError(f"{name} is not aligned: its data address {a.ctypes.data:#x} is not a "
                         f"multiple of its itemsize {a.itemsize} (e.g. np.frombuffer with an "
                         "odd offset); copy it into a fresh array")
    if not flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got strides {a.strides} "
                         f"for shape {a.shape}")
    if writable and not flags.writeable:
        raise ValueError(f"{name} is read-only; it is updated in place and must be writable")
    return dt


def same_dtype(name, dt, ref_name, ref_dt):
    """The state buffers of a call (exp_avg, exp_avg_sq, max_exp_avg_sq) share one dtype."""
    if dt is not ref_dt:
        raise TypeError(f"{name} has dtype {dt} but {ref_name} has {ref_dt}: the state "
                        "buffers of a parameter share one dtype")


def same_shape(name, a, ref_name, ref):
    if a.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {ref.shape}, got {a.shape}")


def no_overlap(names, arrays, inputs="the gradient"):
    """Raise ValueError if any two of ``arrays`` share memory (None skipped)."""
    hit = _runtime.first_overlap(tuple(arrays))
    if hit is not None:
        i, j = hit
        raise ValueError(f"{names[i]} and {names[j]} share memory; outputs must not alias "
                         f"each other or {inputs}")


def id_out_of_range(indices, pos, n_rows):
    """The IndexError for row id ``indices[pos]`` outside ``[0, n_rows)``."""
    return IndexError(f"indices[{pos}] = {int(indices[pos])} is out of range for table "
                      f"with {n_rows} rows (valid ids: 0 <= id < {n_rows})")


def negative_row_step(indices, pos, row_step):
    """The ValueError for a per-row count of row ``indices[pos]`` that is
    negative or would overflow int64 when incremented."""
    r = int(indices[pos])
    c = int(row_step[r])
    if c >= 0:
        return ValueError(f"row_step[{r}] = {c} (row id indices[{pos}]) cannot be incremented: "
                          "per-row step counts must be >= 0 and < 2**63 - 1")
    return ValueError(f"row_step[{r}] = {c} is negative (row id "
                      f"indices[{pos}]); per-row step counts must be >= 0")


#: The largest step count: counts are int64 in the kernels (``row_step``) and
#: in checkpoints; ``beta ** step`` is computed in double.
MAX_STEP = 2**63 - 1


def _not_a_number(x):
    """Whether ``x`` is a bool or a string (numpy's included), which ``float()``
    would accept but which are never meant as a number."""
    if isinstance(x, (bool, np.bool_, str, bytes)):
        return True
    kind = getattr(getattr(x, "dtype", None), "kind", None)
    return kind in ("b", "U", "S")


def real(x, name, what="a real number"):
    """``x`` as a float: a number, numpy scalar or 0-d array; bools and strings
    raise TypeError, numbers too large for a double ValueError (both name ``name``)."""
    if type(x) is float:
        return x
    if _not_a_number(x):
        raise TypeError(f"{name} must be {what}, got {type(x).__name__} {x!r:.40}")
    try:
        return float(x)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got {x!r:.40} (too large for "
                         "a double)") from None
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {what}, got {type(x).__name__}") from None


def check_step(step, name="step"):
    """Return ``step`` as an int in ``[1, MAX_STEP]`` (ints, integral floats and 0-d
    arrays accepted; bools and strings rejected)."""
    if type(step) is int:
        s = step
    else:
        if _not_a_number(step):
            raise TypeError(f"{name} must be an integer >= 1, got {type(step).__name__}")
        try:
            s = operator.index(step)
        except TypeError:
            f = real(step, name, "an integer >= 1")
            if not f.is_integer():
                raise ValueError(f"{name} must be an integer >= 1, got {f}") from None
            s = int(f)
    if s < 1:
        raise ValueError(f"{name} must be >= 1 (the 1-based count of the update being "
                         f"applied), got {s}")
    if s > MAX_STEP:
        raise ValueError(f"{name} must be <= 2**63 - 1, got {s!r:.40}")
    return s


def _nonneg(x, name):
    v = real(x, name)
    if not (v >= 0.0) or math.isinf(v):
        raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    return v


def check_betas(betas):
    """``betas`` as two floats in [0, 1)."""
    if isinstance(betas, (str, bytes)) or _not_a_number(betas):
        raise TypeError(f"betas must be a pair of real numbers, got {betas!r:.40}")
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair of real numbers, got {betas!r:.40}") from None
    b1 = real(b1, "betas[0]")
    b2 = real(b2, "betas[1]")
    if not (0.0 <= b1 < 1.0):
        raise ValueError(f"betas[0] must be in [0, 1), got {b1}")
    if not (0.0 <= b2 < 1.0):
        raise ValueError(f"betas[1] must be in [0, 1), got {b2}")
    return b1, b2


def check_hyper(lr, betas, eps, weight_decay):
    """Validate hyperparameters; return (lr, beta1, beta2, eps, wd) as floats.

    Every value must be a real number (bools and strings are TypeErrors),
    finite, and in range; messages name the argument."""
    # fast path: plain Python floats (and ints for weight_decay) in range
    # (bools are not: ``type(True) is bool``; NaN fails every comparison)
    if type(lr) is float and type(eps) is float and type(betas) is tuple and len(betas) == 2:
        b1, b2 = betas
        wt = type(weight_decay)
        if (type(b1) is float and type(b2) is float and (wt is float or wt is int)
                and 0.0 <= lr < _INF and 0.0 <= eps < _INF and 0.0 <= weight_decay < _INF
                and 0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            return lr, b1, b2, eps, float(weight_decay)
    lr = _nonneg(lr, "lr")
    b1, b2 = check_betas(betas)
    eps = _nonneg(eps, "eps")
    wd = _nonneg(weight_decay, "weight_decay")
    return lr, b1, b2, eps, wd


def check_bool(x, name):
    """A boolean option: ``bool`` or ``numpy.bool_`` (not a string, not 0/1)."""
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r:.40}")


def check_grad_scale(grad_scale, dtype=None):
    """Return (scaled, value). ``None`` means no loss scaling.

    ``grad_scale`` must be a finite real > 0; with ``dtype`` (the param
    dtype of a kernel call) it must stay so once rounded to the call's
    compute dtype, and so must its reciprocal -- otherwise the division
    would turn every gradient into 0, inf or NaN (float32: about
    ``[2.9e-39, 3.4e38]``).
    """
    if grad_scale is None:
        return False, 1.0
    scale = real(grad_scale, "grad_scale", "a real number or None")
    if not (scale > 0.0) or math.isinf(scale):
        raise ValueError(f"grad_scale must be a finite number > 0, got {scale}")
    if dtype is not None:
        ct = np.dtype(_interface.compute_dtype(np.dtype(dtype).name)).type
        with np.errstate(all="ignore"):
            r = ct(scale)
            inv = ct(1) / r
        if not (np.isfinite(r) and r > 0 and np.isfinite(inv) and inv > 0):
            fi = np.finfo(ct)
            raise ValueError(f"grad_scale = {scale} is out of range for {np.dtype(ct)} "
                             f"arithmetic: it and 1/grad_scale must be finite and > 0 "
                             f"there (about {1 / float(fi.max):.3g} to {float(fi.max):.3g})")
    return True, scale


def to_scalar(x):
    """A Python number from a number, numpy scalar or 0-d array/tensor."""
    return x.item() if hasattr(x, "item") else x


def check_state_keys(name, st, keys, what):
    """A checkpoint entry ``st`` of ``name`` holds ``step`` and exactly ``keys``
    (``what``: the layout's name in the messages), else ValueError."""
    unknown = [k for k in st if k != "step" and k not in keys]
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown} ({what}: step, "
                         f"{', '.join(keys)})")
    missing = [k for k in ("step",) + tuple(keys) if k not in st]
    if missing:
        raise ValueError(f"{name} lacks {missing} ({what})")


def check_state_step(value, name="step"):
    """A checkpoint's ``step`` (int, integral float, numpy scalar or 0-d
    tensor) as an int in ``[0, MAX_STEP]`` (0: state created, never stepped)."""
    v = to_scalar(value)
    if _not_a_number(v):
        raise TypeError(f"{name} must be an integer >= 0, got {type(v).__name__}")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if type(v) is int and v == 0:
        return 0
    try:
        return check_step(v, name)
    except ValueError as e:
        raise ValueError(str(e).replace(">= 1 (the 1-based count of the update being "
                                        "applied)", ">= 0")) from None


def to_numpy(x):
    """An ndarray from an ndarray, a (CPU) torch tensor or any array-like (for
    loading checkpoints; never on a hot path)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # torch tensor
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":      # no numpy dtype: the bits, as ml_dtypes'
            import torch
            bf16 = numpy_dtype("bfloat16")
            if bf16 is None:
                raise TypeError("a bfloat16 tensor needs the ml_dtypes package to become "
                                "a numpy array (pip install ml_dtypes)")
            return t.contiguous().view(torch.int16).numpy().view(bf16)
        return t.numpy()
    return np.asarray(x)
