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

__all__ = ["Kernels", "KERNELS", "hyper_args", "with_step", "dense_step_scalars",
           "sparse_neg_step_size", "state_dtype", "torch_vector_bytes", "VECTOR_BYTES",
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

_CACHED = I.SCALAR_NAMES[:-len(I.STEP_SCALARS)]
_L2 = I.FLAG_BITS["l2"]
_SCALED = I.FLAG_BITS["scaled"]
_ROWWISE = I.FLAG_BITS["rowwise"]
# (op, param, grad, state) np.dtype -> compiled name
_NAMES = {(op, np.dtype(p), np.dtype(g), np.dtype(s)): name
          for (op, p, g, s), name in I.KERNELS.items()}


def _combos(op):
    return sorted({(p, g, s) for (o, p, g, s) in I.KERNELS if o == op})


class Kernels:
    """The kernels of one compiled ISA module, selected by dtype combination."""

    def __init__(self, module):
        self.module = module
        self._by_key = {key: getattr(module, name) for key, name in _NAMES.items()}
        self._norm = {np.dtype(d): getattr(module, name) for d, name in I.NORM_KERNELS.items()}
        # the homogeneous float32 (0) / float64 (1) combinations the native
        # scans recognise, by (op, code): the fast path's lookup
        homogeneous: tuple[np.dtype, np.dtype] = (np.dtype("float32"), np.dtype("float64"))
        self._scanned = {(op, code): self._by_key[(op, dt, dt, dt)]
                         for op in I.OPS for code, dt in enumerate(homogeneous)
                         if (op, dt, dt, dt) in self._by_key}

    def get(self, op, param, grad, state, names=("param", "grad", "exp_avg")):
        """The kernel of ``op`` for these dtypes (``np.dtype``), or a TypeError.

        ``names``: what the message calls the param, grad and state buffers.
        """
        fn = self._by_key.get((op, param, grad, state))
        if fn is not None:
            return fn
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

    def scanned(self, op, code):
        """The kernel of ``op`` for a native scan's result ``code`` (0: all
        float32, 1: all float64)."""
        return self._scanned[(op, code)]

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


def state_dtype(param_dtype, state_dtype=None, op="adam"):
    """The dtype of the optimizer state for parameters of ``param_dtype``:
    ``state_dtype`` if given (a kernel must exist for it), else the param's;
    ``"q8"`` (:data:`Q8`) if that is asked for and compiled for the param's dtype."""
    pdt = np.dtype(param_dtype)
    if state_dtype is None:
        return pdt
    if isinstance(state_dtype, str) and state_dtype == Q8:
        if (op + "_q8", pdt, pdt, np.dtype(np.uint8)) not in _NAMES:
            q8_have = sorted({p for (o, p, _, _) in I.KERNELS if o == op + "_q8"})
            raise TypeError(f"state_dtype 'q8' is not supported for {pdt} parameters "
                            f"(8-bit state is compiled for: {', '.join(q8_have) or 'none'})")
        return Q8
    sdt = np.dtype(state_dtype)
    if not any(k[0] == op and k[1] == pdt and k[3] == sdt for k in _NAMES):
        have = ", ".join(sorted({s for (o, p, _, s) in I.KERNELS if o == op and p == pdt.name}))
        raise TypeError(f"state_dtype {sdt} is not supported for {pdt} parameters "
                        f"(supported: {have or 'none'})")
    return sdt


def state_format(param_dtype, size, state_dtype_=None, op="adam"):
    """The state one parameter of ``size`` elements gets: :data:`Q8` for
    ``state_dtype_="q8"`` and ``size >= _interface.Q8_MIN_SIZE`` (smaller arrays
    keep the param dtype's state, as bitsandbytes does), else
    :func:`state_dtype`'s dtype. The one place the optimizers decide it."""
    fmt = state_dtype(param_dtype, state_dtype_, op)
    if fmt is Q8 and size < I.Q8_MIN_SIZE:
        return np.dtype(param_dtype)
    return fmt
