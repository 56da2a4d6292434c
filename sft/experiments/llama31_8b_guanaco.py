"""Llama-3.1-8B (base) x openassistant-guanaco, packed to 4096 tokens, on one 80 GB GPU.

Needs the hub (the model is gated: accept its licence and log in first). Run:
`python -m sft.experiments.llama31_8b_guanaco`. The base model has no chat template, so the plain
template is used (BOS, "### Human:" / "### Assistant:" turns, each reply ending in EOS). Memory:
bf16 weights + stochastic-rounding AdamW with bf16 states (8.0B x 8 bytes = 64 GB), gradient
checkpointing, and the loss computed only on reply positions (no 128k-vocab logits for prompts).
"""
from sft.train import main

EXPERIMENT = "llama31_8b_guanaco"
MODEL = "meta-llama/Llama-3.1-8B"
MODEL_REVISION = "main"   # pin to a commit sha; the resolved commit is recorded in config.json either way
DATASET = "timdettmers/openassistant-guanaco"
DATASET_REVISION = "main"
DATASET_FORMAT = "guanaco"
EVAL_DATASET = DATASET    # its "test" split
EVAL_ROWS = 200
TEMPLATE = "auto"         # the tokenizer's chat template if it has one, else the plain template
MAX_LENGTH = 4096
TOO_LONG = "truncate"
PACKING = True
MICRO_BATCH_SIZE = 1      # packed rows of MAX_LENGTH tokens
GRAD_ACCUM_STEPS = 8
EPOCHS = 2
LR = 1e-5
SEED = 43
PRECISION = "bf16_pure"
BF16_UPDATE = "stochastic_rounding"
OPTIMIZER_STATE_DTYPE = "bfloat16"
GRADIENT_CHECKPOINTING = True
EVAL_EVERY = 25
TASK_METRIC = None
NUM_SAMPLES = 16
MAX_NEW_TOKENS = 256

if __name__ == "__main__":
    main(globals())
