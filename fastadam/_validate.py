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

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
# every dtype some kernel takes, by identity (``dtype is``) and by equality
_DTYPES = {np.dtype(name): np.dtype(name) for name in _interface.DTYPES}
_DTYPE_LIST = " or ".join(_interface.DTYPES)


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
    """The ValueError for a negative per-row count of row ``indices[pos]``."""
    r = int(indices[pos])
    return ValueError(f"row_step[{r}] = {int(row_step[r])} is negative (row id "
                      f"indices[{pos}]); per-row step counts must be >= 0")


def check_step(step, name="step"):
    """Return ``step`` as an int >= 1 (ints, integral floats and 0-d arrays accepted)."""
    if type(step) is int:
        s = step
    else:
        if isinstance(step, (bool, str, bytes)):
            raise TypeError(f"{name} must be an integer >= 1, got {type(step).__name__}")
        try:
            s = operator.index(step)
        except TypeError:
            try:
                f = float(step)
            except (TypeError, ValueError):
                raise TypeError(f"{name} must be an integer >= 1, got "
                                f"{type(step).__name__}") from None
            if not f.is_integer():
                raise ValueError(f"{name} must be an integer >= 1, got {f}") from None
            s = int(f)
    if s < 1:
        raise ValueError(f"{name} must be >= 1 (the 1-based count of the update being "
                         f"applied), got {s}")
    return s


def check_hyper(lr, betas, eps, weight_decay):
    """Validate hyperparameters; return (lr, beta1, beta2, eps, wd) as floats."""
    if isinstance(lr, (str, bytes)):
        raise TypeError(f"lr must be a real number, got {type(lr).__name__}")
    try:
        lr = float(lr)
    except (TypeError, ValueError):
        raise TypeError(f"lr must be a real number, got {type(lr).__name__}") from None
    if not (lr >= 0.0) or math.isinf(lr):
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")
    try:
        b1, b2 = betas
        b1 = float(b1)
        b2 = float(b2)
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair of real numbers, got {betas!r}") from None
    if not (0.0 <= b1 < 1.0):
        raise ValueError(f"betas[0] must be in [0, 1), got {b1}")
    if not (0.0 <= b2 < 1.0):
        raise ValueError(f"betas[1] must be in [0, 1), got {b2}")
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}") from None
    if not (eps >= 0.0) or math.isinf(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    try:
        wd = float(weight_decay)
    except (TypeError, ValueError):
        raise TypeError("weight_decay must be a real number, got "
                        f"{type(weight_decay).__name__}") from None
    if not (wd >= 0.0) or math.isinf(wd):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {wd}")
    return lr, b1, b2, eps, wd


def check_grad_scale(grad_scale):
    """Return (scaled, value). ``None`` means no loss scaling."""
    if grad_scale is None:
        return False, 1.0
    try:
        scale = float(grad_scale)
    except (TypeError, ValueError):
        raise TypeError("grad_scale must be a real number or None, got "
                        f"{type(grad_scale).__name__}") from None
    if not (scale > 0.0) or math.isinf(scale):
        raise ValueError(f"grad_scale must be a finite number > 0, got {scale}")
    return True, scale


def to_scalar(x):
    """A Python number from a number, numpy scalar or 0-d array/tensor."""
    return x.item() if hasattr(x, "item") else x


def check_state_step(value, name="step"):
    """A checkpoint's ``step`` (int, integral float, numpy scalar or 0-d
    tensor) as an int >= 0 (0: state created, never stepped)."""
    v = to_scalar(value)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if v == 0 and not isinstance(v, (bool, str, bytes)):
        return 0
    return check_step(v, name)


def to_numpy(x):
    """An ndarray from an ndarray, a (CPU) torch tensor or any array-like (for
    loading checkpoints; never on a hot path)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # torch tensor
        return x.detach().cpu().numpy()
    return np.asarray(x)
