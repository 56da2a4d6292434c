#!/usr/bin/env bash
# The GPU proof in one command, from the repository root, on a machine with one H200 (or H100):
#   bash bench/gpu_run.sh              480 s of wall time (BUDGET_S); run it with a timeout about 30 s above that
#   bash bench/gpu_run.sh --dry-run    the plan, its order and each row's time estimate; runs nothing
# It needs nothing from an earlier command: it installs the wheels carried in .whl/ (datasets, trl, liger-kernel,
# torchao: see bench/README.md) and reads the 7B inference model's config from .gpu/llama-2-7b-shape (carry both).
# Then bench/gpu_run.py runs its rows most important first (ours 1B, TRL 1B, the study's 1B recipe, ours 7B with
# 8-bit states, ours MPT-7B packed, 7B batch-1 decode on a static cache with compile, FSDP2 in one process), then
# the rest as time allows; a row that does not fit in what is left is recorded as skipped. Each row is written to
# bench/results (and inf_tests/results) as soon as it ends; at the end the goal lines (bench_gpu_goals.md) and
# the README's result blocks are regenerated, so the results can be committed as they are. Everything printed is
# also in bench/results/gpu_run.log. With OUT set, the results folders and the README are copied there too.
set -uo pipefail
BUDGET_S="${BUDGET_S:-480}"
RESULTS=bench/results
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
if [ "${1:-}" = "--dry-run" ]; then
  exec "$PY" -m bench.gpu_run --dry-run --budget-s "$BUDGET_S"
fi
exec > >(tee "$RESULTS/gpu_run.log") 2>&1
export MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
echo "=== GPU proof ($(date +%T)), budget $BUDGET_S s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -m bench.gpu_run --budget-s "$BUDGET_S" "$@" || echo "the GPU proof stopped (exit $?)"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/bench" "$OUT/inf_tests"
  cp -r bench/results "$OUT/bench/" && cp -r inf_tests/results "$OUT/inf_tests/" && cp README.md "$OUT/"
fi
echo "=== done ($(date +%T))"
