"""PyTorch drop-ins (layer 4): ``Adam``, ``AdamW``, ``SparseAdam`` (see :mod:`.adam`)."""
from .adam import Adam, AdamW, SparseAdam

__all__ = ["Adam", "AdamW", "SparseAdam"]
