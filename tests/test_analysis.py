"""Reading run folders, comparing runs, figures, the sft.plotting CLI and the post-processing notebook.

The run folders are hand-made in tmp_path following sft/RUN_FOLDER.md, so these tests need no training.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import nbformat
import pytest
from nbclient import NotebookClient

matplotlib.use("Agg")

from sft import analysis, plotting  # noqa: E402
from sft.errors import DataError  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "sft" / "notebooks" / "postprocess.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

BASE_CONFIG = {
    "experiment": "demo",
    "model": {"name": "tiny-llama", "dtype": "float32"},
    "learning_rate": 2e-5,
    "lora": {"r": 8, "alpha": 16},
    "max_steps": 4,
    "eval_every": 2,
    "seed": 0,
}


def _merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_fake_run(root: Path, name: str, status: str = "completed", **overrides) -> Path:
    """A run folder as training writes it (sft/RUN_FOLDER.md). `overrides` are config settings, merged
    into nested sections. A `running` run has only its start files, an empty metrics file and no samples."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = _merge(BASE_CONFIG, overrides)
    derived = {"optimizer_steps": 4, "world_size": 1, "master_weights": "float32", "tokens_per_optimizer_step": 512}
    (run_dir / "config.json").write_text(json.dumps({"config": config, "derived": derived}))
    (run_dir / "env.json").write_text(json.dumps({
        "python": "3.11.7",
        "packages": {"torch": "2.5.0", "transformers": "4.46.0"},
        "device": {"type": "cpu", "name": "cpu", "count": 1},
        "git": {"commit": "abc1234", "dirty": False},
        "command": ["python", "experiments/demo.py"],
        "hostname": "box",
        "started_at": "2025-01-02T03:04:05+00:00",
    }))
    if status == "running":
        (run_dir / "summary.json").write_text(json.dumps({"status": "running"}))
        (run_dir / "metrics.jsonl").write_text("")
        return run_dir

    (run_dir / "data_stats.json").write_text(json.dumps({
        "rows_read": 10, "rows_kept": 9, "rows_dropped": {"empty_response": 1},
        "token_length_percentiles": {"50": 40, "90": 70, "max": 90},
        "supervised_token_fraction": 0.4, "truncated": 0, "packing_efficiency": 0.93,
    }))
    # Eval loss falls faster with a larger learning rate, so runs with different settings differ in outcome.
    drop = config["learning_rate"] * 1e4
    metrics = [{"kind": "eval", "step": 0, "epoch": 0.0, "tokens": 0, "eval_loss": 2.0,
                "task_metric": 0.1, "task_metric_name": "exact_match", "elapsed_s": 1.0}]
    for step in range(1, 5):
        metrics.append({"kind": "train", "step": step, "epoch": step / 4, "loss": 2.0 - 0.1 * step,
                        "lr": config["learning_rate"] * (1 - (step - 1) / 4), "grad_norm": 3.0 / step,
                        "tokens": 512 * step, "supervised_tokens": 200 * step, "tokens_per_s": 80.0 + step,
                        "elapsed_s": 1.0 + 6.0 * step})
        if step % 2 == 0:
            metrics.append({"kind": "eval", "step": step, "epoch": step / 4, "tokens": 512 * step,
                            "eval_loss": 2.0 - drop * step, "task_metric": 0.5 if step == 4 else None,
                            "task_metric_name": "exact_match", "elapsed_s": 2.0 + 6.0 * step})
    _write_jsonl(run_dir / "metrics.jsonl", metrics)

    decoding = {"do_sample": False, "max_new_tokens": 64}
    samples = []
    for stage in ("before", "after"):
        for index in (1, 0):  # written out of index order on purpose: pairing must not rely on order
            samples.append({"stage": stage, "index": index,
                            "messages": [{"role": "user", "content": f"question {index}"}],
                            "prompt": f"<user>question {index}</user>", "response": f"{stage} answer {index}",
                            "reference": f"reference {index}", "decoding": decoding})
    _write_jsonl(run_dir / "samples.jsonl", samples)

    (run_dir / "summary.json").write_text(json.dumps({
        "status": status, "reason": None,
        "train_runtime": 25.0, "train_samples_per_second": 1.6, "train_steps_per_second": 0.16,
        "train_loss": 1.75, "epoch": 1.0, "global_step": 4, "real_tokens_per_second": 81.9,
        "peak_memory_gib": 0.5, "eval_loss_first": 2.0, "eval_loss_final": 2.0 - drop * 4,
        "task_metric_name": "exact_match", "task_metric_before": 0.1, "task_metric_after": 0.5,
        "num_parameters": 1000, "mfu": None,
    }))
    return run_dir


def test_load_run_reads_every_file_of_the_run_folder(tmp_path):
    run = analysis.load_run(make_fake_run(tmp_path, "2025-01-02_03-04-05_demo"))

    assert run.name == "2025-01-02_03-04-05_demo"
    assert run.status == "completed"
    assert run.config["lora"] == {"r": 8, "alpha": 16}
    assert run.derived["tokens_per_optimizer_step"] == 512
    assert run.env["git"]["commit"] == "abc1234"
    assert run.summary["eval_loss_first"] == 2.0
    assert run.data_stats["packing_efficiency"] == 0.93
    assert list(run.train["step"]) == [1, 2, 3, 4]
    assert "kind" not in run.train.columns
    assert run.train["loss"].iloc[-1] == pytest.approx(1.6)
    assert list(run.evals["step"]) == [0, 2, 4]
    assert run.evals["task_metric"].isna().tolist() == [False, True, False]
    assert len(run.samples) == 4


def test_running_run_loads_with_empty_tables_and_still_plots(tmp_path):
    from sft.run_folder import RunLock

    run_dir = make_fake_run(tmp_path, "2025-01-02_03-04-05_demo", status="running")
    lock = RunLock(run_dir).acquire()  # a live training process holds it
    run = analysis.load_run(run_dir)

    assert run.status == "running"
    assert run.train.empty and "loss" in run.train.columns
    assert run.evals.empty and "eval_loss" in run.evals.columns
    assert run.data_stats is None
    assert analysis.samples_side_by_side(run).empty
    row = analysis.compare_runs([run]).iloc[0]
    assert row["status"] == "running" and row["eval_loss_final"] is None
    assert all(p.stat().st_size > 0 for p in plotting.write_figures(run_dir))
    lock.release()
    assert analysis.load_run(run_dir).status == "stale"  # its process is gone


def test_running_run_compares_with_metrics_written_so_far(tmp_path):
    from sft.run_folder import RunLock

    run_dir = make_fake_run(tmp_path, "2025-01-02_03-04-05_demo")
    (run_dir / "summary.json").write_text(json.dumps({"status": "running"}))
    lock = RunLock(run_dir).acquire()  # still training

    row = analysis.compare_runs([analysis.load_run(run_dir)]).iloc[0]
    lock.release()

    assert row["eval_loss_first"] == 2.0
    assert row["eval_loss_final"] == pytest.approx(2.0 - 0.2 * 4)
    assert row["task_metric_before"] == 0.1
    assert row["train_loss_final"] == pytest.approx(1.6)


def test_unfinished_run_never_shows_the_step_0_eval_as_its_result(tmp_path):
    run_dir = make_fake_run(tmp_path, "2025-01-02_03-04-05_demo")
    (run_dir / "summary.json").write_text(json.dumps({"status": "failed"}))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(ln) for ln in lines if json.loads(ln)["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4]
    # died before step 4's
    kept = [ln for ln in lines if json.loads(ln)["kind"] == "train" or json.loads(ln)["step"] < 4]
    (run_dir / "metrics.jsonl").write_text("\n".join(kept) + "\n")

    row = analysis.compare_runs([analysis.load_run(run_dir)]).iloc[0]
    assert row["task_metric_before"] == 0.1 and row["task_metric_after"] is None  # step 2 measured no metric
    assert row["eval_loss_final"] == pytest.approx(evals[1]["eval_loss"])

    only_step_0 = [ln for ln in kept if json.loads(ln)["kind"] == "eval" and json.loads(ln)["step"] == 0]
    (run_dir / "metrics.jsonl").write_text("\n".join(only_step_0) + "\n")
    row = analysis.compare_runs([analysis.load_run(run_dir)]).iloc[0]
    assert row["eval_loss_first"] == 2.0 and row["eval_loss_final"] is None


def test_truncated_last_metrics_line_is_skipped_with_a_warning(tmp_path):
    run_dir = make_fake_run(tmp_path, "2025-01-02_03-04-05_demo", status="failed")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "epoch": 1.2, "lo')

    with pytest.warns(UserWarning, match=r"metrics\.jsonl:8: skipping malformed line"):
        run = analysis.load_run(run_dir)

    assert list(run.train["step"]) == [1, 2, 3, 4]


def test_folder_without_config_json_raises_data_error_naming_it(tmp_path):
    folder = tmp_path / "2025-01-02_03-04-05_half_written"
    folder.mkdir()
    with pytest.raises(DataError, match="2025-01-02_03-04-05_half_written.*no config.json"):
        analysis.load_run(folder)


def test_find_runs_orders_by_timestamp_name_and_latest_run_is_the_newest(tmp_path):
    for name in ["2025-03-01_00-00-00_b", "2025-01-01_00-00-00_c", "2025-02-01_00-00-00_a"]:
        make_fake_run(tmp_path, name)
    (tmp_path / "2099-01-01_00-00-00_not_a_run").mkdir()

    assert [p.name for p in analysis.find_runs(tmp_path)] == [
        "2025-01-01_00-00-00_c", "2025-02-01_00-00-00_a", "2025-03-01_00-00-00_b"]
    assert analysis.latest_run(tmp_path).name == "2025-03-01_00-00-00_b"


def test_latest_run_of_an_empty_root_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="no run folders"):
        analysis.latest_run(tmp_path)


def test_resolve_runs_prefers_environment_then_arguments_then_newest(tmp_path):
    old = make_fake_run(tmp_path, "2025-01-01_00-00-00_old")
    new = make_fake_run(tmp_path, "2025-02-01_00-00-00_new")
    other_root = tmp_path / "other"
    other = make_fake_run(other_root, "2025-03-01_00-00-00_other")

    assert analysis.resolve_runs([], tmp_path, environ={}) == [new]
    assert analysis.resolve_runs([old.name], tmp_path, environ={}) == [old]
    assert analysis.resolve_runs([old.name], tmp_path, environ={"SFT_RUNS": f"{new}{os.pathsep}{old}"}) == [new, old]
    assert analysis.resolve_runs([], tmp_path, environ={"SFT_RUNS_ROOT": str(other_root)}) == [other]
    # a path given from elsewhere (the repository root) that does not exist from here: its run name counts
    assert analysis.resolve_runs([f"no/such/place/{old.name}"], tmp_path, environ={}) == [old]


def test_compare_runs_shows_only_the_settings_that_differ(tmp_path):
    runs = [
        analysis.load_run(make_fake_run(tmp_path, "2025-01-01_00-00-00_demo")),
        analysis.load_run(make_fake_run(tmp_path, "2025-01-02_00-00-00_demo", learning_rate=5e-5, lora={"r": 16})),
    ]

    table = analysis.compare_runs(runs)

    assert list(table["name"]) == [r.name for r in runs]
    settings = [c for c in table.columns if c in analysis.flatten(BASE_CONFIG)]
    assert settings == ["learning_rate", "lora.r"]
    assert list(table["lora.r"]) == [8, 16]
    assert list(table["eval_loss_final"]) == pytest.approx([1.2, 0.0])
    assert list(table["task_metric_after"]) == [0.5, 0.5]
    for column in ["status", "train_loss_final", "eval_loss_first", "task_metric_before", "train_runtime",
                   "real_tokens_per_second"]:
        assert column in table.columns


def test_samples_side_by_side_pairs_before_and_after_by_prompt_index(tmp_path):
    run = analysis.load_run(make_fake_run(tmp_path, "2025-01-01_00-00-00_demo"))

    table = analysis.samples_side_by_side(run)

    assert list(table.columns) == ["index", "prompt", "reference", "response_before", "response_after"]
    assert table.to_dict("records") == [
        {"index": i, "prompt": f"<user>question {i}</user>", "reference": f"reference {i}",
         "response_before": f"before answer {i}", "response_after": f"after answer {i}"}
        for i in (0, 1)
    ]


def test_write_figures_writes_nonempty_pngs_into_the_run_folder(tmp_path):
    run_dir = make_fake_run(tmp_path, "2025-01-01_00-00-00_demo")

    paths = plotting.write_figures(run_dir)

    assert paths == [run_dir / "loss_curves.png", run_dir / "training_panels.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000


def test_plot_loss_curves_rejects_an_unknown_x_axis(tmp_path):
    run = analysis.load_run(make_fake_run(tmp_path, "2025-01-01_00-00-00_demo"))
    with pytest.raises(ValueError, match="x must be one of"):
        plotting.plot_loss_curves(run, x="epoch")


def test_cli_without_run_plots_the_newest_run_into_out(tmp_path, capsys):
    make_fake_run(tmp_path / "runs", "2025-01-01_00-00-00_old")
    make_fake_run(tmp_path / "runs", "2025-02-01_00-00-00_new")

    code = plotting.main(["--runs-root", str(tmp_path / "runs"), "--out", str(tmp_path / "figs")])

    out_dir = tmp_path / "figs" / "2025-02-01_00-00-00_new"
    assert code == 0
    assert capsys.readouterr().out.split() == [str(out_dir / "loss_curves.png"), str(out_dir / "training_panels.png")]
    assert (out_dir / "training_panels.png").stat().st_size > 0


def test_cli_on_a_missing_path_prints_one_line_error_and_exits_2(tmp_path):
    missing = tmp_path / "no_such_run"
    result = subprocess.run([sys.executable, "-m", "sft.plotting", str(missing)], cwd=REPO_ROOT,
                            capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"})

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error:") and str(missing) in result.stderr


def test_notebook_runs_end_to_end_on_two_runs(tmp_path, monkeypatch):
    runs = [make_fake_run(tmp_path / "runs", "2025-01-01_00-00-00_demo"),
            make_fake_run(tmp_path / "runs", "2025-01-02_00-00-00_demo", learning_rate=5e-5)]
    monkeypatch.setenv("SFT_RUNS", os.pathsep.join(map(str, runs)))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # A user-level kernel spec or IPython profile must not change what the test runs.
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"

    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # training panels, loss vs tokens, comparison
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "after answer 1" in html and "learning_rate" in html
