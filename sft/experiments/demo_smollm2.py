"""Demo: SmolLM2-135M-Instruct (embedded) x the embedded demo tasks, on 2 CPU cores in a few minutes.

Edit the constants, then run `python -m sft.experiments.demo_smollm2` (or this file by its path) from
any directory: the project is installed editable (`make install`, or `pip install -e .`). The run folder
appears under the repository's runs/ (RUNS_ROOT = "..." puts it elsewhere).
"""
from sft.train import main

EXPERIMENT = "demo_smollm2"
MODEL = "embedded:smollm2-135m-instruct"
DATASET = "embedded:demo-tasks"
MAX_ROWS = None          # all rows of the demo set
EVAL_ROWS = 96           # held out: eval loss and exact match
MAX_LENGTH = 256
PACKING = True
MICRO_BATCH_SIZE = 2     # packed rows of MAX_LENGTH tokens per forward pass
GRAD_ACCUM_STEPS = 1
EPOCHS = 1
MAX_STEPS = None
LR = 1e-4
LR_SCHEDULE = "cosine"
WARMUP_RATIO = 0.05
SEED = 42
PRECISION = "auto"       # fp32 on the CPU, bf16 autocast with fp32 master weights on a GPU
EVAL_EVERY = 20
TASK_METRIC_ROWS = 96
NUM_SAMPLES = 12
MAX_NEW_TOKENS = 24

if __name__ == "__main__":
    main(globals())
