"""MPT-7B x dolphin, as the original study (first 100k rows, lr 2e-5, 1 epoch, seed 43), done right.

Needs one 80 GB GPU and the hub. Run: `python -m sft.experiments.mpt7b_dolphin`.
Full-parameter: bf16 weights with stochastic-rounding AdamW and bf16 optimizer states
(6.7B x (2 + 2 + 4) bytes = 54 GB) plus gradient checkpointing. Examples are packed into rows of
2048 tokens: MPT's ALiBi attention runs as flex attention on the GPU (sdpa elsewhere) with each packed
example masked from the others (sft/mpt_attention.py), and 8 rows per optimizer step hold about the
64 examples a step of the original study's padded batches held. ATTN_IMPLEMENTATION = "eager" with
PACKING = False gives transformers' own MPT attention, padded.
"""
from sft.train import main

EXPERIMENT = "mpt7b_dolphin"
MODEL = "mosaicml/mpt-7b"
MODEL_REVISION = "main"   # pin to a commit sha; the resolved commit is recorded in config.json either way
DATASET = "ehartford/dolphin"
DATASET_REVISION = "main"
DATASET_FILES = "flan1m-alpaca-uncensored.jsonl"
DATASET_FORMAT = "dolphin"  # instruction = system prompt, input = user turn, output = reply
MAX_ROWS = 100_000        # streamed: only these rows are downloaded
EVAL_ROWS = 500
MAX_LENGTH = 2048
TOO_LONG = "truncate"
PACKING = True
MICRO_BATCH_SIZE = 4
GRAD_ACCUM_STEPS = 2
EPOCHS = 1
LR = 2e-5
LR_SCHEDULE = "cosine"
WARMUP_RATIO = 0.03
SEED = 43
PRECISION = "bf16_pure"
BF16_UPDATE = "stochastic_rounding"
OPTIMIZER_STATE_DTYPE = "bfloat16"
GRADIENT_CHECKPOINTING = True
EVAL_EVERY = 200
TASK_METRIC = None        # open-ended replies: held-out loss and samples, no exact match
NUM_SAMPLES = 16
MAX_NEW_TOKENS = 256

if __name__ == "__main__":
    main(globals())
