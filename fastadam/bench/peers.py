"""Design: the implementations compared, each built over SHARED buffers.

Every peer of a dense case steps the same four numpy buffers (torch tensors
are zero-copy views made with ``torch.from_numpy`` and the optimizers' state
is pre-filled with views of the same ``exp_avg``/``exp_avg_sq``), so all
peers see the same memory, the same cache state, and the run needs one set
of buffers instead of one per peer. A peer that cannot run raises
:class:`Skip` with one line saying why and how to install what is missing.
"""
import contextlib
import functools
import io
import logging
import os
import sys
from typing import Any, Optional

import numpy as np

INSTALL = {
    "torch": "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu",
    "deepspeed": "pip install deepspeed ninja py-cpuinfo  (its CPU op compiles on first use, "
                 "~1 min, then cached in ~/.cache/torch_extensions)",
    "matplotlib": "pip install matplotlib  (or pip install -e '.[bench]')",
}

LR = 1e-3
WD_ADAMW = 1e-2


class Skip(Exception):
    """A peer that cannot run here; the message is the one line shown."""


# --------------------------------------------------------------------------
# optional imports
# --------------------------------------------------------------------------

@functools.lru_cache(None)
def torch_mod():
    try:
        import torch
    except ImportError:
        raise Skip(f"torch is not installed ({INSTALL['torch']})") from None
    return torch


@functools.lru_cache(None)
def fastadam_torch():
    torch_mod()
    try:
        import fastadam.torch as fat
    except ImportError as e:
        raise Skip(f"fastadam.torch is not available in this build ({e})") from None
    if not hasattr(fat, "Adam"):
        raise Skip("fastadam.torch has no Adam yet")
    return fat


@functools.lru_cache(None)
def deepspeed_cls():
    torch_mod()
    try:
        # quiet: deepspeed logs an accelerator warning on import
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from deepspeed.ops.adam import DeepSpeedCPUAdam
        try:
            from deepspeed.utils import logger as dslog
            dslog.setLevel(logging.ERROR)
        except Exception:
            pass
    except ImportError:
        raise Skip(f"DeepSpeed is not installed ({INSTALL['deepspeed']})") from None
    except Exception as e:
        raise Skip(f"DeepSpeed failed to import: {type(e).__name__}: {e}") from None
    return DeepSpeedCPUAdam


_DS_CACHE: dict[bool, Any] = {}  # adamw mode -> DeepSpeedCPUAdam


def deepspeed_opt(adamw, first_param):
    """One DeepSpeedCPUAdam per mode, re-bound to new params (constructing one
    costs ~1 s of CPU probing; the first ever builds its C++ op, ~1 min)."""
    cls = deepspeed_cls()
    opt = _DS_CACHE.get(adamw)
    if opt is None:
        if not _DS_CACHE:
            print("deepspeed: loading its cpu_adam op (the first use ever compiles it, ~1 min; "
                  "cached in ~/.cache/torch_extensions)", flush=True)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                opt = cls([first_param], lr=LR, adamw_mode=adamw,
                          weight_decay=WD_ADAMW if adamw else 0.0)
        except Exception as e:
            raise Skip(f"DeepSpeedCPUAdam could not be built/loaded: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from None
        _DS_CACHE[adamw] = opt
    return opt


def fastadam_mod():
    import fastadam
    return fastadam


# --------------------------------------------------------------------------
# thread control
# --------------------------------------------------------------------------

@contextlib.contextmanager
def threads(n):
    """Limit every runtime in this process to ``n`` threads: OpenMP/BLAS pools
    (threadpoolctl, which also reaches DeepSpeed's OpenMP), torch intra-op,
    fastadam's default."""
    fa = fastadam_mod()
    stack = contextlib.ExitStack()
    with stack:
        try:
            from threadpoolctl import threadpool_limits
            stack.enter_context(threadpool_limits(limits=n))
        except ImportError:
            pass
        prev_fa = fa._threads._user_threads
        fa.set_num_threads(n)
        stack.callback(fa.set_num_threads, prev_fa)
        torch = sys.modules.get("torch")  # only when in use (ISA workers never import it)
        if torch is not None:
            prev = torch.get_num_threads()
            torch.set_num_threads(n)
            stack.callback(torch.set_num_threads, prev)
        yield


# --------------------------------------------------------------------------
# dense peers: make(case) -> step callable
# --------------------------------------------------------------------------

class Dense:
    """Shared buffers for one or many arrays (``sizes``) of one dtype."""

    def __init__(self, sizes, dtype, threads, variant="adam", seed=0, shapes=None):
        rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.threads = threads
        self.variant = variant
        shapes = shapes or [(n,) for n in sizes]
        # params, grads, exp_avgs, exp_avg_sqs: one array per shape; None after free()
        self.p: Optional[list[np.ndarray]] = []
        self.g: Optional[list[np.ndarray]] = []
        self.m: Optional[list[np.ndarray]] = []
        self.v: Optional[list[np.ndarray]] = []
        for shp in shapes:
            n = int(np.prod(shp))
            # fill without float64 temporaries the size of the array
            p = np.empty(shp, self.dtype)
            g = np.empty(shp, self.dtype)
            chunk = 1 << 20
            fp, fg = p.reshape(-1), g.reshape(-1)
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                fp[lo:hi] = rng.standard_normal(hi - lo, dtype=np.float32)
                fg[lo:hi] = rng.standard_normal(hi - lo, dtype=np.float32)
            self.p.append(p)
            self.g.append(g)
            self.m.append(np.zeros(shp, self.dtype))
            self.v.append(np.zeros(shp, self.dtype))
        self.n = sum(x.size for x in self.p)
        self.as_params = False  # torch scenario: nn.Parameter views, as a model has
        self._tensors = None

    def buffers(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray],
                               list[np.ndarray]]:
        """(params, grads, exp_avgs, exp_avg_sqs); not after :meth:`free`."""
        p, g, m, v = self.p, self.g, self.m, self.v
        assert p is not None and g is not None and m is not None and v is not None, "freed"
        return p, g, m, v

    @property
    def nbytes_state(self):
        return 4 * self.n * self.dtype.itemsize

    def tensors(self):
        """(params, exp_avgs, exp_avg_sqs) as zero-copy torch tensors, grads set."""
        if self._tensors is None:
            p, g, m, v = self.buffers()
            torch = torch_mod()
            ps = [torch.from_numpy(x) for x in p]
            if self.as_params:
                ps = [torch.nn.Parameter(x) for x in ps]
            for tp, gx in zip(ps, g):
                tp.grad = torch.from_numpy(gx)
            self._tensors = (ps, [torch.from_numpy(x) for x in m],
                             [torch.from_numpy(x) for x in v])
        return self._tensors

    def free(self):
        self._tensors = None
        self.p = self.g = self.m = self.v = None


def _torch_state(opt, case, step_tensor=True):
    torch = torch_mod()
    ps, ms, vs = case.tensors()
    for tp, tm, tv in zip(ps, ms, vs):
        opt.state[tp] = {"step": torch.zeros((), dtype=torch.float32) if step_tensor else 0,
                         "exp_avg": tm, "exp_avg_sq": tv}


def _torch_peer(kind):
    def make(case):
        torch = torch_mod()
        ps, _, _ = case.tensors()
        cls = torch.optim.AdamW if case.variant == "adamw" else torch.optim.Adam
        kw = {"foreach": False} if kind == "single" else (
            {"foreach": True} if kind == "foreach" else {"fused": True})
        wd = WD_ADAMW if case.variant == "adamw" else 0.0
        try:
            opt = cls(ps, lr=LR, weight_decay=wd, **kw)
        except Exception as e:
            raise Skip(f"torch.optim.{cls.__name__}({kw}) unavailable: {e}") from None
        _torch_state(opt, case)
        opt.step()  # fail here, not while timing
        return opt.step
    return make


def _fastadam_fn(case):
    fa = fastadam_mod()
    f = fa.adamw_step if case.variant == "adamw" else fa.adam_step
    state = {"step": 0}
    nt = case.threads
    if len(case.p) == 1:
        p, g, m, v = case.p[0], case.g[0], case.m[0], case.v[0]

        def step():
            state["step"] += 1
            f(p, g, m, v, step=state["step"], lr=LR, n_threads=nt)
    else:
        ff = fa.functional.adamw if case.variant == "adamw" else fa.functional.adam

        def step():
            state["step"] += 1
            ff(case.p, case.g, case.m, case.v, steps=state["step"], lr=LR, n_threads=nt)
    return step


def _fastadam_plan(case):
    """``fastadam.functional.run`` of a plan made once by ``plan_adam``: the
    native call without the per-call validation (the floor under any wrapper;
    the step count is frozen in the plan)."""
    fa = fastadam_mod()
    plan_fn = getattr(fa.functional, "plan_adam", None)
    if plan_fn is None:
        raise Skip("fastadam.functional.plan_adam is not in this build")
    kw = {"weight_decay": WD_ADAMW, "decoupled_weight_decay": True} \
        if case.variant == "adamw" else {}
    plan = plan_fn(case.p, case.g, case.m, case.v, steps=10, lr=LR, n_threads=case.threads,
                   **kw)
    run = fa.functional.run
    return lambda: run(plan)


def _fastadam_optim(case):
    """``fastadam.Adam(params).step(grads)``: the stateful numpy optimizer."""
    fa = fastadam_mod()
    cls = fa.AdamW if case.variant == "adamw" else fa.Adam
    opt = cls(case.p, lr=LR, n_threads=case.threads)
    # share the case's state buffers (the optimizer would otherwise allocate its own)
    for p, m, v in zip(case.p, case.m, case.v):
        opt.state[id(p)] = {"step": 0, "exp_avg": m, "exp_avg_sq": v}
    g = case.g
    try:
        opt.step(g)
    except Exception:  # a different internal state layout: let it allocate its own
        opt = cls(case.p, lr=LR, n_threads=case.threads)
    return lambda: opt.step(g)


def _fastadam_torch(case):
    fat = fastadam_torch()
    ps, _, _ = case.tensors()
    cls = fat.AdamW if case.variant == "adamw" else fat.Adam
    kw = dict(lr=LR, weight_decay=WD_ADAMW if case.variant == "adamw" else 0.0)
    try:
        opt = cls(ps, n_threads=case.threads, **kw)
    except TypeError:
        opt = cls(ps, **kw)
    _torch_state(opt, case)
    try:
        opt.step()
    except Exception:
        # its own state layout: let it allocate (costs memory, same speed)
        opt.state.clear()
        opt.step()
    return opt.step


def _deepspeed(case):
    if case.dtype != np.float32:
        raise Skip("DeepSpeedCPUAdam supports float32 (and 16-bit) params only, not float64")
    ps, ms, vs = case.tensors()
    opt = deepspeed_opt(case.variant == "adamw", ps[0])
    opt.param_groups[0]["params"] = list(ps)
    opt.state.clear()
    for tp, tm, tv in zip(ps, ms, vs):
        opt.state[tp] = {"step": 0, "exp_avg": tm, "exp_avg_sq": tv}
    return opt.step


def _reference(case, max_n=2**22):
    if case.n > max_n:
        raise Skip(f"numpy reference skipped above {max_n} elements (slow, allocates temporaries)")
    from fastadam import _reference as ref
    f = ref.adamw if case.variant == "adamw" else ref.adam
    state = {"step": 0}

    def step():
        state["step"] += 1
        for p, g, m, v in zip(case.p, case.g, case.m, case.v):
            f(p, g, m, v, step=state["step"], lr=LR)
    return step


# name -> (factory, short description)
DENSE = {
    "fastadam": (_fastadam_fn, "fastadam.adam_step (lists: fastadam.functional.adam)"),
    "fastadam-plan": (_fastadam_plan, "fastadam.functional.run(plan_adam(...)): validated "
                      "once, the native call alone (floor)"),
    "fastadam.Adam": (_fastadam_optim, "fastadam.Adam(params).step(grads)"),
    "fastadam.torch": (_fastadam_torch, "fastadam.torch.Adam over torch tensors"),
    "torch": (_torch_peer("single"), "torch.optim.Adam(foreach=False)"),
    "torch-foreach": (_torch_peer("foreach"), "torch.optim.Adam(foreach=True)"),
    "torch-fused": (_torch_peer("fused"), "torch.optim.Adam(fused=True)"),
    "deepspeed": (_deepspeed, "deepspeed DeepSpeedCPUAdam"),
    "numpy-ref": (_reference, "fastadam._reference (plain numpy)"),
}
OURS = ("fastadam", "fastadam-plan", "fastadam.Adam", "fastadam.torch")
NOT_PEERS = ("numpy-ref",)  # shown, never the "best peer"


def build(names, case, registry=DENSE, log=print, skipped=None):
    """Build the step callables for ``names``; skipped peers are logged once."""
    cases = {}
    for name in names:
        make = registry[name][0]
        try:
            fn = make(case)
            fn()  # first call: lazy set-up and first touch; a failure skips the peer
            cases[name] = fn
        except Exception as e:
            if isinstance(e, Skip):
                msg = f"skip {name}: {e}"
            else:
                first = str(e).splitlines()[0] if str(e) else ""
                msg = f"skip {name}: failed: {type(e).__name__}: {first}"
            if skipped is not None:
                if msg not in skipped:
                    skipped.add(msg) if isinstance(skipped, set) else skipped.append(msg)
                    log(msg)
            else:
                log(msg)
    return cases


def env_quiet():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
