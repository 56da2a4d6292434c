"""The benchmarks: synthetic data in both trainers' forms, the side-by-side CPU smoke run end to end, and
the precision comparison's outputs."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

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

    done = subprocess.run([sys.executable, "-m", "bench.bench_sft", "--cpu-smoke", "--out", str(tmp_path)],
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
    ours = rows["ours_tiny"]
    assert float(ours["real_tok_s"]) <= float(ours["padded_tok_s"])
    assert "attn=sdpa" in ours["settings"]  # varlen is for GPUs; "auto" picks sdpa on the CPU
    capped = rows["ours_tiny_compile_capped"]  # the compiled trainer, stopped by its time cap
    assert capped["status"] == "ok" and capped["timed_steps"] == "1", capped
    assert "compile=True" in capped["settings"]
    markdown = (tmp_path / "bench_cpu.md").read_text()
    assert "| ours_tiny | ok |" in markdown and "packages: torch" in markdown


def test_precision_compare_writes_one_curve_per_master_weights_variant(tmp_path):
    from bench import precision_compare
    from sft.optim import MASTER_WEIGHTS

    curves = precision_compare.main(["--out", str(tmp_path), "--steps", "3"])
    assert list(curves) == list(MASTER_WEIGHTS)
    rows = list(csv.reader(line for line in open(tmp_path / "precision_cpu.csv") if not line.startswith("#")))
    assert rows[0] == ["step", *MASTER_WEIGHTS] and len(rows) == 4
    assert (tmp_path / "precision_cpu.png").stat().st_size > 0
