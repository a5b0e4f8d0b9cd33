"""One registry of the option sets the tests run (like torch's ``optim_db``).

Each entry names a set of keyword arguments for a step; the dense tests,
the sparse tests and the torch parity tests draw theirs from here instead of
keeping tables of their own.
"""
import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Dense:
    """Options of a dense Adam/AdamW step."""

    weight_decay: float = 0.0
    decoupled: bool = False
    amsgrad: bool = False
    maximize: bool = False
    grad_scale: float = None

    @property
    def id(self):
        return (("adamw" if self.decoupled else ("l2" if self.weight_decay else "plain"))
                + ("-ams" if self.amsgrad else "") + ("-max" if self.maximize else "")
                + ("-gs" if self.grad_scale else ""))

    def kwargs(self, lr=1e-2, betas=(0.9, 0.99), eps=1e-6):
        """Keyword arguments of ``fastadam.adam_step`` (and ``_reference.adam``)."""
        return dict(lr=lr, betas=betas, eps=eps, weight_decay=self.weight_decay,
                    decoupled_weight_decay=self.decoupled, amsgrad=self.amsgrad,
                    maximize=self.maximize, grad_scale=self.grad_scale)


# every combination (decoupled only where weight decay makes it matter)
DENSE = [Dense(wd, dec, ams, mx, gs) for wd, dec, ams, mx, gs in
         itertools.product([0.0, 0.05], [False, True], [False, True], [False, True],
                           [None, 128.0]) if not (wd == 0.0 and dec)]
PLAIN = DENSE[0]

# the torch-parity subset (torch's own option names; grad_scale via GradScaler elsewhere)
TORCH = [Dense(), Dense(0.1), Dense(0.1, True), Dense(amsgrad=True), Dense(maximize=True),
         Dense(0.1, False, True, True), Dense(0.1, True, True, True)]
# ... and with loss scaling (torch: the optimizer's GradScaler-style ``grad_scale`` /
# ``found_inf`` tensors, handed to ``torch._fused_adam_``)
TORCH_SCALED = [Dense(grad_scale=1024.0), Dense(0.1, False, True, True, 1024.0),
                Dense(0.1, True, True, True, 1024.0)]


@dataclass(frozen=True)
class Sparse:
    """Options of a sparse step: keyword arguments and the state layout."""

    name: str
    kwargs: dict = field(default_factory=dict, hash=False)
    rowwise: bool = False
    row_step: bool = False

    @property
    def amsgrad(self):
        return bool(self.kwargs.get("amsgrad", False))


SPARSE = {o.name: o for o in [
    Sparse("torch"),
    Sparse("maximize", {"maximize": True}),
    Sparse("l2", {"weight_decay": 0.1}),
    Sparse("decoupled", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    Sparse("amsgrad", {"amsgrad": True}),
    Sparse("rowwise", rowwise=True),
    Sparse("rowwise_ams_l2_max", {"amsgrad": True, "weight_decay": 0.05, "maximize": True},
           rowwise=True),
    Sparse("row_step", row_step=True),
    Sparse("row_step_rowwise_decoupled", {"weight_decay": 0.2, "decoupled_weight_decay": True},
           rowwise=True, row_step=True),
    Sparse("everything", {"amsgrad": True, "weight_decay": 0.01, "maximize": True},
           row_step=True),
]}
