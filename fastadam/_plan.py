"""Design: the one builder of kernel calls (layer 2's half of the kernel interface).

Every caller -- the single-array, multi-array and sparse functional entries,
the numpy optimizers and the torch drop-ins -- gets its kernel and the
kernel's ``args``/``flags`` here, built from the tables of
``fastadam._interface``; nothing else knows the order of the scalars or the
kernels' names.

* :class:`Kernels` -- the kernels of one ISA module by ``(op, param dtype,
  grad dtype, state dtype)``: one dict lookup, or a TypeError that names the
  buffer whose dtype has no kernel and lists the combinations there are.
* :func:`hyper_args` -- ``(args, flags)`` of a call: the per-call scalars in
  double, filled by name (the step-dependent ones last, see
  ``_interface.STEP_SCALARS``); :func:`with_step` appends those.
* :func:`dense_step_scalars`, :func:`sparse_neg_step_size` -- the
  step-dependent scalars, computed in double exactly as torch does.
* :data:`VECTOR_BYTES` -- the width of torch's fused-Adam vector loop, chosen
  once at import (:func:`torch_vector_bytes`) and passed to every dense call
  as the scalar ``vec_bytes``: the last ``n % (vec_bytes / itemsize)``
  elements of each array take torch's scalar-tail arithmetic. A per-call
  value, not a property of the ISA module, so every module and every thread
  count gives the same bits.

Inputs are validated before they get here (``fastadam._validate``).
"""
import math
import os
import platform
from typing import Any

import numpy as np

from . import _dispatch
from . import _interface as I
from ._validate import KERNEL_DTYPES, SCAN_DTYPES, numpy_dtype  # noqa: F401  (re-exported)

__all__ = ["Kernels", "KERNELS", "hyper_args", "with_step", "dense_step_scalars",
           "sparse_neg_step_size", "state_dtype", "torch_vector_bytes", "VECTOR_BYTES",
           "numpy_dtype", "DTYPES", "STATE_DTYPE_NAMES", "sr_key", "array_seed",
           "Q8", "state_format"]

VECTOR_BYTES_ENV = "FASTADAM_TORCH_VECTOR_BYTES"
_VECTOR_BYTES_ALLOWED = (16, 32, 64)


def torch_vector_bytes(env=None, machine=None):
    """``(bytes, reason)``: the width of torch's fused-Adam vector loop here.

    torch (``aten/src/ATen/native/cpu/FusedAdamKernel.cpp``) steps each
    tensor ``Vectorized<scalar_t>::size()`` elements at a time and the last
    ``numel % size()`` elements in a scalar loop with other arithmetic. Its
    CPU dispatch registers that kernel with ``REGISTER_DISPATCH``, which
    leaves the AVX-512 slot empty (``DispatchStub.h``), so AVX-512 CPUs run
    the AVX2 build: 32 bytes (8 float32, 4 float64) on every x86-64 CPU, as
    measured with torch 2.13. aarch64 NEON builds use 16 bytes (not
    measured). ``FASTADAM_TORCH_VECTOR_BYTES=16|32|64`` overrides the choice
    (e.g. for a torch that registers an AVX-512 fused Adam: 64).
    """
    env = os.environ.get(VECTOR_BYTES_ENV, "") if env is None else env
    if env.strip():
        try:
            value = int(env)
        except ValueError:
            value = None
        if value not in _VECTOR_BYTES_ALLOWED:
            raise ValueError(f"{VECTOR_BYTES_ENV}={env!r}: must be one of "
                             f"{', '.join(map(str, _VECTOR_BYTES_ALLOWED))}")
        return value, f"forced by {VECTOR_BYTES_ENV}"
    machine = (platform.machine() if machine is None else machine).lower()
    if machine in ("aarch64", "arm64"):
        return 16, "torch's NEON Vectorized width on aarch64 (not measured)"
    return 32, ("torch's AVX2 Vectorized width (x86-64: AVX-512 CPUs run torch's AVX2 "
                "fused Adam too)")


# Read once at import; the kernels get it per call (args' ``vec_bytes``).
VECTOR_BYTES, VECTOR_BYTES_REASON = torch_vector_bytes()

# every kernel dtype numpy can name here, by interface name
# the kernels' dtypes by interface name, and the 8-bit state's uint8 codes
DTYPES = dict(KERNEL_DTYPES, uint8=np.dtype(np.uint8))

_CACHED = I.SCALAR_NAMES[:-len(I.STEP_SCALARS)]
_L2 = I.FLAG_BITS["l2"]
_SCALED = I.FLAG_BITS["scaled"]
_ROWWISE = I.FLAG_BITS["rowwise"]
# (op, param, grad, state) np.dtype -> compiled name
# (op, param, grad, state) np.dtype -> compiled name (the copy ops: + param_copy dtype);
# combinations with a dtype numpy cannot name here are left out
_NAMES = {(key[0],) + tuple(DTYPES[d] for d in key[1:]): name
          for key, name in I.KERNELS.items() if all(d in DTYPES for d in key[1:])}


def _combos(op):
    return sorted({k[1:4] for k in I.KERNELS if k[0] == op and all(d in DTYPES for d in k[1:])})


class Kernels:
    """The kernels of one compiled ISA module, selected by dtype combination."""

    def __init__(self, module):
        self.module = module
        self._by_key = {key: getattr(module, name) for key, name in _NAMES.items()}
        self._norm = {np.dtype(d): getattr(module, name) for d, name in I.NORM_KERNELS.items()}
        # every combination of scan dtypes with a kernel, by (op, code of
        # ``_runtime.dense_scan``): the fast path's lookup
        idx = {dt: i for i, dt in enumerate(SCAN_DTYPES)}
        self._scanned = {(key[0], idx[key[1]] + 8 * idx[key[2]] + 64 * idx[key[3]]): fn
                         for key, fn in self._by_key.items()
                         if len(key) == 4 and all(d in idx for d in key[1:])}
        # ops with a kernel for every one-dtype combination of scan dtypes
        # (what ``_runtime.scan_lists`` accepts)
        self._homogeneous = frozenset(
            op for op in {k[0] for k in self._by_key}
            if all((op, dt, dt, dt) in self._by_key for dt in SCAN_DTYPES))

    def get(self, op, param, grad, state, names=("param", "grad", "exp_avg"), copy=None):
        """The kernel of ``op`` for these dtypes (``np.dtype``), or a TypeError.

        ``names``: what the message calls the param, grad and state buffers;
        ``copy``: the param_copy dtype (the copy ops, ``names[3]`` its name).
        """
        key = (op, param, grad, state) if copy is None else (op, param, grad, state, copy)
        fn = self._by_key.get(key)
        if fn is not None:
            return fn
        if copy is not None:
            copies = sorted({k[1:] for k in I.KERNELS if k[0] == op})
            raise TypeError(f"{names[3]}: no kernel writes a {copy} param_copy for "
                            f"{names[0]} {param}, {names[1]} {grad}, {names[2]} {state}; "
                            "supported (param, grad, state, param_copy): "
                            + ", ".join("(" + ", ".join(c) + ")" for c in copies))
        combos = _combos(op)
        have = ", ".join("(" + ", ".join(c) + ")" for c in combos)
        if not any(p == param.name for p, _, _ in combos):
            culprit = names[0]
        elif not any(p == param.name and g == grad.name for p, g, _ in combos):
            culprit = names[1]
        else:
            culprit = names[2]
        raise TypeError(f"{culprit}: no kernel for the mixed combination {names[0]} {param}, "
                        f"{names[1]} {grad}, {names[2]} {state}; supported (param, grad, "
                        f"state): {have}")

    def has(self, op, param, grad, state):
        """Whether ``op`` has a kernel for these dtypes."""
        return (op, param, grad, state) in self._by_key

    def homogeneous(self, op):
        """Whether ``op`` has a kernel for every scan dtype used throughout
        (param, grad and state of one dtype)."""
        return op in self._homogeneous

    def scanned(self, op, code):
        """The kernel of ``op`` for a native scan's result ``code`` (the
        indices of the param, grad and state dtypes in ``SCAN_DTYPES``:
        ``ip + 8 * ig + 64 * is``), or None where there is none."""
        return self._scanned.get((op, code))

    def norm(self, grad):
        """The sum-of-squares kernel for gradients of dtype ``grad``."""
        return self._norm[grad]


KERNELS = Kernels(_dispatch.kernels)

_cache: dict[tuple[Any, ...], tuple[tuple[float, ...], int]] = {}


def hyper_args(lr, beta1, beta2, eps, weight_decay, decoupled, maximize, grad_scale,
               rowwise=False):
    """``(args, flags)`` of a call, without the step-dependent scalars.

    All values are validated floats (``grad_scale`` None: no loss scaling).
    Cached: an optimizer's param group builds its tuple once, not per step.
    """
    vec_bytes = VECTOR_BYTES
    key = (lr, beta1, beta2, eps, weight_decay, decoupled, maximize, grad_scale, rowwise,
           vec_bytes)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    if decoupled:
        decay, l2 = 1.0 - lr * weight_decay, False
    else:
        decay, l2 = 1.0, weight_decay != 0.0
    values = dict(sign=-1.0 if maximize else 1.0,
                  grad_scale=1.0 if grad_scale is None else grad_scale,
                  decay=decay, weight_decay=weight_decay, c1=1.0 - beta1, c2=1.0 - beta2,
                  beta1=beta1, beta2=beta2, eps=eps, lr=lr, vec_bytes=vec_bytes)
    args = tuple(float(values.pop(name)) for name in _CACHED)
    assert not values, values
    flags = ((_L2 if l2 else 0) | (_SCALED if grad_scale is not None else 0)
             | (_ROWWISE if rowwise else 0))
    if len(_cache) > 1024:
        _cache.clear()
    _cache[key] = hit = (args, flags)
    return hit


def with_step(args, neg_step_size, bc2_sqrt=1.0):
    """``args`` of :func:`hyper_args` completed with the step-dependent scalars."""
    return args + (neg_step_size, bc2_sqrt)


def dense_step_scalars(step, lr, beta1, beta2):
    """Dense Adam's step-dependent scalars in double: ``(-lr / bc1, sqrt(bc2))``
    with ``bc1 = 1 - beta1**step``, ``bc2 = 1 - beta2**step`` (torch's fused Adam)."""
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    return -(lr / bc1), math.sqrt(bc2)


def sparse_neg_step_size(step, lr, beta1, beta2):
    """Sparse Adam's ``-lr * sqrt(1 - beta2**step) / (1 - beta1**step)`` in double
    (torch ``SparseAdam``)."""
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    return -(lr * math.sqrt(bc2) / bc1)


#: ``state_dtype="q8"``: 8-bit blockwise state (``fastadam._quant``) for arrays of
#: ``_interface.Q8_MIN_SIZE`` elements or more
Q8 = "q8"


#: Names ``state_dtype=`` accepts besides numpy dtypes, dtype names and types
#: (a new state format is one entry here plus its kernels).
STATE_DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
                     "half": "float16", "float16": "float16", "fp32": "float32",
                     "float": "float32", "float32": "float32", "fp64": "float64",
                     "double": "float64", "float64": "float64"}


def state_dtype_name(value):
    """The interface name of a ``state_dtype=`` value (a name of
    :data:`STATE_DTYPE_NAMES`, a numpy dtype or type, ``ml_dtypes.bfloat16``,
    a ``torch.dtype``), or a TypeError naming the argument."""
    if isinstance(value, str):
        if value.lower() == Q8:        # 8-bit blockwise state: its own kernels
            return Q8
        name = STATE_DTYPE_NAMES.get(value.lower())
        if name is None:
            raise TypeError(f"state_dtype {value!r} is not a known name (known: "
                            f"{', '.join(sorted([*STATE_DTYPE_NAMES, Q8]))})")
        return name
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return state_dtype_name(str(value).replace("torch.", ""))
    try:
        dt = np.dtype(value)
    except TypeError:
        raise TypeError(f"state_dtype must be a dtype or one of "
                        f"{', '.join(sorted(STATE_DTYPE_NAMES))}, got {value!r:.40}") from None
    for name, known in DTYPES.items():
        if dt == known:
            return name
    raise TypeError(f"state_dtype {dt} has no kernels (state dtypes: "
                    f"{', '.join(sorted(set(STATE_DTYPE_NAMES.values())))})")


def state_dtype(param_dtype, state_dtype=None, op="adam"):
    """The dtype of the optimizer state for parameters of ``param_dtype``:
    ``state_dtype`` if given -- a dtype-like or a name (``"bf16"``,
    ``"float32"``, ...: :data:`STATE_DTYPE_NAMES`), and a kernel must exist
    for it -- else the param's; ``"q8"`` (:data:`Q8`, 8-bit blockwise state) if
    that is asked for and compiled for the param's dtype. The one place a state
    dtype is chosen."""
    pdt = np.dtype(param_dtype)
    if state_dtype is None:
        return pdt
    name = state_dtype_name(state_dtype)
    if name is Q8:
        if (op + "_q8", pdt, pdt, np.dtype(np.uint8)) not in _NAMES:
            q8_have = sorted({k[1] for k in I.KERNELS if k[0] == op + "_q8"})
            raise TypeError(f"state_dtype 'q8' is not supported for {pdt} parameters "
                            f"(8-bit state is compiled for: {', '.join(q8_have) or 'none'})")
        return Q8
    if name not in DTYPES:
        raise TypeError(f"state_dtype {name} needs the ml_dtypes package "
                        "(pip install ml_dtypes, or fastadam[bf16])")
    sdt = DTYPES[name]
    if not any(k[0] == op and k[1] == pdt and k[3] == sdt for k in _NAMES):
        have = ", ".join(sorted({k[3] for k in I.KERNELS if k[0] == op and k[1] == pdt.name}))
        raise TypeError(f"state_dtype {name} is not supported for {pdt} parameters "
                        f"(supported: {have or 'none'})")
    return sdt


_M64 = (1 << 64) - 1


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def sr_key(seed, step):
    """The 64-bit stochastic-rounding key of one array at one step (an int):
    splitmix64 of the seed, mixed with the step. The kernels hash it with each
    element's index (``_sr_hash`` in the kernel template)."""
    return _splitmix64(_splitmix64(seed & _M64) ^ (step & _M64))


def array_seed(seed, index):
    """The seed of entry ``index`` of an optimizer seeded with ``seed``: each
    parameter gets its own stream of rounding bits."""
    return _splitmix64((seed & _M64) ^ _splitmix64(index & _M64))


def state_format(param_dtype, size, state_dtype_=None, op="adam"):
    """The state one parameter of ``size`` elements gets: :data:`Q8` for
    ``state_dtype_="q8"`` and ``size >= _interface.Q8_MIN_SIZE`` (smaller arrays
    keep the param dtype's state, as bitsandbytes does), else
    :func:`state_dtype`'s dtype. The one place the optimizers decide it."""
    fmt = state_dtype(param_dtype, state_dtype_, op)
    if fmt is Q8 and size < I.Q8_MIN_SIZE:
        return np.dtype(param_dtype)
    return fmt
