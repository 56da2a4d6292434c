"""`python -m sft.preview`: the first rows as training sees them, supervised spans marked, in the terminal and
as an HTML page."""
from __future__ import annotations

import re

import pytest

from sft.preview import main

pytestmark = pytest.mark.usefixtures("cache_dir")


def test_a_script_previews_its_first_rows_with_the_supervised_spans_marked(tmp_path, capsys):
    page = tmp_path / "p.html"
    assert main(["sft/experiments/demo_smollm2_tools.py", "--rows", "3", "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert out.count("--- row ") == 3 and "multi_turn=per_turn" in out
    body, summary = out.rsplit("\n--- ", 1)
    marked = re.findall(r"\[\[(.*?)\]\]", body, re.DOTALL)
    assert marked and all(m.endswith("<|im_end|>") for m in marked)  # each span closes with the end-of-turn token
    assert any(m.startswith('<tool_call>{"name": "calculator"') for m in marked)
    assert not any("<|im_start|>tool" in m for m in marked)  # tool results are never supervised
    assert "turns by role {" in summary and "'tool':" in summary
    html = page.read_text()
    assert html.count("<mark>") == len(marked) + 1 and "<h2>row 1, example 1 of 1</h2>" in html


def test_a_run_folder_previews_with_its_recorded_settings(trained_runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_runs[0], run)
    assert main([str(run), "--rows", "2"]) == 0
    assert (run / "preview.html").is_file() and capsys.readouterr().out.count("--- row ") == 2


def test_a_path_that_is_neither_a_script_nor_a_run_folder_is_one_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["sft/experiments/demo_smollm2.py", "--rows", "0"]) == 2
