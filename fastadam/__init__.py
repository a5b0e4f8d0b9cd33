"""fastadam: the fastest correct Adam-family optimizer step for the CPU.

Layers: Cython kernels (one module per ISA level, chosen at import; their
interface declared in ``fastadam._interface``) <- ``fastadam.functional``
(validation, the kernel call built by ``fastadam._plan``, dense and sparse)
<- ``fastadam.optim`` (stateful numpy optimizers) and ``fastadam.torch``
(torch.optim drop-ins, imported lazily). ``fastadam._reference`` is the
plain-numpy specification; ``fastadam.bench`` the benchmark suite.
"""
from . import functional
from ._config import show_config
from ._dispatch import ISA as isa
from ._threads import get_num_threads, set_num_threads
from ._version import __version__
from .checkpoint import load, save
from .functional import adam_step, adamw_step, grad_norm, sparse_adam_step
from .optim import Adam, AdamW, SparseAdam

__all__ = [
    "adam_step", "adamw_step", "grad_norm", "sparse_adam_step", "functional",
    "Adam", "AdamW", "SparseAdam", "save", "load",
    "show_config", "get_num_threads", "set_num_threads", "isa", "__version__",
]
