"""fastadam.torch.step_in_backward: each parameter stepped inside backward(), bit for
bit the usual backward-then-step loop; schedulers, per-parameter clipping, checkpoints."""
import io

import pytest

torch = pytest.importorskip("torch")

from fastadam import torch as fat  # noqa: E402
from fastadam.torch import _backward  # noqa: E402


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(50, 32),
        torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0,
                                         batch_first=True),
        torch.nn.Linear(32, 50))


def _batch(s):
    g = torch.Generator().manual_seed(100 + s)
    return torch.randint(0, 50, (4, 12), generator=g), torch.randint(0, 50, (4, 12), generator=g)


def _loss(model, s):
    x, y = _batch(s)
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _bits(ps):
    return [p.detach().clone().view(torch.int32) for p in ps]


def _usual(steps, cls=fat.AdamW, sched=None, clip=None, **kw):
    model = _model()
    opt = cls(model.parameters(), **kw)
    sc = sched(opt) if sched else None
    for s in range(steps):
        opt.zero_grad()
        _loss(model, s).backward()
        if clip is not None:
            for p in model.parameters():
                torch.nn.utils.clip_grad_norm_([p], clip)
        opt.step()
        if sc:
            sc.step()
    return model, opt


@pytest.mark.parametrize("defer_below", [0, 2048, _backward.DEFER_BELOW],
                         ids=["in-hook", "mixed", "default"])
@pytest.mark.parametrize("cls,kw", [(fat.AdamW, dict(lr=1e-2, weight_decay=0.1)),
                                    (fat.Adam, dict(lr=3e-3, amsgrad=True, weight_decay=0.01))])
def test_bitwise_the_usual_loop_on_a_transformer(cls, kw, defer_below):
    ref, _ = _usual(4, cls, **kw)
    model = _model()
    sizes = [p.numel() for p in model.parameters()]
    if defer_below == 2048:   # both paths taken: some parameters deferred, some not
        assert min(sizes) < 2048 <= max(sizes)
    sib = fat.step_in_backward(model, cls, defer_below=defer_below, **kw)
    for s in range(4):
        _loss(model, s).backward()
        assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(_bits(model.parameters()),
                                                  _bits(ref.parameters())))
    assert len(sib.optimizers) == len(list(model.parameters()))


def test_lr_scheduler_and_per_parameter_clipping():
    sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3)  # noqa: E731
    ref, ref_opt = _usual(5, sched=sched, clip=0.05, lr=1e-2)
    model = _model()
    sib = fat.step_in_backward(model, lr=1e-2, max_grad_norm=0.05)
    sc = sib.lr_scheduler(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.3)
    for s in range(5):
        _loss(model, s).backward()
        sc.step()
    assert all(torch.equal(a, b) for a, b in zip(_bits(model.parameters()),
                                                  _bits(ref.parameters())))
    assert set(sc.get_last_lr()) == {ref_opt.param_groups[0]["lr"]}


def test_checkpoint_loads_into_the_ordinary_optimizers_and_back():
    model = _model()
    sib = fat.step_in_backward(model, lr=1e-2)
    for s in range(2):
        _loss(model, s).backward()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": sib.state_dict()}, buf)
    # the usual loop for 4 steps is the reference
    ref, _ = _usual(4, lr=1e-2)
    for kind in ("fastadam", "torch fused", "back into step_in_backward"):
        buf.seek(0)
        ck = torch.load(buf)
        m = _model(seed=1)
        m.load_state_dict(ck["model"])
        if kind == "back into step_in_backward":
            sib2 = fat.step_in_backward(m, lr=5.0)   # lr comes from the checkpoint
            sib2.load_state_dict(ck["opt"])
            for s in range(2, 4):
                _loss(m, s).backward()
        else:
            opt = fat.AdamW(m.parameters(), lr=5.0) if kind == "fastadam" else \
                torch.optim.AdamW(m.parameters(), lr=5.0, fused=True)
            opt.load_state_dict(ck["opt"])
            assert opt.param_groups[0]["lr"] == 1e-2
            for s in range(2, 4):
                opt.zero_grad()
                _loss(m, s).backward()
                opt.step()
        assert all(torch.equal(a, b) for a, b in zip(_bits(m.parameters()),
                                                      _bits(ref.parameters()))), kind


def test_frozen_parameters_groups_and_remove():
    model = _model()
    model[0].weight.requires_grad_(False)
    sib = fat.step_in_backward([{"params": list(model[1].parameters()), "lr": 1e-3},
                                {"params": list(model[2].parameters())}], lr=1e-2)
    assert model[0].weight not in sib.optimizers
    assert {g["lr"] for g in sib.param_groups} == {1e-3, 1e-2}
    _loss(model, 0).backward()
    assert all(p.grad is None for p in model[1].parameters())
    sib.remove()
    _loss(model, 1).backward()
    assert all(p.grad is not None for p in model[2].parameters())
    sib.zero_grad()
    assert all(p.grad is None for p in model[2].parameters())
    assert float(sib.optimizers[model[2].weight].state[model[2].weight]["step"]) == 1.0


@pytest.mark.parametrize("args,kw,err,match", [
    ((torch.zeros(3, requires_grad=True),), {}, TypeError, "a tensor"),
    (([],), {}, ValueError, "no parameters"),
    ((torch.nn.Linear(2, 2),), {"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
    ((torch.nn.Linear(2, 2),), {"defer_below": -1}, ValueError, "defer_below"),
    ((torch.nn.Linear(2, 2),), {"defer_below": 1.5}, ValueError, "defer_below"),
])
def test_bad_arguments(args, kw, err, match):
    with pytest.raises(err, match=match):
        fat.step_in_backward(*args, **kw)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"),
                    reason="peak RSS reset needs Linux /proc/self/clear_refs")
def test_step_in_backward_saves_the_gradients_peak_memory():
    """The saving the docs claim, measured in fresh processes (8 MiB of gradients).

    Fused into backward only the gradient being stepped is alive, so the peak drops by the
    gradients' bytes less what one or two gradients in flight keep (the bound asserted)."""
    import json
    import os
    import subprocess
    import sys

    from fastadam.bench.train import MMAP_THRESHOLD
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), OMP_NUM_THREADS="1")
    rec = {}
    for loop in ("usual", "in-backward"):
        r = subprocess.run([sys.executable, "-m", "fastadam.bench.train", "--memory", loop,
                            "8", "512", "8"], capture_output=True, text=True, env=env,
                           timeout=300, check=True)
        rec[loop] = json.loads(r.stdout.strip().splitlines()[-1])
    grads, largest = rec["usual"]["grad_bytes"], rec["usual"]["largest_grad_bytes"]
    assert grads == 4 * (8 * (512 * 512 + 512))
    assert rec["usual"]["extra_peak_bytes"] >= grads - largest, rec
    saved = rec["usual"]["extra_peak_bytes"] - rec["in-backward"]["extra_peak_bytes"]
    assert saved >= grads - 2 * largest, rec


def test_deferred_small_parameters_step_when_backward_ends_and_after_a_failed_one():
    """Small parameters are stepped by the end-of-backward callback (in the same
    backward, their grads freed); a backward that raises leaves its deferred
    parameters unstepped, and the next backward steps every parameter once."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 300), torch.nn.Linear(300, 4))
    sib = fat.step_in_backward(model, lr=1e-2, defer_below=1000)   # biases deferred

    def count():
        return {n: float(sib.optimizers[p].state[p]["step"]) if p in sib.optimizers[p].state
                else 0.0 for n, p in model.named_parameters()}

    x = torch.randn(5, 8)
    model(x).sum().backward()
    assert count() == {"0.weight": 1.0, "0.bias": 1.0, "1.weight": 1.0, "1.bias": 1.0}
    assert all(p.grad is None for p in model.parameters())

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("boom")

    # the error is raised after layer 1's hooks ran (its bias deferred), before layer 0's
    with pytest.raises(RuntimeError, match="boom"):
        model[1](Boom.apply(model[0](x))).sum().backward()
    steps = count()
    assert steps["1.weight"] == 2.0 and steps["1.bias"] == 1.0      # deferred: not stepped
    assert steps["0.weight"] == 1.0 and steps["0.bias"] == 1.0
    sib.zero_grad()
    model(x).sum().backward()
    assert count() == {"0.weight": 2.0, "0.bias": 2.0, "1.weight": 3.0, "1.bias": 2.0}
    assert all(p.grad is None for p in model.parameters())
