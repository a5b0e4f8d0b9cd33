"""Design: whole training steps at the torch level (scenario ``train``) and the peak
memory of the step fused into backward (scenario ``backward-memory``).

``train``: forward + backward + optimizer step of a small real model built from
``torch.nn`` (one copy per implementation, same initial weights and batch),
interleaved medians: ``fastadam.torch.AdamW`` in the usual loop and fused into
backward (:func:`fastadam.torch.step_in_backward`), ``torch.optim.AdamW``
fused / foreach / single-tensor, DeepSpeedCPUAdam where installed.

``backward-memory``: one fresh worker process per loop (``python -m
fastadam.bench.train --memory LOOP ...``), so one loop's freed memory cannot
serve another's. glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``)
so every tensor above 64 KiB is its own mapping, returned to the system when
freed; RSS then follows the live tensor bytes. After two warm-up steps (state
allocated) the worker resets the kernel's RSS high-water mark (``echo 5 >
/proc/self/clear_refs``) and runs three steps; the figure is ``VmHWM`` minus
the RSS at the reset: what a step needs on top of parameters and state
(gradients, activations, temporaries). Linux only (elsewhere: skipped).
"""
import json
import os
import subprocess
import sys
from typing import Any

try:
    import resource
except ImportError:   # not on this OS: page faults are not counted (0)
    resource = None  # type: ignore[assignment]

from . import peers as P

__all__ = ["TRAIN_MODELS", "train_scenario", "memory_scenario"]

LR = P.LR
WD = P.WD_ADAMW

# name -> (builder(torch) -> (model, batch, loss_fn), description)
def _mlp(torch):
    nn = torch.nn
    model = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(),
                          nn.Linear(2048, 512))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 512, generator=g), torch.randn(8, 512, generator=g)
    return model, (x, y), lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])


def _transformer(torch):
    nn = torch.nn
    model = nn.Sequential(nn.Embedding(2048, 256),
                          nn.TransformerEncoder(nn.TransformerEncoderLayer(
                              256, 4, 1024, dropout=0.0, batch_first=True), 2,
                              enable_nested_tensor=False),
                          nn.Linear(256, 2048))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2048, (4, 32), generator=g)
    y = torch.randint(0, 2048, (4, 32), generator=g)
    return model, (x, y), lambda m, b: torch.nn.functional.cross_entropy(
        m(b[0]).flatten(0, 1), b[1].flatten())


TRAIN_MODELS = {
    "mlp": (_mlp, "MLP 512-2048-2048-512 (GELU), batch 8: 6.3M params"),
    "transformer": (_transformer, "2-layer transformer encoder (d=256, 4 heads, ff 1024), "
                    "vocab 2048, 4x32 tokens: 2.6M params"),
}


class TrainCase:
    """One model kind; each implementation gets a fresh copy (same seed)."""

    def __init__(self, kind, threads):
        self.kind, self.threads = kind, threads
        self.build = TRAIN_MODELS[kind][0]

    def fresh(self):
        torch = P.torch_mod()
        torch.manual_seed(0)
        return self.build(torch)


def _usual(make_opt):
    def make(case):
        model, batch, loss_fn = case.fresh()
        opt = make_opt(model.parameters(), case)

        def step():
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
        return step
    return make


def _in_backward(case):
    fat = P.fastadam_torch()
    model, batch, loss_fn = case.fresh()
    _keep = fat.step_in_backward(model, lr=LR, weight_decay=WD, n_threads=case.threads)

    def step():
        loss_fn(model, batch).backward()
        step.keep = _keep  # type: ignore[attr-defined]   # the hooks live with the step
    return step


def _torch_opt(kind):
    def make(ps, case):
        torch = P.torch_mod()
        kw = {"single": {"foreach": False}, "foreach": {"foreach": True},
              "fused": {"fused": True}}[kind]
        return torch.optim.AdamW(ps, lr=LR, weight_decay=WD, **kw)
    return make


def _ds_opt(ps, case):
    cls = P.deepspeed_cls()
    try:
        return cls(list(ps), lr=LR, weight_decay=WD, adamw_mode=True)
    except Exception as e:  # its CPU op failed to build or load
        raise P.Skip(f"DeepSpeedCPUAdam could not be built/loaded: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}") from None


TRAIN = {
    "fastadam.torch": (_usual(lambda ps, c: P.fastadam_torch().AdamW(
        ps, lr=LR, weight_decay=WD, n_threads=c.threads)),
        "fastadam.torch.AdamW: backward, then step()"),
    "fastadam.torch-in-backward": (_in_backward, "fastadam.torch.step_in_backward(model, "
                                   "AdamW): each parameter stepped inside backward"),
    "torch-fused": (_usual(_torch_opt("fused")), "torch.optim.AdamW(fused=True)"),
    "torch-foreach": (_usual(_torch_opt("foreach")), "torch.optim.AdamW(foreach=True)"),
    "torch": (_usual(_torch_opt("single")), "torch.optim.AdamW(foreach=False)"),
    "deepspeed": (_usual(_ds_opt), "deepspeed DeepSpeedCPUAdam(adamw_mode=True)"),
}


def _minor_faults():
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _count_faults(step, acc):
    """``step`` counting the process's minor page faults during its calls into
    ``acc`` = [faults, calls] (~1 us per call). The implementations share one
    heap: a loop that frees gradients inside backward can leave glibc's heap
    trimmed, so its next gradients come from fresh, faulting pages; the
    column shows when that happens (one loop per process: ~0 faults)."""
    def counted():
        f0 = _minor_faults()
        step()
        acc[0] += _minor_faults() - f0
        acc[1] += 1
    return counted


def train_scenario(run: Any) -> list[dict[str, Any]]:
    """Whole training steps (forward + backward + AdamW step) per implementation."""
    from .scenarios import _cleanup, _rec, interleave
    P.fastadam_torch()
    out = []
    names = [n for n in TRAIN if run.peers is None or n in run.peers]
    for kind in run.train_models:
        for t in run.threads_many:
            run.progress.update(f"train {kind} t={t}")
            case = TrainCase(kind, t)
            with P.threads(t):
                cases = P.build(names, case, registry=TRAIN, log=run.log, skipped=run.skipped)
                faults: dict[str, list[int]] = {}
                cases = {k: _count_faults(f, faults.setdefault(k, [0, 0]))
                         for k, f in cases.items()}
                res = interleave(cases, repeats=max(3, run.repeats // 2 + 1),
                                 target_s=run.target_s, warmup=1)
            model = case.fresh()[0]
            n = sum(p.numel() for p in model.parameters())
            for impl, rr in res.items():
                nf, calls = faults[impl]
                out.append(_rec("train", impl, rr, model=kind, dtype="float32", threads=t,
                                n=n, arrays=len(list(model.parameters())),
                                ms_per_step=rr["median"] * 1e3,
                                faults_per_step=nf / max(calls, 1)))
            del cases
            _cleanup()
    return out


# -- peak memory of the step fused into backward ------------------------------------

MEMORY_LOOPS = ("usual", "in-backward")
MMAP_THRESHOLD = 65536


def _vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(loop, layers, width, batch, steps=3):
    """In a fresh process: the extra peak RSS of ``steps`` training steps (bytes)."""
    import gc

    import torch

    import fastadam.torch as fat
    torch.manual_seed(0)
    nn = torch.nn
    mods: list[Any] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*mods)
    x = torch.randn(batch, width)
    if loop == "usual":
        opt = fat.AdamW(model.parameters(), lr=LR)

        def step():
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
    elif loop == "in-backward":
        sib = fat.step_in_backward(model, lr=LR)

        def step():
            model(x).square().mean().backward()
            step.keep = sib  # type: ignore[attr-defined]
    else:
        raise SystemExit(f"unknown loop {loop!r}; use {', '.join(MEMORY_LOOPS)}")
    for _ in range(2):
        step()
    if loop == "usual":
        opt.zero_grad(set_to_none=True)
    gc.collect()
    base = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(steps):
        step()
    peak = _vm("VmHWM")
    n = sum(p.numel() for p in model.parameters())
    return {"loop": loop, "extra_peak_bytes": peak - base, "base_rss_bytes": base,
            "grad_bytes": 4 * n, "params": n, "largest_grad_bytes":
            4 * max(p.numel() for p in model.parameters()),
            "activation_bytes": 4 * batch * width * (2 * layers + 1)}


def memory_scenario(run: Any) -> list[dict[str, Any]]:
    """Peak RSS of a training step: the usual loop vs the step fused into backward."""
    P.fastadam_torch()
    if not os.path.exists("/proc/self/clear_refs"):
        run.log("skip backward-memory: needs Linux /proc/self/clear_refs (peak RSS reset)")
        return []
    layers, width, batch = run.memory_model
    out: list[dict[str, Any]] = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    for loop in MEMORY_LOOPS:
        run.progress.update(f"backward-memory {loop}")
        cmd = [sys.executable, "-m", "fastadam.bench.train", "--memory", loop,
               str(layers), str(width), str(batch)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0:
            run.log(f"skip backward-memory {loop}: worker failed: {r.stderr.strip()[-300:]}")
            return out
        rec = json.loads(r.stdout.strip().splitlines()[-1])
        rec.update(scenario="backward-memory", impl=f"fastadam.torch {loop}",
                   model=f"{layers}x Linear({width},{width}), batch {batch}",
                   extra_peak_mib=rec["extra_peak_bytes"] / 2**20,
                   grad_mib=rec["grad_bytes"] / 2**20)
        out.append(rec)
    if len(out) == 2:
        saved = out[0]["extra_peak_bytes"] - out[1]["extra_peak_bytes"]
        out[1]["saved_mib"] = saved / 2**20
        out[1]["saved_vs_grads"] = saved / out[1]["grad_bytes"]
    return out


if __name__ == "__main__":  # the memory worker: --memory LOOP LAYERS WIDTH BATCH
    if len(sys.argv) != 6 or sys.argv[1] != "--memory":
        raise SystemExit("usage: python -m fastadam.bench.train --memory LOOP LAYERS WIDTH "
                         "BATCH")
    print(json.dumps(memory_worker(sys.argv[2], *map(int, sys.argv[3:]))))
