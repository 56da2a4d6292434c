"""Reading run folders, comparing runs, figures, the sft.plotting CLI and the post-processing notebook.

The run folders are the trainer's own (the test suite's shared `trained_runs`: the tiny model, 4 steps),
copied under the names a test needs, so these tests read exactly the files and keys that training writes.
"""

import json
import os
from html import escape
import shutil
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
START_FILES = ("config.json", "env.json")  # what a run has written when its first step begins


@pytest.fixture
def make_run(trained_runs):
    """`make_run(root, name, status="completed", which=0)`: a copy of a trained run folder under `root/name`.
    A `running` run keeps only its start files, an empty metrics file and no samples; a `failed` or
    `interrupted` one has the summary of a run stopped during training."""
    def make(root: Path, name: str, status: str = "completed", which: int = 0) -> Path:
        run_dir = root / name
        shutil.copytree(trained_runs[which], run_dir)
        if status == "running":
            for path in run_dir.iterdir():
                if path.name not in START_FILES:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            (run_dir / "summary.json").write_text(json.dumps({"status": "running"}))
            (run_dir / "metrics.jsonl").write_text("")
        elif status != "completed":  # what a run that stopped during training has (RunFolder.record_failure)
            (run_dir / "summary.json").write_text(json.dumps({"status": status, "reason": "RuntimeError: stopped"}))
        return run_dir

    return make


def test_load_run_reads_every_file_of_the_run_folder(tmp_path, make_run):
    run_dir = make_run(tmp_path, "2025-01-02_03-04-05_demo")
    run = analysis.load_run(run_dir)
    written = json.loads((run_dir / "config.json").read_text())

    assert run.name == "2025-01-02_03-04-05_demo"
    assert run.status == "completed"
    assert run.config == written["config"] and run.config["lr"] == 1e-3
    assert run.derived == written["derived"] and run.derived["optimizer_steps"] == 4
    assert run.env["git"] == json.loads((run_dir / "env.json").read_text())["git"]
    assert run.summary["eval_loss_first"] == analysis.read_metrics(run_dir, "eval")[0]["eval_loss"]
    assert 0 < run.data_stats["packing_efficiency"] <= 1
    assert list(run.train["step"]) == [1, 2, 3, 4]
    assert "kind" not in run.train.columns
    assert run.train["loss"].iloc[-1] == analysis.read_metrics(run_dir, "train")[-1]["loss"]
    assert list(run.evals["step"]) == [0, 2, 4]
    assert run.evals["task_metric"].isna().tolist() == [False, True, False]  # measured before and after only
    assert sorted(zip(run.samples["stage"], run.samples["index"])) == [("after", 0), ("after", 1), ("before", 0),
                                                                       ("before", 1)]


def test_running_run_loads_with_empty_tables_and_still_plots(tmp_path, make_run):
    from sft.run_folder import RunLock

    run_dir = make_run(tmp_path, "2025-01-02_03-04-05_demo", status="running")
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


def test_running_run_compares_with_metrics_written_so_far(tmp_path, make_run):
    from sft.run_folder import RunLock

    run_dir = make_run(tmp_path, "2025-01-02_03-04-05_demo")
    (run_dir / "summary.json").write_text(json.dumps({"status": "running"}))
    lock = RunLock(run_dir).acquire()  # still training

    row = analysis.compare_runs([analysis.load_run(run_dir)]).iloc[0]
    lock.release()

    evals, train = analysis.read_metrics(run_dir, "eval"), analysis.read_metrics(run_dir, "train")
    assert row["eval_loss_first"] == evals[0]["eval_loss"]
    assert row["eval_loss_final"] == evals[-1]["eval_loss"]
    assert row["task_metric_before"] == evals[0]["task_metric"]
    assert row["train_loss_final"] == train[-1]["loss"]


def test_unfinished_run_never_shows_the_step_0_eval_as_its_result(tmp_path, make_run):
    run_dir = make_run(tmp_path, "2025-01-02_03-04-05_demo", status="failed")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    evals = analysis.read_metrics(run_dir, "eval")
    assert [e["step"] for e in evals] == [0, 2, 4]
    # died before step 4's
    kept = [ln for ln in lines if json.loads(ln)["kind"] == "train" or json.loads(ln)["step"] < 4]
    (run_dir / "metrics.jsonl").write_text("\n".join(kept) + "\n")

    row = analysis.compare_runs([analysis.load_run(run_dir)]).iloc[0]
    assert row["task_metric_before"] == evals[0]["task_metric"]
    assert row["task_metric_after"] is None  # step 2 measured no metric
    assert row["eval_loss_final"] == evals[1]["eval_loss"]

    only_step_0 = [ln for ln in kept if json.loads(ln)["kind"] == "eval" and json.loads(ln)["step"] == 0]
    (run_dir / "metrics.jsonl").write_text("\n".join(only_step_0) + "\n")
    row = analysis.compare_runs([analysis.load_run(run_dir)]).iloc[0]
    assert row["eval_loss_first"] == evals[0]["eval_loss"] and row["eval_loss_final"] is None


def test_truncated_last_metrics_line_is_skipped_with_a_warning(tmp_path, make_run):
    run_dir = make_run(tmp_path, "2025-01-02_03-04-05_demo", status="failed")
    lines = len((run_dir / "metrics.jsonl").read_text().splitlines())
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "epoch": 1.2, "lo')

    with pytest.warns(UserWarning, match=rf"metrics\.jsonl:{lines + 1}: skipping malformed line"):
        run = analysis.load_run(run_dir)

    assert list(run.train["step"]) == [1, 2, 3, 4]


def test_folder_without_config_json_raises_data_error_naming_it(tmp_path):
    folder = tmp_path / "2025-01-02_03-04-05_half_written"
    folder.mkdir()
    with pytest.raises(DataError, match="2025-01-02_03-04-05_half_written.*no config.json"):
        analysis.load_run(folder)


def test_find_runs_orders_by_timestamp_name_and_latest_run_is_the_newest(tmp_path, make_run):
    for name in ["2025-03-01_00-00-00_b", "2025-01-01_00-00-00_c", "2025-02-01_00-00-00_a"]:
        make_run(tmp_path, name)
    (tmp_path / "2099-01-01_00-00-00_not_a_run").mkdir()

    assert [p.name for p in analysis.find_runs(tmp_path)] == [
        "2025-01-01_00-00-00_c", "2025-02-01_00-00-00_a", "2025-03-01_00-00-00_b"]
    assert analysis.latest_run(tmp_path).name == "2025-03-01_00-00-00_b"


def test_latest_run_of_an_empty_root_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="no run folders"):
        analysis.latest_run(tmp_path)


def test_resolve_runs_prefers_environment_then_arguments_then_newest(tmp_path, make_run):
    old = make_run(tmp_path, "2025-01-01_00-00-00_old")
    new = make_run(tmp_path, "2025-02-01_00-00-00_new")
    other_root = tmp_path / "other"
    other_root.mkdir()
    other = make_run(other_root, "2025-03-01_00-00-00_other")

    assert analysis.resolve_runs([], tmp_path, environ={}) == [new]
    assert analysis.resolve_runs([old.name], tmp_path, environ={}) == [old]
    assert analysis.resolve_runs([old.name], tmp_path, environ={"SFT_RUNS": f"{new}{os.pathsep}{old}"}) == [new, old]
    assert analysis.resolve_runs([], tmp_path, environ={"SFT_RUNS_ROOT": str(other_root)}) == [other]
    # a path given from elsewhere (the repository root) that does not exist from here: its run name counts
    assert analysis.resolve_runs([f"no/such/place/{old.name}"], tmp_path, environ={}) == [old]


def test_compare_runs_shows_only_the_settings_that_differ(tmp_path, make_run):
    dirs = [make_run(tmp_path, "2025-01-01_00-00-00_demo"), make_run(tmp_path, "2025-01-02_00-00-00_demo", which=1)]
    runs = [analysis.load_run(d) for d in dirs]

    table = analysis.compare_runs(runs)

    assert list(table["name"]) == [r.name for r in runs]
    settings = [c for c in table.columns if c in analysis.flatten(runs[0].config)]
    assert settings == ["lr"]  # the runs differ in their learning rate alone
    assert list(table["lr"]) == [1e-3, 3e-3]
    assert list(table["eval_loss_final"]) == [r.summary["eval_loss_final"] for r in runs]
    assert list(table["task_metric_after"]) == [r.summary["task_metric_after"] for r in runs]
    for column in ["status", "train_loss_final", "eval_loss_first", "task_metric_before", "train_runtime",
                   "real_tokens_per_second"]:
        assert column in table.columns


def test_samples_side_by_side_pairs_before_and_after_by_prompt_index(tmp_path, make_run):
    run_dir = make_run(tmp_path, "2025-01-01_00-00-00_demo")
    written = analysis.read_samples(run_dir)
    shuffled = written[::-1]  # pairing must not rely on the order of the lines
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shuffled))

    table = analysis.samples_side_by_side(analysis.load_run(run_dir))

    by = {(r["stage"], r["index"]): r for r in written}
    assert list(table.columns) == ["index", "prompt", "reference", "response_before", "response_after"]
    assert table.to_dict("records") == [
        {"index": i, "prompt": by["before", i]["prompt"], "reference": by["before", i]["reference"],
         "response_before": by["before", i]["response"], "response_after": by["after", i]["response"]}
        for i in (0, 1)
    ]


def test_write_figures_writes_nonempty_pngs_into_the_run_folder(tmp_path, make_run):
    run_dir = make_run(tmp_path, "2025-01-01_00-00-00_demo")
    for path in run_dir.glob("*.png"):
        path.unlink()

    paths = plotting.write_figures(run_dir)

    assert paths == [run_dir / "loss_curves.png", run_dir / "training_panels.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000


def test_the_runs_listing_shows_each_runs_real_status_steps_and_numbers(tmp_path, make_run, capsys):
    from sft.run_folder import LOCK

    done = make_run(tmp_path, "2025-01-01_00-00-00_demo")
    killed = make_run(tmp_path, "2025-01-02_00-00-00_demo", status="running")
    (killed / LOCK).write_text('{"pid": 1}')  # its process died without removing it: nobody holds it
    (tmp_path / "not-a-run").mkdir()
    assert analysis.main([str(tmp_path)]) == 0
    header, first, second = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["run", "status", "steps", "train_loss_final", "eval_loss_first", "eval_loss_final",
                              "task_metric_name", "task_metric_before", "task_metric_after"]
    summary = json.loads((done / "summary.json").read_text())
    assert first.split()[:3] == [done.name, "completed", "4/4"]
    assert f"{summary['eval_loss_first']:.4f}" in first and f"{summary['eval_loss_final']:.4f}" in first
    assert second.split()[:3] == [killed.name, "stale", "0/4"]
    assert analysis.main([str(tmp_path / "not-a-run")]) == 2 and "no run folders" in capsys.readouterr().err


def test_a_completed_runs_figures_are_titled_completed(tiny_config, monkeypatch):
    titles = []
    curves, panels = plotting.plot_loss_curves, plotting.plot_training_panels

    def seen(plot, title):
        def drawn(*args, **kwargs):
            fig = plot(*args, **kwargs)
            titles.append(title(fig))
            return fig
        return drawn

    monkeypatch.setattr(plotting, "plot_loss_curves", seen(curves, lambda fig: fig.axes[0].get_title()))
    monkeypatch.setattr(plotting, "plot_training_panels", seen(panels, lambda fig: fig.get_suptitle()))
    from sft.run import run

    folder = run(tiny_config(max_steps=1)).path
    assert titles == [f"{folder.name} (completed)"] * 2


def test_plot_loss_curves_rejects_an_unknown_x_axis(tmp_path, make_run):
    run = analysis.load_run(make_run(tmp_path, "2025-01-01_00-00-00_demo"))
    with pytest.raises(ValueError, match="x must be one of"):
        plotting.plot_loss_curves(run, x="epoch")


def test_cli_without_run_plots_the_newest_run_into_out(tmp_path, capsys, make_run):
    (tmp_path / "runs").mkdir()
    make_run(tmp_path / "runs", "2025-01-01_00-00-00_old")
    make_run(tmp_path / "runs", "2025-02-01_00-00-00_new")

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


def test_notebook_runs_end_to_end_on_two_runs(tmp_path, monkeypatch, trained_runs):
    runs = list(trained_runs)
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
    after = analysis.read_samples(runs[0])[-1]
    shown = escape(after["messages"][-1]["content"], quote=False)
    assert after["stage"] == "after" and shown in html  # the samples side by side
    assert ">lr<" in html  # the comparison's one differing setting
