#!/usr/bin/env bash
# Work for one call of a GPU machine (README.md, Benchmarks): build the CUDA
# extension, then run the named steps, each under its own time limit so the call always returns.
#
#   tools/gpu_session.sh build test bench-verify          # first call
#   tools/gpu_session.sh build sanitize bench-kernels suite
#   tools/gpu_session.sh build bench-e2e bench-kernels      # the draft-path issue's GPU targets
#
# Logs and results go to $OUT (the device tool's output folder; /tmp/s2d_gpu_out elsewhere), packed
# into $OUT/gpu_run.tar.gz after every step, so a killed call still returns what it finished.
set -u
OUT=${OUT:-/tmp/s2d_gpu_out}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
SUMMARY="$OUT/summary.txt"

pack() { tar -czf "$OUT/gpu_run.tar.gz" -C "$OUT" logs -C "$PWD" bench/results 2>/dev/null; }
note() { echo "$*" | tee -a "$SUMMARY"; }
run_step() {  # run_step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  note "step $name: rc=$rc in $((SECONDS - start)) s"
  tail -n 4 "$OUT/logs/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
  pack
  return $rc
}

note "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$SUMMARY"

for step in "$@"; do
  case $step in
  build)
    run_step build 300 $PY -m pip install -v --no-build-isolation --no-deps -e . || exit 1
    $PY -c "import torch, s2d_ext; from s2d_ext.ops import available_backends as a; \
print({op: a(op, torch.device('cuda')) for op in ('verify', 'exit_head', 'kv_compact')})" 2>&1 | tee -a "$SUMMARY"
    ;;
  test)
    run_step test_ops 240 $PY -m pytest -q -n 12 --timeout 200 python_tests/ops ;;
  bench-verify)
    run_step bench_verify 280 $PY bench/verify.py --device cuda
    cp bench/results/verify_cuda.md "$OUT/" 2>/dev/null ;;
  bench-kernels)
    run_step bench_exit_head 150 $PY bench/exit_head.py --device cuda
    run_step bench_kv_compact 60 $PY bench/kv_compact.py --device cuda ;;
  bench-e2e)
    # issue 13: a 1.2B random-weights target in bf16 with a draft cut from it, the step's time split
    run_step bench_e2e 240 $PY bench/speculate_quick.py --device cuda --dtype bfloat16 --hidden 2048 \
      --layers 16 --vocab 32000 --repeats 2 --tag speculate_1b_cuda
    run_step bench_engine_graph 200 $PY bench/engine_cuda_graph.py --device cuda ;;
  sanitize)
    run_step memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 9 $PY tools/gpu_smoke.py
    run_step racecheck 180 compute-sanitizer --tool racecheck --error-exitcode 9 $PY tools/gpu_smoke.py --verify-only --small ;;
  suite)
    run_step suite 240 $PY -m pytest -q -n 12 --timeout 220 python_tests --ignore=python_tests/ops ;;
  *)
    note "unknown step $step" ;;
  esac
done
pack
note "== done at $(date -u +%T)"
