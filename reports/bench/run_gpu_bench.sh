#!/usr/bin/env bash
# Issue 9's GPU checks and benchmark on the device machine, in parts that fit one call each:
#
#     bash reports/bench/run_gpu_bench.sh [tests|bench|all]        (all: the default)
#
#   tests: the GPU-only tests (the device cache's no-sync test, the CUDA evaluation test, tests/test_cuda_graph.py
#          with compile off and all), capped at PFE_TEST_TIMEOUT (200 s);
#   bench: `python3 -m pfe.cli bench --device cuda` (`bench train`, then `bench eval` and `bench rerank`), capped
#          at PFE_BENCH_TIMEOUT (370 s; 560 s when it runs alone). PFE_BENCH_ARGS replaces its arguments, e.g.
#          PFE_BENCH_ARGS="train --device cuda --only baseline,stage1,stage2,epoch_device_cache,eval" for the
#          acceptance rows alone. `bench train` measures, in this order: baseline, stage I and stage II with the
#          defaults (CUDA graph, compile=all, frozen_main=auto); the same graphed with nothing compiled, then
#          eager; two stage-I epochs of a generated SynthReID JPEG set through data.cache=device; the
#          MSMT17-size evaluation; baseline and stage I with runtime.autotune=coordinate_descent,
#          max_autotune_gemm and max_autotune; profiles; stages I and II with compile=regions; stage II with frozen_main=modules and
#          with the copy auto did not pick; stage II's frozen forward alone; MFA-dagger; the epochs through
#          DataLoader workers. The first step of each compiled variant takes 20-50 s (more with autotuning), so
#          a capped run may stop early; bench_cuda.json is rewritten after every measurement and keeps what
#          was measured.
#
# 1. Here, once per session (pip access needed):   bash reports/bench/fetch_wheels.sh
# 2. The device call (the `run` tool), from the repo root:
#        command: bash reports/bench/run_gpu_bench.sh bench      carry: [".whl"]      timeout_s: 590
# 3. Copy the files that come back (bench_cuda.json/.md, eval_cuda.*, rerank_cuda.*, log.txt,
#    pytest_cuda.txt) into reports/bench/ (log.txt as log_cuda.txt), draw the figure here
#    (`pfe-study bench plot --out reports/bench`: bench_cuda.png; the device returns at most 8 files,
#    so it is not made there) and commit them with the figures in the note.
#
# What earlier runs measured and what the next call should run: reports/bench/NOTES.md. The project runs
# from the source tree (PYTHONPATH=.); pydantic and its deps come from .whl/.
set -uo pipefail
PART=${1:-all}
case "$PART" in tests|bench|all) ;; *) echo "usage: run_gpu_bench.sh [tests|bench|all]"; exit 2 ;; esac
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/pfe-bench-out}
mkdir -p "$OUT/bench"
SITE=/tmp/pfe-site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH="$SITE"
else
  echo "no .whl/ here: run reports/bench/fetch_wheels.sh before the call and carry .whl (pydantic is not installed there)"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 - <<'EOF' || exit 4
import torch, pydantic, pfe.config, pfe.engine.trainer  # noqa: F401  (fails fast when something is missing)
print(f"torch {torch.__version__} cuda {torch.version.cuda} pydantic {pydantic.VERSION}; "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE'}")
EOF
if [ "$PART" != bench ]; then
  timeout "${PFE_TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -p no:logging --durations=8 \
    tests/test_device_cache.py::test_an_epoch_on_a_gpu_never_waits_for_the_device \
    tests/test_evaluation.py::test_cuda_matches_cpu tests/test_cuda_graph.py > "$OUT/bench/pytest_cuda.txt" 2>&1
  rc=$?
  echo "GPU tests: exit status $rc ($(tail -1 "$OUT/bench/pytest_cuda.txt"))"
  [ "$PART" = tests ] && exit "$rc"
fi
[ "$PART" = bench ] && BENCH_TIMEOUT=${PFE_BENCH_TIMEOUT:-560} || BENCH_TIMEOUT=${PFE_BENCH_TIMEOUT:-370}
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv 2>&1 | tee "$OUT/bench/log.txt"
# PFE_BENCH_ARGS: some measurements (--only), or a dry run elsewhere: PFE_BENCH_ARGS="train --device cpu --quick"
# shellcheck disable=SC2086
timeout "$BENCH_TIMEOUT" python3 -m pfe.cli bench ${PFE_BENCH_ARGS:---device cuda} --out "$OUT/bench" 2>&1 \
  | tee -a "$OUT/bench/log.txt"
rc=${PIPESTATUS[0]}
rm -f "$OUT"/bench/*.png  # drawn here from the JSON (pfe-study bench plot): the device returns at most 8 files
echo "=== exit status $rc (124: cut at $BENCH_TIMEOUT s) ==="
for f in "$OUT"/bench/bench_*.json; do
  echo "=== $f ==="
  cat "$f" 2>/dev/null || echo "(not written)"
done
exit "$rc"
