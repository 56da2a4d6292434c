"""Qwen3-8B x OpenR1-Math-220k: reasoning traces, packed to 16k tokens, on one 80 GB GPU.

The rows' assistant turns hold the reasoning inline (`<think>...</think>` before the answer); it is read
into `reasoning_content`, the field Qwen3's template renders, so the loss covers the reasoning, the answer
and <|im_end|>. Qwen3's template drops the reasoning of turns before the last user message: with
MULTI_TURN = "per_turn" every assistant turn of a multi-turn row is trained after exactly the history the
template gives it at inference (data_stats.json counts the examples per row). Needs the hub. Run
`python -m sft.experiments.qwen3_8b_reasoning`; `python -m sft.preview` on this file shows the first rows as
training sees them. Memory: bf16 weights, stochastic-rounding AdamW with 8-bit states, every layer
recomputed, the loss on supervised positions only.
"""
from sft.train import main

EXPERIMENT = "qwen3_8b_reasoning"
MODEL = "Qwen/Qwen3-8B"
MODEL_REVISION = "main"   # pin to a commit sha; the resolved commit is recorded in config.json either way
DATASET = "open-r1/OpenR1-Math-220k"
DATASET_REVISION = "main"
DATASET_FORMAT = "messages"
MULTI_TURN = "per_turn"
EVAL_ROWS = 200
MAX_LENGTH = 16384        # reasoning traces run to 4k-16k tokens
TOO_LONG = "drop"         # a cut trace would teach the model to stop thinking mid-way; counted in data_stats.json
PACKING = True
MICRO_BATCH_SIZE = 1      # one packed row of MAX_LENGTH tokens
GRAD_ACCUM_STEPS = 8
EPOCHS = 1
LR = 1e-5
SEED = 42
PRECISION = "bf16_pure"
BF16_UPDATE = "stochastic_rounding"
OPTIMIZER_STATE_DTYPE = "int8"
GRADIENT_CHECKPOINTING = True
ATTN_IMPLEMENTATION = "auto"  # varlen flash attention over the packed examples on GPUs
EVAL_EVERY = 100
TASK_METRIC = "exact_match"   # the final answer, after the reasoning
TASK_METRIC_ROWS = 64
NUM_SAMPLES = 8
MAX_NEW_TOKENS = 4096

if __name__ == "__main__":
    main(globals())
