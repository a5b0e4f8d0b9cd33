"""Design: PyTorch drop-ins (layer 4): ``Adam``, ``AdamW``, ``SparseAdam``.

Laid out like ``torch.optim``: :mod:`fastadam.torch.adam` (``Adam``,
``AdamW``), :mod:`fastadam.torch.adam8bit` (``Adam8bit``, ``AdamW8bit``:
8-bit state, and the bitsandbytes state converters),
:mod:`fastadam.torch.sparse_adam` (``SparseAdam``) and
:mod:`fastadam.torch._views` (zero-copy numpy views, layout helpers, state
creation, parameter checks) and :mod:`fastadam.torch._state`
(:func:`to_torch_state_dict`: numpy-layout state dicts, e.g. from
``fastadam.load``, in torch's layout), :mod:`fastadam.torch._fast` (the
recorded per-group fast step), :mod:`fastadam.torch._stepper` (``step()``:
hooks, profiler range, lock) and :mod:`fastadam.torch._backward`
(:func:`step_in_backward`: the step fused into backward). Contract:
subclasses of ``torch.optim.Optimizer`` with torch's arguments, defaults,
``param_groups`` and state, stepped by fastadam's kernels through the
functional layer; a step plans every native call (validating everything)
before it writes anything.

This is the only package of fastadam that imports torch; ``import fastadam``
does not.
"""
try:
    import torch  # noqa: F401
    from torch.optim.optimizer import Optimizer  # noqa: F401
except ImportError as _e:  # torch is an optional extra
    raise ImportError("fastadam.torch needs PyTorch (an optional extra): "
                      "pip install torch  (or pip install 'fastadam[torch]')") from _e

from ._backward import StepInBackward, step_in_backward
from ._state import resolve_fused, to_torch_state_dict
from .adam import Adam, AdamW
from .adam8bit import Adam8bit, AdamW8bit, from_bitsandbytes_state, to_bitsandbytes_state
from .sparse_adam import SparseAdam

__all__ = ["Adam", "AdamW", "SparseAdam", "to_torch_state_dict", "resolve_fused",
           "step_in_backward", "StepInBackward",
           "Adam8bit", "AdamW8bit", "to_bitsandbytes_state", "from_bitsandbytes_state"]
