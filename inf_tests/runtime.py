"""Inference runtime: model load time, time to first token, decode tokens/s, latency percentiles and peak
memory of `model.generate`, plain and on a fast path, for every model x variant x batch size x prompt length.

Edit the constants, then run from the repository root (flags override the constants, see --help):

    .venv/bin/python -m inf_tests.runtime

Writes inf_tests/results/runtime_<cpu|gpu>.csv (one row per model x variant x batch size x prompt length)
and runtime_<cpu|gpu>.png, and prints a markdown table. inf_tests/README.md says what each column means.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from inf_tests.measure import peak_memory_gib, provenance_header, reset_peak_memory, rss_bytes
from sft.config import EMBEDDED_MODEL
from sft.errors import ConfigError, SFTError
from sft.generation import Decoding, only_given_settings
from sft.generation import generation_config as sft_generation_config
from sft.run_folder import provenance
from sft.perf import memory_bandwidth, synchronize

# Llama-2-7B's layer shapes with random weights, built directly on the device (no download). The vocabulary
# is the embedded tokenizer's (49,152 tokens instead of Llama-2's 32,000), so the prompts are real chat text.
LLAMA_7B = "random-init-llama-7b"

# Entries: EMBEDDED_MODEL, a local Hugging Face folder (a run folder's model/ is one), "owner/name@revision",
# "random-init:<folder>" (that folder's config and tokenizer, random weights), or LLAMA_7B.
MODELS = {"cpu": [EMBEDDED_MODEL], "cuda": [EMBEDDED_MODEL, LLAMA_7B]}
DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
ATTN_IMPLEMENTATION = "sdpa"
# FAST_PATH: variants measured next to plain `generate` (dynamic KV cache, no compile). "static_cache":
# preallocated KV cache, forward not compiled. "static_cache+compile": the same plus torch.compile of the decode
# step (transformers compiles only on a GPU; on its own a static cache there would also be compiled, so the
# "static_cache" variant switches compilation off explicitly).
VARIANTS = {"cpu": ["generate", "static_cache"], "cuda": ["generate", "static_cache", "static_cache+compile"]}
COMPILE_MODE = "reduce-overhead"  # transformers' default for generate: CUDA graphs around the compiled step
BATCH_SIZES = [1, 4]
PROMPT_TOKENS = [64, 512]         # SmolLM2's chat template alone (default system prompt) takes 30 tokens
NEW_TOKENS = 64                   # forced: min_new_tokens = max_new_tokens, so every run decodes exactly this many
DO_SAMPLE = False
TEMPERATURE = 1.0                 # used only when DO_SAMPLE
TOP_P = 1.0                       # used only when DO_SAMPLE
SEED = 0                          # set before every generate call: sampled runs repeat the same tokens
WARMUP = 2                        # untimed calls per row (compilation and CUDA-graph capture happen here)
REPEATS = 5                       # timed calls per row
OUT_DIR = "inf_tests/results"

ALL_VARIANTS = ("generate", "static_cache", "static_cache+compile")

# A real chat request, made as long as asked by repeating the notes and cutting them to fit.
INSTRUCTION = "Summarize these meeting notes in three bullet points for a colleague who missed the meeting."
NOTES = ("The team agreed to move the release from Thursday to the following Monday.",
         "Priya reported that the login bug affects about two percent of mobile users.",
         "Marco will draft the customer email once the fix has been verified.",
         "The database migration finished overnight without errors.",
         "Support tickets dropped by a third since the new help page went live.",
         "The budget for the design contractor was approved until the end of the quarter.",
         "Two candidates for the data engineer role will be interviewed next week.",
         "The on-call rotation changes on the first of the month.")

COLUMNS = ["model", "variant", "batch_size", "prompt_tokens", "new_tokens",
           "ttft_ms_p50", "ttft_ms_p90", "decode_tok_s", "decode_tok_s_batch",
           "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "peak_mem_gib", "peak_mem_kind", "load_s",
           "bandwidth_bound_tok_s", "fraction_of_bound", "matches_generate", "output_digest",
           "new_tokens_generated", "graphs_compiled_warmup", "graphs_compiled_timed", "other_cpu_pct",
           "params_m", "weights_gib", "dtype", "attn", "do_sample", "temperature", "top_p", "seed", "warmup",
           "repeats", "device", "torch", "transformers"]


@dataclass(frozen=True)
class Settings:
    models: list[str]
    device: str
    dtype: str
    attn_implementation: str
    variants: list[str]
    batch_sizes: list[int]
    prompt_tokens: list[int]
    new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int
    warmup: int
    repeats: int
    out_dir: Path
    tag: str | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("models (MODELS / --models): name at least one model")
        for name in ("batch_sizes", "prompt_tokens"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise ConfigError(f"{name} (--{name.replace('_', '-')}): positive integers, got {values}")
        if self.new_tokens < 2:
            raise ConfigError(f"new_tokens (NEW_TOKENS / --new-tokens): at least 2, so that there is a decode "
                              f"phase after the first token; got {self.new_tokens}")
        if self.repeats < 1 or self.warmup < 0:
            raise ConfigError(f"repeats / warmup: repeats >= 1 and warmup >= 0, got {self.repeats} / {self.warmup}")
        for variant in self.variants:
            if variant not in ALL_VARIANTS:
                raise ConfigError(f"variants: {variant!r} is not one of {', '.join(map(repr, ALL_VARIANTS))}")
        if "static_cache+compile" in self.variants and self.device != "cuda":
            raise ConfigError("variants: 'static_cache+compile' needs a GPU (transformers compiles generate's "
                              "decode step only there); on the CPU the fast path is 'static_cache'")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype (DTYPE / --dtype): 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ConfigError(f"temperature / top_p: temperature > 0 and top_p in (0, 1], "
                              f"got {self.temperature} / {self.top_p}")


# ---------------------------------------------------------------------------------------------- setup


def split_revision(spec: str) -> tuple[str, str | None]:
    """"owner/name@revision" -> ("owner/name", "revision"); anything else has no revision."""
    if "@" in spec and not Path(spec).exists():
        name, _, revision = spec.partition("@")
        return name, revision
    return spec, None


def check_models(models: list[str]) -> None:
    """Fails before anything is measured on a model entry that cannot be loaded (bad path, unpinned hub id)."""
    from sft.modeling import resolve_model_source

    for spec in models:
        if spec != LLAMA_7B:
            resolve_model_source(*split_revision(spec))


def llama_7b_config(tokenizer):
    """Llama-2-7B's layer shapes with `tokenizer`'s vocabulary. Saved with the tokenizer in a folder, it makes a
    `random-init:<folder>` model for machines without the embedded package."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def save_llama_7b_folder(path: Path) -> None:
    """The 7B shape's config.json and the embedded tokenizer in `path`, without weights: `random-init:<path>`
    is LLAMA_7B on a machine that has no embedded package."""
    from sft.modeling import load_tokenizer
    from sft.templates import setup_template

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    setup_template(tokenizer, "auto")
    llama_7b_config(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)


def load(spec: str, settings: Settings):
    """(model, tokenizer, seconds to get the model onto the device in eval mode). The tokenizer is loaded first,
    outside the timing (the embedded default is converted from GGUF on its first use, once per machine)."""
    from transformers import AutoModelForCausalLM

    from sft.modeling import load_model, load_tokenizer
    from sft.templates import setup_template

    device, dtype = torch.device(settings.device), getattr(torch, settings.dtype)
    name, revision = (EMBEDDED_MODEL, None) if spec == LLAMA_7B else split_revision(spec)
    tokenizer = load_tokenizer(name, revision)
    setup_template(tokenizer, "auto")
    torch.manual_seed(settings.seed)  # the same random-init weights in every run
    synchronize(device)
    start = time.perf_counter()
    if spec == LLAMA_7B:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(llama_7b_config(tokenizer), dtype=dtype,
                                                     attn_implementation=settings.attn_implementation)
    else:
        model = load_model(name, revision, dtype=dtype, attn_implementation=settings.attn_implementation,
                           device=device).to(device)
    model.eval()
    if device.type == "cpu":
        # Weights come memory-mapped from the file and are read from disk on first touch: read them all now, so
        # that loading counts that time and the first measured row neither pays it nor counts it as its memory.
        with torch.no_grad():
            for p in model.parameters():
                p.sum()
    synchronize(device)
    return model, tokenizer, time.perf_counter() - start


def prompt_batch(tokenizer, prompt_tokens: int, batch_size: int) -> torch.Tensor:
    """`batch_size` chat prompts of exactly `prompt_tokens` tokens, rendered by encode_chat with the generation
    prompt: the template's own tokens are kept whole and the user message (an instruction and meeting notes,
    repeated as needed) is cut to fit. Rows number their notes and start at different notes, so they differ
    but need no padding."""
    from sft.templates import encode_chat

    def encode(content: str) -> list[int]:
        return encode_chat(tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True).input_ids

    # Two one-token messages locate the template around the message: what they share at the start and the end.
    probe_a, probe_b = encode("0"), encode("1")
    head = next(i for i, (a, b) in enumerate(zip(probe_a, probe_b)) if a != b)
    tail = next(i for i, (a, b) in enumerate(zip(reversed(probe_a), reversed(probe_b))) if a != b)
    room = prompt_tokens - head - tail
    if room < 1:
        raise ConfigError(f"prompt_tokens: {prompt_tokens} leaves no room for a user message; this model's chat "
                          f"template alone takes {head + tail} tokens")
    rows = []
    for row in range(batch_size):
        notes = NOTES[row % len(NOTES):] + NOTES[:row % len(NOTES)]
        content = f"{INSTRUCTION}\n\nNotes from meeting {row + 1}:\n"
        while True:
            ids = encode(content)
            if len(ids) - head - tail >= room:
                break
            content += " ".join(notes) + " "
        if ids[:head] != probe_a[:head] or ids[len(ids) - tail:] != probe_a[len(probe_a) - tail:]:
            raise ConfigError("template: the chat template's tokens change with the message, so a prompt of an "
                              "exact length cannot be cut from it; use a model with a different template")
        rows.append(ids[:head + room] + ids[len(ids) - tail:])
    return torch.tensor(rows, dtype=torch.long)


def generation_config(variant: str, tokenizer, settings: Settings):
    """Every decoding setting explicit (sft.generation), exactly `new_tokens` of them, and the variant's cache."""
    from transformers import CompileConfig

    fast_path = {"generate": {"cache_implementation": "dynamic", "disable_compile": True},
                 "static_cache": {"cache_implementation": "static", "disable_compile": True},
                 "static_cache+compile": {"cache_implementation": "static", "disable_compile": False,
                                          "compile_config": CompileConfig(mode=COMPILE_MODE)}}[variant]
    decoding = Decoding(settings.new_tokens, settings.do_sample, settings.temperature, settings.top_p, settings.seed)
    return sft_generation_config(tokenizer, decoding, min_new_tokens=settings.new_tokens, **fast_path)


# ---------------------------------------------------------------------------------------------- measuring


class TokenClock:
    """A generate streamer that notes when each step's tokens reach the host. generate hands it the prompt
    first, then one token per row per step, copied to the host (on a GPU that copy waits for the step to
    finish, as generate's stop check does every step anyway)."""

    def __init__(self):
        self.prompt_seen = False
        self.times: list[float] = []

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


@dataclass
class Timing:
    ttft_s: float       # call start -> first new token on the host (prefill + choosing token 1)
    decode_s: float     # first new token -> last new token (new_tokens - 1 decode steps)
    latency_s: float    # the whole generate call
    new_tokens: torch.Tensor


@torch.no_grad()
def timed_generate(model, input_ids: torch.Tensor, config, seed: int) -> Timing:
    clock = TokenClock()
    with only_given_settings(model, seed):
        synchronize(input_ids.device)
        start = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=config, streamer=clock)
        synchronize(input_ids.device)
        end = time.perf_counter()
    new = out[:, input_ids.shape[1]:].cpu()
    if new.shape[1] != config.max_new_tokens or len(clock.times) != config.max_new_tokens:
        raise RuntimeError(f"generate returned {new.shape[1]} new tokens in {len(clock.times)} steps, not "
                           f"{config.max_new_tokens}")
    return Timing(clock.times[0] - start, clock.times[-1] - clock.times[0], end - start, new)


def measure(model, tokenizer, variant: str, batch_size: int, prompt_tokens: int,
            settings: Settings) -> tuple[dict, torch.Tensor]:
    """One row: WARMUP untimed calls, then REPEATS timed ones, and the tokens of the last call."""
    device = torch.device(settings.device)
    input_ids = prompt_batch(tokenizer, prompt_tokens, batch_size).to(device)
    config = generation_config(variant, tokenizer, settings)
    rss_before = None if device.type == "cuda" else rss_bytes()
    cpu_before = _cpu_seconds()
    peak_reset = reset_peak_memory(device)
    compiled_before = _graphs_compiled()
    for _ in range(settings.warmup):
        timed_generate(model, input_ids, config, settings.seed)
    compiled_warm = _graphs_compiled()
    runs = [timed_generate(model, input_ids, config, settings.seed) for _ in range(settings.repeats)]
    peak_gib, peak_kind = peak_memory_gib(device, rss_before, peak_reset)
    other_cpu_pct = _other_cpu_pct(cpu_before, _cpu_seconds()) if device.type == "cpu" else None
    ttft = np.array([r.ttft_s for r in runs]) * 1e3
    latency = np.array([r.latency_s for r in runs]) * 1e3
    decode_tok_s = float(np.median([(settings.new_tokens - 1) / r.decode_s for r in runs]))
    tokens = runs[-1].new_tokens
    row = {"variant": variant, "batch_size": batch_size, "prompt_tokens": prompt_tokens,
           "new_tokens": settings.new_tokens,
           "ttft_ms_p50": np.percentile(ttft, 50), "ttft_ms_p90": np.percentile(ttft, 90),
           "decode_tok_s": decode_tok_s, "decode_tok_s_batch": decode_tok_s * batch_size,
           "latency_ms_p50": np.percentile(latency, 50), "latency_ms_p90": np.percentile(latency, 90),
           "latency_ms_p99": np.percentile(latency, 99), "peak_mem_gib": peak_gib, "peak_mem_kind": peak_kind,
           "output_digest": hashlib.sha1(tokens.numpy().tobytes()).hexdigest()[:12],
           "new_tokens_generated": tokens.shape[1],
           "graphs_compiled_warmup": compiled_warm - compiled_before,
           "graphs_compiled_timed": _graphs_compiled() - compiled_warm, "other_cpu_pct": other_cpu_pct}
    return row, tokens


def weight_bytes_per_step(model) -> int:
    """Bytes of weights a decode step reads: every parameter, except an input embedding table that is not tied
    to the output layer (a step reads only its rows for the new tokens)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embedding is not output:  # tied weights are one Parameter
        total -= embedding.numel() * embedding.element_size()
    return total


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds all processes spent busy, CPU seconds this process spent), None without /proc."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system [idle iowait] irq softirq steal
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime


def _other_cpu_pct(before, after) -> float | None:
    """Share of the machine's CPU time that other processes used during a row: on the CPU they compete with
    torch's threads, which makes timings slower and erratic, so a result with a high share is suspect."""
    if before is None or after is None:
        return None
    wall, busy, own = (a - b for a, b in zip(after, before))
    return 100 * max(busy - own, 0.0) / (wall * os.cpu_count())


def _graphs_compiled() -> int:
    """Graphs torch.compile has built in this process so far (0 if it was never imported)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return 0 if utils is None else int(utils.counters["stats"]["unique_graphs"])


def _free(model, device: torch.device) -> None:
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()  # compiled graphs hold on to the model they were traced from


# ---------------------------------------------------------------------------------------------- the run


def provenance_columns(device: torch.device) -> dict:
    """The device and the versions every row names (the CSV's head has the full provenance lines)."""
    import transformers

    from sft.run_folder import collect_env

    env = collect_env(device)["device"]
    name = env["name"] if device.type == "cuda" else f"{env['name']} cpu ({env['threads']} threads)"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__}


def warn_if_cpu_busy() -> None:
    """Other processes compete with torch's threads on the CPU: a second's look at the machine, before the
    timings, says whether they are busy."""
    before = _cpu_seconds()
    time.sleep(1)
    busy = _other_cpu_pct(before, _cpu_seconds())
    if busy is not None and busy > 5:
        print(f"warning: other processes are using {busy:.0f}% of the CPU; CPU timings will be slow and noisy "
              f"while they run (see the other_cpu_pct column)", file=sys.stderr)


def run(settings: Settings, on_row=None) -> pd.DataFrame:
    """Measures every model x prompt length x batch size x variant; returns one row for each. `on_row`, if
    given, receives the rows so far after each one (so a run stopped midway keeps what it measured)."""
    check_models(settings.models)
    device = torch.device(settings.device)
    where = provenance_columns(device)
    if "static_cache+compile" in settings.variants:
        from torch import _dynamo

        # One graph per batch size x static cache length; past the default limit dynamo silently runs eagerly.
        _dynamo.config.recompile_limit = 64
    if device.type == "cpu":
        warn_if_cpu_busy()
    bandwidth = memory_bandwidth(device)
    rows = []
    for spec in settings.models:
        model, tokenizer, load_s = load(spec, settings)
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None and max(settings.prompt_tokens) + settings.new_tokens > context:
            raise ConfigError(f"prompt_tokens + new_tokens: {max(settings.prompt_tokens)} + {settings.new_tokens} "
                              f"exceeds {spec}'s {context} positions")
        weight_bytes = weight_bytes_per_step(model)
        bound = None if bandwidth is None else bandwidth / weight_bytes
        common = {"model": spec, "load_s": load_s, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                  "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
                  "bandwidth_bound_tok_s": bound, "dtype": settings.dtype, "attn": settings.attn_implementation,
                  "do_sample": settings.do_sample,
                  "temperature": settings.temperature if settings.do_sample else None,
                  "top_p": settings.top_p if settings.do_sample else None, "seed": settings.seed,
                  "warmup": settings.warmup, "repeats": settings.repeats, **where}
        # Ascending prompt lengths: generate sizes a static cache for the longest call the model has seen so far,
        # so in this order every row's cache is exactly prompt + new tokens long.
        for prompt_tokens in sorted(settings.prompt_tokens):
            for batch_size in sorted(settings.batch_sizes):
                reference = None
                for variant in settings.variants:
                    row, tokens = measure(model, tokenizer, variant, batch_size, prompt_tokens, settings)
                    if variant == "generate":
                        reference = tokens
                    row["matches_generate"] = (None if variant == "generate" or reference is None
                                               else bool(torch.equal(tokens, reference)))
                    row["fraction_of_bound"] = None if bound is None else row["decode_tok_s"] / bound
                    rows.append({**common, **row})
                    if on_row is not None:
                        on_row(pd.DataFrame(rows, columns=COLUMNS))
                    print(f"{spec} {variant} batch {batch_size} prompt {prompt_tokens}: "
                          f"ttft {row['ttft_ms_p50']:.1f} ms, {row['decode_tok_s']:.1f} tok/s per sequence",
                          file=sys.stderr)
        _free(model, device)
    return pd.DataFrame(rows, columns=COLUMNS)


def plot(frame: pd.DataFrame, title: str):
    """Decode tokens/s of the whole batch against batch size, and time to first token against prompt length."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    colors = {v: f"C{i}" for i, v in enumerate(ALL_VARIANTS)}
    styles = ["-", "--", ":", "-."]
    for (model, variant), group in frame.groupby(["model", "variant"], sort=False):
        label = f"{model.split('/')[-1]} {variant}"
        for i, (prompt, g) in enumerate(group.groupby("prompt_tokens")):
            g = g.sort_values("batch_size")
            left.plot(g["batch_size"], g["decode_tok_s_batch"], marker="o", color=colors[variant],
                      linestyle=styles[i % len(styles)], label=f"{label}, prompt {prompt}")
        for i, (batch, g) in enumerate(group.groupby("batch_size")):
            g = g.sort_values("prompt_tokens")
            right.plot(g["prompt_tokens"], g["ttft_ms_p50"], marker="o", color=colors[variant],
                       linestyle=styles[i % len(styles)], label=f"{label}, batch {batch}")
    left.set(xscale="log", xlabel="batch size", ylabel="decode tokens/s (whole batch, median)",
             title="decode throughput")
    right.set(xscale="log", xlabel="prompt tokens", ylabel="time to first token, p50 (ms)",
              title="time to first token")
    for ax, ticks in ((left, sorted(frame["batch_size"].unique())), (right, sorted(frame["prompt_tokens"].unique()))):
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def settings_from_args(argv=None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    parser.add_argument("--dtype")
    parser.add_argument("--attn-implementation", default=ATTN_IMPLEMENTATION)
    parser.add_argument("--variants", nargs="+")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=BATCH_SIZES)
    parser.add_argument("--prompt-tokens", nargs="+", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=DO_SAMPLE)
    parser.add_argument("--temperature", type=float, default=TEMPERATURE)
    parser.add_argument("--top-p", type=float, default=TOP_P)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--out-dir", default=OUT_DIR)
    parser.add_argument("--tag", help="appended to the output file names, so a trial run leaves the results be")
    parser.add_argument("--save-llama-7b", metavar="DIR",
                        help="only write a folder with the 7B shape's config and the embedded tokenizer, usable as "
                             "random-init:DIR where the embedded package is not installed, and exit")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device (--device): 'auto', 'cuda' or 'cpu', got {args.device!r}")
    return Settings(models=args.models or MODELS[device], device=device, dtype=args.dtype or DTYPE[device],
                    attn_implementation=args.attn_implementation, variants=args.variants or VARIANTS[device],
                    batch_sizes=args.batch_sizes, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                    do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                    warmup=args.warmup, repeats=args.repeats, out_dir=Path(args.out_dir), tag=args.tag)


def main(argv=None) -> int:
    from inf_tests.report_sources import INFERENCE_COLUMNS
    from sft.tables import markdown_table

    try:
        settings = settings_from_args(argv)
        saved = argparse.ArgumentParser(add_help=False)
        saved.add_argument("--save-llama-7b")
        folder = saved.parse_known_args(argv)[0].save_llama_7b
        if folder:
            save_llama_7b_folder(Path(folder))
            print(f"wrote {folder}: use it as --models random-init:{folder}", file=sys.stderr)
            return 0
        kind = "gpu" if settings.device == "cuda" else "cpu"
        stem = f"runtime_{kind}" + (f"_{settings.tag}" if settings.tag else "")

        partial = settings.out_dir / f"{stem}.partial.csv"

        def write_csv(frame: pd.DataFrame) -> None:
            """After every row, into <stem>.partial.csv, renamed to <stem>.csv once all rows are in: a run
            stopped midway keeps the rows it measured and leaves the last complete results as they were."""
            settings.out_dir.mkdir(parents=True, exist_ok=True)
            with open(partial, "w", newline="") as f:
                f.write(provenance_header(provenance(torch.device(settings.device))))
                frame.round(3).to_csv(f, index=False)

        frame = run(settings, on_row=write_csv)
        partial.replace(settings.out_dir / f"{stem}.csv")
    except SFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    title = (f"{frame['device'].iloc[0]}, {settings.dtype}, {settings.attn_implementation}, "
             f"{settings.new_tokens} new tokens, torch {torch.__version__}")
    plot(frame, title).savefig(settings.out_dir / f"{stem}.png", dpi=120)
    print(markdown_table(frame[INFERENCE_COLUMNS]))
    print(f"\nwrote {settings.out_dir / stem}.csv and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
