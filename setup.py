"""Build fastadam's Cython kernels, once per instruction-set level.

Layout of the build:

* ``fastadam/_kernels.pyx.tp`` (Tempita, with ``_sparse.pxi.tp`` included)
  is rendered with the tables of ``fastadam/_interface.py`` (the kernel
  interface: scalars, flags, dtype combinations) and written out as
  ``_kernels_<isa>.pyx`` for every ISA level, with a type stub
  ``_kernels_<isa>.pyi`` rendered from ``_kernels.pyi.tp``. The files differ
  only in their module name, so every ISA module exports exactly the same
  functions, generated from one source.
* ``fastadam/_runtime.pyx`` is the flag-free module: CPU probe, OpenMP thread
  queries and pointer helpers. It is compiled without any ISA flag so that it
  can run on every x86-64 CPU before a kernel module is chosen.

Every module is compiled with ``-fno-math-errno`` (vectorised sqrt) and
``-ffp-contract=off`` (no implicit FMA contraction: the kernels call ``fma``
explicitly where the semantics require it, so all ISA builds round the same).
``-ffast-math`` and ``-march=native`` are never used by default;
``FASTADAM_MARCH=native`` adds an extra ``_kernels_native`` module;
``FASTADAM_ISAS=avx2`` (comma list) limits the modules built (baseline always);
``FASTADAM_NO_OPENMP=1`` forces a serial build;
``FASTADAM_SANITIZE=1`` builds for AddressSanitizer + UndefinedBehaviorSanitizer
(``-fsanitize=address,undefined -fno-sanitize-recover=undefined
-fno-omit-frame-pointer -g -O1`` instead of ``-O3``, compile and link; a debugging
build, never for use: see CONTRIBUTING.md, "Sanitizers", for how to run it);
``FASTADAM_BUILD_JOBS=N`` (or ``MAX_JOBS=N``) compiles N modules at once
(default: setuptools' own, serial unless ``build_ext -j N`` is given).
OpenMP is used when the compiler supports it, else the build is serial
(with a warning).
"""
import importlib.util
import os
import platform
import subprocess
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from Cython.Tempita import Template
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.join(HERE, "fastadam")

IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
COMMON = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fno-strict-aliasing"]
LINK = []
SANITIZE = os.environ.get("FASTADAM_SANITIZE", "").strip() not in ("", "0")
if SANITIZE:  # ASan + UBSan; any UB report aborts (no recovery)
    _SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
            "-fno-omit-frame-pointer"]
    COMMON = ["-O1", "-g", "-fno-math-errno", "-ffp-contract=off", "-fno-strict-aliasing"] + _SAN
    LINK = list(_SAN)
ISA_FLAGS = {"baseline": []}
if IS_X86:
    # -mf16c: every AVX2 CPU has F16C (vcvtph2ps / vcvtps2ph: the float16 codec)
    ISA_FLAGS["avx2"] = ["-mavx", "-mavx2", "-mfma", "-mf16c"]
    ISA_FLAGS["avx512"] = [
        "-mavx", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512dq", "-mavx512bw",
        "-mavx512vl", "-mprefer-vector-width=512",
    ]
if os.environ.get("FASTADAM_MARCH", "").strip() == "native":
    ISA_FLAGS["native"] = ["-march=native"]
if os.environ.get("FASTADAM_ISAS"):  # e.g. FASTADAM_ISAS=baseline for a quick build
    _keep = {"baseline"} | set(os.environ["FASTADAM_ISAS"].split(","))
    ISA_FLAGS = {k: v for k, v in ISA_FLAGS.items() if k in _keep}


def _compiles(flags, source="int main(void){return 0;}\n", link=True):
    """Whether the default C compiler accepts ``flags`` for ``source``."""
    cc = os.environ.get("CC", "cc").split()
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as f:
            f.write(source)
        cmd = cc + flags + [src, "-o", os.path.join(d, "t.out" if link else "t.o")]
        if not link:
            cmd.insert(len(cc), "-c")
        try:
            r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return False
        return r.returncode == 0


OMP_SRC = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
if os.environ.get("FASTADAM_NO_OPENMP"):
    OPENMP = []
elif _compiles(["-fopenmp"], OMP_SRC):
    OPENMP = ["-fopenmp"]
else:
    OPENMP = []
    warnings.warn("fastadam: the C compiler has no OpenMP; building serial kernels",
                  stacklevel=1)

for isa in [k for k in ISA_FLAGS if k != "baseline"]:
    if not _compiles(ISA_FLAGS[isa], link=False):
        warnings.warn(f"fastadam: compiler rejects {isa} flags; skipping that module",
                      stacklevel=1)
        del ISA_FLAGS[isa]


def _interface():
    """``fastadam/_interface.py`` (plain Python), loaded without importing fastadam."""
    spec = importlib.util.spec_from_file_location("_fastadam_interface",
                                                  os.path.join(PKG, "_interface.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def render_templates():
    """Render ``_kernels.pyx.tp`` (and included ``*.pxi.tp``) and the type stub
    ``_kernels.pyi.tp`` for each ISA, from the tables of ``_interface.py``."""
    ns = {"I": _interface()}
    for name in os.listdir(PKG):
        if name.endswith(".pxi.tp"):
            out = os.path.join(PKG, name[:-3])
            _write_if_changed(out, _render(os.path.join(PKG, name), ns))
    src = _render(os.path.join(PKG, "_kernels.pyx.tp"), ns)
    stub = _render(os.path.join(PKG, "_kernels.pyi.tp"), ns)
    for isa in ISA_FLAGS:
        header = f"# Generated from _kernels.pyx.tp for ISA level '{isa}'. Do not edit.\n"
        body = src.replace("@ISA@", isa)
        _write_if_changed(os.path.join(PKG, f"_kernels_{isa}.pyx"), header + body)
        _write_if_changed(os.path.join(PKG, f"_kernels_{isa}.pyi"), stub)


def _render(path, ns):
    with open(path, encoding="utf-8") as f:
        return Template(f.read(), name=os.path.basename(path), namespace=ns).substitute()


def _write_if_changed(path, text):
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


render_templates()

MACROS = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
build_info = {"openmp": bool(OPENMP), "common_flags": COMMON, "isa_flags": ISA_FLAGS,
              "sanitize": SANITIZE}

extensions = [
    Extension(
        "fastadam._runtime",
        ["fastadam/_runtime.pyx"],
        include_dirs=[np.get_include()],
        define_macros=MACROS,
        extra_compile_args=COMMON + OPENMP,
        extra_link_args=OPENMP + LINK,
    )
]
for isa, flags in ISA_FLAGS.items():
    extensions.append(
        Extension(
            f"fastadam._kernels_{isa}",
            [f"fastadam/_kernels_{isa}.pyx"],
            include_dirs=[np.get_include()],
            define_macros=MACROS,
            extra_compile_args=COMMON + OPENMP + flags,
            extra_link_args=OPENMP + LINK,
        )
    )

with open(os.path.join(PKG, "_build_info.py"), "w") as f:
    f.write("# Written by setup.py at build time.\n")
    f.write(f"BUILD_INFO = {build_info!r}\n")


def _build_jobs():
    """``FASTADAM_BUILD_JOBS`` or ``MAX_JOBS`` (a positive int), else None."""
    for var in ("FASTADAM_BUILD_JOBS", "MAX_JOBS"):
        val = os.environ.get(var, "").strip()
        if val:
            if not val.isdigit() or int(val) < 1:
                raise SystemExit(f"fastadam: {var}={val!r} must be a positive integer")
            return int(val)
    return None


class BuildExt(build_ext):
    """Compile the per-ISA modules ``FASTADAM_BUILD_JOBS`` (or ``MAX_JOBS``) at a
    time when set; otherwise setuptools' default (``build_ext -j N`` works)."""

    def finalize_options(self):
        super().finalize_options()
        jobs = _build_jobs()
        if jobs is not None:
            self.parallel = jobs


setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "nonecheck": False,
            "embedsignature": True,
        },
        quiet=True,
    ),
    cmdclass={"build_ext": BuildExt},
)
