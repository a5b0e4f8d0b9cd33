"""ISA dispatch: choose the kernel module once, at import.

The CPU probe lives in ``fastadam._runtime``, which is compiled without ISA
flags, so nothing built with AVX2/AVX-512 flags is imported before the probe
says the CPU (and OS) support it. ``FASTADAM_ISA=baseline|avx2|avx512|native``
forces a module; an unsupported or unbuilt choice raises ``ImportError`` with
the reason.
"""
import importlib
import os

from . import _runtime

ISA_LEVELS = ("baseline", "avx2", "avx512", "native")
_REQUIRES = {
    "baseline": (),
    "avx2": ("avx", "avx2", "fma", "f16c"),
    "avx512": ("avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl"),
    "native": (),  # built with -march=native on this machine (FASTADAM_MARCH=native)
}


def cpu_features():
    return _runtime.cpu_features()


def built_modules():
    """ISA levels whose module was built (importable or not on this CPU)."""
    here = os.path.dirname(os.path.abspath(__file__))
    names = os.listdir(here)
    return [isa for isa in ISA_LEVELS
            if any(n.startswith(f"_kernels_{isa}.") and n.endswith((".so", ".pyd")) for n in names)]


def supported(isa):
    """Whether the CPU can run the ``isa`` module, and why not."""
    feats = cpu_features()
    missing = [f for f in _REQUIRES[isa] if not feats.get(f, False)]
    if missing:
        return False, "CPU lacks " + ", ".join(missing)
    return True, ""


def available_modules():
    """Built ISA levels that this CPU supports, best last."""
    return [isa for isa in built_modules() if supported(isa)[0]]


def load(isa):
    """Import the kernel module for ``isa`` after checking CPU support."""
    if isa not in ISA_LEVELS:
        raise ImportError(f"FASTADAM_ISA={isa!r} is not one of {', '.join(ISA_LEVELS)}")
    if isa not in built_modules():
        raise ImportError(f"FASTADAM_ISA={isa!r}: no _kernels_{isa} module was built "
                          f"(built: {', '.join(built_modules())})")
    ok, why = supported(isa)
    if not ok:
        raise ImportError(f"FASTADAM_ISA={isa!r} is not supported on this CPU: {why}")
    return importlib.import_module(f"fastadam._kernels_{isa}")


def choose():
    """Return (isa, module, reason)."""
    forced = os.environ.get("FASTADAM_ISA", "").strip().lower()
    if forced:
        return forced, load(forced), "forced by FASTADAM_ISA"
    avail = available_modules()
    if "native" in avail:
        best = "native"
    else:
        best = avail[-1] if avail else "baseline"
    feats = cpu_features()
    have = [f for f in ("avx2", "fma", "avx512f") if feats.get(f)]
    cpu = ", ".join(have) or "baseline x86-64 only"
    reason = f"best built module the CPU supports (CPU has: {cpu})"
    return best, load(best), reason


ISA, kernels, REASON = choose()
