"""The README blocks the inference runtime feeds: python -m sft.report renders them from these files."""
from __future__ import annotations

from sft.report import ResultSource

# The columns the README shows (the CSV has more: inf_tests/README.md says what each means).
INFERENCE_COLUMNS = ["model", "variant", "batch_size", "prompt_tokens", "ttft_ms_p50", "decode_tok_s",
                     "decode_tok_s_batch", "latency_ms_p50", "latency_ms_p99", "peak_mem_gib", "fraction_of_bound",
                     "matches_generate", "device", "dtype", "torch", "transformers"]

SOURCES = [ResultSource("inference-cpu", "inf_tests/results/runtime_cpu.csv", INFERENCE_COLUMNS),
           ResultSource("inference-gpu", "inf_tests/results/runtime_gpu.csv", INFERENCE_COLUMNS)]
