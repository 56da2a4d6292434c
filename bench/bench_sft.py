"""Side by side on one GPU: this toolkit's trainer, TRL's SFTTrainer at its best settings, and the
original study's recipe; full-parameter SFT of random-init Llama and MPT shapes on synthetic instruction data.

    python -m bench.bench_sft                 # the GPU plan (about 10 minutes on an H100; see --time-limit-s)
    python -m bench.bench_sft --cpu-smoke     # tiny model, a few steps of every variant a CPU can run
    python -m bench.bench_sft --only ours_1b,trl_1b --out DIR --time-limit-s 400

Each variant runs in its own Python process, started by this one: nothing of one variant (compiled
code, monkey-patched model classes such as Liger's, allocator state) reaches the next, a crash or an OOM
becomes that variant's status, and a variant that outlives its `timeout_s` is killed and recorded as a
timeout. Results go to <out>/bench_<gpu|cpu>.csv and .md, rewritten after every variant; METHOD below
says how each number is measured (the same way for every variant).
"""
from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before the heavy imports: "first step s" counts them

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.synthetic import LENGTH_MEDIAN, LENGTH_RANGE, LENGTHS, PROMPT_FRACTION, benchmark_tokenizer, \
    model_config, model_folder, synthetic_examples  # noqa: E402
from inf_tests.measure import header_value, peak_memory_gib, provenance_header  # noqa: E402
from sft.perf import MEMORY_BANDWIDTH, mfu, synchronize  # noqa: E402
from sft.run_folder import provenance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"  # the committed results
LR = 2e-5
SEED = 0
ROW_LENGTH = 4096          # packed row length, ours and TRL's
ROWS = 4                   # packed rows per optimizer step: 16k token slots
LONG_ROW_LENGTH = 16384    # reasoning-length data: one packed row of 16k tokens per optimizer step
MIN_VARIANT_S = 40         # with --time-limit-s: no variant starts with less time left than this
STUDY_PAD_TO = 2048        # the original study pads every example to 2048 tokens...
STUDY_BATCH = 4            # ...4 examples per step, pure bf16 AdamW, no checkpointing, sdpa, loss on all tokens
# The 7B rows' AdamW step: the fused Triton kernel (one pass over each parameter's bytes, 8-bit moments included);
# dict(optimizer_kernel="torch") measures the compiled torch step instead.
FUSED_INT8_STEP = dict(optimizer_kernel="triton")

# Ours: packed rows, varlen attention on the GPU (attn "auto"), lm_head only on supervised positions.
OURS = dict(packing=True, max_length=ROW_LENGTH, micro_batch_size=ROWS, attn_implementation="auto",
            loss_impl="selected")
OURS_FP32_MASTER = dict(OURS, precision="bf16_autocast")  # fp32 master weights, fused AdamW
OURS_PURE_BF16 = dict(OURS, precision="bf16_pure", bf16_update="stochastic_rounding",
                      optimizer_state_dtype="bfloat16")
OURS_INT8_STATES = dict(OURS_PURE_BF16, optimizer_state_dtype="int8")  # block-wise 8-bit moments
OURS_7B_INT8 = dict(OURS_INT8_STATES, micro_batch_size=1, grad_accum_steps=ROWS, compile=True, **FUSED_INT8_STEP)
# Llama-3.1-8B's shape on one 16k-token row per step, within 60 GiB:
#   weights, bf16                         8.03e9 x 2 B  = 16.1 GB (15.0 GiB)
#   AdamW moments, 8-bit block-wise       8.03e9 x ~2 B = 16.3 GB (15.2 GiB: 2 codes + an fp32 scale per 256)
#   gradients, bf16                       8.03e9 x 2 B  = 16.1 GB (15.0 GiB)
#   activations, every layer recomputed:  32 layer inputs of 16384 x 4096 bf16 = 4 GiB, plus one layer's
#     recomputation and its gradients (the MLP's three 16384 x 14336 bf16 tensors are 0.45 GiB each): ~3 GiB
#   the loss in chunks of 2048 tokens:    2048 x 128256 logits, bf16 and an fp32 softmax: ~1.5 GiB
#   about 54 GiB in all. The fallback steps each parameter in the backward pass instead (its gradient is
#   freed at once: 15 GiB less, without clipping to a global norm)
OURS_LONG = dict(OURS_INT8_STATES, max_length=LONG_ROW_LENGTH, micro_batch_size=1, grad_accum_steps=1,
                 gradient_checkpointing=True, compile=True, loss_chunk_tokens=2048)
OURS_LONG_IN_BACKWARD = dict(OURS_LONG, optimizer_in_backward=True, max_grad_norm=None)
# Adapters on Llama-3.1-8B's shape beside its full finetune: rank 16 on every linear layer of a frozen bf16 base
# (16 GB; the adapters and their fp32 AdamW states are 0.5 GB), one 4096-token row per micro-batch, no
# recomputation; QLoRA holds the base in 4-bit NF4 (about 5.7 GB) and computes in bf16
OURS_8B_LORA = dict(OURS, finetune="lora", lora_r=16, lora_alpha=32, precision="bf16_pure", micro_batch_size=1,
                    grad_accum_steps=ROWS, compile=True)
OURS_8B_QLORA = dict(OURS_8B_LORA, load_in_4bit=True, compile=False)
# MPT padded to the longest example of each micro-batch, on transformers' eager attention (which cannot pack)
OURS_MPT_PADDED = dict(OURS_INT8_STATES, packing=False, attn_implementation="eager", max_length=STUDY_PAD_TO,
                       micro_batch_size=ROWS, gradient_checkpointing=True)
# TRL's best (as in the anchor): best-fit-decreasing packing, padding-free batches, Liger kernels.
TRL_BEST = dict(per_device_train_batch_size=ROWS, max_length=ROW_LENGTH, packing=True, packing_strategy="bfd",
                padding_free=True, bf16=True, use_liger_kernel=True, optim="adamw_torch_fused")
# The same, with each padding-free batch padded to its full ROWS x ROW_LENGTH token slots: one shape, so flex
# attention compiles once instead of once per packed length (the anchor's minutes of recompiling). A user
# who knows TRL would set it; the padding is not counted as real tokens.
TRL_BEST_STATIC = dict(TRL_BEST, pad_to_multiple_of=ROWS * ROW_LENGTH)
STUDY = dict(per_device_train_batch_size=STUDY_BATCH, max_length=STUDY_PAD_TO, pad_to_multiple_of=STUDY_PAD_TO,
             completion_only_loss=False, optim="adamw_torch", dtype="bf16", attn="sdpa")


@dataclass
class Variant:
    name: str
    recipe: str            # "ours", "trl" or "study"
    arch: str              # a key of bench.synthetic.ARCH
    steps: int             # optimizer steps, warm-up included
    warmup: int            # steps before the clock starts
    settings: dict = field(default_factory=dict)  # TrainConfig fields (ours) or SFTConfig fields + dtype, attn
    needs_cuda: bool = False
    max_s: float | None = None  # stop after the first timed step that ends past this many seconds
    timeout_s: float = 150     # kill the variant's process after this many seconds
    fallback_for: str | None = None  # runs only if that variant failed or went past the memory goal
    profile: bool = False      # with --profile: write this variant's top operators (ours only)
    lengths: str = "instruction"  # the examples' lengths: a key of bench.synthetic.LENGTHS
    estimate_s: float = 60     # expected wall time of its process on one H100/H200, what bench.gpu_run plans with


GPU_PLAN = [  # most important first: --time-limit-s (and bench.gpu_run's budget) skips the tail
    Variant("ours_1b_pure_bf16_compile", "ours", "llama-1b", 15, 5, dict(OURS_PURE_BF16, compile=True),
            profile=True, estimate_s=55),
    # TRL's best settings, with one batch shape so that its flex attention compiles once (its compile can take
    # minutes at 1B: capped, and TRL's sdpa row stands in if it fails)
    Variant("trl_1b_flex_static_pure_bf16", "trl", "llama-1b", 15, 5,
            dict(TRL_BEST_STATIC, dtype="bf16", attn="flex_attention"), max_s=50, timeout_s=70, estimate_s=65),
    Variant("trl_1b_sdpa_pure_bf16", "trl", "llama-1b", 15, 5, dict(TRL_BEST, dtype="bf16", attn="sdpa"),
            max_s=35, fallback_for="trl_1b_flex_static_pure_bf16", estimate_s=40),
    Variant("study_1b", "study", "llama-1b", 15, 5, STUDY, estimate_s=30),
    # 8-bit moments (about 2 bytes per parameter instead of 4) leave memory for activations: no recomputation,
    # with one 4096-token row per micro-batch and 4 micro-batches per step
    Variant("ours_7b_int8_states_compile", "ours", "llama-7b", 10, 3, OURS_7B_INT8, profile=True, estimate_s=70),
    # the original study's own model: MPT-7B packed, ALiBi as a flex-attention score modification
    Variant("ours_mpt7b_packed_int8_states_compile", "ours", "mpt-7b", 10, 3, OURS_7B_INT8, profile=True,
            estimate_s=75),
    # reasoning-length data (median 4k tokens, up to 16k) on Llama-3.1-8B's shape, one 16k row per step
    Variant("ours_8b_long16k_int8_states_gc_compile", "ours", "llama-8b", 8, 3, OURS_LONG, lengths="long",
            estimate_s=85),
    Variant("ours_8b_long16k_int8_states_in_backward_gc_compile", "ours", "llama-8b", 8, 3, OURS_LONG_IN_BACKWARD,
            lengths="long", fallback_for="ours_8b_long16k_int8_states_gc_compile", estimate_s=85),
    Variant("ours_8b_lora_r16_compile", "ours", "llama-8b", 10, 3, OURS_8B_LORA, estimate_s=70),
    Variant("ours_8b_qlora_r16", "ours", "llama-8b", 10, 3, OURS_8B_QLORA, estimate_s=80),
    # the levers, one at a time on the best rows. CUDA graphs around each compiled layer
    Variant("ours_1b_pure_bf16_compile_cudagraphs", "ours", "llama-1b", 15, 5,
            dict(OURS_PURE_BF16, compile=True, compile_mode="reduce-overhead"), estimate_s=60),
    # bf16 moments with the activations in pinned host memory instead of recomputed
    Variant("ours_7b_pure_bf16_offload_compile", "ours", "llama-7b", 10, 3,
            dict(OURS_PURE_BF16, micro_batch_size=1, grad_accum_steps=ROWS, activation_offload=True, compile=True),
            estimate_s=90),
    # float8 matmuls in the decoder layers (torchao, rowwise scales)
    Variant("ours_1b_pure_bf16_compile_float8", "ours", "llama-1b", 15, 5,
            dict(OURS_PURE_BF16, compile=True, float8=True), profile=True, estimate_s=60),
    Variant("ours_7b_int8_states_compile_float8", "ours", "llama-7b", 10, 3, dict(OURS_7B_INT8, float8=True),
            profile=True, estimate_s=80),
    # longer packed rows: 2 x 8192 instead of 4 x 4096 token slots per step
    Variant("ours_1b_pure_bf16_compile_rows8192", "ours", "llama-1b", 15, 5,
            dict(OURS_PURE_BF16, compile=True, max_length=2 * ROW_LENGTH, micro_batch_size=ROWS // 2), estimate_s=50),
    # only if the 8-bit row without recomputation fails or passes 60 GiB: every 8th layer recomputed
    Variant("ours_7b_int8_states_gc_every8_compile", "ours", "llama-7b", 10, 3,
            dict(OURS_7B_INT8, gradient_checkpointing=True, checkpoint_every_n_layers=8),
            fallback_for="ours_7b_int8_states_compile", estimate_s=75),
    # TRL at 7B: flex attention with one batch shape, then sdpa in its place if that fails
    Variant("trl_7b_flex_static_pure_bf16_gc", "trl", "llama-7b", 10, 3,
            dict(TRL_BEST_STATIC, gradient_checkpointing=True, dtype="bf16", attn="flex_attention"),
            max_s=80, timeout_s=120, estimate_s=110),
    Variant("trl_7b_sdpa_pure_bf16_gc", "trl", "llama-7b", 10, 3,
            dict(TRL_BEST, gradient_checkpointing=True, dtype="bf16", attn="sdpa"), max_s=60,
            fallback_for="trl_7b_flex_static_pure_bf16_gc", estimate_s=80),
    Variant("study_7b", "study", "llama-7b", 10, 3, STUDY, estimate_s=60),
    Variant("study_mpt7b", "study", "mpt-7b", 10, 3, dict(STUDY, attn="eager"), max_s=80, estimate_s=95),
    # MPT padded on transformers' eager MPT attention (every layer recomputed: its [T, T] fp32 scores would not fit)
    Variant("ours_mpt7b_padded_eager_int8_states_gc", "ours", "mpt-7b", 10, 3, OURS_MPT_PADDED, max_s=80,
            estimate_s=95),
    # bf16 moments, every layer recomputed: the baseline the 7B lever rows are measured against
    Variant("ours_7b_pure_bf16_gc_compile", "ours", "llama-7b", 10, 3,
            dict(OURS_PURE_BF16, gradient_checkpointing=True, compile=True), estimate_s=75),
    Variant("ours_1b_fp32_master_compile", "ours", "llama-1b", 15, 5, dict(OURS_FP32_MASTER, compile=True),
            estimate_s=60),
    # the same 8-bit moments with two rows per micro-batch, every other layer recomputed
    Variant("ours_7b_int8_states_gc_half_compile", "ours", "llama-7b", 10, 3,
            dict(OURS_INT8_STATES, micro_batch_size=2, grad_accum_steps=ROWS // 2, gradient_checkpointing=True,
                 checkpoint_every_n_layers=2, compile=True), estimate_s=75),
    # TRL's fastest setting in the anchor, as the anchor ran it. Flex attention recompiles for each new packed
    # length, which can take minutes per length: late, capped, timed out if it does
    Variant("trl_1b_flex_pure_bf16", "trl", "llama-1b", 25, 5, dict(TRL_BEST, dtype="bf16", attn="flex_attention"),
            max_s=100, timeout_s=130, estimate_s=130),
    Variant("ours_1b_fp32_master_sdpa", "ours", "llama-1b", 15, 5, dict(OURS_FP32_MASTER, attn_implementation="sdpa"),
            estimate_s=40),
    Variant("ours_1b_pure_bf16", "ours", "llama-1b", 15, 5, OURS_PURE_BF16, estimate_s=35),
    Variant("ours_7b_pure_bf16_gc", "ours", "llama-7b", 10, 3, dict(OURS_PURE_BF16, gradient_checkpointing=True),
            estimate_s=60),
    Variant("ours_1b_fp32_master", "ours", "llama-1b", 15, 5, OURS_FP32_MASTER, estimate_s=35),
]
# The anchor (TRL 1.16 on one H100 80GB HBM3, 2026-11-26), printed beside GPU results.
ANCHOR = ("anchor, real tok/s: 1B study 5,892, TRL sdpa fp32 master 10,635, TRL flex pure bf16 47,149; "
          "7B study 1,345, TRL sdpa pure bf16 + checkpointing 3,745, TRL flex pure bf16 + checkpointing 9,986")
ANCHOR_TRL_BEST = {"llama-1b": 47_149, "llama-7b": 9_986}  # TRL's best in the anchor: flex attention, pure bf16
# The goals, checked over each invocation's rows: real tok/s of the best "ours" row and its peak memory,
GOALS = {"llama-1b": dict(real_tok_s=70_000), "llama-7b": dict(real_tok_s=13_000, peak_gib=60)}
# the long rows within the same memory,
LONG_GOAL = dict(arch="llama-8b", peak_gib=60)
# MPT-7B packed: a share of the llama-7b row's speed (about the same FLOPs per token) within the same memory, and a
# multiple of the study's recipe on the MPT-7B shape
MPT_GOAL = dict(arch="mpt-7b", like="llama-7b", share=0.9, peak_gib=60, times_study=8)
FIRST_STEP_GOAL_S = 60  # every row of ours
# batch-1 decode of the 7B shape on the inference runtime's fast path: this share of the memory-bandwidth bound
DECODE_GOAL = dict(variant="static_cache+compile", share=0.7)
# bf16 updates precise to fp32 (never plain bf16 rounding); rows whose trainable weights are fp32 are precise too.
# Every row of ours is, and the speed goals count only these.
PRECISE_BF16_UPDATES = ("stochastic_rounding", "kahan")
FP32_WEIGHTS = "fp32 trainable weights"  # a row's settings say this, or bf16_update=<how bf16 weights update>

CPU_ROW_LENGTH = 512
CPU_MAX_EXAMPLE = 512      # shorter examples on the CPU: sdpa builds a dense [T, T] mask for packed rows
CPU_LONG_ROW_LENGTH = 2048  # long examples on the CPU: clipped to this row length
CPU_PLAN = [
    Variant("ours_tiny", "ours", "tiny", 4, 2,
            dict(OURS, max_length=CPU_ROW_LENGTH, micro_batch_size=2, precision="fp32"), profile=True),
    Variant("ours_tiny_compile_capped", "ours", "tiny", 4, 2, max_s=0.0, profile=True,  # stops after 1 timed step
            settings=dict(OURS, max_length=CPU_ROW_LENGTH, micro_batch_size=1, grad_accum_steps=2, precision="fp32",
                          compile=True)),
    Variant("ours_tiny_int8_states", "ours", "tiny", 4, 2,
            dict(OURS_INT8_STATES, max_length=CPU_ROW_LENGTH, micro_batch_size=2), profile=True),
    Variant("trl_tiny_flex", "trl", "tiny", 4, 2, needs_cuda=True,
            settings=dict(TRL_BEST, max_length=CPU_ROW_LENGTH, dtype="bf16", attn="flex_attention")),
    Variant("trl_tiny_sdpa", "trl", "tiny", 4, 2,
            dict(per_device_train_batch_size=2, max_length=CPU_ROW_LENGTH, packing=True, packing_strategy="bfd",
                 padding_free=True, optim="adamw_torch", use_cpu=True, dtype="fp32", attn="sdpa")),
    Variant("trl_tiny_sdpa_static", "trl", "tiny", 4, 2,
            dict(per_device_train_batch_size=2, max_length=CPU_ROW_LENGTH, packing=True, packing_strategy="bfd",
                 padding_free=True, pad_to_multiple_of=2 * CPU_ROW_LENGTH, optim="adamw_torch", use_cpu=True,
                 dtype="fp32", attn="sdpa")),
    Variant("study_tiny", "study", "tiny", 4, 2,
            dict(STUDY, max_length=CPU_MAX_EXAMPLE, pad_to_multiple_of=CPU_MAX_EXAMPLE, use_cpu=True, dtype="fp32")),
    Variant("ours_tiny_mpt_packed", "ours", "tiny-mpt", 4, 2,
            dict(OURS, max_length=CPU_ROW_LENGTH, micro_batch_size=2, precision="fp32")),
    Variant("ours_tiny_mpt_padded_eager", "ours", "tiny-mpt", 4, 2,
            dict(OURS, packing=False, attn_implementation="eager", max_length=CPU_MAX_EXAMPLE, micro_batch_size=2,
                 precision="fp32")),
    Variant("study_tiny_mpt", "study", "tiny-mpt", 4, 2,
            dict(STUDY, max_length=CPU_MAX_EXAMPLE, pad_to_multiple_of=CPU_MAX_EXAMPLE, use_cpu=True, dtype="fp32",
                 attn="eager")),
    # the long-row settings of llama-8b on the tiny model: long examples, one row per step, every layer recomputed
    Variant("ours_tiny_long", "ours", "tiny", 4, 2, lengths="long",
            settings=dict(OURS_LONG, max_length=CPU_LONG_ROW_LENGTH, compile=False, loss_chunk_tokens=512)),
]

METHOD = """\
- real tok/s: non-padding tokens of the timed steps (those after the warm-up steps) / their wall time;
  padded tok/s counts every position fed to the model.
- MFU: 6 x parameters x real tok/s / the device's dense bf16 peak (sft.perf); rows with adapters count
  4 x parameters + 2 x trainable parameters per token, since the frozen weights' gradient matmuls are not done.
- peak GiB: torch.cuda.max_memory_allocated since the variant started.
- first step s: from the start of the variant's Python process (imports, model creation, data packing
  or tokenization, trainer setup, compilation) to the end of its first optimizer step."""

COLUMNS = ["variant", "recipe", "arch", "params_b", "status", "real_tok_s", "padded_tok_s", "mfu", "peak_gib",
           "first_step_s", "s_per_step", "timed_steps", "real_tokens_per_step", "settings"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


PROGRESS_FILE: Path | None = None  # the child's progress, read by the parent when the child times out


def progress(text: str) -> None:
    """Notes how far the variant got (seconds since its process started), so that a variant stopped by its
    timeout is recorded with where it was: building, compiling, or stepping slowly."""
    if PROGRESS_FILE is not None:
        with open(PROGRESS_FILE, "a") as f:
            f.write(f"{time.perf_counter() - PROCESS_START:.0f} s: {text}\n")


class Clock:
    """Marks the end of the first step, of the warm-up and of the last step, with token counts. The last
    step is the planned one, or the first timed step that ends past the variant's time cap."""

    def __init__(self, start: float, warmup: int, last: int, device: torch.device, max_s: float | None = None):
        self.start, self.warmup, self.last, self.device, self.max_s = start, warmup, last, device, max_s
        self.marks: dict[str, tuple[float, int, int]] = {}
        self.first_step_s = float("nan")

    def step_done(self, step: int, real, padded: int) -> bool:
        """Records the step; True when it is the last one. `real` may be a device tensor: it is read only
        at the marks, so counting adds no sync between them."""
        capped = (self.max_s is not None and step > self.warmup
                  and time.perf_counter() - self.start > self.max_s)  # host time: no sync for the check
        last = step >= self.last or capped
        progress(f"step {step} of {self.last} launched")
        if step in (1, self.warmup) or last:
            synchronize(self.device)
            now = time.perf_counter()
            real = int(real)
            if step == 1:
                self.first_step_s = now - self.start
            if step == self.warmup:
                self.marks["warm"] = (now, real, padded)
            if last:
                self.marks["last"] = (now, real, padded)
                self.last = step
        return last

    def result(self, num_params: int, trainable: int | None = None) -> dict:
        (t0, real0, pad0), (t1, real1, pad1) = self.marks["warm"], self.marks["last"]
        steps = self.last - self.warmup
        real_tok_s = (real1 - real0) / (t1 - t0)
        fraction = mfu(num_params, real_tok_s, self.device, trainable)  # None without a known peak (CPUs)
        return dict(params_b=round(num_params / 1e9, 4), real_tok_s=round(real_tok_s),
                    mfu=fraction and round(fraction, 4), padded_tok_s=round((pad1 - pad0) / (t1 - t0)),
                    first_step_s=round(self.first_step_s, 1),
                    s_per_step=round((t1 - t0) / steps, 3), timed_steps=steps,
                    real_tokens_per_step=round((real1 - real0) / steps))


def run_ours(variant: Variant, examples, work: Path, device: torch.device, start: float) -> dict:
    from sft import attention
    from sft.config import TrainConfig
    from sft.data import PreparedData
    from sft.loop import train_step
    from sft.setup import build

    cfg = TrainConfig(experiment=variant.name, model=f"random-init:{model_folder(variant.arch, work / 'model')}",
                      template="plain", max_steps=variant.steps, lr=LR, lr_schedule="constant", warmup_ratio=0.0,
                      seed=SEED, task_metric=None, num_samples=0, save_model=False, runs_root=str(work / "runs"),
                      **variant.settings)
    data = PreparedData(train=[e.to_example() for e in examples], eval=[], eval_conversations=[], stats={})
    progress("data ready, building the model and optimizer")
    setup = build(cfg, data)
    if cfg.load_in_4bit and device.type == "cuda":
        # a random-init base is built in bf16 and then quantized (a checkpoint would load quantized): the peak
        # counts from here, with the 4-bit base, the adapters and the optimizer in memory
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    progress("built; training")
    if len(setup.steps) < variant.steps:
        raise RuntimeError(f"only {len(setup.steps)} steps of data for {variant.steps}")
    clock = Clock(start, variant.warmup, variant.steps, device, variant.max_s)
    real = padded = 0
    for step, batches in enumerate(setup.batches(), start=1):
        real += train_step(setup, batches).real_tokens
        padded += sum(b["input_ids"].numel() for b in batches)
        if clock.step_done(step, real, padded):
            break
    result = clock.result(setup.derived["num_parameters"],
                          setup.derived["trainable_parameters"] if setup.adapter is not None else None)
    # after the measurement: the profiler's overhead is not in the numbers
    if PROFILE_DIR is not None and variant.profile:
        path = PROFILE_DIR / f"profile_{variant.name}.txt"
        try:
            profile_steps(setup, list(setup.batches(max(0, clock.last - PROFILE_STEPS), clock.last)), device, path)
        except Exception as e:  # noqa: BLE001 - a profiler failure must not cost the measured row
            traceback.print_exc()
            path.write_text(f"profiling failed: {type(e).__name__}: {e}\n")
    return dict(result,
                settings=f"{setup.derived['precision']}, {update_setting(setup.derived.get('bf16_update'))}, "
                         f"attn={setup.derived['attn_implementation']}, loss={setup.derived['loss_impl']}, "
                         f"rows={cfg.micro_batch_size}x{cfg.max_length} x {cfg.grad_accum_steps} micro-batches, "
                         f"checkpointing={cfg.gradient_checkpointing}"
                         + (f" (every {cfg.checkpoint_every_n_layers} layers)" if cfg.gradient_checkpointing
                            and cfg.checkpoint_every_n_layers > 1 else "") + ", "
                         f"states={cfg.optimizer_state_dtype}, compile={cfg.compile}"
                         + (f" ({cfg.compile_mode})" if cfg.compile and cfg.compile_mode != "default" else "")
                         + f", float8={setup.derived['float8']}, activation_offload={cfg.activation_offload}, "
                         f"optimizer={setup.derived['optimizer']}"
                         + (f", grouped heads {attention.grouped_heads()}" if cfg.packing and
                            setup.derived["attn_implementation"] == attention.IMPLEMENTATION else "")
                         + (f", data={variant.lengths} (lognormal lengths, median {LENGTHS[variant.lengths][0]}, "
                            f"{LENGTHS[variant.lengths][1]}..{LENGTHS[variant.lengths][2]})"
                            if variant.lengths != "instruction" else ""))


PROFILE_DIR: Path | None = None  # --profile DIR: ours variants marked `profile` also write a kernel-time table there
PROFILE_STEPS = 3


def profile_steps(setup, steps: list, device: torch.device, path: Path) -> None:
    """Reruns the last few optimizer steps under torch.profiler and writes the operators that took the
    most device time (CPU time on a CPU): where the next speedup is."""
    from torch.profiler import ProfilerActivity, profile

    from sft.loop import train_step

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    began = time.perf_counter()
    with profile(activities=activities) as prof:
        for batches in steps:
            train_step(setup, batches)
        synchronize(device)
    wall = time.perf_counter() - began
    events = prof.key_averages()
    busy = ""
    if device.type == "cuda":  # the device's idle time is what host overhead (launches, syncs) costs
        kernels = sum(e.self_device_time_total for e in events  # kernel events only, as the table's total
                      if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) / 1e6
        busy = f"; device busy {kernels:.3f} s ({kernels / wall:.0%} of the wall time)\n" + time_split(events)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{len(steps)} optimizer steps, {wall:.3f} s wall under the profiler{busy}\n"
                    + events.table(sort_by=sort, row_limit=30, max_name_column_width=70) + "\n")


# kernel names by what they compute (cuBLAS's Hopper kernels are "nvjet_*"; "qqtst" ones are float8)
KERNEL_KINDS = {"matmul": ("gemm", "nvjet", "cutlass", "xmma", "scaled_mm"), "attention": ("flash", "fmha", "attn")}


def time_split(events) -> str:
    """One line: the share of the device time in matmul kernels, attention kernels, the optimizer step (device
    time inside the optimizer's profiler range) and everything else (norms, activations, the loss's softmax,
    casts, gradient accumulation)."""
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    total = sum(e.self_device_time_total for e in kernels) or 1
    share = {kind: sum(e.self_device_time_total for e in kernels if any(k in e.key.lower() for k in keys))
             for kind, keys in KERNEL_KINDS.items()}
    share["optimizer step"] = sum(e.device_time_total for e in events if e.is_user_annotation  # its GPU range
                                  and e.device_type == torch.autograd.DeviceType.CUDA
                                  and e.key.startswith("Optimizer.step"))
    share["other"] = total - sum(share.values())
    return "where the device time goes: " + ", ".join(f"{kind} {t / total:.1%}" for kind, t in share.items())


def run_trl(variant: Variant, examples, work: Path, device: torch.device, start: float) -> dict:
    """TRL's SFTTrainer (the HF Trainer underneath); also runs the original study's recipe."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    settings = dict(variant.settings)
    dtype, attn = DTYPES[settings.pop("dtype")], settings.pop("attn")
    notes = []
    if settings.get("use_liger_kernel") and not _installed("liger-kernel"):
        settings["use_liger_kernel"] = False
        notes.append("liger-kernel not installed")
    progress("building the model")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(variant.arch), dtype=dtype, attn_implementation=attn)
    num_params = sum(p.numel() for p in model.parameters())
    pad_id = model.config.pad_token_id
    clock = Clock(start, variant.warmup, variant.steps, device, variant.max_s)
    counts = {"real": 0, "padded": 0}  # device tensors until read at a mark: counting adds no sync

    def count_tokens(module, args, kwargs):
        # padding-free batches have no mask; padded to a fixed length, their padding is the pad id (real
        # synthetic tokens never are)
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        counts["padded"] += ids.numel()
        counts["real"] = counts["real"] + (mask.sum() if mask is not None else (ids != pad_id).sum())

    class OnStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if clock.step_done(state.global_step, counts["real"], counts["padded"]):
                control.should_training_stop = True

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "completion_mask": e.completion_mask()} for e in examples])
    args = SFTConfig(output_dir=str(work / "trl"), max_steps=variant.steps, learning_rate=LR, seed=SEED,
                     logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True,
                     dataset_num_proc=8 if device.type == "cuda" else 1, **settings)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=benchmark_tokenizer(),
                         callbacks=[OnStep()])
    progress("trainer built; training")
    trainer.train()
    shown = {k: v for k, v in settings.items() if k not in ("max_length", "per_device_train_batch_size", "use_cpu")}
    return dict(clock.result(num_params),
                settings=", ".join([f"{str(dtype).removeprefix('torch.')} weights", f"attn={attn}",
                                    f"batch={settings['per_device_train_batch_size']}x{settings['max_length']}"]
                                   + [f"{k}={v}" for k, v in shown.items()] + notes))


RUNNERS = {"ours": run_ours, "trl": run_trl, "study": run_trl}


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def tokens_for(plan: list[Variant], arch: str, lengths: str = "instruction") -> int:
    """Synthetic tokens for one architecture and kind of data: enough for its hungriest variant. Every variant of
    an architecture trains on this one set (the generator is seeded)."""
    need = max(v.steps * (v.settings.get("micro_batch_size") or v.settings.get("per_device_train_batch_size"))
               * v.settings.get("grad_accum_steps", 1) * v.settings["max_length"] for v in plan
               if v.arch == arch and v.lengths == lengths)
    return int(need * 1.2)


def data_key(variant: Variant) -> str:
    """Which synthetic set a variant trains on: its architecture and kind of data."""
    return f"{variant.arch}/{variant.lengths}"


def tokens_by_data(plan: list[Variant]) -> dict[str, int]:
    return {data_key(v): tokens_for(plan, v.arch, v.lengths) for v in plan}


def run_variant(variant: Variant, tokens: int, device: torch.device, start: float) -> dict:
    """Runs one variant in this process (the child's side of run_isolated)."""
    row = dict(variant=variant.name, recipe=variant.recipe, arch=variant.arch)
    # the data's own lengths on a GPU; on the CPU shorter instruction examples, long ones up to the row length
    max_example = None if variant in GPU_PLAN else CPU_LONG_ROW_LENGTH if variant.lengths == "long" \
        else CPU_MAX_EXAMPLE
    examples = synthetic_examples(tokens, model_config(variant.arch).vocab_size, seed=SEED, max_length=max_example,
                                  lengths=variant.lengths)
    try:
        with tempfile.TemporaryDirectory(prefix=f"bench_{variant.name}_") as work:
            row.update(RUNNERS[variant.recipe](variant, examples, Path(work), device, start), status="ok")
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:  # the error becomes the variant's status
        traceback.print_exc()
        row["status"] = f"error: {type(e).__name__}: {e}"[:300].replace("\n", " ")
    if device.type == "cuda":
        row["peak_gib"] = round(peak_memory_gib(device)[0], 1)
    return row


def run_isolated(variant: Variant, tokens: int, device: torch.device, profile: Path | None = None,
                 timeout_s: float | None = None) -> dict:
    """Runs the variant in a new Python process (bench.common.run_isolated: its own process group, killed whole
    after `timeout_s`, by default the variant's) and returns its row."""
    timeout_s = variant.timeout_s if timeout_s is None else timeout_s
    row = dict(variant=variant.name, recipe=variant.recipe, arch=variant.arch)
    if variant.needs_cuda and device.type != "cuda":
        return dict(row, status="skipped: needs CUDA")
    if variant.recipe != "ours" and not _installed("trl"):
        return dict(row, status="skipped: trl not installed (pip install -r requirements-bench.txt)")
    print(f"[{variant.name}] starting", file=sys.stderr, flush=True)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_child_") as tmp:
        result, progress_file = Path(tmp) / "row.json", Path(tmp) / "progress.txt"
        code = common.run_isolated([sys.executable, "-m", "bench.bench_sft", "--child", variant.name,
                                    "--child-tokens", str(tokens), "--child-result", str(result),
                                    "--child-progress", str(progress_file)]
                                   + (["--profile", str(profile.resolve())] if profile else []), timeout_s).code
        if code is None:
            notes = progress_file.read_text().splitlines() if progress_file.exists() else []
            row["status"] = f"timeout: no result in {timeout_s:.0f} s (last progress: {notes[-1] if notes else 'none'})"
        elif result.exists():
            row = json.loads(result.read_text())
        else:
            row["status"] = f"error: the variant's process exited with code {code}"
    print(f"[{variant.name}] {row['status']} in {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return row


def header(device: torch.device) -> list[str]:
    return provenance(device, ("torch", "transformers", "accelerate", "datasets", "trl", "liger-kernel")) + [
        f"data: synthetic, lognormal lengths (median {LENGTH_MEDIAN}, clipped to {LENGTH_RANGE[0]}.."
        f"{LENGTH_RANGE[1]}), {PROMPT_FRACTION[0]:.0%}-{PROMPT_FRACTION[1]:.0%} prompt without loss; "
        "random-init Llama shapes"] + ([ANCHOR] if device.type == "cuda" else [])


def write_results(rows: list[dict], lines: list[str], out: Path, kind: str) -> str:
    import pandas as pd  # here, not at the top: a variant's child process would count the import

    from sft.tables import markdown_table

    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"bench_{kind}.csv", "w", newline="") as f:
        f.write(provenance_header(lines))
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    def cell(row: dict, column: str) -> str:
        value = row.get(column)
        if value is None or value == "":
            return ""
        if column == "mfu":
            return f"{value:.1%}"
        return f"{value:,}" if isinstance(value, (int, float)) else str(value)

    shown = ["variant", "status", "real_tok_s", "padded_tok_s", "mfu", "peak_gib", "first_step_s", "s_per_step",
             "params_b", "settings"]
    table = [markdown_table(pd.DataFrame([[cell(r, c) for c in shown] for r in rows], columns=shown))]
    goals = ["", "Against the goals:", "", *[f"- {line}" for line in goal_lines(rows)]] if kind == "gpu" else []
    markdown = "\n".join([f"# SFT throughput side by side ({kind.upper()})", ""] + [f"- {line}" for line in lines]
                         + ["", *table, *goals, "", METHOD, ""])
    (out / f"bench_{kind}.md").write_text(markdown)
    if kind == "gpu":
        write_gpu_goals(out)
    return markdown


def write_gpu_goals(out: Path, inference_csv: Path | None = None) -> Path:
    """The goal lines of each GPU benchmark CSV in `out` (one per invocation, each checked over its own rows), then
    the decode goal over the inference runtime's CSV (by default `inference_results_for(out)`), in
    bench_gpu_goals.md: what the README shows under the GPU tables (python -m sft.report)."""
    import pandas as pd

    paths = [p for p in sorted(out.glob("bench_gpu*.csv")) if not p.stem.endswith("_smoke")]
    text = []
    for path in paths:
        lines = goal_lines(pd.read_csv(path, comment="#", dtype=str).to_dict("records"))
        if len(paths) == 1:
            text += [f"- {line}\n" for line in lines]
        else:
            text += [f"- From `{path.name}` ({csv_device(path)}):\n"] + [f"  - {line}\n" for line in lines]
    inference_csv = inference_results_for(out) if inference_csv is None else inference_csv
    if inference_csv.is_file():
        text += [f"- {line}\n" for line in decode_goal_lines(
            pd.read_csv(inference_csv, comment="#").to_dict("records"))]
    path = out / "bench_gpu_goals.md"
    path.write_text("".join(text))
    return path


def inference_results_for(out: Path) -> Path:
    """The inference runtime CSV that goes with the benchmark results in `out`: the repository's
    (inf_tests/results) beside the repository's bench/results, else runtime_gpu.csv in `out` itself."""
    if out.resolve() == RESULTS.resolve():
        return RESULTS.parent.parent / "inf_tests" / "results" / "runtime_gpu.csv"
    return out / "runtime_gpu.csv"


def csv_device(path: Path) -> str:
    """The device a results CSV names in its `# device:` header line."""
    return header_value(path, "device") or "device unknown"


def goal_lines(rows: list[dict]) -> list[str]:
    """The goals over the rows of one invocation: per architecture the fastest of our rows that meets the memory
    goal with updates precise to fp32 (fp32 master weights, stochastic rounding or Kahan summation, never plain
    bf16), as a ratio to TRL's best row of the same invocation (and to TRL's best in the anchor and the study's
    recipe), then the long-row, MPT, precision and first-step goals. Rows may come from CSV files (strings) or
    from this run."""
    ok = [r for r in rows if r.get("status") == "ok"]
    lines = []
    for arch, goal in GOALS.items():
        ours = fastest(ok, arch, "ours", lambda r: fits(r, goal.get("peak_gib", float("inf"))))
        if ours is None:
            lines.append(f"{arch}: no successful run of ours with updates precise to fp32"
                         + (f" within {goal['peak_gib']} GiB" if "peak_gib" in goal else ""))
            continue
        speed = number(ours, "real_tok_s")
        parts = [f"{arch}: ours {speed:,.0f} real tok/s ({ours['variant']}, {number(ours, 'peak_gib'):.1f} GiB, "
                 f"first step {number(ours, 'first_step_s'):.1f} s)", versus_trl(ours, ok),
                 f"{speed / ANCHOR_TRL_BEST[arch]:.2f}x TRL's best in the anchor ({ANCHOR_TRL_BEST[arch]:,}, H100)"]
        study = fastest(ok, arch, "study")
        if study is not None:
            parts.append(f"{speed / number(study, 'real_tok_s'):.1f}x the study's recipe "
                         f"({number(study, 'real_tok_s'):,.0f})")
        parts.append(f"updates {weight_update(ours)} (precise to fp32)")
        met = speed >= goal["real_tok_s"]
        parts.append(f"goal {goal['real_tok_s']:,}" + (f" within {goal['peak_gib']} GiB" if "peak_gib" in goal else "")
                     + (": met" if met else f": not met ({speed / goal['real_tok_s']:.0%} of it)"))
        lines.append("; ".join(parts))
    return lines + long_goal_line(rows, ok) + mpt_goal_line(ok) + precision_goal_line(ok) + first_step_line(ok)


def number(row: dict, column: str) -> float:
    """A row's value as a number (rows read back from a CSV hold strings); NaN when it has none."""
    try:
        return float(row.get(column))
    except (TypeError, ValueError):
        return float("nan")


def fits(row: dict, peak_gib: float) -> bool:
    """Within the memory goal, with updates precise to fp32."""
    return number(row, "peak_gib") <= peak_gib and precise_updates(row)


def fastest(ok: list[dict], arch: str, recipe: str, accept=lambda r: True) -> dict | None:
    """The row of `recipe` on `arch` with the most real tok/s among those `accept` takes."""
    found = [r for r in ok if r["arch"] == arch and r["recipe"] == recipe and accept(r)]
    return max(found, key=lambda r: number(r, "real_tok_s")) if found else None


def versus_trl(row: dict, ok: list[dict]) -> str:
    """The row against TRL's best row of the same invocation: in real tok/s on the same architecture, else (no
    TRL row on that shape) in MFU against TRL's row with the highest MFU."""
    same = fastest(ok, row["arch"], "trl")
    if same is not None:
        return (f"{number(row, 'real_tok_s') / number(same, 'real_tok_s'):.2f}x TRL's best here ({same['variant']}, "
                f"{number(same, 'real_tok_s'):,.0f})")
    if not any(r["recipe"] == "trl" for r in ok):
        return "no TRL row completed in this invocation"
    measured = [r for r in ok if r["recipe"] == "trl" and number(r, "mfu") > 0]  # NaN compares False
    if not measured or not number(row, "mfu") > 0:
        return f"no TRL row on {row['arch']} here, and no MFU to compare with"
    best = max(measured, key=lambda r: number(r, "mfu"))
    return (f"MFU {number(row, 'mfu'):.1%}, {number(row, 'mfu') / number(best, 'mfu'):.2f}x that of TRL's best row "
            f"here ({best['variant']}, {number(best, 'mfu'):.1%}; no TRL row on {row['arch']})")


def long_goal_line(rows: list[dict], ok: list[dict]) -> list[str]:
    """Reasoning-length rows on Llama-3.1-8B's shape: their speed, MFU and memory against the memory goal."""
    goal = LONG_GOAL
    if not any(r["arch"] == goal["arch"] and not str(r.get("status")).startswith("skipped") for r in rows):
        return []
    head = f"{goal['arch']}, rows of {LONG_ROW_LENGTH:,} tokens"
    long = fastest(ok, goal["arch"], "ours", lambda r: fits(r, goal["peak_gib"]))
    if long is None:
        return [f"{head}: no successful run of ours with updates precise to fp32 within {goal['peak_gib']} GiB; "
                f"goal: not met"]
    return [f"{head}: ours {number(long, 'real_tok_s'):,.0f} real tok/s ({long['variant']}, MFU "
            f"{number(long, 'mfu'):.1%}, {number(long, 'peak_gib'):.1f} GiB, first step "
            f"{number(long, 'first_step_s'):.1f} s); {versus_trl(long, ok)}; updates {weight_update(long)} (precise "
            f"to fp32); goal within {goal['peak_gib']} GiB: met"]


def mpt_goal_line(ok: list[dict]) -> list[str]:
    """MPT-7B packed against the llama-7b row (the same memory limit) and against the study's recipe on MPT-7B."""
    goal = MPT_GOAL
    mpt = fastest(ok, goal["arch"], "ours", lambda r: fits(r, goal["peak_gib"]) and "packed ALiBi" in
                  str(r.get("settings")))
    if mpt is None:
        return [f"{goal['arch']}: no successful packed run of ours within {goal['peak_gib']} GiB"] if any(
            r["arch"] == goal["arch"] for r in ok) else []
    speed = number(mpt, "real_tok_s")
    parts = [f"{goal['arch']} packed: {speed:,.0f} real tok/s ({mpt['variant']}, {number(mpt, 'peak_gib'):.1f} GiB)"]
    like, study = fastest(ok, goal["like"], "ours", lambda r: fits(r, goal["peak_gib"])), fastest(ok, goal["arch"],
                                                                                                  "study")
    if like is not None:
        share = speed / number(like, "real_tok_s")
        parts.append(f"{share:.0%} of {goal['like']} ({like['variant']}, {number(like, 'real_tok_s'):,.0f}); goal "
                     f"{goal['share']:.0%}: {'met' if share >= goal['share'] else 'not met'}")
    else:
        parts.append(f"no {goal['like']} row of ours to compare with")
    if study is not None:
        times = speed / number(study, "real_tok_s")
        parts.append(f"{times:.1f}x the study's recipe on {goal['arch']} ({number(study, 'real_tok_s'):,.0f}); goal "
                     f"{goal['times_study']}x: {'met' if times >= goal['times_study'] else 'not met'}")
    else:
        parts.append(f"the study's recipe on {goal['arch']} did not complete (goal {goal['times_study']}x it)")
    parts.append(versus_trl(mpt, ok))
    return ["; ".join(parts)]


def precision_goal_line(ok: list[dict]) -> list[str]:
    """Every row of ours updates its weights precisely to fp32 (the goal lines above count only those)."""
    ours = [r for r in ok if r["recipe"] == "ours"]
    if not ours:
        return []
    imprecise = [f"{r['variant']}, {weight_update(r)}" for r in ours if not precise_updates(r)]
    return [f"updates precise to fp32 (fp32 master weights, stochastic rounding or Kahan summation): "
            f"{len(ours) - len(imprecise)} of {len(ours)} rows of ours"
            + (f" (not: {'; '.join(imprecise)})" if imprecise else "")
            + f"; goal every row: {'not met' if imprecise else 'met'}"]


def first_step_line(ok: list[dict]) -> list[str]:
    ours = [r for r in ok if r["recipe"] == "ours"]
    if not ours:
        return []
    slowest = max(ours, key=lambda r: number(r, "first_step_s"))
    worst = number(slowest, "first_step_s")
    return [f"time to the first step, ours: at most {worst:.1f} s ({slowest['variant']}) over {len(ours)} runs; "
            f"goal {FIRST_STEP_GOAL_S} s for every row: {'met' if worst <= FIRST_STEP_GOAL_S else 'not met'}"]


def decode_goal_lines(rows: list[dict]) -> list[str]:
    """Batch-1 decode of the largest model in the inference runtime's CSV on its fast path, against the bound
    that the device's memory bandwidth sets (every weight read once per token)."""
    fast = [r for r in rows if r.get("variant") == DECODE_GOAL["variant"] and number(r, "batch_size") == 1]
    if not fast:
        return []
    row = max(fast, key=lambda r: number(r, "params_m"))
    head = (f"decode, {number(row, 'params_m') / 1e3:.2f}B parameters, batch 1, {row['variant']}: "
            f"{number(row, 'decode_tok_s'):,.1f} tok/s")
    bandwidth, bound = bandwidth_of(str(row.get("device"))), number(row, "bandwidth_bound_tok_s")
    if bandwidth is None or not bound > 0:
        return [f"{head}; no memory bandwidth known for {row.get('device')}, so no bound to compare with"]
    share = number(row, "decode_tok_s") / bound
    return [f"{head}, {share:.0%} of the bandwidth bound ({bound:,.0f} tok/s: {bandwidth / bound / 1e9:.1f} GB of "
            f"weights per token at {bandwidth / 1e12:.2f} TB/s, {row.get('device')}); goal {DECODE_GOAL['share']:.0%}: "
            f"{'met' if share >= DECODE_GOAL['share'] else 'not met'}"]


def bandwidth_of(device_name: str) -> float | None:
    """The memory bandwidth (bytes/s) of a device named as in a results CSV, from sft.perf's table: the entry
    whose key is the longest part of the name, as sft.perf.memory_bandwidth reads it for a live device."""
    matches = [k for k in MEMORY_BANDWIDTH if k in device_name]
    return MEMORY_BANDWIDTH[max(matches, key=len)] if matches else None


def update_setting(bf16_update: str | None) -> str:
    """How a row's trainable weights take their updates, as its settings say it (read by weight_update)."""
    return f"bf16_update={bf16_update}" if bf16_update else FP32_WEIGHTS


def weight_update(row: dict) -> str | None:
    """How a row of ours updates its weights, read from its settings: FP32_WEIGHTS, "bf16_update=..." or None."""
    settings = str(row.get("settings", ""))
    found = re.search(r"bf16_update=(\w+)", settings)
    return found.group(0) if found else FP32_WEIGHTS if FP32_WEIGHTS in settings else None


def precise_updates(row: dict) -> bool:
    """Whether a row's updates are precise to fp32: fp32 trainable weights, or stochastic rounding or Kahan."""
    update = weight_update(row)
    return update == FP32_WEIGHTS or update in {f"bf16_update={u}" for u in PRECISE_BF16_UPDATES}


def fallback_needed(variant: Variant, rows: list[dict]) -> bool:
    """A fallback variant runs only when the variant it stands in for failed or went past its
    architecture's memory goal (or did not run at all)."""
    done = next((r for r in rows if r["variant"] == variant.fallback_for), None)
    if variant.fallback_for is None or done is None:
        return True
    return done.get("status") != "ok" or float(done.get("peak_gib") or 0) > memory_goal(variant.arch)


def memory_goal(arch: str) -> float:
    """The GiB a row of ours on `arch` must stay within (infinite where no goal limits it)."""
    goals = {**{a: g.get("peak_gib") for a, g in GOALS.items()}, LONG_GOAL["arch"]: LONG_GOAL["peak_gib"],
             MPT_GOAL["arch"]: MPT_GOAL["peak_gib"]}
    return goals.get(arch) or float("inf")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, a few steps (automatic without a GPU)")
    parser.add_argument("--only", default="", help="comma-separated parts of variant names to run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="every variant ends within this many seconds of the start (cut short if needed)")
    parser.add_argument("--profile", type=Path,
                        help="ours variants marked `profile` also write profile_<variant>.txt here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run_isolated's child: one variant by name
    parser.add_argument("--child-tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-progress", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--goals", action="store_true",
                        help="only rewrite bench_gpu_goals.md from the GPU CSVs in --out, running nothing")
    args = parser.parse_args(argv)
    if args.goals:
        print(write_gpu_goals(args.out).read_text())
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        global PROFILE_DIR
        global PROGRESS_FILE
        PROFILE_DIR, PROGRESS_FILE = args.profile, args.child_progress
        variant = next(v for v in GPU_PLAN + CPU_PLAN if v.name == args.child)
        row = run_variant(variant, args.child_tokens, device, PROCESS_START)
        args.child_result.write_text(json.dumps(row))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` stops us: run the cleanup in run_isolated
    smoke = args.cpu_smoke or device.type != "cuda"
    plan = CPU_PLAN if smoke else GPU_PLAN
    if args.only:
        plan = [v for v in plan if any(part in v.name for part in args.only.split(","))]
    # the output's name says which plan ran: the README's GPU table reads bench_gpu.* only
    kind = "cpu" if device.type != "cuda" else "gpu_smoke" if smoke else "gpu"
    lines = header(device)
    tokens = tokens_by_data(plan)
    rows = []
    for variant in plan:
        left = math.inf if args.time_limit_s is None else args.time_limit_s - (time.perf_counter() - PROCESS_START)
        if left < MIN_VARIANT_S:
            rows.append(dict(variant=variant.name, recipe=variant.recipe, arch=variant.arch,
                             status="skipped: time limit"))
        elif not fallback_needed(variant, rows):
            rows.append(dict(variant=variant.name, recipe=variant.recipe, arch=variant.arch,
                             status=f"skipped: {variant.fallback_for} ran within the memory goal"))
        else:  # cut to what is left, so that a variant is stopped and recorded, never killed with the benchmark
            rows.append(run_isolated(variant, tokens[data_key(variant)], device, args.profile,
                                     timeout_s=min(variant.timeout_s, left - 5)))
        markdown = write_results(rows, lines, args.out, kind)
    print(markdown)


if __name__ == "__main__":
    main()
