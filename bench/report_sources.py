"""The README blocks the benchmarks feed: python -m sft.report renders them from these files."""
from __future__ import annotations

from sft.report import Results, ResultSource

# The columns the README shows of a throughput CSV (bench.bench_sft.COLUMNS has them all).
BENCH_COLUMNS = ["variant", "recipe", "arch", "params_b", "status", "real_tok_s", "padded_tok_s", "mfu", "peak_gib",
                 "first_step_s"]
PROFILES = "bench/results/profiles"


def profile_splits(results: Results) -> list[str]:
    """The device-time split of each profiled GPU variant (bench.bench_sft.time_split's line), as one section."""
    splits = [f"- {p.stem.removeprefix('profile_')}: {line.split(': ', 1)[1]}" for p in results.glob(
        results.root / PROFILES, "profile_*.txt") for line in results.read(p).splitlines()
        if line.startswith("where the device time")]
    return [f"Where the device time goes (`{PROFILES}/`, a few steps under the profiler):\n\n"
            + "\n".join(splits)] if splits else []


SOURCES = [ResultSource("bench-cpu", "bench/results/bench_cpu.csv", BENCH_COLUMNS),
           ResultSource("data-cpu", "bench/results/data_cpu.csv", goals="bench/results/data_cpu_goals.md"),
           # one CSV per benchmark invocation; the goals were checked over each one's rows
           ResultSource("bench-gpu", "bench/results/bench_gpu*.csv", BENCH_COLUMNS, skip_status="skipped",
                        goals="bench/results/bench_gpu_goals.md",
                        goals_heading="Against the goals, over the rows above:", notes=profile_splits)]
