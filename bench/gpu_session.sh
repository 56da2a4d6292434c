#!/usr/bin/env bash
# All the GPU work of the benchmark in one call on one H100 (about 9.5 minutes at most), from the
# repository root:  bash bench/gpu_session.sh      (on the device machine: carry .whl, timeout_s=600)
# 1. installs the wheels carried in .whl/ (datasets, trl, liger-kernel, pytest: see bench/README.md)
# 2. checks the varlen attention path on the GPU against sdpa (tests/test_attention.py)
# 3. runs the side-by-side benchmark (bench.bench_sft; skips the plan's tail past its time budget)
# 4. runs the precision comparison on the GPU (bench.precision_compare)
# 5. runs inf_tests/runtime.py if present (flags from $INF_ARGS)
# Outputs go to $OUT when set (the device machine's return folder), else bench/results; everything
# printed is also in $OUT/gpu_session.log. Each step has its own timeout so a hang cannot eat the rest.
set -uo pipefail
OUT="${OUT:-bench/results}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-290}"   # no new benchmark variant starts after this many seconds
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_session.log") 2>&1
export MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
step() { echo; echo "=== $* ($(date +%T))"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -d .whl ]; then  # one install per package: pip installs nothing of a list when one part fails
  for pkg in datasets trl pytest liger-kernel; do
    "$PY" -m pip install -q --no-index --find-links .whl "$pkg" || echo "could not install $pkg"
  done
fi
"$PY" - <<'EOF'
import inspect, torch, transformers
print("torch", torch.__version__, "| transformers", transformers.__version__, "|",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
except ImportError as e:
    print("no varlen_attn:", e)
EOF

step "varlen attention against sdpa on the GPU"
timeout 90 "$PY" -m pytest -q -rs tests/test_attention.py || echo "attention tests failed (exit $?)"

step "side-by-side benchmark"
timeout 360 "$PY" -m bench.bench_sft --out "$OUT" --budget-s "$BENCH_BUDGET_S" || echo "benchmark stopped (exit $?)"

step "precision comparison"
timeout 60 "$PY" -m bench.precision_compare --out "$OUT" || echo "precision comparison stopped (exit $?)"

if [ -f inf_tests/runtime.py ]; then
  step "inference runtime"
  # INF_ARGS: extra flags (e.g. --models random-init:<folder>; the embedded model's 94 MB package cannot travel)
  timeout 50 "$PY" -m inf_tests.runtime --out-dir "$OUT" ${INF_ARGS:-} || echo "runtime stopped (exit $?)"
fi
step "done"
ls -la "$OUT"
