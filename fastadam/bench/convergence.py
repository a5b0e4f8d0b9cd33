"""Design: does it train? A small language model on real text, per optimizer config.

``python -m fastadam.bench.convergence --help``. Evidence, not a speed figure:
the same character-level transformer language model, from the same initial
weights and the same batches, is trained once per optimizer *config* and the
loss curves are compared. A config is a name in :data:`CONFIGS`: the dtype the
model is held in and a factory that builds the optimizer for its parameters
(fastadam's float32 AdamW, torch's fused AdamW as the anchor, and the
low-precision / 8-bit state variants as they are added). Adding a config is
one entry in that table.

The text: the Python reference manual's topic pages as the standard library
ships them (``pydoc_data.topics``: ~465 K characters of English prose with
code), so the run needs no download. The first 90 % is the training text, the
last 10 % the held-out text; characters are the tokens.

The model: token + position embeddings, ``layers`` pre-norm
``torch.nn.TransformerEncoderLayer`` blocks with a causal mask, a final
LayerNorm and a linear head; no dropout, so a run is deterministic for a given
thread count. AdamW with a linear warm-up (``torch.optim.lr_scheduler.LambdaLR``)
and weight decay 0.01 on every parameter.

Output: ``<out>.json`` (per config: steps, train loss per step, held-out loss
every ``eval_every`` steps, final held-out loss, wall time) and, when
matplotlib is installed, ``<out>.png`` with the curves. Tests run a short
version (``tests/test_convergence.py``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


def corpus():
    """The real text: the stdlib's reference-manual topics, in a fixed order."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class Config:
    """One optimizer configuration: a label, the model dtype, the optimizer factory.

    ``make(params, lr, weight_decay)`` returns a torch optimizer over
    ``params`` (the model already in ``dtype``).
    """

    label: str
    dtype: str
    make: Callable[..., Any]


def _fastadam_adamw(params, lr, weight_decay, **kw):
    import fastadam.torch as fat

    return fat.AdamW(params, lr=lr, weight_decay=weight_decay, **kw)


def _fastadam_adamw8bit(params, lr, weight_decay):
    import fastadam.torch as fat

    return fat.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def _torch_fused_adamw(params, lr, weight_decay):
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def _fastadam_adamw_with(**options):
    """A factory of fastadam AdamW with extra keywords (state_dtype, stochastic_rounding...)."""
    def make(params, lr, weight_decay):
        return _fastadam_adamw(params, lr, weight_decay, **options)
    return make


# name -> Config. The low-precision and 8-bit state configs are added here.
CONFIGS: dict[str, Config] = {
    "float32": Config("fastadam AdamW, float32", "float32", _fastadam_adamw),
    "torch-fused": Config("torch AdamW(fused=True), float32", "float32", _torch_fused_adamw),
    # issue 12: 16-bit moments, all-bf16 with nearest and stochastic rounding
    "bf16-moments": Config("fastadam AdamW, float32 params + bf16 moments", "float32",
                           _fastadam_adamw_with(state_dtype="bf16")),
    "bf16-nearest": Config("fastadam AdamW, all-bf16 (round to nearest)", "bfloat16",
                           _fastadam_adamw),
    "bf16-stochastic": Config("fastadam AdamW, all-bf16 (stochastic rounding)", "bfloat16",
                              _fastadam_adamw_with(stochastic_rounding=True, seed=0)),
    "q8": Config("fastadam AdamW8bit, 8-bit state", "float32", _fastadam_adamw8bit),
}


@dataclass
class Shape:
    """The model and run size."""

    d_model: int = 128
    layers: int = 2
    heads: int = 4
    seq: int = 128
    batch: int = 16
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    eval_every: int = 25
    eval_batches: int = 4
    seed: int = 0
    extra: dict = field(default_factory=dict)


def short_shape(steps):
    """The tests' shape: a 1-layer d_model-32 model on 8 x 32 characters, ``steps`` steps."""
    return Shape(d_model=32, layers=1, heads=2, seq=32, batch=8, steps=steps, eval_every=10,
                 eval_batches=2, warmup=5)


def _model(vocab, shape):
    import torch
    from torch import nn

    class CharLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, shape.d_model)
            self.pos = nn.Embedding(shape.seq, shape.d_model)
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(shape.d_model, shape.heads, 4 * shape.d_model,
                                           dropout=0.0, batch_first=True, norm_first=True)
                for _ in range(shape.layers))
            self.norm = nn.LayerNorm(shape.d_model)
            self.head = nn.Linear(shape.d_model, vocab)
            self.causal = torch.ones(shape.seq, shape.seq, dtype=torch.bool).triu(1)

        def forward(self, x):
            t = x.shape[1]
            h = self.tok(x) + self.pos.weight[:t]
            for block in self.blocks:
                h = block(h, src_mask=self.causal[:t, :t])
            return self.head(self.norm(h))

    return CharLM()


class Data:
    """Fixed train batches (by step) and fixed held-out batches, from :func:`corpus`."""

    def __init__(self, shape, text=None):
        text = corpus() if text is None else text
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        chars, ids = np.unique(codes, return_inverse=True)
        self.vocab = len(chars)
        ids = ids.astype(np.int64)
        cut = int(len(ids) * 0.9)
        self.train, self.held_out = ids[:cut], ids[cut:]
        self.shape = shape
        rng = np.random.default_rng(shape.seed + 1)
        self.eval_starts = rng.integers(0, len(self.held_out) - shape.seq - 1,
                                        (shape.eval_batches, shape.batch))

    def _batch(self, ids, starts):
        import torch

        idx = starts[:, None] + np.arange(self.shape.seq + 1)
        window = torch.from_numpy(ids[idx])
        return window[:, :-1], window[:, 1:]

    def train_batch(self, step):
        rng = np.random.default_rng((self.shape.seed, step))
        starts = rng.integers(0, len(self.train) - self.shape.seq - 1, self.shape.batch)
        return self._batch(self.train, starts)

    def eval_batches(self):
        return [self._batch(self.held_out, s) for s in self.eval_starts]


def _loss(model, x, y):
    import torch.nn.functional as F

    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def train(name, shape=None, data=None, config=None, log=None):
    """Train the model with one config; return its record (see the module docstring)."""
    import torch

    shape = shape or Shape()
    data = data or Data(shape)
    config = config or CONFIGS[name]
    torch.manual_seed(shape.seed)
    model = _model(data.vocab, shape).to(getattr(torch, config.dtype))
    opt = config.make(model.parameters(), lr=shape.lr, weight_decay=shape.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, shape.warmup)))
    held_out = data.eval_batches()

    def evaluate():
        with torch.no_grad():
            return float(np.mean([_loss(model, x, y).item() for x, y in held_out]))

    record: dict[str, Any] = {"label": config.label, "dtype": config.dtype, "train_loss": [],
                              "eval_step": [], "eval_loss": []}
    t0 = time.perf_counter()
    for step in range(shape.steps):
        if step % shape.eval_every == 0:
            record["eval_step"].append(step)
            record["eval_loss"].append(evaluate())
        x, y = data.train_batch(step)
        loss = _loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        record["train_loss"].append(loss.item())
        if log and (step + 1) % shape.eval_every == 0:
            log(f"  {name}: step {step + 1}/{shape.steps} train loss {loss.item():.4f}")
    record["eval_step"].append(shape.steps)
    record["eval_loss"].append(evaluate())
    record["final_eval_loss"] = record["eval_loss"][-1]
    record["seconds"] = time.perf_counter() - t0
    return record


def plot(results, path, title):
    """Loss curves (train loss smoothed, held-out loss as markers) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, rec in enumerate(results.values()):
        color = f"C{i}"
        tl = np.asarray(rec["train_loss"])
        k = min(10, len(tl))
        smooth = np.convolve(tl, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k - 1, len(tl)), smooth, color=color, alpha=0.6, lw=1)
        ax.plot(rec["eval_step"], rec["eval_loss"], "o-", color=color, ms=3,
                label=f"{rec['label']} (held-out {rec['final_eval_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / character)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastadam.bench.convergence",
                                description="Train a small char-level transformer LM on "
                                            "real text once per optimizer config.")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma list of {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--steps", type=int, default=Shape.steps)
    p.add_argument("--d-model", type=int, default=Shape.d_model)
    p.add_argument("--layers", type=int, default=Shape.layers)
    p.add_argument("--seq", type=int, default=Shape.seq)
    p.add_argument("--batch", type=int, default=Shape.batch)
    p.add_argument("--lr", type=float, default=Shape.lr)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="convergence", help="output path stem (.json, .png)")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; known: {list(CONFIGS)}")
    shape = Shape(d_model=args.d_model, layers=args.layers, seq=args.seq, batch=args.batch,
                  steps=args.steps, lr=args.lr)
    data = Data(shape)
    n_params = sum(t.numel() for t in _model(data.vocab, shape).parameters())
    print(f"char LM: vocab {data.vocab}, {n_params:,} parameters, {shape.steps} steps of "
          f"{shape.batch}x{shape.seq} characters, torch threads {torch.get_num_threads()}")
    results = {}
    for name in names:
        results[name] = train(name, shape, data, log=print)
        r = results[name]
        print(f"{name}: final held-out loss {r['final_eval_loss']:.4f} ({r['seconds']:.1f} s)")
    meta = {"shape": {k: v for k, v in vars(shape).items() if k != "extra"},
            "vocab": data.vocab, "parameters": n_params, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "text": "pydoc_data.topics (Python reference manual topics), 90/10 split",
            "baseline_loss": math.log(data.vocab)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    try:
        plot(results, args.out + ".png",
             f"char LM ({n_params:,} params) on pydoc_data.topics, {shape.steps} steps")
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
    print(f"wrote {args.out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
