"""torch.compile and fastadam.torch: a compiled model trains with the drop-ins (bit
for bit torch fused on the same compiled model); compiling the step itself graph-breaks
(runs eagerly, same bits), and fullgraph=True refuses it."""
import pytest

torch = pytest.importorskip("torch")

from fastadam import torch as fat  # noqa: E402

# torch's own compile stack imports deprecated torch.jit names (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)


def _bits(ps):
    return [p.detach().clone().view(torch.int32) for p in ps]


def test_compiled_model_trains_with_fastadam_like_torch_fused():
    x, y = _data()
    out = []
    for make in (lambda ps: fat.AdamW(ps, lr=1e-2),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True)):
        torch._dynamo.reset()
        model = _mlp()
        cm = torch.compile(model)
        opt = make(model.parameters())
        losses = []
        for _ in range(4):
            opt.zero_grad()
            loss = ((cm(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        out.append(_bits(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_compiling_the_step_graph_breaks_and_gives_the_eager_bits():
    x, y = _data()
    res = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = _mlp()
        opt = fat.AdamW(model.parameters(), lr=1e-2)
        step = torch.compile(opt.step) if compiled else opt.step
        for _ in range(3):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            step()
        assert float(opt.state[model[0].weight]["step"]) == 3.0
        res.append(_bits(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*res))
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(opt.step, fullgraph=True)()
