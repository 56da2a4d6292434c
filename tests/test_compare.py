"""Comparing runs: one figure with every run's losses, and a markdown table of the settings that differ and
of the results."""
from __future__ import annotations

import pytest

from sft.compare import main, write_comparison
from sft.run import run


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    from sft.config import TrainConfig

    root = tmp_path_factory.mktemp("compare-runs")
    common = dict(model=str(tiny_model_dir), eval_rows=8, max_rows=64, max_length=128, micro_batch_size=2,
                  grad_accum_steps=2, max_steps=3, task_metric_rows=2, num_samples=1, max_new_tokens=2,
                  runs_root=str(root), save_model=False, precision="fp32", report_to=(), eval_every=2)
    return [run(TrainConfig(experiment=name, lr=lr, **common)).path for name, lr in (("slow", 1e-4), ("fast", 1e-3))]


def test_comparison_writes_the_figure_and_the_tables(two_runs, tmp_path):
    figure, text = write_comparison(two_runs, tmp_path / "cmp")
    assert figure.stat().st_size > 5000
    markdown = text.read_text()
    settings, results = markdown.split("## Settings that differ", 1)[1].split("## Results", 1)
    assert "| lr | 0.0001 | 0.001 |" in settings
    assert "| experiment | slow | fast |" in settings and "| max_steps |" not in settings  # shared settings stay out
    for path in two_runs:
        assert f"| {path.name} | completed |" in results


def test_comparison_figure_overlays_train_and_held_out_losses_by_step_and_tokens(two_runs):
    from sft.analysis import load_run
    from sft.plotting import plot_comparison

    fig = plot_comparison([load_run(p) for p in two_runs])
    by_step, by_tokens = fig.axes
    assert by_step.get_xlabel() == "optimizer step" and by_tokens.get_xlabel() == "real tokens seen"
    labels = [line.get_label() for line in by_step.lines]
    assert labels == [f"{p.name}: {kind}" for p in two_runs for kind in ("train", "held-out")]


def test_compare_command_prints_the_tables(two_runs, tmp_path, capsys):
    assert main([str(p) for p in two_runs] + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "## Settings that differ" in out and f"wrote {tmp_path / 'comparison.png'}" in out
    assert main([str(tmp_path / "missing")]) == 2
