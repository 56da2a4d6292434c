"""Llama-3.1-8B-Instruct x glaive function calling (LLaMA-Factory's ShareGPT layout), on one 80 GB GPU.

Rows are ShareGPT conversations with `function_call` and `observation` turns and a `tools` column: each
call becomes an assistant `tool_calls` turn, each observation a `tool` turn, and the tools go to Llama 3.1's
template, which lists them in the first user turn and renders a call as `{"name": ..., "parameters": ...}`.
The calls and answers are supervised with their <|eot_id|>; tool results are not. Llama 3.1 renders one call
per turn: a row with several in one turn is an error that names it (`python -m sft.preview` on this file
shows the first rows as training sees them). Needs the hub (the model is gated). Run
`python -m sft.experiments.llama31_8b_instruct_tools`.
"""
from sft.train import main

EXPERIMENT = "llama31_8b_instruct_tools"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MODEL_REVISION = "main"   # pin to a commit sha; the resolved commit is recorded in config.json either way
DATASET = "hiyouga/glaive-function-calling-v2-sharegpt"
DATASET_REVISION = "e9e063d1e1a4d9e0907f6b60f9493a1a7c9e6496"
DATASET_FILES = "glaive_toolcall.json"
DATASET_FORMAT = "sharegpt"
MAX_ROWS = 50000
EVAL_ROWS = 500
MAX_LENGTH = 4096
TOO_LONG = "drop"
PACKING = True
MICRO_BATCH_SIZE = 2
GRAD_ACCUM_STEPS = 4
EPOCHS = 1
LR = 1e-5
SEED = 42
PRECISION = "bf16_pure"
BF16_UPDATE = "stochastic_rounding"
OPTIMIZER_STATE_DTYPE = "bfloat16"
GRADIENT_CHECKPOINTING = True
EVAL_EVERY = 100
TASK_METRIC = "tool_call_match"  # the calls the model makes against the row's: name and arguments as JSON
TASK_METRIC_ROWS = 128
NUM_SAMPLES = 8
MAX_NEW_TOKENS = 256

if __name__ == "__main__":
    main(globals())
