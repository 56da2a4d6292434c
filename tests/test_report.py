"""README blocks are generated from run folders and CSVs, and only between their markers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
import subprocess

import pytest

from sft.errors import SFTError
from sft.report import blocks, replace_block
from sft.run import run


def test_demo_block_is_rendered_from_the_newest_completed_demo_run(tiny_config, tmp_path):
    folder = run(tiny_config(experiment="demo_smollm2", runs_root=str(tmp_path / "runs")))
    (tmp_path / "inf_tests" / "results").mkdir(parents=True)
    (tmp_path / "inf_tests" / "results" / "runtime_cpu.csv").write_text("model,decode_tok_s\nm,12.5\n")
    assert blocks(tmp_path) == {}  # not a git checkout: nothing is committed
    rendered = blocks(tmp_path, include_local=True)
    summary = folder.path.joinpath("summary.json").read_text()
    assert folder.path.name in rendered["demo-results"]
    first = __import__("json").loads(summary)["eval_loss_first"]
    assert f"{first:,.3f}" in rendered["demo-results"]
    assert "| m | 12.500 |" in rendered["inference-cpu"]  # only the columns the CSV has
    assert (tmp_path / "assets" / "demo_loss_curves.png").stat().st_size > 1000


def test_full_and_lora_demo_runs_are_compared_side_by_side_with_their_figure(tiny_config, tmp_path):
    runs = str(tmp_path / "runs")
    full = run(tiny_config(experiment="demo_smollm2", runs_root=runs)).path
    assert "demo-lora-results" not in blocks(tmp_path, include_local=True)  # no adapter run yet: no block
    adapter = run(tiny_config(experiment="demo_smollm2_lora", runs_root=runs, finetune="lora", lr=1e-2)).path
    block = blocks(tmp_path, include_local=True)["demo-lora-results"]
    summaries = [json.loads((p / "summary.json").read_text()) for p in (full, adapter)]
    trainable = summaries[1]["trainable_parameters"]
    assert f"| trainable parameters | {summaries[0]['num_parameters']:,} of {summaries[0]['num_parameters']:,} | " \
           f"{trainable:,} of {summaries[1]['num_parameters']:,} |" in block
    assert "| lr | 0.001 | 0.01 |" in block and "| finetune | full | lora (rank 16, alpha 32) |" in block
    assert f"-> {summaries[1]['eval_loss_final']:,.3f}" in block
    assert (tmp_path / "assets" / "demo_lora_comparison.png").stat().st_size > 1000


def git(root, *args):
    subprocess.run(["git", "-C", str(root), "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
                   check=True, capture_output=True)


BENCH_HEADER = "variant,recipe,arch,status,real_tok_s,peak_gib,first_step_s,settings\n"


def test_only_committed_results_reach_the_readme_unless_local_ones_are_asked_for(tiny_config, tmp_path):
    root = tmp_path / "repo"
    committed = run(tiny_config(experiment="demo_smollm2", runs_root=str(root / "runs"))).path
    results = root / "inf_tests" / "results"
    results.mkdir(parents=True)
    (results / "runtime_cpu.csv").write_text("model,decode_tok_s\ncommitted,12.5\n")
    bench = root / "bench" / "results"
    bench.mkdir(parents=True)
    (bench / "bench_gpu.csv").write_text(BENCH_HEADER + "ours_1b,ours,llama-1b,ok,80000,30,12,x\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "results")

    # what one machine has on top: a newer completed demo run, an edited CSV and new ones
    local = committed.parent / committed.name.replace(committed.name[:4], "2999", 1)
    shutil.copytree(committed, local)
    (local / "loss_curves.png").write_bytes(b"local" * 1000)
    (results / "runtime_cpu.csv").write_text("model,decode_tok_s\nlocal,99\n")
    (results / "runtime_gpu.csv").write_text("model,decode_tok_s\nlocal_gpu,99\n")
    (bench / "bench_gpu_run2.csv").write_text(BENCH_HEADER + "ours_7b,ours,llama-7b,ok,9000,50,9,x\n")

    rendered = blocks(root)
    assert f"Run `{committed.name}`" in rendered["demo-results"] and local.name not in rendered["demo-results"]
    assert (root / "assets" / "demo_loss_curves.png").read_bytes() == (committed / "loss_curves.png").read_bytes()
    assert "| committed | 12.500 |" in rendered["inference-cpu"] and "local" not in rendered["inference-cpu"]
    assert "inference-gpu" not in rendered
    assert "bench_gpu.csv" in rendered["bench-gpu"] and "bench_gpu_run2.csv" not in rendered["bench-gpu"]
    assert (results / "runtime_cpu.csv").read_text() == "model,decode_tok_s\nlocal,99\n"  # left as it was

    rendered = blocks(root, include_local=True)
    assert f"Run `{local.name}`" in rendered["demo-results"]
    assert (root / "assets" / "demo_loss_curves.png").read_bytes() == b"local" * 1000
    assert "| local | 99 |" in rendered["inference-cpu"] and "| local_gpu | 99 |" in rendered["inference-gpu"]
    assert "bench_gpu.csv" in rendered["bench-gpu"] and "bench_gpu_run2.csv" in rendered["bench-gpu"]


def test_a_run_folder_counts_as_committed_only_once_its_summary_is(tiny_config, tmp_path):
    root = tmp_path / "repo"
    folder = run(tiny_config(experiment="demo_smollm2", runs_root=str(root / "runs"))).path
    git(root, "init", "-q")
    git(root, "add", ".", ":!runs/*/summary.json")
    git(root, "commit", "-q", "-m", "a run without its summary")
    assert "demo-results" not in blocks(root)
    git(root, "add", ".")
    assert "demo-results" not in blocks(root)  # staged is not committed
    git(root, "commit", "-q", "-m", "its summary")
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"
    assert folder.name in blocks(root)["demo-results"]


def test_replace_block_keeps_everything_outside_the_markers():
    text = "intro\n<!-- BEGIN t -->\nold\n<!-- END t -->\noutro\n"
    assert replace_block(text, "t", "new") == "intro\n<!-- BEGIN t -->\nnew\n<!-- END t -->\noutro\n"
    with pytest.raises(SFTError, match="no block named 'missing'"):
        replace_block(text, "missing", "x")


def test_the_report_needs_neither_torch_nor_the_benchmarks():
    """The README report reads result files: importing it (and so running it) loads no torch, no transformers
    and nothing from bench/, whose goal lines it reads from the files the benchmarks write."""
    import sys

    code = ("import sys, sft.report; loaded = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'bench')]; print(loaded); sys.exit(bool(loaded))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_count_with_blanks_is_shown_as_integers_and_measurements_keep_their_decimals():
    from sft.tables import csv_table

    table = csv_table("variant,processes,seconds,tok_s\na,2,6.45,417004\nb,,,\n")
    assert "| a | 2 | 6.450 | 417,004 |" in table  # not "2.000" processes
    assert "| b | - | - | - |" in table


def test_the_readme_summaries_show_the_best_rows_with_device_and_date():
    from bench.report_sources import data_summary, speed_summary
    from sft.report import Results

    gpu = ("# device: NVIDIA H200, CUDA 13.0\n# date: 2026-12-01T10:00:00, git abc, python 3.12\n"
           "variant,recipe,arch,status,real_tok_s,mfu,peak_gib\n"
           "ours_a,ours,llama-1b,ok,60000,0.45,30.0\nours_b,ours,llama-1b,ok,71000,0.5,32.0\n"
           "ours_c,ours,llama-1b,timeout: no result in 9 s,,,\ntrl_x,trl,llama-1b,ok,47000,0.3,11.0\n"
           "study_1b,study,llama-1b,ok,5900,0.04,11.6\n")
    data = ("# device: x86_64, 2 threads\n# guanaco set, date: 2026-11-27T14:58:20, git x\n"
            "variant,rows,status,tok_s,peak_rss_gib,set\nours,1000,ok,400000,1.5,guanaco\n"
            "trl,1000,ok,200000,3.0,guanaco\nours,1000000,ok,450000,2.3,guanaco\n")

    class Text(Results):
        def __init__(self, text):
            self.text = text

        def read(self, path):
            return self.text

    table = speed_summary([Path("bench_gpu.csv")], Text(gpu))
    assert "| llama-1b | ours_b | 71,000 | 50.0% | 32.000 | 47,000 | 5,900 | NVIDIA H200, 2026-12-01 |" in table
    row = "| guanaco | 1,000 | 400,000 | 200,000 | 2.00x | 1.500 | x86_64, 2 threads, 2026-11-27 |"
    assert row in data_summary([Path("data_cpu.csv")], Text(data))
