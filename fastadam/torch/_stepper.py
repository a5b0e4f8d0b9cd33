"""Design: ``step()`` entry of the drop-ins: torch's hook and profiler semantics,
without torch's per-call wrapper when nothing needs it, under a per-optimizer lock.

Contract: ``torch.optim.Optimizer.__init__`` wraps a class's ``step`` in
``profile_hook_step`` unless ``step.hooked`` is set; that wrapper opens a
``record_function`` range and walks four hook dicts on every call (~10 us).
:class:`Stepper` marks its ``step`` hooked and does the same work itself
only when it matters: step pre/post hooks registered (on the optimizer or
globally, ``register_optimizer_step_pre_hook``) or the autograd profiler on
(then the ``Optimizer.step#<Class>.step`` range and
``_optimizer_step_code`` as torch). Hooks get ``(optimizer, args, kwargs)``
with ``args`` starting with the optimizer, as torch's; a pre-hook may return
new ``(args, kwargs)``.

Every step runs under the optimizer's ``threading.RLock`` (Python threads
sharing one optimizer serialise: no lost steps); pickling and deepcopy drop
the lock and the copy gets its own. Subclasses implement ``_step(closure)``.
"""
import threading
from itertools import chain
from typing import Any

import torch
from torch.optim import optimizer as _O

__all__ = ["Stepper"]

_profiler_enabled = torch.autograd._profiler_enabled


class Stepper:
    """Mixin (before ``torch.optim.Optimizer`` in the bases): the ``step`` entry."""

    _lock: threading.RLock
    # torch.optim.Optimizer's, found through the MRO
    _optimizer_step_pre_hooks: Any
    _optimizer_step_post_hooks: Any
    _optimizer_step_code: Any

    def _init_lock(self):
        self._lock = threading.RLock()

    def step(self, closure=None):
        """Perform a single optimization step (optionally re-evaluating ``closure``);
        returns the closure's loss, like torch. See the class docstring."""
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _O._global_optimizer_pre_hooks or _O._global_optimizer_post_hooks
                or _profiler_enabled()):
            return self._hooked_step((self,) if closure is None else (self, closure), {})
        with self._lock:
            return self._step(closure)

    step.hooked = True  # type: ignore[attr-defined]  # torch: do not wrap it again

    def _hooked_step(self, args, kwargs):
        """torch's ``profile_hook_step`` wrapper, around the locked ``_step``."""
        with torch.autograd.profiler.record_function(
                f"Optimizer.step#{self.__class__.__name__}.step"):
            for pre_hook in chain(_O._global_optimizer_pre_hooks.values(),
                                  self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(f"{self.step} must return None or a tuple of "
                                           f"(new_args, new_kwargs), but got {result}.")
            with self._lock:
                out = self._step(*args[1:], **kwargs)
            self._optimizer_step_code()
            for post_hook in chain(self._optimizer_step_post_hooks.values(),
                                   _O._global_optimizer_post_hooks.values()):
                post_hook(self, args, kwargs)
            return out

    def _step(self, closure=None):  # pragma: no cover - implemented by the optimizers
        raise NotImplementedError
