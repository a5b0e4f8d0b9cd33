"""Design: the optimizer step fused into backward (layer 4, ``fastadam.torch``).

Contract: :func:`step_in_backward` follows torch's recipe ("How to save
memory by fusing the optimizer step into the backward pass"): one optimizer
per parameter, stepped by a ``register_post_accumulate_grad_hook`` as soon as
that parameter's gradient is complete, which then frees the gradient
(``p.grad = None``). So at most one large gradient (plus autograd's in-flight
ones) is alive at a time instead of all of them, and the step reads the
gradient while it is still in cache. Parameters under ``defer_below``
elements (biases, norms) are stepped together when ``backward()`` ends
(``queue_callback``; found by autograd's graph-task id, so a backward that
raised leaves them unstepped and the next one starts afresh): their
gradients are small, and between autograd's kernels each step would pay
its Python glue with cold caches. Each per-parameter optimizer takes the
recorded fast step (:mod:`fastadam.torch._fast`), so the result is bit for
bit the usual backward-then-``step()`` loop's for the same options.

What cannot carry over, by construction: anything that needs every gradient
before the first step -- global-norm clipping (``clip_grad_norm_`` over all
parameters), ``GradScaler`` (its inf check spans all gradients), gradient
accumulation over several backward passes. ``max_grad_norm`` offers
per-parameter clipping instead (each gradient clipped to that norm alone).
Checkpoints are in the ordinary optimizer's layout (:meth:`StepInBackward.state_dict`),
and load either way.
"""
from typing import Any, Optional

import torch

from .adam import AdamW

__all__ = ["step_in_backward", "StepInBackward", "DEFER_BELOW"]

#: parameters with fewer elements are stepped at the end of ``backward()``, together
DEFER_BELOW = 65536


def _graph_task_id():
    """Autograd's id of the running ``backward()`` (torch.utils.checkpoint uses it)."""
    return torch._C._current_graph_task_id()


def _groups(model_or_params):
    if isinstance(model_or_params, torch.nn.Module):
        model_or_params = model_or_params.parameters()
    if isinstance(model_or_params, torch.Tensor):
        raise TypeError("step_in_backward: params must be a module or an iterable of "
                        "tensors or param-group dicts, got a tensor")
    items = list(model_or_params)
    if not items:
        raise ValueError("step_in_backward: got no parameters")
    if all(isinstance(g, dict) for g in items):
        return [dict(g, params=list(g["params"])) for g in items]
    if any(isinstance(g, dict) for g in items):
        raise TypeError("step_in_backward: mix of tensors and param-group dicts")
    return [{"params": items}]


class StepInBackward:
    """Steps each parameter inside ``backward()``; made by :func:`step_in_backward`.

    Attributes
    ----------
    optimizers : dict
        parameter -> its one-parameter optimizer (torch's recipe's
        ``optimizer_dict``).
    param_groups : list of dict
        The per-parameter optimizers' param groups (one per parameter, the
        same dict objects): set ``lr`` there, or use :meth:`lr_scheduler`.
    """

    def __init__(self, model_or_params, optimizer_class=AdamW, *,
                 max_grad_norm: Optional[float] = None, defer_below: int = DEFER_BELOW,
                 **kwargs: Any):
        self._groups = _groups(model_or_params)
        if max_grad_norm is not None and not (float(max_grad_norm) > 0.0):
            raise ValueError(f"step_in_backward: max_grad_norm must be > 0 or None, got "
                             f"{max_grad_norm!r}")
        if type(defer_below) is not int or defer_below < 0:
            raise ValueError(f"step_in_backward: defer_below must be an int >= 0, got "
                             f"{defer_below!r}")
        self.max_grad_norm = max_grad_norm
        self.defer_below = defer_below
        self._pending: list[torch.Tensor] = []
        self._task: Optional[int] = None
        self.optimizer_class = optimizer_class
        self.kwargs = kwargs
        self.optimizers: dict[torch.Tensor, Any] = {}
        self._handles = []
        seen = set()
        for g in self._groups:
            opts = {k: v for k, v in g.items() if k != "params"}
            for p in g["params"]:
                if id(p) in seen:
                    continue     # listed twice: stepped once (torch warns for optimizers)
                seen.add(id(p))
                if not p.requires_grad:
                    continue
                self.optimizers[p] = optimizer_class([dict(opts, params=[p])], **kwargs)
        # The ordinary optimizer over the same groups: the checkpoint layout.
        self._ordinary = optimizer_class(
            [dict(g, params=[p for p in g["params"] if p in self.optimizers])
             for g in self._groups], **kwargs)
        for p in self.optimizers:
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    @property
    def param_groups(self):
        return [o.param_groups[0] for o in self.optimizers.values()]

    def _hook(self, p):
        if p.numel() < self.defer_below:
            # small: stepped with the other small ones once backward ends (its
            # gradient's memory is small; stepping it here costs the glue with
            # caches cold from autograd's kernels, ~0.1-0.2 ms)
            task = _graph_task_id()
            if task != self._task:       # the first deferred one of this backward()
                self._task = task
                self._pending = []       # left by a backward() that raised: not stepped
                torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            self._pending.append(p)
            return
        self._step_one(p)

    def _step_one(self, p):
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        self.optimizers[p].step()
        p.grad = None                  # free the gradient now

    def _flush(self):
        """End of backward: step the deferred small parameters, in hook order."""
        pending, self._pending, self._task = self._pending, [], None
        for p in pending:
            if p.grad is not None:
                self._step_one(p)

    def remove(self):
        """Remove the hooks: ``backward()`` only accumulates gradients again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def zero_grad(self, set_to_none: bool = True):
        """Gradients are freed by each step; this clears any left by a backward
        run while the hooks were removed."""
        for p in self.optimizers:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def _sync_ordinary(self):
        """Point the ordinary optimizer at the per-parameter state and hyperparameters
        (those of each group's first parameter)."""
        o = self._ordinary
        for og in o.param_groups:
            if og["params"]:
                src = self.optimizers[og["params"][0]].param_groups[0]
                og.update({k: v for k, v in src.items() if k != "params"})
        o.state.clear()
        for p, opt in self.optimizers.items():
            if p in opt.state:
                o.state[p] = opt.state[p]

    def state_dict(self):
        """The state dict of ``optimizer_class(params, **kwargs)`` (the ordinary
        optimizer over the same param groups), sharing the state tensors:
        ``torch.save`` it and load it into either."""
        self._sync_ordinary()
        return self._ordinary.state_dict()

    def load_state_dict(self, state_dict):
        """Load a state dict of the ordinary optimizer (or of :meth:`state_dict`)."""
        self._sync_ordinary()
        self._ordinary.load_state_dict(state_dict)
        o = self._ordinary
        for og in o.param_groups:
            hyper = {k: v for k, v in og.items() if k != "params"}
            for p in og["params"]:
                opt = self.optimizers[p]
                opt.param_groups[0].update(hyper)
                opt.state.clear()
                if p in o.state:
                    opt.state[p] = o.state[p]
                opt._fa_fast = {}

    def lr_scheduler(self, scheduler_class, *args, **kwargs):
        """One ``scheduler_class(opt, *args, **kwargs)`` per per-parameter optimizer,
        stepped together: returns an object with ``step()``, ``get_last_lr()``,
        ``state_dict()`` and ``load_state_dict()``."""
        return _Schedulers([scheduler_class(o, *args, **kwargs)
                            for o in self.optimizers.values()])


class _Schedulers:
    """Several schedulers stepped as one (see :meth:`StepInBackward.lr_scheduler`)."""

    def __init__(self, schedulers):
        self.schedulers = schedulers

    def step(self):
        for s in self.schedulers:
            s.step()

    def get_last_lr(self):
        return [lr for s in self.schedulers for lr in s.get_last_lr()]

    def state_dict(self):
        return [s.state_dict() for s in self.schedulers]

    def load_state_dict(self, states):
        for s, st in zip(self.schedulers, states):
            s.load_state_dict(st)


def step_in_backward(model_or_params, optimizer_class=AdamW, *,
                     max_grad_norm: Optional[float] = None, defer_below: int = DEFER_BELOW,
                     **kwargs: Any) -> StepInBackward:
    """Step every parameter inside ``backward()``, as soon as its gradient is accumulated.

    Parameters
    ----------
    model_or_params : torch.nn.Module, iterable of tensors, or list of param-group dicts
        What to optimize (parameters with ``requires_grad=False`` are left out).
    optimizer_class : type
        A ``fastadam.torch`` optimizer class (default :class:`fastadam.torch.AdamW`);
        one instance per parameter, built with ``**kwargs`` and the group's options.
    max_grad_norm : float, optional
        Clip each parameter's gradient to this 2-norm on its own before its step
        (``clip_grad_norm_([p], max_grad_norm)``). Global-norm clipping over all
        parameters is impossible here: a parameter steps before the others'
        gradients exist.
    defer_below : int, default 65536
        Parameters with fewer elements (biases, norms) are not stepped in their
        hook but one after another when ``backward()`` ends (through autograd's
        ``queue_callback``): their gradients are small, and a step run between
        autograd's kernels pays its Python glue with cold caches (~0.1-0.2 ms
        each). The bits do not change. 0: every parameter in its own hook.
    **kwargs
        The optimizer's arguments (``lr``, ``betas``, ``weight_decay``, ...).

    Returns
    -------
    StepInBackward
        Holds the optimizers and hooks; ``state_dict()`` is the ordinary
        optimizer's, ``lr_scheduler(cls, ...)`` schedules all of them,
        ``remove()`` removes the hooks.

    Notes
    -----
    After ``loss.backward()`` every parameter has been stepped and its
    ``grad`` is None: do not call ``optimizer.step()`` or ``zero_grad()``.
    Bit for bit the usual loop (``backward()`` then ``optimizer.step()`` of
    one ``optimizer_class(params, **kwargs)``). Not with ``GradScaler`` or
    gradient accumulation over several backward passes (both need all
    gradients before any step).

    Examples
    --------
    >>> import torch
    >>> from fastadam.torch import step_in_backward
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = step_in_backward(model, lr=1e-2)
    >>> model(torch.ones(3, 4)).sum().backward()    # steps here
    >>> model.weight.grad is None, float(opt.optimizers[model.weight].state[model.weight]["step"])
    (True, 1.0)
    """
    return StepInBackward(model_or_params, optimizer_class, max_grad_norm=max_grad_norm,
                          defer_below=defer_below, **kwargs)
