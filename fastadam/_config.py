"""``show_config()``: what was built and what was chosen at import."""
import platform
import sys
from typing import Any, Optional, TextIO

import numpy as np

from . import _dispatch, _plan, _runtime, _threads


def _build_info():
    try:
        from ._build_info import BUILD_INFO
    except ImportError:  # pragma: no cover - source tree without a build
        return {}
    return BUILD_INFO


def config() -> dict[str, Any]:
    """The configuration as a dict (the bench records it with every result)."""
    from . import __version__
    info = _build_info()
    feats = _dispatch.cpu_features()
    return {
        "fastadam": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_features": {k: v for k, v in feats.items()},
        "isa": _dispatch.ISA,
        "isa_reason": _dispatch.REASON,
        "isa_built": _dispatch.built_modules(),
        "isa_available": _dispatch.available_modules(),
        "openmp": _runtime.have_openmp() and bool(getattr(_dispatch.kernels, "OPENMP", False)),
        "fast_div": bool(getattr(_dispatch.kernels, "FAST_DIV", False)),
        "torch_vector_bytes": _plan.VECTOR_BYTES,
        "torch_vector_reason": _plan.VECTOR_BYTES_REASON,
        "threads": _threads.get_num_threads(),
        "serial_threshold": _threads.SERIAL_THRESHOLD,
        "common_flags": info.get("common_flags"),
        "isa_flags": info.get("isa_flags"),
    }


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def show_config(file: Optional[TextIO] = None) -> None:
    """Print the build and runtime configuration.

    Names the chosen kernel module and why, the modules built and usable on
    this CPU, the CPU features probed, OpenMP and threads, and build flags.

    Examples
    --------
    >>> import fastadam
    >>> fastadam.show_config()  # doctest: +SKIP
    """
    c = config()
    out = file or sys.stdout
    feats = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in c["cpu_features"].items())
    lines = [
        f"fastadam {c['fastadam']} (python {c['python']}, numpy {c['numpy']})",
        f"cpu:             {c['cpu']} ({c['machine']})",
        f"cpu features:    {feats or 'n/a (not x86)'}",
        f"kernel module:   _kernels_{c['isa']}  -- {c['isa_reason']}",
        f"modules built:   {', '.join(c['isa_built'])}",
        f"usable here:     {', '.join(c['isa_available'])}",
        f"openmp:          {'on' if c['openmp'] else 'off (serial build)'}",
        f"x / sqrt(bc2):   {'FMA units (hardware fma)' if c['fast_div'] else 'true division'}",
        f"torch tail:      last n % {c['torch_vector_bytes']}/itemsize elements "
        f"({c['torch_vector_reason']})",
        f"threads:         {c['threads']} "
        f"(serial below {c['serial_threshold']} elements per thread)",
        f"compile flags:   {' '.join(c['common_flags'] or [])}",
    ]
    for isa, fl in (c["isa_flags"] or {}).items():
        lines.append(f"  {isa:<13}  {' '.join(fl) or '(none: x86-64 baseline)'}")
    print("\n".join(lines), file=out)
