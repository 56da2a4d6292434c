"""The benchmarks: synthetic data in both trainers' forms, the side-by-side CPU smoke run end to end, and
the precision comparison's outputs."""
from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.synthetic import LENGTH_RANGE, synthetic_examples
from sft.templates import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_examples_follow_the_anchor_distribution_and_supervise_the_same_tokens():
    examples = synthetic_examples(200_000, vocab_size=1000, seed=0)
    lengths = sorted(len(e.input_ids) for e in examples)
    assert sum(lengths) >= 200_000
    assert LENGTH_RANGE[0] <= lengths[0] and lengths[-1] <= LENGTH_RANGE[1]
    assert 250 < lengths[len(lengths) // 2] < 350  # median about 300
    assert all(0.2 * len(e.input_ids) - 1 <= e.prompt_length <= 0.6 * len(e.input_ids) for e in examples)
    e = examples[0]
    ours = e.to_example()
    # position t predicts token t+1: supervised exactly where the next token is a completion token
    assert [t != IGNORE_INDEX for t in ours.targets] == [m == 1 for m in e.completion_mask()[1:]] + [False]
    assert ours.targets[e.prompt_length - 1] == e.input_ids[e.prompt_length]


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def test_cpu_smoke_runs_every_variant_and_counts_only_real_tokens(tmp_path):
    from bench.bench_sft import COLUMNS

    done = subprocess.run([sys.executable, "-m", "bench.bench_sft", "--cpu-smoke", "--out", str(tmp_path),
                           "--profile", str(tmp_path / "profiles")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "bench_cpu.csv") as f:
        assert f.readline().startswith("# device:")
    rows = {r["variant"]: r for r in read_csv(tmp_path / "bench_cpu.csv")}
    assert list(next(iter(rows.values()))) == COLUMNS
    assert rows["trl_tiny_flex"]["status"] == "skipped: needs CUDA"
    for name in ("ours_tiny", "trl_tiny_sdpa", "study_tiny"):
        assert rows[name]["status"] == "ok", rows[name]
        assert float(rows[name]["real_tok_s"]) > 0 and float(rows[name]["first_step_s"]) > 0
    study = rows["study_tiny"]
    assert float(study["real_tok_s"]) < 0.9 * float(study["padded_tok_s"])  # padding to 512 is not counted
    static = rows["trl_tiny_sdpa_static"]  # padding-free, padded to one shape: that padding is not counted either
    assert static["status"] == "ok", static
    assert float(static["real_tok_s"]) < float(static["padded_tok_s"])
    assert float(rows["trl_tiny_sdpa"]["real_tok_s"]) == float(rows["trl_tiny_sdpa"]["padded_tok_s"])
    ours = rows["ours_tiny"]
    assert float(ours["real_tok_s"]) <= float(ours["padded_tok_s"])
    assert "attn=sdpa" in ours["settings"]  # varlen is for GPUs; "auto" picks sdpa on the CPU
    profile = (tmp_path / "profiles" / "profile_ours_tiny.txt").read_text()  # ours only: TRL has its own tools
    assert profile.startswith("3 optimizer steps") and "aten::mm" in profile
    assert sorted(p.name for p in (tmp_path / "profiles").iterdir()) == [
        "profile_ours_tiny.txt", "profile_ours_tiny_compile_capped.txt", "profile_ours_tiny_int8_states.txt"]
    int8 = rows["ours_tiny_int8_states"]  # pure bf16 weights with 8-bit moments
    assert int8["status"] == "ok" and "states=int8" in int8["settings"], int8
    assert "8-bit block-wise states" in int8["settings"]
    capped = rows["ours_tiny_compile_capped"]  # the compiled trainer, stopped by its time cap
    assert capped["status"] == "ok" and capped["timed_steps"] == "1", capped
    assert "compile=True" in capped["settings"]
    mpt = rows["ours_tiny_mpt_packed"]  # the original study's architecture, packed with its ALiBi attention
    assert mpt["status"] == "ok" and "attn=packed ALiBi (sdpa)" in mpt["settings"], mpt
    for name in ("ours_tiny_mpt_padded_eager", "study_tiny_mpt"):  # transformers' eager MPT attention, padded
        assert rows[name]["status"] == "ok", rows[name]
        assert float(rows[name]["real_tok_s"]) < float(rows[name]["padded_tok_s"])
    markdown = (tmp_path / "bench_cpu.md").read_text()
    assert "| ours_tiny | ok |" in markdown and "packages: torch" in markdown


def test_precision_compare_writes_one_curve_per_master_weights_variant(tmp_path):
    from bench import precision_compare
    from sft.optim import MASTER_WEIGHTS

    curves = precision_compare.main(["--out", str(tmp_path), "--steps", "3"])
    assert {master for master, _ in precision_compare.VARIANTS.values()} == set(MASTER_WEIGHTS)
    assert ("bf16_stochastic_rounding", "int8") in precision_compare.VARIANTS.values()
    float8 = [precision_compare.FLOAT8] if importlib.util.find_spec("torchao") else []  # with torchao only
    assert list(curves) == list(precision_compare.VARIANTS) + float8
    rows = list(csv.reader(line for line in open(tmp_path / "precision_cpu.csv") if not line.startswith("#")))
    assert rows[0] == ["step", *precision_compare.VARIANTS, *float8] and len(rows) == 4
    assert (tmp_path / "precision_cpu.png").stat().st_size > 0


def test_a_variant_past_its_timeout_is_killed_and_recorded():
    import dataclasses

    from bench import bench_sft

    variant = dataclasses.replace(bench_sft.CPU_PLAN[0], timeout_s=0.5)  # not even its imports finish
    began = time.perf_counter()
    row = bench_sft.run_isolated(variant, 10_000, torch.device("cpu"))
    assert row["status"].startswith("timeout: no result in") and row["status"].endswith("(last progress: none)")
    assert time.perf_counter() - began < 30


def test_a_fallback_variant_runs_only_when_the_one_it_stands_in_for_missed_the_memory_goal():
    from bench.bench_sft import Variant, fallback_needed

    fallback = Variant("ours_7b_every8", "ours", "llama-7b", 10, 3, fallback_for="ours_7b")
    ran = lambda status, gib=None: [dict(variant="ours_7b", status=status, peak_gib=gib)]  # noqa: E731
    assert not fallback_needed(fallback, ran("ok", 58.9))
    assert fallback_needed(fallback, ran("ok", 60.2))
    assert fallback_needed(fallback, ran("OOM"))
    assert fallback_needed(fallback, ran("error: RuntimeError: ..."))
    assert fallback_needed(fallback, [])  # the first did not run (--only): the fallback is all there is
    assert fallback_needed(Variant("ours_1b", "ours", "llama-1b", 15, 5), ran("OOM"))  # not a fallback


def test_a_failing_profiler_leaves_the_measured_row(tmp_path, monkeypatch):
    from bench import bench_sft

    def broken(*args):
        raise RuntimeError("no such sort key")

    monkeypatch.setattr(bench_sft, "PROFILE_DIR", tmp_path)
    monkeypatch.setattr(bench_sft, "profile_steps", broken)
    variant = next(v for v in bench_sft.CPU_PLAN if v.name == "ours_tiny")
    row = bench_sft.run_variant(variant, 4_000, torch.device("cpu"), time.perf_counter())
    assert row["status"] == "ok" and float(row["real_tok_s"]) > 0, row
    assert (tmp_path / "profile_ours_tiny.txt").read_text() == "profiling failed: RuntimeError: no such sort key\n"


def test_goal_lines_take_our_fastest_row_within_the_memory_goal():
    from bench.bench_sft import goal_lines

    row = lambda variant, recipe, arch, tok, gib, first="10", master="bf16_stochastic_rounding": dict(  # noqa: E731
        variant=variant, recipe=recipe, arch=arch, status="ok", real_tok_s=str(tok), peak_gib=str(gib),
        first_step_s=first, settings=f"bf16_pure, master={master}, attn=sft_varlen")  # as read back from a CSV
    rows = [row("ours_1b_a", "ours", "llama-1b", 71_000, 30), row("ours_1b_b", "ours", "llama-1b", 60_000, 20),
            row("ours_1b_plain", "ours", "llama-1b", 90_000, 20, master="bf16_plain"),  # imprecise: never counts
            row("trl_1b", "trl", "llama-1b", 35_500, 10), row("study_1b", "study", "llama-1b", 7_100, 11),
            row("ours_7b_big", "ours", "llama-7b", 14_000, 61, first="70"),
            row("ours_7b", "ours", "llama-7b", 6_500, 50),
            dict(variant="ours_7b_oom", recipe="ours", arch="llama-7b", status="OOM")]
    one_b, seven_b, first = goal_lines(rows)
    mpt = [row("ours_mpt", "ours", "mpt-7b", 5_850, 55), row("study_mpt", "study", "mpt-7b", 700, 70)]
    mpt[0]["settings"] += " (packed ALiBi (flex_attention))"
    assert goal_lines(rows + mpt)[2] == (
        "mpt-7b packed: 5,850 real tok/s (ours_mpt, 55.0 GiB); 90% of llama-7b (ours_7b, 6,500); goal 90%: met; "
        "8.4x the study's recipe on mpt-7b (700); goal 8x: met")
    assert one_b.startswith("llama-1b: ours 71,000 real tok/s (ours_1b_a, 30.0 GiB")
    assert "updates bf16_stochastic_rounding (precise to fp32)" in one_b
    assert "2.00x TRL measured here (trl_1b, 35,500)" in one_b and "10.0x the study's recipe" in one_b
    assert one_b.endswith("goal 70,000: met")
    assert seven_b.startswith("llama-7b: ours 6,500 real tok/s (ours_7b,")  # the 61 GiB row is over the goal
    assert seven_b.endswith("goal 13,000 within 60 GiB: not met (50% of it)")
    assert first.endswith("goal 60 s: not met")  # the slowest start counts, whatever its speed


def test_report_renders_every_gpu_benchmark_file_and_the_goals(tmp_path):
    from sft import report

    header = ("# device: NVIDIA H100 80GB HBM3, CUDA 13.0\n"
              "variant,recipe,arch,status,real_tok_s,peak_gib,first_step_s,settings\n")
    (tmp_path / "bench_gpu.csv").write_text(header + 'ours_1b,ours,llama-1b,ok,80000,30,12,"master=fp32"\n')
    (tmp_path / "bench_gpu_run2.csv").write_text(header + 'ours_7b,ours,llama-7b,ok,9000,50,9,"master=bf16_kahan"\n')
    from bench.bench_sft import write_gpu_goals

    write_gpu_goals(tmp_path)  # what the benchmark writes after each of its rows
    body = report.bench_gpu(sorted(tmp_path.glob("bench_gpu*.csv")), tmp_path)
    assert body.index("From `bench_gpu.csv`") < body.index("From `bench_gpu_run2.csv`")
    assert "- device: NVIDIA H100 80GB HBM3, CUDA 13.0" in body
    assert "llama-1b: ours 80,000 real tok/s" in body and "goal 70,000: met" in body
    assert "goal 13,000 within 60 GiB: not met (69% of it)" in body


def test_stopping_the_benchmark_stops_the_variant_it_is_running(tmp_path):
    """`timeout` (as gpu_run.sh uses it) sends SIGTERM to the benchmark: its variant's process, which
    runs in its own process group, must not live on holding the device."""
    import signal

    parent = subprocess.Popen([sys.executable, "-m", "bench.bench_sft", "--cpu-smoke", "--only", "ours_tiny_compile",
                               "--out", str(tmp_path)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert "starting" in parent.stderr.readline()
    time.sleep(2)  # the variant's process is importing torch by now
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 143

    def children() -> list[str]:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "bench.bench_sft --child ours_tiny_compile_capped" in cmdline:
                found.append(cmdline)
        return found

    assert children() == []


def test_the_time_limit_cuts_each_variant_to_the_time_left_and_skips_the_rest(tmp_path, monkeypatch):
    """Every variant ends within --time-limit-s: its timeout is what is left (so it is recorded, never killed
    with the benchmark), and none starts with less than MIN_VARIANT_S left."""
    import bench.bench_sft as bench

    started = []

    def run_isolated(variant, tokens, device, profile=None, timeout_s=None):
        started.append((variant.name, timeout_s))
        monkeypatch.setattr(bench, "PROCESS_START", bench.PROCESS_START - 30)  # each variant takes 30 s
        return dict(variant=variant.name, recipe=variant.recipe, arch=variant.arch, status="ok")

    monkeypatch.setattr(bench, "run_isolated", run_isolated)
    monkeypatch.setattr(bench, "PROCESS_START", time.perf_counter())
    bench.main(["--cpu-smoke", "--out", str(tmp_path), "--time-limit-s", "105"])
    assert [name for name, _ in started] == [v.name for v in bench.CPU_PLAN[:3]]
    # what is left of 105 s, less 5 s of margin (and the time the plan's setup took)
    assert [t for _, t in started] == pytest.approx([100, 70, 40], abs=3)
    rows = read_csv(tmp_path / "bench_cpu.csv")
    assert [r["status"] for r in rows[3:]] == ["skipped: time limit"] * (len(bench.CPU_PLAN) - 3)


def test_the_child_notes_its_progress_for_a_timeout_to_report(tmp_path, monkeypatch):
    from bench import bench_sft

    monkeypatch.setattr(bench_sft, "PROGRESS_FILE", tmp_path / "progress.txt")
    clock = bench_sft.Clock(time.perf_counter(), warmup=1, last=3, device=torch.device("cpu"))
    bench_sft.progress("built; training")
    for step in (1, 2):
        clock.step_done(step, 100, 100)
    notes = (tmp_path / "progress.txt").read_text().splitlines()
    assert [n.split(": ", 1)[1] for n in notes] == ["built; training", "step 1 of 3 launched", "step 2 of 3 launched"]


def test_the_profile_splits_device_time_by_kind_of_kernel():
    from types import SimpleNamespace

    from bench.bench_sft import time_split

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    event = lambda key, t, device=cuda, range_=False: SimpleNamespace(  # noqa: E731
        key=key, self_device_time_total=0 if range_ else t, device_time_total=t, device_type=device,
        is_user_annotation=range_)
    events = [event("nvjet_sm90_tst_256x128", 600), event("void pytorch_flash::flash_bwd", 100),
              event("triton_poi_fused_rand_like", 150), event("triton_red_fused_logsumexp", 150),
              event("Optimizer.step#BF16AdamW.step", 150, range_=True),  # the optimizer's range on the GPU...
              event("Optimizer.step#BF16AdamW.step", 999, device=cpu, range_=True),  # ...not its host side
              event("aten::mm", 600, device=cpu)]  # the op that launched a kernel: not counted again
    assert time_split(events) == ("where the device time goes: matmul 60.0%, attention 10.0%, optimizer step 15.0%, "
                                  "other 15.0%")


def test_data_bench_measures_every_path_and_checks_the_goals(tmp_path):
    from bench import data_bench

    rows = data_bench.main(["--rows", "300", "--out", str(tmp_path), "--timeout-s", "600"])
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {"ours", "ours_cache_hit", "trl", "per_conversation"}
    assert all(r["status"] == "ok" for r in rows), rows
    # the same rows, the same template: every path sees the same tokens (the held-out split aside)
    assert by_variant["ours"]["tokens"] == by_variant["per_conversation"]["tokens"] == by_variant["trl"]["tokens"]
    assert by_variant["ours_cache_hit"]["anon_bytes_per_token"] > 0
    markdown = (tmp_path / "data_cpu.md").read_text()
    assert "| ours | 300 | ok |" in markdown and "300 rows: " in markdown and "x trl" in markdown
    assert (tmp_path / "data_cpu_goals.md").read_text().startswith("- 300 rows: ")  # the README's goal lines
