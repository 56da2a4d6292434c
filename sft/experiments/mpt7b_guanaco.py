"""MPT-7B x openassistant-guanaco (all turns of every conversation, not only the first).

Needs one 80 GB GPU and the hub. Run: `python -m sft.experiments.mpt7b_guanaco`.
Memory plan and packed ALiBi attention as in mpt7b_dolphin.py. The held-out set is guanaco's own
test split.
"""
from sft.train import main

EXPERIMENT = "mpt7b_guanaco"
MODEL = "mosaicml/mpt-7b"
MODEL_REVISION = "main"   # pin to a commit sha; the resolved commit is recorded in config.json either way
DATASET = "timdettmers/openassistant-guanaco"
DATASET_REVISION = "main"
DATASET_FORMAT = "guanaco"
EVAL_DATASET = DATASET    # its "test" split
EVAL_ROWS = 200
MAX_LENGTH = 2048
TOO_LONG = "truncate"
PACKING = True
MICRO_BATCH_SIZE = 4
GRAD_ACCUM_STEPS = 2
EPOCHS = 1
LR = 2e-5
SEED = 43
PRECISION = "bf16_pure"
BF16_UPDATE = "stochastic_rounding"
OPTIMIZER_STATE_DTYPE = "bfloat16"
GRADIENT_CHECKPOINTING = True
EVAL_EVERY = 50
TASK_METRIC = None
NUM_SAMPLES = 16
MAX_NEW_TOKENS = 256

if __name__ == "__main__":
    main(globals())
