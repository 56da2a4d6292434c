"""Evaluating a finished model on another dataset: the held-out loss and exact match the trainer would
compute on it, the base model for comparison, and an lm-evaluation-harness task defined on a local file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sft.analysis import read_samples
from sft.evaluate import evaluate, main
from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [("What is 2 + 3?", "5"), ("What is 4 + 4?", "8"), ("Capital of France?", "Paris"),
             ("Opposite of hot?", "cold"), ("What is 7 - 2?", "5"), ("Colour of the sky?", "blue")]



@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A run whose held-out set is a separate file: evaluating that file must give the run's own numbers."""
    from sft.config import TrainConfig
    from sft.run import run

    tmp = tmp_path_factory.mktemp("evaluate")
    held_out = write_jsonl(tmp / "held_out.jsonl", [{"messages": [{"role": "user", "content": q},
                                                                  {"role": "assistant", "content": a}]}
                                                    for q, a in QUESTIONS])
    cfg = TrainConfig(experiment="evaluate", model=str(tiny_model_dir), max_rows=64, eval_dataset=held_out,
                      max_length=128, micro_batch_size=2, grad_accum_steps=2, lr=1e-3, max_steps=3, task_metric_rows=4,
                      num_samples=2, max_new_tokens=4, runs_root=str(tmp / "runs"), save_model=True, precision="fp32",
                      report_to=())
    return run(cfg).path, held_out


def test_scoring_the_runs_own_held_out_file_gives_the_runs_numbers(finished):
    path, held_out = finished
    out = evaluate(path, dataset=held_out)
    assert out == path / "eval" / "held_out.jsonl_model.json"
    result = json.loads(out.read_text())
    summary = json.loads((path / "summary.json").read_text())
    assert result["eval_loss"] == pytest.approx(summary["eval_loss_final"], rel=1e-6)
    assert result["exact_match"] == summary["task_metric_after"] and result["exact_match_rows"] == 4
    assert result["examples"]["examples"] == len(QUESTIONS) and result["dataset"]["format"] == "messages"
    samples = read_samples(path)
    after = [s["response"] for s in samples if s["stage"] == "after"]
    assert [s["response"] for s in result["samples"]] == after  # the same prompts, decoded the same way


def test_the_base_model_is_scored_the_same_way_for_comparison(finished, tiny_model_dir, capsys):
    path, held_out = finished
    assert main([str(path), "--dataset", held_out, "--model", str(tiny_model_dir), "--name", "base"]) == 0
    base = json.loads((path / "eval" / "base.json").read_text())
    tuned = json.loads(evaluate(path, dataset=held_out, name="tuned").read_text())
    assert base["base_model"] and base["model"] == str(tiny_model_dir)
    summary = json.loads((path / "summary.json").read_text())
    assert base["eval_loss"] == pytest.approx(summary["eval_loss_first"], rel=1e-6)  # the step-0 eval
    assert tuned["eval_loss"] < base["eval_loss"]
    assert "held-out loss" in capsys.readouterr().out


def test_an_lm_eval_task_on_a_local_file(finished, tmp_path):
    pytest.importorskip("lm_eval")
    path, _ = finished
    data = write_jsonl(tmp_path / "mc.jsonl", [{"question": q, "choices": [a, "none of these"], "answer": 0}
                                                for q, a in QUESTIONS])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_local.yaml").write_text(
        "task: tiny_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + data + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    # through the command, in a process of its own: lm-eval imports scipy, scikit-learn and more, which the
    # rest of the test process (compiled kernels, OpenMP) is better without
    done = subprocess.run([sys.executable, "-m", "sft.evaluate", str(path), "--lm-eval-tasks", "tiny_local",
                           "--lm-eval-include", str(tmp_path / "tasks"), "--name", "lm_eval"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "lm-eval tiny_local:" in done.stdout and "acc,none" in done.stdout
    results = json.loads((path / "eval" / "lm_eval.json").read_text())["lm_eval"]["results"]["tiny_local"]
    assert 0.0 <= results["acc,none"] <= 1.0


def test_nothing_to_evaluate_and_a_missing_model_are_clear_errors(finished, tmp_path, capsys):
    path, _ = finished
    assert main([str(path)]) == 2 and "nothing to do" in capsys.readouterr().err
    assert main([str(tmp_path), "--dataset", "x.jsonl"]) == 2 and "not a run folder" in capsys.readouterr().err


def test_the_run_keeps_its_held_out_conversations_and_heldout_scores_exactly_those(finished, capsys):
    path, _ = finished
    kept = [json.loads(line) for line in (path / "heldout.jsonl").read_text().splitlines()]
    assert kept == [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                    for q, a in QUESTIONS]
    assert main([str(path), "--heldout", "--name", "own"]) == 0
    result = json.loads((path / "eval" / "own.json").read_text())
    summary = json.loads((path / "summary.json").read_text())
    assert result["eval_loss"] == pytest.approx(summary["eval_loss_final"], rel=1e-6)
    assert result["exact_match"] == summary["task_metric_after"] and result["examples"]["examples"] == len(QUESTIONS)
    assert main([str(path), "--heldout", "--dataset", "x.jsonl"]) == 2 and "give one" in capsys.readouterr().err


def test_a_hub_model_is_scored_at_the_revision_given(finished, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path, held_out = finished
    assert main([str(path), "--dataset", held_out, "--model", "owner/base"]) == 2
    assert "needs a pinned revision" in capsys.readouterr().err
    assert main([str(path), "--dataset", held_out, "--model", "owner/base", "--model-revision", "abc123"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model: cannot load 'owner/base' at revision 'abc123'") and err.count("\n") == 1


def test_a_held_out_set_too_large_to_copy_is_kept_as_its_row_numbers(tmp_path):
    from sft.run_folder import HELDOUT, HELDOUT_MAX_BYTES, HELDOUT_ROWS, RunFolder

    folder = RunFolder(tmp_path)
    big = [[{"role": "user", "content": "x" * (HELDOUT_MAX_BYTES // 2)}, {"role": "assistant", "content": "y"}]] * 3
    assert folder.write_heldout(big, rows=[("data.jsonl", 7), ("data.jsonl", 2), ("data.jsonl", 41)]) is None
    assert not (tmp_path / HELDOUT).exists()
    assert json.loads((tmp_path / HELDOUT_ROWS).read_text()) == {"rows": [
        {"dataset": "data.jsonl", "row": 7}, {"dataset": "data.jsonl", "row": 2}, {"dataset": "data.jsonl", "row": 41}]}
    small = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]
    assert folder.write_heldout(small, rows=[("data.jsonl", 1)]) > 0 and (tmp_path / HELDOUT).is_file()
