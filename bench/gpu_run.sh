#!/usr/bin/env bash
# The GPU work on one H100 in two back-to-back parts, from the repository root (carry .whl and .gpu):
#   bash bench/gpu_run.sh bench    the side-by-side benchmark (about 9.5 minutes; timeout about 30 s more)
#   bash bench/gpu_run.sh checks   inference runtime and GPU tests (about 3.5 minutes), on the same machine
# Both parts first install the wheels carried in .whl/ (datasets, trl, liger-kernel, torchao, pytest: see
# bench/README.md); a second part on the same machine finds them installed.
# bench:  bench.bench_sft within the part's time limit: every variant is cut to end within it, so no variant is
#         killed without a row; the variants marked `profile` write their top operators (profiles.tar)
# checks: inf_tests/runtime.py with $INF_ARGS (a 7B Llama shape by default; its CSV is written after every row),
#         then the GPU tests: varlen attention against sdpa, eager and compiled (tests/test_attention.py), MPT's
#         flex attention against its eager attention (tests/test_mpt_attention.py), the
#         CUDA cases of the compiled optimizer steps, loss kernel and float8 layers (test_optim.py,
#         test_loss.py, test_levers.py), and the FSDP2 config in one process against the run without it
#         (test_distributed.py); then the precision comparison if time is left
# Outputs go to the folder named by OUT (default bench/results); everything printed is
# also in $OUT/gpu_run.log. Every step's timeout is cut to what is left of the part's time limit (PART_S),
# so the part ends in time and a hang cannot eat the rest.
set -uo pipefail
PART="${1:-bench}"
case "$PART" in
  bench) PART_S="${PART_S:-560}" ;;
  checks) PART_S="${PART_S:-215}" ;;
  *) echo "usage: bash bench/gpu_run.sh bench|checks" >&2; exit 2 ;;
esac
OUT="${OUT:-bench/results}"
INF_END_S="${INF_END_S:-125}"             # checks: the inference runtime ends by then, the GPU tests get the rest
# the inference model: Llama-2-7B's shapes with SmolLM2's tokenizer, a folder made where the embedded package is
# (python -m inf_tests.runtime --save-llama-7b .gpu/llama-2-7b-shape)
INF_ARGS="${INF_ARGS:---models random-init:.gpu/llama-2-7b-shape --variants generate static_cache+compile \
--batch-sizes 1 8 --prompt-tokens 128 --new-tokens 64 --warmup 2 --repeats 3}"
PART_START=$SECONDS
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
export MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
step() { echo; echo "=== $* ($(date +%T), $((SECONDS - PART_START)) s in)"; }
# left CAP: seconds for the next step, at most CAP and what is left of PART_S
left() { local rest=$((PART_S - (SECONDS - PART_START))); echo $((rest < $1 ? rest : $1)); }
# by MARK: seconds left until MARK seconds into the part (never past its end)
by() { local to=$(( $1 < PART_S ? $1 : PART_S )); echo $(( to - (SECONDS - PART_START) )); }

step "environment ($PART)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -d .whl ]; then  # one install per package: pip installs nothing of a list when one part fails
  for pkg in datasets trl pytest liger-kernel torchao; do
    "$PY" -m pip show -q "$pkg" >/dev/null 2>&1 && continue  # installed by the part before
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

if [ "$PART" = bench ]; then
  step "side-by-side benchmark"
  bench_s=$(left 600)
  PROFILES=$(mktemp -d)
  timeout "$((bench_s + 10))" "$PY" -m bench.bench_sft --out "$OUT" --time-limit-s "$((bench_s - 5))" --profile "$PROFILES" \
    || echo "benchmark stopped (exit $?)"
  tar cf "$OUT/profiles.tar" -C "$PROFILES" .  # one archive: easy to copy off the GPU machine
else
  if [ -n "${INF_ARGS:-}" ] && [ "$(by "$INF_END_S")" -ge 40 ]; then
    step "inference runtime"
    timeout "$(by "$INF_END_S")" "$PY" -m inf_tests.runtime --out-dir "$OUT" $INF_ARGS || echo "runtime stopped (exit $?)"
  fi
  step "GPU tests: varlen attention, MPT flex attention, compiled optimizer steps, loss kernel, float8 layers, FSDP2"
  timeout "$(left 200)" "$PY" -m pytest -v -rs -p no:cacheprovider tests/test_attention.py tests/test_optim.py \
    tests/test_mpt_attention.py \
    tests/test_loss.py tests/test_levers.py tests/test_distributed.py -k "cuda or gpu" || echo "GPU tests failed (exit $?)"
  if [ "$(left 120)" -ge 90 ]; then
    step "precision comparison"
    timeout "$(left 120)" "$PY" -m bench.precision_compare --out "$OUT" || echo "precision comparison stopped (exit $?)"
  fi
fi
step "done"
ls -la "$OUT"
