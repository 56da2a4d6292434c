"""README blocks are generated from run folders and CSVs, and only between their markers."""
from __future__ import annotations

import pytest

from sft.errors import SFTError
from sft.report import blocks, replace_block
from sft.train import run


def test_demo_block_is_rendered_from_the_newest_completed_demo_run(tiny_config, tmp_path):
    folder = run(tiny_config(experiment="demo_smollm2", runs_root=str(tmp_path / "runs")))
    (tmp_path / "inf_tests" / "results").mkdir(parents=True)
    (tmp_path / "inf_tests" / "results" / "runtime_cpu.csv").write_text("model,decode_tok_s\nm,12.5\n")
    rendered = blocks(tmp_path)
    summary = folder.path.joinpath("summary.json").read_text()
    assert folder.path.name in rendered["demo-results"]
    first = __import__("json").loads(summary)["eval_loss_first"]
    assert f"{first:,.3f}" in rendered["demo-results"]
    assert "| m | 12.500 |" in rendered["inference-cpu"]  # only the columns the CSV has
    assert (tmp_path / "assets" / "demo_loss_curves.png").stat().st_size > 1000


def test_replace_block_keeps_everything_outside_the_markers():
    text = "intro\n<!-- BEGIN t -->\nold\n<!-- END t -->\noutro\n"
    assert replace_block(text, "t", "new") == "intro\n<!-- BEGIN t -->\nnew\n<!-- END t -->\noutro\n"
    with pytest.raises(SFTError, match="no block named 'missing'"):
        replace_block(text, "missing", "x")
