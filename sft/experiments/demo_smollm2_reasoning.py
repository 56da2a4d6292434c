"""Demo: SmolLM2-135M-Instruct (embedded) learns to reason briefly, then answer, on 2 CPU cores.

The embedded `embedded:demo-reasoning` set gives each answer a short worked reasoning (the letters of a word
spelt out, tens and units added apart). SmolLM2's chat template has no place for reasoning, so
REASONING_TAGS writes it inline, `<think>\\n...\\n</think>\\n\\n` before the answer, into the template the
model is saved with: training, the held-out samples and inference all render it so. The loss covers the
reasoning, the answer and <|im_end|>; exact match compares the answer only. Run
`python -m sft.experiments.demo_smollm2_reasoning`.
"""
from sft.train import main

EXPERIMENT = "demo_smollm2_reasoning"
MODEL = "embedded:smollm2-135m-instruct"
DATASET = "embedded:demo-reasoning"
REASONING_TAGS = ("<think>", "</think>")
MAX_ROWS = 480           # of 789: a few minutes on 2 CPU cores
EVAL_ROWS = 64
MAX_LENGTH = 256
PACKING = True
MICRO_BATCH_SIZE = 2
EPOCHS = 1
LR = 2e-4
WARMUP_RATIO = 0.05
SEED = 42
PRECISION = "auto"
EVAL_EVERY = 20
TASK_METRIC = "exact_match"
TASK_METRIC_ROWS = 64
NUM_SAMPLES = 8
MAX_NEW_TOKENS = 48      # reasoning, then the answer

if __name__ == "__main__":
    main(globals())
