"""The kernel interface is declared once (fastadam/_interface.py): every
compiled module, its type stub and the argument builder agree with it."""
import ast
import os

import numpy as np
import pytest
from conftest import importable_isas, isa_module

from fastadam import _interface as I
from fastadam import _plan

PKG = os.path.dirname(os.path.abspath(_plan.__file__))


def _compiled_params(fn):
    """Parameter names of a compiled kernel, from its embedded signature."""
    first = fn.__doc__.split("\n", 1)[0]
    inner = first[first.index("(") + 1:first.rindex(")")]
    return tuple(p.split()[-1].split("=")[0] for p in inner.split(", "))


@pytest.mark.parametrize("isa", importable_isas())
def test_compiled_signatures_match_the_table(isa):
    mod = isa_module(isa)
    assert mod.ARGS == I.SCALAR_NAMES
    assert mod.FLAGS == I.FLAG_BITS
    for (op, *_), name in I.KERNELS.items():
        assert _compiled_params(getattr(mod, name)) == I.SIGNATURES[op] + I.TRAILING, name
    for name in I.NORM_KERNELS.values():
        assert _compiled_params(getattr(mod, name)) == ("ptrs", "offsets", "n_threads")


def test_type_stub_matches_the_table():
    stubs = [n for n in os.listdir(PKG) if n.startswith("_kernels_") and n.endswith(".pyi")]
    assert stubs, "setup.py renders a stub beside each kernel module"
    for stub in stubs:
        with open(os.path.join(PKG, stub), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        sigs = {n.name: tuple(a.arg for a in n.args.args) for n in tree.body
                if isinstance(n, ast.FunctionDef)}
        for (op, *_), name in I.KERNELS.items():
            assert sigs[name] == I.SIGNATURES[op] + I.TRAILING, (stub, name)


def test_builder_fills_every_scalar_by_name():
    lr, b1, b2, eps, wd = 0.01, 0.8, 0.95, 1e-6, 0.1
    args, flags = _plan.hyper_args(lr, b1, b2, eps, wd, False, True, 8.0)
    full = dict(zip(I.SCALAR_NAMES, _plan.with_step(args, -2.5, 0.25)))
    assert full == dict(sign=-1.0, grad_scale=8.0, decay=1.0, weight_decay=wd, c1=1 - b1,
                        c2=1 - b2, beta1=b1, beta2=b2, eps=eps, lr=lr,
                        vec_bytes=float(_plan.VECTOR_BYTES), neg_step_size=-2.5, bc2_sqrt=0.25)
    assert flags == I.FLAG_BITS["l2"] | I.FLAG_BITS["scaled"]
    args, flags = _plan.hyper_args(lr, b1, b2, eps, wd, True, False, None, rowwise=True)
    full = dict(zip(I.SCALAR_NAMES, _plan.with_step(args, 0.0)))
    assert full["decay"] == 1.0 - lr * wd and full["sign"] == 1.0
    assert flags == I.FLAG_BITS["rowwise"]          # decoupled: no L2 flag


def test_kernels_take_the_scalars_from_the_named_fields():
    """A kernel fed ``c1`` and ``c2`` swapped gives a different result: the
    positions the builder writes are the ones the compiled code reads."""
    p, g = np.ones(8, np.float32), np.full(8, 0.5, np.float32)
    fn = _plan.KERNELS.get("adam", p.dtype, g.dtype, p.dtype)
    args, flags = _plan.hyper_args(0.1, 0.9, 0.999, 1e-8, 0.0, False, False, None)
    args = _plan.with_step(args, *_plan.dense_step_scalars(1, 0.1, 0.9, 0.999))
    i1, i2 = I.SCALAR_NAMES.index("c1"), I.SCALAR_NAMES.index("c2")
    swapped = list(args)
    swapped[i1], swapped[i2] = swapped[i2], swapped[i1]
    outs = []
    for a in (args, tuple(swapped)):
        bufs = [p.copy(), g, np.zeros_like(p), np.zeros_like(p)]
        fn(*bufs, None, a, flags, 1)
        outs.append(bufs[2].copy())
    assert outs[0][0] == np.float32(0.05)           # m = (1 - b1) * g
    assert not np.array_equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="args must hold"):
        fn(*[p.copy(), g, np.zeros_like(p), np.zeros_like(p)], None, args[:-1], flags, 1)


def test_selection_by_dtype_combination():
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    for key, name in I.KERNELS.items():
        if not all(d in _plan.DTYPES for d in key[1:]):
            continue            # bfloat16 without ml_dtypes
        op, p, g, s = key[:4]
        copy = _plan.DTYPES[key[4]] if len(key) > 4 else None
        assert _plan.KERNELS.get(op, _plan.DTYPES[p], _plan.DTYPES[g], _plan.DTYPES[s],
                                 copy=copy) is getattr(_plan.KERNELS.module, name)
    with pytest.raises(TypeError, match=r"^grad: no kernel for the mixed combination.*"
                                        r"supported \(param, grad, state\)"):
        _plan.KERNELS.get("adam", f32, f64, f32)
    with pytest.raises(TypeError, match=r"^exp_avg: no kernel"):
        _plan.KERNELS.get("adam", f32, f32, f64)
    assert _plan.state_dtype(f32) is f32
    assert _plan.state_dtype(f64, np.float64) == f64
    with pytest.raises(TypeError, match="state_dtype float64 is not supported for float32"):
        _plan.state_dtype(f32, np.float64)


def test_every_combination_has_every_op():
    combos = set(I.COMBOS.values())
    dense = combos | set(I.DENSE_COMBOS.values())
    for op in I.OPS:
        assert {k[1:] for k in I.KERNELS if k[0] == op} == (dense if op in I.DENSE_OPS
                                                            else combos), op
    sr = {(I.COMBOS | I.DENSE_COMBOS)[sfx] for sfx in I.SR_COMBOS}
    for op in I.SR_OPS:
        assert {k[1:] for k in I.KERNELS if k[0] == op} == sr, op
    for op in I.COPY_OPS:
        assert {k[1:] for k in I.KERNELS if k[0] == op} == set(I.COPY_COMBOS.values()), op
    assert I.SCALAR_NAMES[-2:] == I.STEP_SCALARS
