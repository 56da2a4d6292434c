"""Demo: SmolLM2-135M-Instruct (embedded) learns to call a calculator and a lookup tool, on 2 CPU cores.

Each `embedded:demo-tools` row lists two tools; the assistant calls one (or two, or none where no tool
helps), the tool's result follows in a `tool` turn, and the assistant answers from it. SmolLM2's own
template renders no tool calls, so TEMPLATE = "chatml-tools" (ChatML with the tools in the system turn and
each call as JSON in <tool_call> tags) is installed and saved with the model. The calls and the answers are
supervised, the tool results are not. The held-out metric, tool_call_match, compares the calls the model
makes (name and arguments, as JSON) with the row's. Run `python -m sft.experiments.demo_smollm2_tools`.
"""
from sft.train import main

EXPERIMENT = "demo_smollm2_tools"
MODEL = "embedded:smollm2-135m-instruct"
DATASET = "embedded:demo-tools"
TEMPLATE = "chatml-tools"
MAX_ROWS = 240           # of 769: each row carries the tool schemas, about 250 tokens
EVAL_ROWS = 48
MAX_LENGTH = 512
PACKING = True
MICRO_BATCH_SIZE = 1
GRAD_ACCUM_STEPS = 2
EPOCHS = 1
LR = 2e-4
WARMUP_RATIO = 0.05
SEED = 42
PRECISION = "auto"
EVAL_EVERY = 20
TASK_METRIC = "tool_call_match"
TASK_METRIC_ROWS = 48
NUM_SAMPLES = 8
MAX_NEW_TOKENS = 64      # two calls take about 50 tokens

if __name__ == "__main__":
    main(globals())
