"""fastadam: the fastest correct Adam-family optimizer step for the CPU.

Layers: Cython kernels (one module per ISA level, chosen at import) <-
``fastadam.functional`` (validation, scalars, dispatch) <- ``fastadam.optim``
(stateful numpy optimizers) and ``fastadam.torch`` (torch.optim drop-ins,
imported lazily). ``fastadam._reference`` is the plain-numpy specification.
"""
from . import functional
from ._config import show_config
from ._dispatch import ISA as isa
from ._threads import get_num_threads, set_num_threads
from ._version import __version__
from .functional import adam_step, adamw_step, grad_norm
from .optim import Adam, AdamW, load, save

try:  # the sparse path (issue 4)
    from .sparse import SparseAdam, sparse_adam_step
except ImportError:  # pragma: no cover - until the sparse path lands
    pass

__all__ = [
    "adam_step", "adamw_step", "grad_norm", "sparse_adam_step", "functional",
    "Adam", "AdamW", "SparseAdam", "save", "load",
    "show_config", "get_num_threads", "set_num_threads", "isa", "__version__",
]
