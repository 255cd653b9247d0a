#!/usr/bin/env bash
# CI (make test): the CPU kernels built with -fsanitize=address,undefined in their own build folder, and the ops
# tests' bad-input, non-finite and edge cases run against them. Any ASan / UBSan report fails the run.
#
# Usage: tools/sanitize_check.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
libs=$("$py" tools/dev_build.py --sanitize | tail -1)
# NOTE: the ASan runtime must come first in the process; libstdc++ beside it, because python itself does not
# link libstdc++, and ASan's __cxa_throw interceptor fails ("real___cxa_throw != 0") when it cannot resolve it
# at start-up, on the first TORCH_CHECK that throws.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export S2D_NATIVE_DIR="$libs"
export OMP_NUM_THREADS=2
"$py" -c "import s2d_ext._native as n; d = n._library_dir(); assert 'sanitize' in str(d) and all(n._NATIVE.values()), (d, n._NATIVE); print('sanitized kernels from', d)"
"$py" -m pytest -q -p no:cacheprovider python_tests/ops \
  -k "(bad or non_finite or out_of_range or empty or cpp_binding or beyond or boundary or chunked or matches_reference or ties or batch_invariance) and not triton"
echo "sanitizer check: no ASan / UBSan report"
