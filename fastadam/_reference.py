"""Plain-numpy oracle of every fastadam update (layer 5): the readable spec.

Slow, allocating, obviously correct. Tests compare every kernel against these
functions. Each scalar is computed in double and rounded once to the array
dtype (``fl``). ``_fma(a, b, c)`` is a fused multiply-add: exact for float32
up to a rare double rounding (the product of two float32 is exact in float64);
for float64 numpy has no fma, so it is ``a*b + c`` rounded twice -- tests
compare float64 to a few ulp, float32 to a few ulp.
"""
import math

import numpy as np


def _fl(dtype, x):
    return np.asarray(x, dtype=np.float64).astype(dtype)


def _fma(a, b, c):
    dt = np.result_type(a, b, c)
    if dt == np.float32:
        return (np.asarray(a, np.float64) * np.asarray(b, np.float64)
                + np.asarray(c, np.float64)).astype(np.float32)
    return a * b + c


def adam(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
         weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, max_exp_avg_sq=None,
         maximize=False, grad_scale=None):
    """Dense Adam/AdamW step (torch fused arithmetic), in place on the arrays given."""
    dt = param.dtype
    b1, b2 = betas
    g = np.array(grad, dtype=dt, copy=True)
    if maximize:
        g = -g
    if grad_scale is not None:
        g = g / _fl(dt, grad_scale)
    p = param.copy()
    if decoupled_weight_decay:
        p = p * _fl(dt, 1.0 - lr * weight_decay)
    elif weight_decay != 0.0:
        g = _fma(p, _fl(dt, weight_decay), g)
    m = _fma(_fl(dt, 1.0 - b1), g - exp_avg, exp_avg)               # torch lerp_
    v = _fma(_fl(dt, 1.0 - b2) * g, g, exp_avg_sq * _fl(dt, b2))
    if amsgrad:
        u = np.maximum(max_exp_avg_sq, v)
        max_exp_avg_sq[...] = u
    else:
        u = v
    bc1 = 1.0 - b1 ** step
    bc2 = 1.0 - b2 ** step
    step_size = lr / bc1
    denom = np.sqrt(u) / _fl(dt, math.sqrt(bc2)) + _fl(dt, eps)
    p = p + (_fl(dt, -step_size) * m) / denom
    param[...] = p
    exp_avg[...] = m
    exp_avg_sq[...] = v


def adamw(param, grad, exp_avg, exp_avg_sq, *, step, weight_decay=1e-2, **kw):
    adam(param, grad, exp_avg, exp_avg_sq, step=step, weight_decay=weight_decay,
         decoupled_weight_decay=True, **kw)


def grad_norm(grads):
    """L2 norm of all gradients together, accumulated in float64."""
    return math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads))
