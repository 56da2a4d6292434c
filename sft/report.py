"""README tables and figures generated from committed results, never typed by hand.

`python -m sft.report` rewrites each README block between `<!-- BEGIN name -->` and `<!-- END name -->`
from its source (the newest completed demo run folder, or the result files that the benchmarks list in
their report_sources modules: SOURCE_TABLES) and copies the demo run's loss curves into assets/. A block
whose source is missing is left as it is.

Only committed results count, so the README never shows what exists on one machine alone: a run
folder counts when its summary.json is committed (at HEAD), and a result file is read as committed,
whatever its working-tree copy holds (a file never committed does not exist for the report). Outside
a git checkout nothing is committed. `--include-local` reads the working tree instead: local run
folders and uncommitted changes to result files count too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pandas as pd

from .analysis import Run, find_runs, load_run, samples_side_by_side
from .errors import SFTError
from .tables import csv_table, fmt_value, markdown_table

ROOT = Path(__file__).resolve().parents[1]
# The benchmarks' own lists of the README blocks they feed (each a module with SOURCES, a list of ResultSource),
# imported only when the blocks are rendered: the report itself needs neither torch nor the benchmarks.
SOURCE_TABLES = ("inf_tests.report_sources", "bench.report_sources")


DEMOS = {"demo_smollm2": "demo", "demo_smollm2_reasoning": "demo-reasoning", "demo_smollm2_tools": "demo-tools"}
# full finetuning against adapters on the same data and seed: (full run's experiment, adapter run's), README block
LORA_DEMO = ("demo_smollm2", "demo_smollm2_lora", "demo-lora-results")
LORA_FIGURE = "demo_lora_comparison.png"  # in assets/: both runs' loss curves (sft.plotting.plot_comparison)


def demo_results(run: Run) -> str:
    s, env, derived = run.summary, run.env, run.derived
    device = env.get("device", {})
    packages = env.get("packages", {})
    rows = [
        ("held-out loss", fmt_value(s.get("eval_loss_first")), fmt_value(s.get("eval_loss_final"))),
        (f"held-out {s.get('task_metric_name')}", fmt_value(s.get("task_metric_before")),
         fmt_value(s.get("task_metric_after"))),
    ]
    table = markdown_table(pd.DataFrame(rows, columns=["metric", "before training", "after training"]))
    facts = (f"Run `{run.name}` ({s.get('status')}): {fmt_value(s.get('global_step'))} optimizer steps over "
             f"{fmt_value(derived.get('train_examples'))} examples ({fmt_value(s.get('real_tokens'))} real tokens, "
             f"packing efficiency {fmt_value(derived.get('packing_efficiency'))}), training time "
             f"{fmt_value(s.get('train_runtime'), 1)} s, "
             f"{fmt_value(s.get('real_tokens_per_second'), 1)} real tokens/s, "
             f"peak memory {fmt_value(s.get('peak_memory_gib'), 2)} GiB ({s.get('peak_memory_kind')}); "
             f"precision {derived.get('precision')}{_bf16_update(derived)}. "
             f"Device: {device.get('type')} {device.get('name')} ({_device_count(device)}); "
             f"torch {packages.get('torch')}, transformers {packages.get('transformers')}.")
    shown = dataclasses.replace(run, samples=run.samples.assign(
        response=run.samples.apply(_shown_reply, axis=1),
        reference=run.samples["reference"].map(lambda r: _shown_calls(r) if derived.get("chat_template", {}).get(
            "tool_calls") and s.get("task_metric_name") == "tool_call_match" else r)))
    samples = samples_side_by_side(shown).head(6)
    # the question as asked, whatever the template: the last user turn of each sample's prompt messages
    asked = run.samples.drop_duplicates("index", keep="last").set_index("index")["messages"]
    samples = samples.assign(prompt=samples["index"].map(
        lambda i: _clip(next(m["content"] for m in reversed(asked[i]) if m["role"] == "user"), 60)))
    sample_table = markdown_table(samples[["prompt", "reference", "response_before", "response_after"]]
                                  .rename(columns={"response_before": "before", "response_after": "after"})
                                  .assign(before=lambda f: f["before"].map(lambda t: _clip(t, 70)),
                                          after=lambda f: f["after"].map(lambda t: _clip(t, 90))))
    return f"{table}\n\n{facts}\n\n{sample_table}"


def _shown_reply(sample: pd.Series) -> str:
    """A generated reply as a table shows it: its tool calls as `name(arguments)`, its reasoning before the
    answer."""
    calls = sample.get("tool_calls")
    text = " ".join(f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in calls) \
        if isinstance(calls, list) and calls else str(sample.get("response") or "")
    reasoning = sample.get("reasoning")
    return f"{reasoning} → {text}" if isinstance(reasoning, str) and reasoning else text


def _shown_calls(reference: str) -> str:
    calls = json.loads(reference)
    return " ".join(f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in calls) or "(no call)"


def lora_comparison(full: Run, adapter: Run) -> str:
    """Full finetuning and the adapter run side by side: what each trained and what it cost, from their folders."""
    def column(run: Run) -> list[str]:
        s, d, c = run.summary, run.derived, run.config
        trainable = d.get("trainable_parameters", d.get("num_parameters"))
        return [c.get("finetune", "full") + (f" (rank {c['lora_r']}, alpha {c['lora_alpha']})"
                                             if c.get("finetune") == "lora" else ""),
                f"{c.get('lr'):g}", f"{fmt_value(trainable)} of {fmt_value(d.get('num_parameters'))}",
                f"{fmt_value(s.get('eval_loss_first'))} -> {fmt_value(s.get('eval_loss_final'))}",
                f"{fmt_value(s.get('task_metric_before'))} -> {fmt_value(s.get('task_metric_after'))}",
                fmt_value(s.get("peak_memory_gib"), 2) + f" ({s.get('peak_memory_kind')})",
                fmt_value(s.get("real_tokens_per_second"), 1), fmt_value(s.get("train_runtime"), 1)]
    rows = ["finetune", "lr", "trainable parameters", "held-out loss, before -> after",
            f"held-out {adapter.summary.get('task_metric_name')}, before -> after", "peak memory, GiB",
            "real tokens/s", "training time, s"]
    table = pd.DataFrame({"": rows, f"`{full.name}`": column(full), f"`{adapter.name}`": column(adapter)})
    same = all(full.config.get(k) == adapter.config.get(k) for k in ("model", "dataset", "seed", "max_length"))
    return (markdown_table(table) + "\n\n" + ("Same model, data, seed and row length; " if same else
                                               "note: the runs differ in model, data, seed or row length; ")
            + f"device: {adapter.env.get('device', {}).get('type')} {adapter.env.get('device', {}).get('name')}.\n\n"
            + f"![full against LoRA: loss curves](assets/{LORA_FIGURE})\n")


def _bf16_update(derived: dict) -> str:
    """How the weights took their updates: fp32 weights, or bf16 weights with the bf16 update named."""
    update = derived.get("bf16_update")
    return f" with bf16_update {update}" if update else " (fp32 weights)"


def _device_count(device: dict) -> str:
    if "threads" in device:  # a CPU
        return f"{device['threads']} threads"
    return f"{device.get('count')} GPU" + ("s" if device.get("count") != 1 else "")


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


class Results:
    """The result files under `root` as the report reads them: as committed at HEAD, or with
    `include_local` as they are in the working tree. Paths are absolute, under `root`."""

    def __init__(self, root: Path, include_local: bool = False):
        self.root, self.include_local = root, include_local
        self.committed: set[str] = set() if include_local else committed_files(root)

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def exists(self, path: Path) -> bool:
        return path.is_file() if self.include_local else self._relative(path) in self.committed

    def read(self, path: Path) -> str:
        """The file's text, line ends kept as they are."""
        if self.include_local:
            return path.read_bytes().decode()
        data = _git(self.root, "show", f"HEAD:./{self._relative(path)}")
        if not path.is_file() or path.read_bytes() != data:
            print(f"note: {self._relative(path)}: using the committed version, not the working tree's "
                  f"(--include-local uses the working tree's)", file=sys.stderr)
        return data.decode()

    def glob(self, folder: Path, pattern: str) -> list[Path]:
        """The files under `folder` whose path relative to it matches `pattern` (`*` within one name), sorted."""
        if self.include_local:
            return sorted(p for p in folder.glob(pattern) if p.is_file())
        depth = len(PurePosixPath(pattern).parts)
        prefix = self._relative(folder) + "/" if folder != self.root else ""
        found = (PurePosixPath(f[len(prefix):]) for f in self.committed if f.startswith(prefix))
        return sorted(folder / f for f in found if len(f.parts) == depth and f.match(pattern))


def _git(root: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, check=True).stdout


def committed_files(root: Path) -> set[str]:
    """The paths (relative to `root`, with /) of the files committed at HEAD under `root`; none when
    `root` is not in a git checkout with a commit."""
    try:
        listing = _git(root, "ls-tree", "-r", "-z", "--name-only", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        print(f"note: {root} is not a git checkout with a commit, so no result counts as committed; "
              f"--include-local uses the working tree", file=sys.stderr)
        return set()
    return {name for name in listing.decode().split("\0") if name}


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", flags=re.S)
    if not pattern.search(text):
        raise SFTError(f"README has no block named {name!r}")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def newest_run(experiment: str, results: Results) -> Run | None:
    """The newest completed run of `experiment` under runs/ that `results` counts (see the module's docstring)."""
    runs = [p for p in find_runs(results.root / "runs") if p.name.endswith("_" + experiment)]
    completed = [p for p in runs if load_run(p).status == "completed"]
    counted = [p for p in completed if results.exists(p / "summary.json")]
    left_out = [p.name for p in completed if p not in counted and (not counted or p.name > counted[-1].name)]
    if left_out:
        print(f"note: newer local {experiment} runs left out: {', '.join(left_out)} (--include-local uses them)",
              file=sys.stderr)
    return load_run(counted[-1]) if counted else None


@dataclasses.dataclass(frozen=True)
class ResultSource:
    """A README block made from result files: a table of each file that `pattern` matches, then the goal
    lines the benchmark checked over them, then any `notes` it adds."""
    block: str                          # the README block's name
    pattern: str                        # the result files, relative to the root (`*` within one name)
    columns: list[str] | None = None    # the columns shown, in this order (None: all of them)
    skip_status: str | None = None      # rows whose status starts with it are named under the table instead
    goals: str | None = None            # the file of goal lines, relative to the root
    goals_heading: str = "Against the goals:"
    notes: Callable[[Results], list[str]] | None = None  # more sections, read through `results`
    summary: Callable[[list[Path], Results], str] | None = None  # instead of the tables: one summary of the files


def render(source: ResultSource, results: Results) -> str | None:
    """The block of `source` from the files `results` counts; None when there are none."""
    folder, _, name = source.pattern.rpartition("/")
    paths = results.glob(results.root / folder, name)
    if not paths:
        return None
    if source.summary is not None:
        return source.summary(paths, results)
    sections = [f"From `{path.relative_to(results.root)}`:\n\n"
                + csv_table(results.read(path), source.columns, skip_status=source.skip_status) for path in paths]
    goals = None if source.goals is None else results.root / source.goals
    if goals is not None and results.exists(goals):  # the goals, checked by the benchmark over its rows
        sections.append(f"{source.goals_heading}\n\n" + results.read(goals))
    return "\n\n".join(sections + (source.notes(results) if source.notes else []))


def result_sources() -> list[ResultSource]:
    """Every benchmark's ResultSource entries, in the order of SOURCE_TABLES; a benchmark package that is not
    there (an installed toolkit without bench/) has none."""
    import importlib
    import importlib.util

    return [source for name in SOURCE_TABLES if importlib.util.find_spec(name.split(".")[0]) is not None
            for source in importlib.import_module(name).SOURCES]


def blocks(root: Path = ROOT, include_local: bool = False) -> dict[str, str]:
    """Each README block that has a source, rendered; from committed results unless `include_local`."""
    out: dict[str, str] = {}
    results = Results(root, include_local)
    for experiment, name in DEMOS.items():
        demo = newest_run(experiment, results)
        if demo is not None:
            out[f"{name}-results"] = demo_results(demo)
            assets = root / "assets"
            assets.mkdir(exist_ok=True)
            shutil.copyfile(demo.path / "loss_curves.png", assets / f"{name.replace('-', '_')}_loss_curves.png")
    full, adapter = (newest_run(name, results) for name in LORA_DEMO[:2])
    if full is not None and adapter is not None:
        from .plotting import plot_comparison

        out[LORA_DEMO[2]] = lora_comparison(full, adapter)
        (root / "assets").mkdir(exist_ok=True)
        plot_comparison([full, adapter]).savefig(root / "assets" / LORA_FIGURE, dpi=110, format="png")
    for source in result_sources():
        body = render(source, results)
        if body is not None:
            out[source.block] = body
    return out


def execute_notebook(path: Path, run_dirs: list[Path]) -> None:
    """Runs the notebook on the given runs and saves it with its outputs, so it reads on a code host."""
    import os

    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    env_before = os.environ.get("SFT_RUNS")
    os.environ["SFT_RUNS"] = os.pathsep.join(str(p) for p in run_dirs)
    try:
        nbclient.NotebookClient(notebook, kernel_name="python3", timeout=600,
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if env_before is None:
            os.environ.pop("SFT_RUNS")
        else:
            os.environ["SFT_RUNS"] = env_before
    for cell in notebook.cells:  # execution metadata only adds diff noise
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(notebook, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", nargs="+", default=[str(ROOT / "README.md"), str(ROOT / "bench" / "README.md")],
                        help="the files whose blocks to rewrite (default: README.md and bench/README.md)")
    parser.add_argument("--notebook", action="store_true",
                        help="also execute sft/notebooks/postprocess.ipynb on the newest demo run and save its outputs")
    parser.add_argument("--include-local", action="store_true",
                        help="also use local results: run folders whose summary.json is not committed, and result "
                             "files as they are in the working tree (by default only what is committed at HEAD "
                             "counts, and result files are read as committed)")
    args = parser.parse_args(argv)
    rendered = blocks(ROOT, args.include_local)
    for readme in map(Path, args.readme):
        text = readme.read_text()
        try:
            for name, body in rendered.items():
                if f"<!-- BEGIN {name} -->" in text:
                    text = replace_block(text, name, body)
                    print(f"updated block {name} in {readme.name}")
        except SFTError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        readme.write_text(text)
    if args.notebook:
        demo = newest_run("demo_smollm2", Results(ROOT, args.include_local))
        if demo is None:
            print("error: no completed demo run in runs/ to execute the notebook on"
                  + ("" if args.include_local else " whose summary.json is committed"), file=sys.stderr)
            return 2
        execute_notebook(ROOT / "sft" / "notebooks" / "postprocess.ipynb", [demo.path])
        print(f"executed sft/notebooks/postprocess.ipynb on {demo.path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
