#!/usr/bin/env bash
# The sanitizer job: build fastadam with FASTADAM_SANITIZE=1 (AddressSanitizer +
# UndefinedBehaviorSanitizer) in a separate copy of the source tree and run the test
# suite against that build. Exits non-zero on a build failure, a failing test or any
# sanitizer report. The developer's in-place build is never touched.
#
#   scripts/sanitize.sh                 # default selection (below)
#   scripts/sanitize.sh tests/test_sparse.py -k merge   # any pytest arguments instead
#
# Environment:
#   FASTADAM_SANITIZE_DIR=DIR  build in DIR and keep it (rebuilds are incremental);
#                              default: a temporary directory, removed at exit
#   FASTADAM_ISAS=...          ISA modules to build (default: the best one this CPU runs;
#                              baseline is always built)
#   PYTHON                     the interpreter (default: python)
#
# Default selection: the whole suite and the doctests except the `torch` and `slow`
# markers, then the torch layer's hardening, plan and conformance files (TORCH_SUBSET:
# ~300 tests, ~20 s: bad tensors, swaps, partial-write checks, the views the torch layer
# hands the kernels). `slow` is test_build.py (builds more copies) and test_bench.py
# (timings); neither runs kernel code the rest does not. torch is not instrumented and
# the interceptors slow it down: the torch parity and property suites (test_torch.py,
# test_parity_torch*.py, test_properties_torch.py) took 5 minutes here (2 cores), so
# they run only when named: `scripts/sanitize.sh tests/test_torch.py ...`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
t0=$(date +%s)

if [ -n "${FASTADAM_SANITIZE_DIR:-}" ]; then
    DIR=$FASTADAM_SANITIZE_DIR
    mkdir -p "$DIR"
else
    DIR=$(mktemp -d "${TMPDIR:-/tmp}/fastadam-sanitize.XXXXXX")
    keep=0  # kept after a failure, for its build.log and test.log
    trap '[ "$keep" = 1 ] || rm -rf "$DIR"' EXIT
fi
DIR=$(cd "$DIR" && pwd)
case "$DIR/" in "$ROOT"/) echo "sanitize.sh: FASTADAM_SANITIZE_DIR must not be the source tree" >&2; exit 2;; esac

# Copy the tracked and untracked-but-not-ignored files (what `git status` knows), no
# build products. tar keeps the modification times, so a kept DIR rebuilds incrementally.
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -C "$DIR" -xf -

# Baseline + the best ISA module this CPU runs (a third of the compile time of all three).
if [ -z "${FASTADAM_ISAS:-}" ]; then
    FASTADAM_ISAS=baseline
    flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true) "
    has() { for f in "$@"; do case "$flags" in *" $f "*) ;; *) return 1;; esac; done; }
    if has avx2 fma avx512f avx512dq avx512bw avx512vl; then FASTADAM_ISAS=avx512
    elif has avx2 fma; then FASTADAM_ISAS=avx2; fi
fi
echo "sanitize.sh: building in $DIR (FASTADAM_ISAS=$FASTADAM_ISAS)"
(cd "$DIR" && FASTADAM_SANITIZE=1 FASTADAM_ISAS=$FASTADAM_ISAS \
    FASTADAM_BUILD_JOBS=${FASTADAM_BUILD_JOBS:-2} \
    "$PYTHON" setup.py -q build_ext --inplace >build.log 2>&1) \
    || { keep=1; tail -50 "$DIR/build.log"; echo "sanitize.sh: the sanitized build failed" >&2; exit 1; }
t1=$(date +%s)
echo "sanitize.sh: built in $((t1 - t0)) s"

# CPython is not built with ASan: the runtimes must be loaded first; leaks are not
# checked (CPython keeps its allocations to the end); any UB report aborts.
CC_=${CC:-gcc}
ASAN_LIB=$($CC_ -print-file-name=libasan.so)
UBSAN_LIB=$($CC_ -print-file-name=libubsan.so)
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
    [ -f "$lib" ] || { echo "sanitize.sh: $lib not found ($CC_ has no sanitizer runtimes)" >&2; exit 2; }
done
export LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONPATH="$DIR"
unset FASTADAM_ISA

cd "$DIR"
# Make sure the tests will see this build, not an installed or in-place one.
"$PYTHON" -c "
import fastadam, fastadam._build_info as b
assert fastadam.__file__.startswith('$DIR/'), fastadam.__file__
assert b.BUILD_INFO.get('sanitize'), 'not a FASTADAM_SANITIZE=1 build'
print('sanitize.sh: testing', fastadam.__file__, 'kernels', fastadam.isa)
"

TORCH_SUBSET=()
if [ $# -eq 0 ]; then
    TORCH_SUBSET=(tests/test_torch_harden.py tests/test_torch_plan.py tests/test_torch_conformance.py)
    # the soak test is left out: it asserts RSS stays flat, and ASan's quarantine of
    # freed memory makes RSS grow by design (tracemalloc stays flat there too)
    set -- -m "not torch and not slow" tests --doctest-modules fastadam \
        --deselect tests/test_soak.py::test_soak_memory_is_flat
fi
# --capture=sys: pytest would otherwise redirect fd 2 to a temporary file and a
# sanitizer report (written to fd 2 just before the process aborts) would be lost.
status=0
"$PYTHON" -m pytest -q -p no:cacheprovider --capture=sys "$@" 2>&1 | tee "$DIR/test.log" \
    || status=1
if [ ${#TORCH_SUBSET[@]} -gt 0 ] && "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pytest -q -p no:cacheprovider --capture=sys "${TORCH_SUBSET[@]}" 2>&1 \
        | tee -a "$DIR/test.log" || status=1
fi
t2=$(date +%s)
if grep -Eq 'ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer' \
        "$DIR/test.log"; then
    echo "sanitize.sh: SANITIZER REPORT (above; also in $DIR/test.log)" >&2
    status=1
fi
keep=$status
echo "sanitize.sh: tests in $((t2 - t1)) s, total $((t2 - t0)) s, status $status"
exit $status
