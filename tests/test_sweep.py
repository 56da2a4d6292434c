"""Sweeps (`python -m sft.sweep`): a grid of settings trained one run per point in child processes, every
point checked before the first trains, and the table of the points' results."""
from __future__ import annotations

import csv
import json
import socket
import sys
from pathlib import Path

import pytest

import sft.sweep
from sft.sweep import child_command, grid, main, parse_value, point_experiment, split_values
from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = '''from sft.train import main

EXPERIMENT = "tiny"
MODEL = {model!r}
DATASET = {dataset!r}
RUNS_ROOT = {runs!r}
EVAL_ROWS = 4
MAX_LENGTH = 64
MICRO_BATCH_SIZE = 2
MAX_STEPS = 2
LR = 1e-4
TASK_METRIC_ROWS = 2
NUM_SAMPLES = 1
MAX_NEW_TOKENS = 2
SAVE_MODEL = False
PRECISION = "fp32"
REPORT_TO = ()

if __name__ == "__main__":
    main(globals())
'''


def write_script(tmp_path: Path, model: str) -> Path:
    """A tiny experiment script: the tiny model, 24 one-line chats, two optimizer steps, runs under tmp_path/runs."""
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": str(i + 1)}]} for i in range(24)]
    dataset = write_jsonl(tmp_path / "data.jsonl", rows)
    script = tmp_path / "tiny_experiment.py"
    script.write_text(SCRIPT.format(model=model, dataset=dataset, runs=str(tmp_path / "runs")))
    return script


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_two_point_grid_trains_one_run_per_point_and_tabulates_them(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SFT_CACHE", str(tmp_path / "cache"))  # the children's tokenization cache
    script = write_script(tmp_path, str(tiny_model_dir))
    assert main([str(script), "LR=1e-3,1e-2", "SEED=1"]) == 0
    runs = tmp_path / "runs"
    folders = sorted(p for p in runs.iterdir() if (p / "config.json").is_file())
    assert [p.name.split("_", 2)[2] for p in folders] == ["tiny_lr1e-3_seed1", "tiny_lr1e-2_seed1"]
    for folder, lr in zip(folders, (1e-3, 1e-2)):
        assert json.loads((folder / "summary.json").read_text())["status"] == "completed"
        config = json.loads((folder / "config.json").read_text())["config"]
        assert (config["lr"], config["seed"], config["max_steps"]) == (lr, 1, 2)
    (out,) = [p for p in runs.iterdir() if p.name.endswith("_sweep_tiny")]
    rows = read_csv(out / "sweep.csv")
    assert [float(r["lr"]) for r in rows] == [1e-3, 1e-2] and [r["seed"] for r in rows] == ["1", "1"]
    assert [r["run"] for r in rows] == [p.name for p in folders]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    for row, folder in zip(rows, folders):
        summary = json.loads((folder / "summary.json").read_text())
        assert float(row["eval_loss_final"]) == pytest.approx(summary["eval_loss_final"])
        assert row["task_metric_name"] == "exact_match"
        assert int(row["trainable_parameters"]) == summary["trainable_parameters"] > 0
    assert (out / "sweep.png").stat().st_size > 5000
    markdown = (out / "sweep.md").read_text()
    assert f"| 1e-3 | 1 | {folders[0].name} | completed |" in markdown
    assert markdown in capsys.readouterr().out


def run_sweep_expecting_error(args: list[str], monkeypatch, capsys) -> str:
    """The one error line of a sweep refused before any child starts."""
    monkeypatch.setattr(sft.sweep, "wait_for", lambda command: pytest.fail("a point started training"))
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


def test_an_unknown_setting_is_named_before_anything_trains(tmp_path, monkeypatch, capsys):
    script = write_script(tmp_path, str(tmp_path / "model"))
    line = run_sweep_expecting_error([str(script), "LRR=1,2"], monkeypatch, capsys)
    assert line.startswith("error: LRR: not a setting (did you mean LR") and "upper case" in line
    assert not (tmp_path / "runs").exists()


def test_a_bad_value_in_a_later_point_stops_the_sweep_before_the_first_trains(tmp_path, monkeypatch, capsys):
    script = write_script(tmp_path, str(tmp_path / "model"))
    line = run_sweep_expecting_error([str(script), "SEED=1,2", "LR=1e-3,-1"], monkeypatch, capsys)
    assert line == "error: LR: must be > 0, got -1 (grid point 2 of 4: SEED=1 LR=-1)"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["LR"], "error: 'LR': expected a setting and its values, NAME=v1,v2,... (e.g. LR=1e-4,3e-4)"),
    (["LR="], "error: 'LR=': expected a setting and its values"),
    (["LR=1e-3,,1e-2"], "error: 'LR=1e-3,,1e-2': expected a setting and its values"),
    (["=1e-3"], "error: '=1e-3': expected a setting and its values"),
    (["LR=1e-3", "SEED=1", "LR=1e-2"], "error: LR: given twice; list all its values in one LR=v1,v2,..."),
    (["lr=1e-3"], "error: LR: settings are UPPER_CASE constants; write LR = ..."),
    (["_LR=1e-3"], "error: _LR: not a setting;"),
])
def test_a_malformed_assignment_is_one_error_line(tmp_path, monkeypatch, capsys, args, expected):
    script = write_script(tmp_path, str(tmp_path / "model"))
    assert run_sweep_expecting_error([str(script), *args], monkeypatch, capsys).startswith(expected)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", ["missing_experiment.py", "sft.experiments.no_such_demo", "no_such_package.demo"])
def test_a_missing_script_is_one_error_line(tmp_path, monkeypatch, capsys, script):
    monkeypatch.chdir(tmp_path)
    line = run_sweep_expecting_error([script, "LR=1e-3"], monkeypatch, capsys)
    assert line.startswith(f"error: {script}: no such experiment script")


def test_values_parse_as_python_literals_or_stay_text():
    values = [parse_value(text) for text in ("1e-4", "8", "True", "None", "cosine", "'text'", "(0.9, 0.99)", "-1")]
    assert values == [1e-4, 8, True, None, "cosine", "text", (0.9, 0.99), -1]
    assert [type(v) for v in values[:3]] == [float, int, bool]
    assert split_values("(0.9, 0.95),(0.9,0.99)") == ["(0.9, 0.95)", "(0.9,0.99)"]
    assert split_values('"a, b",c') == ['"a, b"', "c"]


def test_the_grid_varies_the_first_setting_slowest_and_names_each_point():
    points = grid({"LR": ["1e-4", "1e-3"], "LORA_R": ["8", "64"]})
    assert [(p["LR"], p["LORA_R"]) for p in points] == [("1e-4", "8"), ("1e-4", "64"), ("1e-3", "8"), ("1e-3", "64")]
    assert point_experiment("demo_smollm2_lora", points[1]) == "demo_smollm2_lora_lr1e-4_lora_r64"
    assert point_experiment("demo", {"SYSTEM_PROMPT": "'Be brief / exact.'"}) == "demo_system_promptBe-brief-exact."


def test_each_point_runs_under_the_launcher(tmp_path):
    record = tmp_path / "r.txt"
    assert child_command([], "s.py", {"LR": "1e-3"}, record) == [
        sys.executable, "-m", "sft.sweep", "--run-one", "s.py", "LR=1e-3", "--record", str(record)]
    assert child_command(["accelerate", "launch", "--num_processes", "2"], "s.py", {"LR": "1e-3", "LORA_R": "8"},
                         record)[:9] == ["accelerate", "launch", "--num_processes", "2", "-m", "sft.sweep",
                                         "--run-one", "s.py", "LR=1e-3"]


def test_a_failed_point_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """The first point fails after making its run folder (found although it recorded none), the second before."""
    script = write_script(tmp_path, str(tmp_path / "model"))
    commands = []

    def failing_child(command):
        commands.append(command)
        if len(commands) == 1:
            folder = tmp_path / "runs" / "2026-01-01_00-00-00_tiny_lr1e-3"
            folder.mkdir(parents=True)
            (folder / "config.json").write_text(json.dumps({"config": {"lr": 1e-3}, "derived": {"num_parameters": 7}}))
            (folder / "summary.json").write_text(json.dumps({"status": "failed", "eval_loss_first": 2.5}))
        return 3

    monkeypatch.setattr(sft.sweep, "wait_for", failing_child)
    out = tmp_path / "out"
    assert main([str(script), "LR=1e-3,1e-2", "--launcher", "accelerate launch --num_processes 2",
                 "--out", str(out)]) == 1
    assert [c[:4] for c in commands] == [["accelerate", "launch", "--num_processes", "2"]] * 2
    assert [c[8] for c in commands] == ["LR=1e-3", "LR=1e-2"]
    rows = read_csv(out / "sweep.csv")
    assert [(r["lr"], r["status"], r["run"]) for r in rows] == [
        ("1e-3", "failed (exit 3)", "2026-01-01_00-00-00_tiny_lr1e-3"), ("1e-2", "failed (exit 3)", "")]
    assert (rows[0]["eval_loss_first"], rows[0]["trainable_parameters"]) == ("2.5", "7")
    assert not (out / "sweep.png").exists() and "0 completed" in (out / "sweep.md").read_text()


def test_a_point_refused_by_its_child_fails_with_the_childs_exit_code(tiny_model_dir, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("SFT_CACHE", str(tmp_path / "cache"))
    script = write_script(tmp_path, str(tiny_model_dir))
    missing = tmp_path / "missing.jsonl"
    assert main([str(script), f"DATASET={missing}", "--out", str(tmp_path / "out")]) == 1
    assert f"error: dataset path {missing} does not exist" in capfd.readouterr().err
    assert [r["status"] for r in read_csv(tmp_path / "out" / "sweep.csv")] == ["failed (exit 2)"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_points_train_on_two_processes_under_a_launcher(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """Under accelerate each point is one run of two processes; the main process records its folder."""
    from sft.config import TrainConfig, settings_from
    from sft.data import prepare_data

    monkeypatch.setenv("SFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    script = write_script(tmp_path, str(tiny_model_dir))
    # tokenized here first: two processes that both miss the cache race to replace its store (sft.data)
    prepare_data(TrainConfig(**settings_from(sft.sweep.load_script(str(script)))), tokenizer)
    launcher = (f"{sys.executable} -m accelerate.commands.launch --config_file "
                f"{ROOT / 'sft' / 'accelerate' / 'cpu_2proc.yaml'} --main_process_port {free_port()}")
    assert main([str(script), "LR=1e-3", "--launcher", launcher, "--out", str(tmp_path / "out")]) == 0
    (folder,) = [p for p in (tmp_path / "runs").iterdir()]  # the other process made none
    assert json.loads((folder / "config.json").read_text())["derived"]["world_size"] == 2
    assert json.loads((folder / "data_stats.json").read_text())["tokenization_cache"]["hit"] is True
    assert [r["run"] for r in read_csv(tmp_path / "out" / "sweep.csv")] == [folder.name]


def test_an_interrupted_point_ends_the_sweep(tmp_path, monkeypatch):
    script = write_script(tmp_path, str(tmp_path / "model"))
    monkeypatch.setattr(sft.sweep, "wait_for", lambda command: 130)
    out = tmp_path / "out"
    assert main([str(script), "LR=1e-3,1e-2,1e-1", "--out", str(out)]) == 130
    assert [r["status"] for r in read_csv(out / "sweep.csv")] == ["interrupted", "not run", "not run"]


def test_the_docstring_examples_hold():
    import doctest

    result = doctest.testmod(sft.sweep)
    assert result.attempted == 5 and result.failed == 0
