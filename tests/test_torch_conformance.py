"""fastadam.torch behaves like torch.optim where torch's Optimizer base class decides:
add_param_group, duplicate parameters, deferred (meta-device) init; and the OpenMP
thread count that fastadam and torch share."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastadam as fa

torch = pytest.importorskip("torch")
import fastadam.torch as fat  # noqa: E402

_DUP = "optimizer contains a parameter group with duplicate parameters"


# -- add_param_group: a rejected group is not added --

@pytest.mark.parametrize("cls", [fat.Adam, fat.AdamW, fat.SparseAdam])
def test_rejected_param_group_is_not_added(cls):
    p = torch.nn.Parameter(torch.zeros(4, 16))
    opt = cls([p], lr=1e-2)
    with pytest.raises(TypeError, match="float8_e5m2"):
        opt.add_param_group({"params": [
            torch.nn.Parameter(torch.zeros(4, dtype=torch.float8_e5m2))]})
    with pytest.raises(TypeError, match="int32"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=torch.int32)]})
    assert len(opt.param_groups) == 1
    if cls is fat.SparseAdam:
        p.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 16), (4, 16), check_invariants=True)
    else:
        p.grad = torch.ones(4, 16)
    opt.step()                                   # later steps work
    assert int(float(opt.state[p]["step"])) == 1


def test_numpy_rejected_param_group_is_not_added():
    w = np.zeros(4, np.float32)
    opt = fa.Adam([w])
    with pytest.raises(TypeError):
        opt.add_param_group({"params": [np.zeros(4, np.int32)]})
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [np.zeros(4, np.float32)], "lr": -1.0})
    assert len(opt.param_groups) == 1
    opt.step([np.ones(4, np.float32)])
    assert opt.state_dict()["state"][0]["step"] == 1


# -- duplicate parameters: torch's warning, stepped once --

@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_duplicate_parameter_warns_like_torch_and_steps_once(name):
    def run(mod, dup, **kw):
        w = torch.nn.Parameter(torch.linspace(-1, 1, 32))
        v = torch.nn.Parameter(torch.linspace(1, 2, 16))
        params = [w, v, w] if dup else [w, v]
        opt = getattr(mod, name)(params, lr=1e-2, **kw)
        for s in range(3):
            w.grad = torch.full((32,), 0.5 + s)
            v.grad = torch.full((16,), 1.0 - s)
            opt.step()
        return w, v, opt

    with pytest.warns(UserWarning, match=_DUP):
        run(torch.optim, True)                   # torch's own warning ...
    with pytest.warns(UserWarning, match=_DUP):
        w, v, opt = run(fat, True)               # ... is fastadam's too
    wr, vr, ref = run(torch.optim, False, fused=True)   # stepped once per step, one state
    assert torch.equal(w, wr) and torch.equal(v, vr)
    assert len(opt.state) == 2 and float(opt.state[w]["step"]) == 3.0
    with pytest.warns(UserWarning, match=_DUP):
        _, _, topt = run(torch.optim, True)
    assert opt.state_dict()["param_groups"][0]["params"] == \
        topt.state_dict()["param_groups"][0]["params"]   # the same layout as torch's


def test_duplicate_table_sparse_adam_steps_once():
    def run(dup):
        e = torch.nn.Parameter(torch.zeros(8, 16))
        opt = fat.SparseAdam([e, e] if dup else [e], lr=1e-2)
        e.grad = torch.sparse_coo_tensor([[1, 3]], torch.ones(2, 16), (8, 16),
                                         check_invariants=True)
        opt.step()
        return e, opt

    with pytest.warns(UserWarning, match=_DUP):
        e, opt = run(True)
    er, _ = run(False)
    assert torch.equal(e, er) and opt.state[e]["step"] == 1


# -- deferred init: parameters built on meta, materialised before the first step --

def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_deferred_init_meta_then_to_empty(name):
    """Optimizer built over meta parameters; to_empty() keeps the Parameter objects when
    torch swaps them (set_swap_module_params_on_conversion); then the optimizer steps the
    model's actual parameters, bit for bit as torch fused on the same model."""
    ref = _model()
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.device("meta"):
            m = _model()
        opt = getattr(fat, name)(m.parameters(), lr=1e-2)   # torch accepts meta here too
        m.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)
    m.load_state_dict(ref.state_dict())
    held = [p for g in opt.param_groups for p in g["params"]]
    assert all(a is b for a, b in zip(held, m.parameters()))
    ropt = getattr(torch.optim, name)(ref.parameters(), lr=1e-2, fused=True)
    x = torch.randn(8, 16)
    for mod, o in ((m, opt), (ref, ropt)):
        for _ in range(3):
            o.zero_grad()
            mod(x).square().mean().backward()
            o.step()
    for a, b in zip(m.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [fat.Adam, fat.SparseAdam])
def test_meta_parameter_still_meta_at_step_is_a_clear_error(cls):
    """Without the swap, to_empty() replaces the Parameters: the optimizer still holds the
    meta ones (torch then silently steps nothing); fastadam names the parameter."""
    with torch.device("meta"):
        emb = torch.nn.Embedding(8, 16)
    opt = cls(emb.parameters())
    with pytest.raises(ValueError, match="parameter 0 of param group 0 is still on the meta "
                                         "device.*set_swap_module_params_on_conversion"):
        opt.step()


# -- threads: one OpenMP runtime shared with torch --

def test_thread_count_is_shared_with_torch_unless_set():
    """In one process fastadam and torch share the OpenMP runtime (GNU libgomp):
    torch.set_num_threads(n) changes fastadam's default too; fastadam.set_num_threads(n)
    (or n_threads=) sets fastadam's alone."""
    code = """
import fastadam as fa, torch
torch.set_num_threads(1)
a = fa.get_num_threads()
fa.set_num_threads(2)
b, c = fa.get_num_threads(), torch.get_num_threads()
fa.set_num_threads(None)
torch.set_num_threads(2)
print(a, b, c, fa.get_num_threads())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.stdout.split() == ["1", "2", "1", "2"]
