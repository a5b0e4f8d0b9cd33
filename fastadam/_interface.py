"""Design: the kernel interface, declared once (the contract of layer 1).

Everything a kernel receives besides its buffers is declared in the tables
below, and nowhere else:

* ``SCALARS`` -- the per-call scalars, all Python floats (double). The
  template (``_kernels.pyx.tp``) generates from this table the C struct
  ``fa_args`` (one ``double`` field per entry, in this order), the code that
  fills it from the ``args`` tuple every kernel takes, and the tuple
  ``ARGS`` that each compiled module exports. ``fastadam._plan`` builds the
  tuple by name from the same table, so a swapped ``c1``/``c2`` cannot pass
  silently. Each kernel rounds the doubles it uses once to its compute type.
* ``FLAGS`` -- the per-call switches, bits of the ``flags`` int.
* ``DTYPES`` -- the element types a buffer may have (numpy name -> C type
  and codec: how a non-native format is widened and rounded).
* ``COMBOS`` -- the (param, grad, state) dtype combinations compiled for
  every op, each with a suffix; ``DENSE_COMBOS`` -- those compiled for the
  dense ops only (16-bit gradients, which the sparse path does not take);
  ``SR_COMBOS`` / ``COPY_COMBOS`` -- the combinations of the stochastic-rounding
  ops and of the ``param_copy`` ops. ``KERNELS`` -- ``(op, param dtype, grad
  dtype, state dtype) -> name`` for every op and combination (the copy ops:
  ``(op, param, grad, state, param_copy dtype)``). ``fastadam._plan``
  selects a kernel by that key with one dict lookup; validation asks the
  same table which combinations exist. The template generates one function
  per entry, with one explicit name per combination (``adam32``,
  ``adam64``, ...).
* ``SIGNATURES`` -- the buffers and trailing arguments of each op, in order;
  the template writes the compiled signatures and the type stub from it, and
  a test checks both against the compiled modules.

This module is plain Python with no imports, so ``setup.py`` reads it while
rendering the templates, before anything is built. See CONTRIBUTING.md,
"Adding a kernel variant or a dtype".
"""

# name -> meaning. Order = field order of ``fa_args`` = position in ``args``.
SCALARS = (
    ("sign", "-1.0 if maximize else 1.0 (exact in every type)"),
    ("grad_scale", "the gradient is divided by it when flag 'scaled' is set"),
    ("decay", "fl(1 - lr * weight_decay) for decoupled decay, else 1.0"),
    ("weight_decay", "L2 coefficient, added as g + p * wd when flag 'l2' is set"),
    ("c1", "1 - beta1 (torch's lerp weight; c1 >= 0.5 takes lerp's other formula)"),
    ("c2", "1 - beta2"),
    ("beta1", "beta1 (sparse per-row steps)"),
    ("beta2", "beta2 (dense: v * beta2; sparse per-row steps)"),
    ("eps", "eps"),
    ("lr", "lr (sparse per-row steps)"),
    ("vec_bytes", "dense: torch's vector width in bytes; the last n % (vec_bytes / itemsize) "
                  "elements of each array take torch's scalar-tail arithmetic"),
    ("neg_step_size", "dense: -lr / bc1; sparse: -lr * sqrt(bc2) / bc1 (step-dependent)"),
    ("bc2_sqrt", "dense: sqrt(1 - beta2**step) (step-dependent)"),
)
# The step-dependent scalars: they come LAST in SCALARS, so a caller can cache
# the rest of a param group's tuple and append these two per step.
STEP_SCALARS = ("neg_step_size", "bc2_sqrt")

# name -> (bit, meaning)
FLAGS = (
    ("l2", 1, "Adam's L2 weight decay: g = g + p * weight_decay"),
    ("scaled", 2, "loss scaling: g = g / grad_scale"),
    ("rowwise", 4, "sparse: one second moment per table row"),
)

# numpy dtype name -> (C type of a buffer element, codec). Codec None: a C
# floating type, loaded and stored with C casts. Otherwise (a 16- or 8-bit
# format held in an integer C type) the templates call ``_ld_<codec>(x)`` to
# widen to the compute type and ``_st_<codec>(x)`` to round back; those two
# inline functions are written once in the codec section of _kernels.pyx.tp.
DTYPES = {
    "float32": ("float", None),
    "float64": ("double", None),
    # 16-bit formats, widened exactly and rounded to nearest even (the codecs
    # ``bf16`` / ``f16``); numpy names them ml_dtypes.bfloat16 / np.float16
    "bfloat16": ("uint16_t", "bf16"),
    "float16": ("uint16_t", "f16"),
}
# Formats with a stochastic-rounding store (``_st_<codec>_sr(x, random bits)``).
SR_CODECS = ("bf16",)

# compute C type -> (suffix, fma, sqrt, largest finite value, macro that is 1
# where the compiler has hardware fma for it)
C_MATH = {
    "float": ("32", "fmaf", "sqrtf", "FLT_MAX", "FA_FAST_FMA32"),
    "double": ("64", "fma", "sqrt", "DBL_MAX", "FA_FAST_FMA64"),
}

# The dtype combinations the kernels are compiled for: suffix -> (param,
# grad, state) dtype. Arithmetic is float64 for float64 params, else float32.
COMBOS = {
    "32": ("float32", "float32", "float32"),
    "64": ("float64", "float64", "float64"),
    # float32 params, bfloat16 moments (DeepSpeed's bf16 optimizer states)
    "32_bf16s": ("float32", "float32", "bfloat16"),
    # bfloat16 params (embedding tables) and moments with float32 gradients
    # (the sparse path sums gradient rows in float32; bf16 rows are widened first)
    "bf16_32g": ("bfloat16", "float32", "bfloat16"),
}

# The ops every combination has (one compiled function each).
OPS = ("adam", "adam_multi", "sparse_adam", "sparse_adam_catchup")
DENSE_OPS = ("adam", "adam_multi")

# Combinations compiled for the dense ops only (suffix -> (param, grad, state)).
DENSE_COMBOS = {
    "bf16": ("bfloat16", "bfloat16", "bfloat16"),     # torch fused on bf16, bit for bit
    "f16": ("float16", "float16", "float16"),         # torch fused on fp16, bit for bit
    "32_bf16g": ("float32", "bfloat16", "float32"),   # grads from an accelerator
    "32_f16g": ("float32", "float16", "float32"),
    "32_bf16gs": ("float32", "bfloat16", "bfloat16"),  # offload: bf16 grads and moments
    # 16-bit params and grads with float32 moments: the dense loops of the
    # 8-bit-state kernels of bf16 / fp16 params (Q8_COMBOS), also a dense step
    "bf16_32s": ("bfloat16", "bfloat16", "float32"),
    "f16_32s": ("float16", "float16", "float32"),
}

# Stochastic rounding of the bfloat16 buffers that have no float32 master
# (params and/or state): ops ``adam_sr``/``adam_sr_multi`` take a per-array
# 64-bit key (``sr_key`` / ``sr_keys``: from seed and step, _plan.sr_key).
SR_OPS = ("adam_sr", "adam_sr_multi")
SR_COMBOS = ("bf16", "32_bf16s", "32_bf16gs")

# float32 master params whose update is also written, rounded to nearest
# even, to a 16-bit ``param_copy`` in the same pass (suffix -> (param, grad,
# state, param_copy)); ops ``adam_copy``/``adam_copy_multi``.
COPY_OPS = ("adam_copy", "adam_copy_multi")
COPY_COMBOS = {
    "32_cbf16": ("float32", "float32", "float32", "bfloat16"),
    "32_cf16": ("float32", "float32", "float32", "float16"),
    "32_bf16g_cbf16": ("float32", "bfloat16", "float32", "bfloat16"),
    "32_f16g_cf16": ("float32", "float16", "float32", "float16"),
    "32_bf16gs_cbf16": ("float32", "bfloat16", "bfloat16", "bfloat16"),
}

_ALL = {**COMBOS, **DENSE_COMBOS}
# (op, param dtype, grad dtype, state dtype) -> compiled name, e.g. "adam32";
# the copy ops' keys end with the param_copy dtype
KERNELS: dict[tuple[str, ...], str] = {(op,) + combo: op + sfx for op in OPS
                                       for sfx, combo in COMBOS.items()}
KERNELS.update({(op,) + combo: op + sfx for op in DENSE_OPS
                for sfx, combo in DENSE_COMBOS.items()})
KERNELS.update({(op,) + _ALL[sfx]: op + sfx for op in SR_OPS for sfx in SR_COMBOS})
KERNELS.update({(op,) + combo: op + sfx for op in COPY_OPS
                for sfx, combo in COPY_COMBOS.items()})

# The gradient-norm kernel, by gradient dtype.
NORM_KERNELS = {"float32": "sumsq_multi32", "float64": "sumsq_multi64"}

# op -> buffer arguments of the compiled function, in order; after them every
# op takes TRAILING: ``args`` (tuple of SCALARS), ``flags`` (int of FLAGS),
# ``n_threads`` (int).
SIGNATURES = {
    "adam": ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "adam_multi": ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                   "offsets", "neg_step_sizes", "bc2_sqrts"),
    "sparse_adam": ("table", "indices", "grad_rows", "exp_avg", "exp_avg_sq",
                    "max_exp_avg_sq", "row_step"),
    # the dense-equivalent sparse step: last_step int64 (n_rows,), history
    # float64 (step + 1, 5) (see _sparse.pxi.tp, "catch-up")
    "sparse_adam_catchup": ("table", "indices", "grad_rows", "exp_avg", "exp_avg_sq",
                            "max_exp_avg_sq", "last_step", "history"),
    "adam_sr": ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "sr_key"),
    "adam_sr_multi": ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                      "offsets", "neg_step_sizes", "bc2_sqrts", "sr_keys"),
    "adam_copy": ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "param_copy"),
    "adam_copy_multi": ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                        "offsets", "neg_step_sizes", "bc2_sqrts", "param_copies"),
}
TRAILING = ("args", "flags", "n_threads")

# ------------------------------------------- 8-bit blockwise state (issue 13)
# exp_avg / exp_avg_sq held as uint8 codes into the 256-value dynamic maps of
# Dettmers et al. 2021 (signed for exp_avg, unsigned for exp_avg_sq), one
# float32 absmax per block of Q8_BLOCK elements (see fastadam/_quant.py and
# docs/guide/q8.md). Ops and combinations of their own: the float ops above
# are not generated for them. A combination is (param, grad, "uint8"); the
# compute type is float32. Each needs the float32-state combination of the
# same param and grad dtypes in COMBOS or DENSE_COMBOS: its dense loop runs
# on each dequantised block (loads and stores through I.load / I.store, so a
# 16-bit param is rounded to nearest even by its codec).
Q8_BLOCK = 256          # elements per absmax block
Q8_MIN_SIZE = 4096      # the optimizers keep float32 state for smaller arrays
# The exact nearest-code lookup of each map (signed, unsigned): key =
# (bits(|y|) >> shift) - base, clamped to [0, nkeys - 1] (|y| clamped to 1.0
# first; |y| < 2**-24 is key 0): the exponent and the top 7 (signed map) or 8
# (unsigned map: twice the values per decade) mantissa bits.
Q8_KEYS = {"signed": (16, 103 << 7, (24 << 7) + 1), "unsigned": (15, 103 << 8, (24 << 8) + 1)}
Q8_OPS = ("adam_q8", "adam_q8_multi")
Q8_COMBOS = {
    "32": ("float32", "float32", "uint8"),
    "bf16": ("bfloat16", "bfloat16", "uint8"),       # bf16 params and grads
    "f16": ("float16", "float16", "uint8"),          # fp16 params and grads
    "32_bf16g": ("float32", "bfloat16", "uint8"),    # float32 master, bf16 grads
    "32_f16g": ("float32", "float16", "uint8"),
}
KERNELS.update({(op,) + combo: f"{op}_{sfx}" for op in Q8_OPS
                for sfx, combo in Q8_COMBOS.items()})   # adam_q8_32, ...
SIGNATURES.update({
    "adam_q8": ("param", "grad", "exp_avg", "exp_avg_sq", "exp_avg_absmax",
                "exp_avg_sq_absmax", "qtables"),
    "adam_q8_multi": ("params", "grads", "exp_avgs", "exp_avg_sqs", "exp_avg_absmaxes",
                      "exp_avg_sq_absmaxes", "offsets", "neg_step_sizes", "bc2_sqrts",
                      "qtables"),
})

# 8-bit row state for embedding tables (the sparse path, issue 13): each row of
# ``dim`` elements is split into ceil(dim / Q8_BLOCK) blocks of its own (a
# block never spans two rows), ``exp_avg``/``exp_avg_sq`` uint8 codes of the
# table's shape, ``exp_avg_absmax``/``exp_avg_sq_absmax`` float32 of shape
# (n_rows, ceil(dim / Q8_BLOCK)). A combination of its own table (the dense
# Q8_COMBOS entries are not compiled for the sparse op): (table, grad rows,
# "uint8"); each needs the float32-state sparse combination of the same
# table/grad dtypes in COMBOS, whose row update the kernel runs per block.
SPARSE_Q8_OPS = ("sparse_adam_q8",)
SPARSE_Q8_COMBOS = {
    "32": ("float32", "float32", "uint8"),
}
KERNELS.update({(op,) + combo: f"{op}_{sfx}" for op in SPARSE_Q8_OPS
                for sfx, combo in SPARSE_Q8_COMBOS.items()})   # sparse_adam_q8_32
SIGNATURES["sparse_adam_q8"] = ("table", "indices", "grad_rows", "exp_avg", "exp_avg_sq",
                                "exp_avg_absmax", "exp_avg_sq_absmax", "row_step", "qtables")

SCALAR_NAMES = tuple(name for name, _ in SCALARS)
FLAG_BITS = {name: bit for name, bit, _ in FLAGS}


def compute_dtype(param_dtype):
    """The arithmetic type of a combination: float64 for float64 params, else float32."""
    return "float64" if param_dtype == "float64" else "float32"


def combos():
    """For the templates: ``(suffix, TP, TG, TS, TC)`` C types per combination."""
    return [(sfx, DTYPES[p][0], DTYPES[g][0], DTYPES[s][0], DTYPES[compute_dtype(p)][0])
            for sfx, (p, g, s) in COMBOS.items()]


def codecs(sfx):
    """For the templates: the codecs of combination ``sfx``'s param, grad, state
    (and param_copy, for a copy combination)."""
    combo = COMBOS.get(sfx) or DENSE_COMBOS.get(sfx) or COPY_COMBOS[sfx]
    return tuple(DTYPES[name][1] for name in combo)


def dense_families():
    """For the dense template: ``(kind, suffix, TP, TG, TS, TC, TCOPY)`` per
    compiled family of dense kernels; ``kind`` is ``""`` (ops adam /
    adam_multi), ``"sr"`` or ``"copy"``; ``TCOPY`` the param_copy C type or None."""
    out: list[tuple[str, str, str, str, str, str, str | None]] = []
    for sfx, (p, g, s) in _ALL.items():
        out.append(("", sfx, DTYPES[p][0], DTYPES[g][0], DTYPES[s][0],
                    DTYPES[compute_dtype(p)][0], None))
    for sfx in SR_COMBOS:
        p, g, s = _ALL[sfx]
        out.append(("sr", sfx, DTYPES[p][0], DTYPES[g][0], DTYPES[s][0],
                    DTYPES[compute_dtype(p)][0], None))
    for sfx, (p, g, s, c) in COPY_COMBOS.items():
        out.append(("copy", sfx, DTYPES[p][0], DTYPES[g][0], DTYPES[s][0],
                    DTYPES[compute_dtype(p)][0], DTYPES[c][0]))
    return out


def pruned(sfx):
    """Whether the dense loops of combination ``sfx`` are compiled with fewer
    variants (build time): the lerp formula chosen by a select in the loop
    instead of a variant, and no ``bc2_sqrt == 1`` variant (8 loops instead
    of 32). The float32/float64 combinations keep all 32."""
    return sfx not in ("32", "64")


def ctypes():
    """For the templates: every buffer C type (one restrict typedef each)."""
    return sorted({ctype for ctype, _ in DTYPES.values()})


def load(codec, compute_ctype, expr):
    """For the templates: C code widening buffer element ``expr`` to the compute type."""
    return f"(<{compute_ctype}>{expr})" if codec is None else f"_ld_{codec}({expr})"


def store(codec, ctype, expr, tail=False, sr=None):
    """For the templates: C code rounding compute-type ``expr`` to a buffer element.

    ``tail``: in torch's scalar tail (a codec may round NaN differently there,
    as torch's scalar conversion does); ``sr``: C expression of 32 random bits
    for a stochastic-rounding store (codecs in ``SR_CODECS`` only).
    """
    if codec is None:
        return f"<{ctype}>{expr}"
    if sr is not None and codec in SR_CODECS:
        return f"_st_{codec}_sr({expr}, {sr})"
    return f"_st_{codec}{'_tail' if tail else ''}({expr})"


def compute_types():
    """For the templates: ``(suffix, C type, fma, sqrt, largest, fast-fma macro)``."""
    return [(m[0], c) + m[1:] for c, m in C_MATH.items()]


def math_of(ctype):
    """For the templates: ``compute_types()``'s entry of one C type."""
    m = C_MATH[ctype]
    return (m[0], ctype) + m[1:]


def q8_combos():
    """For the templates: ``(sfx, TP, TG, dense)`` per 8-bit-state combination;
    ``dense`` is the suffix of the float32-state combination of the same param
    and grad dtypes, whose update loops the 8-bit kernel runs on each block."""
    out = []
    for sfx, (p, g, _) in Q8_COMBOS.items():
        dense = [d for d, combo in _ALL.items() if combo == (p, g, "float32")]
        if not dense:
            raise ValueError(f"8-bit combination {sfx} ({p}, {g}) needs the dense "
                             f"combination ({p}, {g}, float32) in COMBOS or DENSE_COMBOS")
        out.append((sfx, DTYPES[p][0], DTYPES[g][0], dense[0]))
    return out


def sparse_q8_combos():
    """For the templates: ``(sfx, TP, TG, sparse)`` per 8-bit row-state
    combination; ``sparse`` is the suffix of the float32-state sparse
    combination of the same table and grad dtypes, whose row function the
    kernel runs on each dequantised block."""
    out = []
    for sfx, (p, g, _) in SPARSE_Q8_COMBOS.items():
        dense = [d for d, combo in COMBOS.items() if combo == (p, g, "float32")]
        if not dense:
            raise ValueError(f"8-bit sparse combination {sfx} ({p}, {g}) needs the "
                             f"combination ({p}, {g}, float32) in COMBOS")
        out.append((sfx, DTYPES[p][0], DTYPES[g][0], dense[0]))
    return out


assert SCALAR_NAMES[-len(STEP_SCALARS):] == STEP_SCALARS, "step scalars come last"
