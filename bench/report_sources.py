"""The README blocks the benchmarks feed: python -m sft.report renders them from these files."""
from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from sft.report import Results, ResultSource
from sft.tables import markdown_table

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


def speed_summary(paths: list[Path], results: Results) -> str:
    """One table of the best measured rows per model shape over every GPU benchmark CSV: ours, TRL's best and
    the study's recipe, with the device and date of the run that measured ours."""
    frames = []
    for path in paths:
        text = results.read(path)
        provenance = dict(line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("# ")
                          and ": " in line)
        frame = pd.read_csv(io.StringIO(text), comment="#")
        frames.append(frame[frame["status"] == "ok"].assign(
            device=provenance.get("device", "-"), date=provenance.get("date", "-").split(",")[0][:10]))
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if rows.empty:
        return "(no GPU benchmark rows yet)"
    out = []
    for arch, group in rows.groupby("arch", sort=False):
        best = {recipe: g.loc[g["real_tok_s"].idxmax()] for recipe, g in group.groupby("recipe")}
        if "ours" not in best:
            continue
        ours = best["ours"]
        out.append({"model shape": arch, "ours, best row": ours["variant"], "real tok/s": ours["real_tok_s"],
                    "MFU": f"{float(ours['mfu']):.1%}" if pd.notna(ours.get("mfu")) else "-",
                    "peak GiB": ours.get("peak_gib"),
                    "TRL's best": best["trl"]["real_tok_s"] if "trl" in best else None,
                    "study's recipe": best["study"]["real_tok_s"] if "study" in best else None,
                    "device, date": f"{ours['device'].split(',')[0]}, {ours['date']}"})
    return markdown_table(pd.DataFrame(out))


def data_summary(paths: list[Path], results: Results) -> str:
    """One table of the data benchmark's sets, each at the largest size measured for this toolkit and TRL alike:
    our preparation and TRL's on the same rows, with the device and the date."""
    text = results.read(paths[0])
    provenance = [line[2:] for line in text.splitlines() if line.startswith("# ")]
    frame = pd.read_csv(io.StringIO(text), comment="#")
    frame = frame[frame["status"] == "ok"] if "status" in frame.columns else frame
    if "set" not in frame.columns:
        frame = frame.assign(set="guanaco")
    device = next((line.split(": ", 1)[1] for line in provenance if line.startswith("device:")), "-")
    out = []
    for name, group in frame.groupby("set", sort=False):
        both = [n for n, g in group.groupby("rows") if {"ours", "trl"} <= set(g["variant"])]
        size = max(both) if both else group["rows"].max()  # the largest size measured for both, if any
        at = group[group["rows"] == size].set_index("variant")
        date = next((line.split("date: ", 1)[1].split(",")[0][:10] for line in provenance
                     if line.startswith(f"{name} set, date:")), "-")
        ours, trl = at["tok_s"].get("ours"), at["tok_s"].get("trl")
        out.append({"set": name, "rows": int(size), "ours, tok/s (2 processes)": ours,
                    "TRL, tok/s": trl, "ours / TRL": f"{ours / trl:.2f}x" if pd.notna(ours) and pd.notna(trl) else "-",
                    "peak RSS GiB": at["peak_rss_gib"].get("ours"), "device, date": f"{device}, {date}"})
    return markdown_table(pd.DataFrame(out))


SOURCES = [ResultSource("bench-cpu", "bench/results/bench_cpu.csv", BENCH_COLUMNS),
           ResultSource("data-cpu", "bench/results/data_cpu.csv", goals="bench/results/data_cpu_goals.md"),
           # one CSV per benchmark invocation; the goals were checked over each one's rows
           ResultSource("bench-gpu", "bench/results/bench_gpu*.csv", BENCH_COLUMNS, skip_status="skipped",
                        goals="bench/results/bench_gpu_goals.md",
                        goals_heading="Against the goals, over the rows above:", notes=profile_splits),
           # the README's summaries of the best rows; every row is in bench/README.md
           ResultSource("speed-summary", "bench/results/bench_gpu*.csv", summary=speed_summary),
           ResultSource("data-summary", "bench/results/data_cpu.csv", summary=data_summary)]
