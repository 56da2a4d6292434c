#!/usr/bin/env bash
# All the GPU work of the benchmark in one call on one H100, from the repository root:
#   bash bench/gpu_session.sh      (on the device machine: carry .whl, timeout_s about 30 s over SESSION_S)
# 1. installs the wheels carried in .whl/ (datasets, trl, liger-kernel, pytest: see bench/README.md)
# 2. checks the varlen attention path on the GPU against sdpa, eager and compiled (tests/test_attention.py),
#    and the CUDA cases of the compiled optimizer steps and loss kernel (tests/test_optim.py, test_loss.py)
# 3. runs the side-by-side benchmark (bench.bench_sft) in the time left but BENCH_RESERVE_S: every variant
#    is cut to end within it, so no variant is killed without a row
# 4. runs the precision comparison on the GPU (bench.precision_compare), if time is left
# 5. runs inf_tests/runtime.py with the flags in $INF_ARGS, when set and if time is left
# Outputs go to $OUT when set (the device machine's return folder), else bench/results; everything
# printed is also in $OUT/gpu_session.log. Every step's timeout is cut to what is left of SESSION_S, so
# the whole session ends in time and a hang cannot eat the rest; results are written after each variant.
set -uo pipefail
OUT="${OUT:-bench/results}"
SESSION_S="${SESSION_S:-530}"            # the whole script's wall-clock budget
BENCH_RESERVE_S="${BENCH_RESERVE_S:-20}"  # kept back from the benchmark (raise it to leave the precision
                                          # comparison its 90 s)
SESSION_START=$SECONDS
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_session.log") 2>&1
export MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
step() { echo; echo "=== $* ($(date +%T), $((SECONDS - SESSION_START)) s in)"; }
# left CAP: seconds for the next step, at most CAP and what is left of SESSION_S
left() { local rest=$((SESSION_S - (SECONDS - SESSION_START))); echo $((rest < $1 ? rest : $1)); }

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
timeout "$(left 120)" "$PY" -m pytest -q -rs tests/test_attention.py || echo "attention tests failed (exit $?)"

step "compiled optimizer steps, optimizer in backward and loss kernel on the GPU"
timeout "$(left 120)" "$PY" -m pytest -q -rs tests/test_optim.py tests/test_loss.py -k cuda || echo "GPU kernel tests failed (exit $?)"

step "side-by-side benchmark"
bench_s=$(( $(left 600) - BENCH_RESERVE_S ))
timeout "$((bench_s + 10))" "$PY" -m bench.bench_sft --out "$OUT" --budget-s "$bench_s" --profile "$OUT" || echo "benchmark stopped (exit $?)"

if [ "$(left 120)" -ge 90 ]; then
  step "precision comparison"
  timeout "$(left 120)" "$PY" -m bench.precision_compare --out "$OUT" || echo "precision comparison stopped (exit $?)"
else
  echo "precision comparison skipped: session budget spent"
fi

if [ -n "${INF_ARGS:-}" ] && [ "$(left 60)" -ge 40 ]; then
  step "inference runtime"
  # INF_ARGS: the runtime test's flags, e.g. --models random-init:<folder> (the embedded model's package cannot travel)
  timeout "$(left 60)" "$PY" -m inf_tests.runtime --out-dir "$OUT" ${INF_ARGS:-} || echo "runtime stopped (exit $?)"
fi
step "done"
ls -la "$OUT"
