"""The benchmarks: synthetic data in both trainers' forms, the side-by-side CPU smoke run end to end, the goal
lines on hand-made rows, the GPU proof's plan and budget (bench/gpu_run.py, dry and with a stand-in runner), and
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

from bench.synthetic import LENGTH_RANGE, LENGTHS, synthetic_examples
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


def test_long_examples_have_a_median_of_4k_tokens_clipped_to_16k():
    lengths = sorted(len(e.input_ids) for e in synthetic_examples(2_000_000, vocab_size=1000, seed=0, lengths="long"))
    assert LENGTHS["long"] == (4096, 256, 16384)
    assert 3600 < lengths[len(lengths) // 2] < 4600
    assert lengths[0] >= 256 and lengths[-1] == 16384  # the lognormal's tail is clipped, not dropped
    clipped = synthetic_examples(200_000, vocab_size=1000, seed=0, max_length=2048, lengths="long")
    assert max(len(e.input_ids) for e in clipped) == 2048


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
    long = rows["ours_tiny_long"]  # the long-row settings: one row of long examples, every layer recomputed
    assert long["status"] == "ok", long
    assert "rows=1x2048 x 1 micro-batches" in long["settings"] and "checkpointing=True" in long["settings"]
    assert "data=long (lognormal lengths, median 4096, 256..16384)" in long["settings"]
    markdown = (tmp_path / "bench_cpu.md").read_text()
    assert "| ours_tiny | ok |" in markdown and "packages: torch" in markdown


def test_precision_compare_writes_one_curve_per_bf16_update_and_fp32(tmp_path):
    from bench import precision_compare
    from sft.optim import BF16_UPDATES

    curves = precision_compare.main(["--out", str(tmp_path), "--steps", "3"])
    assert {update for update, _ in precision_compare.VARIANTS.values()} == {None, *BF16_UPDATES}
    assert ("stochastic_rounding", "int8") in precision_compare.VARIANTS.values()
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
    long = Variant("ours_8b_in_backward", "ours", "llama-8b", 8, 3, fallback_for="ours_7b")  # the long rows' 60 GiB
    assert fallback_needed(long, ran("ok", 60.2)) and not fallback_needed(long, ran("ok", 54.0))
    trl = Variant("trl_1b_sdpa", "trl", "llama-1b", 15, 5, fallback_for="ours_7b")  # no memory goal at 1B
    assert not fallback_needed(trl, ran("ok", 70.0)) and fallback_needed(trl, ran("timeout: no result in 70 s"))


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


def csv_row(variant, recipe, arch, tok, gib, first="10", update="bf16_update=stochastic_rounding", mfu="", extra=""):
    """A row as read back from a benchmark CSV: every value a string."""
    return dict(variant=variant, recipe=recipe, arch=arch, status="ok", real_tok_s=str(tok), peak_gib=str(gib),
                first_step_s=first, mfu=mfu, settings=f"bf16_pure, {update}, attn=sft_varlen{extra}")


def test_goal_lines_take_our_fastest_row_within_the_memory_goal_as_a_ratio_to_trl_here():
    from bench.bench_sft import goal_lines

    rows = [csv_row("ours_1b_a", "ours", "llama-1b", 71_000, 30, mfu="0.53"),
            csv_row("ours_1b_b", "ours", "llama-1b", 60_000, 20),
            csv_row("ours_1b_plain", "ours", "llama-1b", 90_000, 20, update="bf16_update=none"),  # imprecise
            csv_row("trl_1b", "trl", "llama-1b", 35_500, 10, mfu="0.265"),
            csv_row("trl_1b_slow", "trl", "llama-1b", 12_000, 10, mfu="0.09"),
            csv_row("study_1b", "study", "llama-1b", 7_100, 11),
            csv_row("ours_7b_big", "ours", "llama-7b", 14_000, 61, first="70"),
            csv_row("ours_7b", "ours", "llama-7b", 6_500, 50, mfu="0.265"),
            dict(variant="ours_7b_oom", recipe="ours", arch="llama-7b", status="OOM")]
    one_b, seven_b, precise, first = goal_lines(rows)
    assert one_b.startswith("llama-1b: ours 71,000 real tok/s (ours_1b_a, 30.0 GiB")
    assert "; 2.00x TRL's best here (trl_1b, 35,500); 1.51x TRL's best in the anchor (47,149, H100)" in one_b
    assert "10.0x the study's recipe" in one_b and "updates bf16_update=stochastic_rounding (precise to fp32)" in one_b
    assert one_b.endswith("goal 70,000: met")
    assert seven_b.startswith("llama-7b: ours 6,500 real tok/s (ours_7b,")  # the 61 GiB row is over the goal
    # no TRL row on the 7B shape: compared by MFU with TRL's best row of the same invocation
    assert "MFU 26.5%, 1.00x that of TRL's best row here (trl_1b, 26.5%; no TRL row on llama-7b)" in seven_b
    assert seven_b.endswith("goal 13,000 within 60 GiB: not met (50% of it)")
    assert precise == ("updates precise to fp32 (fp32 master weights, stochastic rounding or Kahan summation): 4 of 5 "
                       "rows of ours (not: ours_1b_plain, bf16_update=none); goal every row: not met")
    assert first == "time to the first step, ours: at most 70.0 s (ours_7b_big) over 5 runs; goal 60 s for every " \
                    "row: not met"  # the slowest start counts, whatever its speed
    mpt = [csv_row("ours_mpt", "ours", "mpt-7b", 5_850, 55, extra=" (packed ALiBi (flex_attention))", mfu="0.22"),
           csv_row("study_mpt", "study", "mpt-7b", 700, 70)]
    assert goal_lines(rows + mpt)[2] == (
        "mpt-7b packed: 5,850 real tok/s (ours_mpt, 55.0 GiB); 90% of llama-7b (ours_7b, 6,500); goal 90%: met; "
        "8.4x the study's recipe on mpt-7b (700); goal 8x: met; MFU 22.0%, 0.83x that of TRL's best row here "
        "(trl_1b, 26.5%; no TRL row on mpt-7b)")


def test_the_long_row_goal_is_its_memory_and_names_its_speed_and_mfu():
    from bench.bench_sft import goal_lines

    trl = csv_row("trl_1b", "trl", "llama-1b", 30_000, 10, mfu="0.2")
    long = csv_row("ours_8b_long", "ours", "llama-8b", 9_000, 54.2, first="41", mfu="0.44")
    line = next(line for line in goal_lines([trl, long]) if line.startswith("llama-8b"))
    assert line == ("llama-8b, rows of 16,384 tokens: ours 9,000 real tok/s (ours_8b_long, MFU 44.0%, 54.2 GiB, first "
                    "step 41.0 s); MFU 44.0%, 2.20x that of TRL's best row here (trl_1b, 20.0%; no TRL row on "
                    "llama-8b); updates bf16_update=stochastic_rounding (precise to fp32); goal within 60 GiB: met")
    over = dict(long, peak_gib="61.5")
    assert "no successful run of ours with updates precise to fp32 within 60 GiB; goal: not met" in next(
        line for line in goal_lines([trl, over]) if line.startswith("llama-8b"))
    skipped = dict(variant="ours_8b_long", recipe="ours", arch="llama-8b", status="skipped: needs about 85 s")
    assert not any(line.startswith("llama-8b") for line in goal_lines([trl, skipped]))  # not run: no line


def test_the_decode_goal_is_a_share_of_the_bandwidth_bound_of_the_device():
    from bench.bench_sft import bandwidth_of, decode_goal_lines

    assert bandwidth_of("NVIDIA H200") == 4.8e12 and bandwidth_of("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bandwidth_of("NVIDIA GH200 480GB") == 4.0e12  # the longest name that matches
    row = lambda variant, batch, tok_s, bound, device="NVIDIA H200": dict(  # noqa: E731
        model="random-init:.gpu/llama-2-7b-shape", variant=variant, batch_size=batch, decode_tok_s=tok_s,
        bandwidth_bound_tok_s=bound, params_m=6898.3, device=device)
    rows = [row("static_cache+compile", 1, 250.0, 352.9), row("static_cache+compile", 8, 230.0, 352.9),
            row("generate", 1, 30.0, 352.9)]
    assert decode_goal_lines(rows) == [
        "decode, 6.90B parameters, batch 1, static_cache+compile: 250.0 tok/s, 71% of the bandwidth bound (353 tok/s: "
        "13.6 GB of weights per token at 4.80 TB/s, NVIDIA H200); goal 70%: met"]
    h100 = [row("static_cache+compile", 1, 126.0, 246.6, device="NVIDIA H100 80GB HBM3")]
    assert decode_goal_lines(h100)[0].endswith("51% of the bandwidth bound (247 tok/s: 13.6 GB of weights per token "
                                               "at 3.35 TB/s, NVIDIA H100 80GB HBM3); goal 70%: not met")
    unknown = [row("static_cache+compile", 1, 100.0, float("nan"), device="NVIDIA L40S")]
    assert decode_goal_lines(unknown)[0].endswith("no memory bandwidth known for NVIDIA L40S, so no bound to compare "
                                                  "with")
    assert decode_goal_lines([row("generate", 1, 30.0, 352.9)]) == []


def test_each_invocation_is_checked_over_its_own_rows_then_the_decode_goal(tmp_path):
    from bench.bench_sft import write_gpu_goals

    def write(name, device, rows):
        header = "variant,recipe,arch,status,real_tok_s,peak_gib,first_step_s,mfu,settings\n"
        (tmp_path / name).write_text(f"# device: {device}\n" + header + "".join(
            f'{r["variant"]},{r["recipe"]},{r["arch"]},ok,{r["real_tok_s"]},{r["peak_gib"]},10,{r["mfu"]},'
            f'"{r["settings"]}"\n' for r in rows))

    write("bench_gpu.csv", "NVIDIA H200, CUDA 13.0", [csv_row("ours_1b", "ours", "llama-1b", 80_000, 30),
                                                      csv_row("trl_1b", "trl", "llama-1b", 40_000, 12)])
    write("bench_gpu_run2.csv", "NVIDIA H100 80GB HBM3, CUDA 13.0",
          [csv_row("ours_1b", "ours", "llama-1b", 60_000, 30)])
    (tmp_path / "runtime_gpu.csv").write_text(
        "# device: NVIDIA H200\nvariant,batch_size,decode_tok_s,bandwidth_bound_tok_s,params_m,device\n"
        "static_cache+compile,1,260.0,352.9,6898.3,NVIDIA H200\n")
    lines = write_gpu_goals(tmp_path).read_text().splitlines()
    assert lines[0] == "- From `bench_gpu.csv` (NVIDIA H200, CUDA 13.0):"
    assert lines[1].startswith("  - llama-1b: ours 80,000 real tok/s") and "2.00x TRL's best here (trl_1b" in lines[1]
    run2 = lines.index("- From `bench_gpu_run2.csv` (NVIDIA H100 80GB HBM3, CUDA 13.0):")
    assert "no TRL row completed in this invocation" in lines[run2 + 1]  # never the other file's TRL row
    assert lines[-1].startswith("- decode, 6.90B parameters, batch 1") and lines[-1].endswith("goal 70%: met")


def test_report_renders_every_gpu_benchmark_file_and_the_goals(tmp_path):
    import dataclasses

    from sft import report

    header = ("# device: NVIDIA H100 80GB HBM3, CUDA 13.0\n"
              "variant,recipe,arch,status,real_tok_s,peak_gib,first_step_s,settings\n")
    (tmp_path / "bench_gpu.csv").write_text(header + 'ours_1b,ours,llama-1b,ok,80000,30,12,"fp32 trainable weights"\n')
    (tmp_path / "bench_gpu_run2.csv").write_text(header + 'ours_7b,ours,llama-7b,ok,9000,50,9,"bf16_update=kahan"\n')
    from bench.bench_sft import write_gpu_goals

    write_gpu_goals(tmp_path)  # what the benchmark writes after each of its rows
    gpu = next(s for s in report.result_sources() if s.block == "bench-gpu")  # its files, here in tmp_path itself
    here = dataclasses.replace(gpu, pattern=gpu.pattern.rpartition("/")[2], goals=gpu.goals.rpartition("/")[2])
    body = report.render(here, report.Results(tmp_path, include_local=True))
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


def test_the_gpu_proof_dry_run_prints_the_plan_in_order_with_estimates_against_the_budget():
    from bench import gpu_run

    done = subprocess.run([sys.executable, "-m", "bench.gpu_run", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"GPU proof: {len(gpu_run.PLAN)} rows in this order, budget 480 s")
    rows = [line.split()[1] for line in lines if line[:3].strip().isdigit() and int(line[:3]) >= 1]
    assert rows == [row.name for row in gpu_run.PLAN]
    assert rows[:9] == ["ours_1b_pure_bf16_compile", "trl_1b_flex_static_pure_bf16", "trl_1b_sdpa_pure_bf16",
                        "study_1b", "ours_7b_int8_states_compile", "ours_mpt7b_packed_int8_states_compile",
                        "inference_7b_batch1", "fsdp2_one_process", "ours_8b_long16k_int8_states_gc_compile"]
    first = next(line for line in lines if line.split()[1:2] == ["ours_1b_pure_bf16_compile"])
    assert first.split()[3:5] == ["55", "75"]  # its estimate, and when it ends after the setup's 20 s
    sdpa = next(line for line in lines if line.split()[1:2] == ["trl_1b_sdpa_pure_bf16"])
    assert "(only if trl_1b_flex_static_pure_bf16 fails" in sdpa and sdpa.split()[4] == "-"  # not counted
    fsdp = next(line for line in lines if line.split()[1:2] == ["fsdp2_one_process"])
    assert "past the budget" not in fsdp and "past the budget" in lines[lines.index(fsdp) + 1]
    assert lines[-2].startswith("first 8 rows (the seven items that matter most): ")
    assert "of the 480 s budget: fits" in lines[-2]
    tight = gpu_run.dry_run(gpu_run.PLAN, 300).splitlines()
    assert "does not fit" in tight[-2]
    assert "past the budget" in next(line for line in tight if " inference_7b_batch1 " in line)


class StandIn:
    """Runs every row in `took[row]` seconds of a fake clock (finishing early when its timeout is shorter)."""

    def __init__(self, took: dict, fallback_needed: bool = False):
        self.took, self.now, self.ran, self.skips, self.written = took, 0.0, [], [], []
        self.fallback_needed = fallback_needed

    def clock(self) -> float:
        return self.now

    def not_needed(self, row):
        return None if row.fallback_for is None or self.fallback_needed else f"{row.fallback_for} ran"

    def skipped(self, row, status):
        self.skips.append((row.name, status))

    def run(self, row, timeout_s):
        self.ran.append((row.name, round(timeout_s)))
        took = self.took.get(row.name, row.estimate_s)
        self.now += min(took, timeout_s)
        return ("ok", "") if took <= timeout_s else (f"timeout: stopped after {timeout_s:.0f} s", "")

    def write(self, ledger):
        self.written.append(len(ledger))


def test_the_gpu_proof_runs_rows_while_they_fit_and_records_the_others_as_skipped():
    from bench.gpu_run import LIMIT_FACTOR, MARGIN_S, REPORT_S, Row, run_plan

    plan = [Row("a", "bench", 100, ""), Row("a_fallback", "bench", 50, "", fallback_for="a"),
            Row("b", "inference", 100, ""), Row("c", "pytest", 200, ""), Row("d", "pytest", 40, ""),
            Row("e", "bench", 120, "")]
    proof = StandIn(took={"a": 90, "b": 400})  # b hangs: stopped at its limit
    ledger = run_plan(plan, 400, proof, clock=proof.clock, start=0.0)
    left_for_b = 400 - REPORT_S - 90
    assert proof.ran == [("a", LIMIT_FACTOR * 100), ("b", LIMIT_FACTOR * 100), ("d", 40 * LIMIT_FACTOR)]
    assert [e["status"] for e in ledger] == [
        "ok", "skipped: a ran", f"timeout: stopped after {LIMIT_FACTOR * 100:.0f} s",
        f"skipped: needs about 200 s, {left_for_b - 150:.0f} s left of the 400 s budget", "ok",
        f"skipped: needs about 120 s, {left_for_b - 150 - 40:.0f} s left of the 400 s budget"]
    assert [e["seconds"] for e in ledger] == [90, "", 150, "", 40, ""]
    assert proof.written == [1, 2, 3, 4, 5, 6]  # the ledger is written after every row
    assert [name for name, _ in proof.skips] == ["a_fallback", "c", "e"]
    # a row is cut to what is left of the budget, never past it
    cut = StandIn(took={})
    run_plan([Row("x", "bench", 50, ""), Row("y", "bench", 100, "")], 175, cut, clock=cut.clock, start=0.0)
    assert cut.ran == [("x", 75), ("y", round(175 - REPORT_S - 50 - MARGIN_S))]


def test_the_gpu_proof_refuses_to_run_without_a_gpu(capsys):
    from bench import gpu_run

    if torch.cuda.is_available():
        pytest.skip("runs the proof on a GPU")
    assert gpu_run.main(["--out", "/nonexistent"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_gpu_proof_writes_every_row_where_its_results_go_as_soon_as_it_ends(tmp_path):
    from bench import bench_sft
    from bench.gpu_run import Proof, Row, run_plan

    proof = Proof(tmp_path, torch.device("cpu"), None, variants=bench_sft.CPU_PLAN)  # the CPU plan's variants
    plan = [Row("ours_tiny", "bench", 60, "ours tiny"), Row("perf_tests", "pytest", 60, "", ("tests/test_perf.py",)),
            Row("ours_tiny_int8_states", "bench", 10_000, "ours tiny")]
    ledger = run_plan(plan, 600, proof)
    assert [e["status"] for e in ledger[:2]] == ["ok", "ok"], ledger
    assert "real tok/s" in ledger[0]["result"] and ledger[1]["result"].endswith(tuple("0123456789s"))
    assert "passed" in ledger[1]["result"]
    assert ledger[2]["status"].startswith("skipped: needs about 10000 s, ")
    assert [r["row"] for r in read_csv(tmp_path / "gpu_run.csv")] == ["ours_tiny", "perf_tests",
                                                                      "ours_tiny_int8_states"]
    assert (tmp_path / "gpu_run.csv").read_text().startswith("# device:")
    bench = read_csv(tmp_path / "bench_gpu.csv")  # the benchmark's rows, skipped ones too
    assert [(r["variant"], r["status"]) for r in bench] == [("ours_tiny", "ok"),
                                                           ("ours_tiny_int8_states", ledger[2]["status"])]
    assert (tmp_path / "bench_gpu_goals.md").is_file()


def test_the_gpu_proof_merges_its_inference_rows_into_one_runtime_csv(tmp_path):
    import pandas as pd

    from bench.gpu_run import Proof
    from inf_tests import runtime

    def row(batch, tok_s):
        return {**dict.fromkeys(runtime.COLUMNS), "model": "random-init:.gpu/llama-2-7b-shape", "batch_size": batch,
                "variant": "static_cache+compile", "prompt_tokens": 128, "new_tokens": 64, "decode_tok_s": tok_s,
                "decode_tok_s_batch": tok_s * batch, "ttft_ms_p50": 30.0, "bandwidth_bound_tok_s": 352.9,
                "params_m": 6898.3, "device": "NVIDIA H200", "dtype": "bfloat16"}

    proof = Proof(tmp_path, torch.device("cpu"), None, variants=[])
    runs = proof.inference_runs  # where the inference rows write their own CSVs
    for name, rows in (("runtime_gpu_batch1.csv", [row(1, 262.0)]),
                       ("runtime_gpu_batch8.partial.csv", [row(8, 240.0)])):
        with open(runs / name, "w") as f:  # as the runtime writes them: complete, and as far as a stopped run got
            f.write("# device: NVIDIA H200\n")
            pd.DataFrame(rows, columns=runtime.COLUMNS).to_csv(f, index=False)
    merged = proof.merge_inference()
    assert list(merged["batch_size"]) == [1, 8]
    assert (tmp_path / "runtime_gpu.csv").read_text().startswith("# device: NVIDIA H200\nmodel,variant,")
    assert (tmp_path / "runtime_gpu.png").stat().st_size > 0
    goals = (tmp_path / "bench_gpu_goals.md").read_text()
    assert "batch 1, static_cache+compile: 262.0 tok/s, 74% of the bandwidth bound" in goals
