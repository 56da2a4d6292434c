"""Do small updates survive bf16 weights? Loss curves of the AdamW variants of sft.optim on the same
batches: fp32 weights, then bf16 weights with each `bf16_update`: stochastic rounding (with fp32 or
block-wise 8-bit moments), Kahan summation, and "none", plain bf16 (which rounds away every update smaller
than half a bf16 step of the weight).

    python -m bench.precision_compare [--out DIR] [--steps N]

A small random-init Llama learns a synthetic Markov-chain language (each token has a few possible
successors), so the loss keeps falling for as long as updates land. Every variant computes in bf16
(autocast over the fp32 master weights); only how the update reaches the weights differs. At the
finetuning learning rate LR most updates are below half a bf16 step of their weight: plain bf16 stalls
while the others track fp32. Writes <out>/precision_<cpu|gpu>.csv and .png.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import time
from pathlib import Path

import torch

from inf_tests.measure import provenance_header
from sft.optim import build_optimizer
from sft.run_folder import provenance

LR = 2e-5                  # the toolkit's default finetuning learning rate
BETAS = (0.9, 0.95)
STEPS = 200
BATCH, LENGTH = 8, 64      # sequences per step, tokens per sequence
VOCAB = 256
SUCCESSORS = 4             # possible next tokens per token: the loss floor is about ln(4)
MODEL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=LENGTH)
SEED = 0
SMOOTH = 10                # steps in the plotted moving average
# curve name: (bf16_update, optimizer state dtype); None: fp32 weights (sft.optim.build_optimizer)
VARIANTS = {"fp32": (None, "float32"),
            "stochastic_rounding": ("stochastic_rounding", "float32"),
            "stochastic_rounding_int8_states": ("stochastic_rounding", "int8"),
            "kahan": ("kahan", "float32"),
            "none": ("none", "float32")}
# float8 matmuls in the decoder layers (sft.modeling.convert_to_float8, torchao) over the stochastic-rounding
# update: the same update, so its curve against stochastic_rounding shows what float8 compute costs
FLOAT8 = "stochastic_rounding_float8"


def markov_batches(steps: int, seed: int = SEED) -> list[torch.Tensor]:
    """Token sequences of a random first-order Markov chain; the same list feeds every variant."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCAB, (VOCAB, SUCCESSORS), generator=gen)
    batches = []
    for _ in range(steps):
        x = torch.empty(BATCH, LENGTH, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=gen)
        choice = torch.randint(0, SUCCESSORS, (BATCH, LENGTH), generator=gen)
        for t in range(1, LENGTH):
            x[:, t] = successors[x[:, t - 1], choice[:, t]]
        batches.append(x)
    return batches


def train(bf16_update: str | None, state_dtype: str, batches: list[torch.Tensor], device: torch.device,
          float8: bool = False) -> list[float]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sft.modeling import convert_to_float8

    torch.manual_seed(SEED)  # the same initial weights for every variant (rounded to bf16 for the bf16 ones)
    dtype = torch.float32 if bf16_update is None else torch.bfloat16
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**MODEL), dtype=dtype, attn_implementation="sdpa")
    if float8:
        convert_to_float8(model)
    optimizer = build_optimizer(model.parameters(), bf16_update=bf16_update, lr=LR, betas=BETAS, seed=SEED,
                                state_dtype=state_dtype)
    losses = []
    for x in batches:
        x = x.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def moving_average(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot(curves: dict[str, list[float]], title: str, path: Path) -> None:
    """Left: the loss curves (faint: every step). Right: each curve minus fp32's, where tracking fp32
    means staying near zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    reference = moving_average(curves["fp32"], SMOOTH)
    for (name, losses), style in zip(curves.items(), ("-", "--", "-.", ":", "-", "--")):
        smooth = moving_average(losses, SMOOTH)
        line, = left.plot(smooth, style, label=name, lw=1.8)
        left.plot(losses, color=line.get_color(), alpha=0.15, lw=0.8)
        right.plot([a - b for a, b in zip(smooth, reference)], style, color=line.get_color(), label=name, lw=1.8)
    left.set(xlabel="optimizer step", ylabel=f"training loss ({SMOOTH}-step moving average)")
    right.set(xlabel="optimizer step", ylabel="loss minus fp32 weights' loss")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = "gpu" if device.type == "cuda" else "cpu"
    batches = markov_batches(args.steps)
    runs = {name: (*settings, False) for name, settings in VARIANTS.items()}
    if importlib.util.find_spec("torchao") is not None:
        runs[FLOAT8] = (*VARIANTS["stochastic_rounding"], True)
    else:
        print(f"{FLOAT8}: left out (float8 training needs torchao: pip install torchao)")
    curves = {}
    for name, (bf16_update, state_dtype, float8) in runs.items():
        start = time.perf_counter()
        curves[name] = train(bf16_update, state_dtype, batches, device, float8)
        print(f"{name}: loss {curves[name][0]:.3f} -> {sum(curves[name][-SMOOTH:]) / SMOOTH:.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"precision_{kind}.csv", "w", newline="") as f:
        f.write(provenance_header(provenance(device)))
        f.write(f"# lr {LR}, betas {BETAS}, {BATCH}x{LENGTH} tokens per step, model {MODEL}, bf16 autocast compute\n")
        writer = csv.writer(f)
        writer.writerow(["step", *curves])
        writer.writerows([step + 1, *(round(curves[n][step], 5) for n in curves)] for step in range(args.steps))
    drop = {n: curves[n][0] - sum(curves[n][-SMOOTH:]) / SMOOTH for n in curves}
    title = (f"AdamW at lr {LR:g}, {args.steps} steps on the {kind.upper()}; loss drop as a share of fp32 "
             f"weights' drop:\n" + ", ".join(f"{n} {drop[n] / drop['fp32']:.0%}" for n in curves if n != "fp32"))
    plot(curves, title, args.out / f"precision_{kind}.png")
    print(title)
    return curves


if __name__ == "__main__":
    main()
