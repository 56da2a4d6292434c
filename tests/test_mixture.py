"""Mixtures of datasets: each source read in its own format, held out on its own, sampled by its share, counted
in data_stats.json and scored with its own held-out loss."""
from __future__ import annotations

import json

import pytest

from sft.analysis import load_run, read_metrics
from sft.config import TrainConfig
from sft.data import prepare_data
from sft.errors import ConfigError, DataError
from sft.plotting import plot_loss_curves
from sft.run import run
from sft.selection import take_share
from conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("cache_dir")



def alpaca(n: int) -> list[dict]:
    return [{"instruction": f"Double {i}.", "input": "", "output": str(2 * i)} for i in range(n)]


def guanaco(n: int) -> list[dict]:
    return [{"text": f"### Human: Say {i} backwards.### Assistant: {str(i)[::-1]} reversed"} for i in range(n)]


@pytest.mark.parametrize("settings, message", [
    (dict(datasets=[]), "datasets: a non-empty list"),
    (dict(datasets=["a.jsonl"]), "each entry is (source, share)"),
    (dict(datasets=[("a.jsonl", 0)]), "the share is a fraction"),
    (dict(datasets=[("a.jsonl", True)]), "the share is a fraction"),
    (dict(datasets=[("a.jsonl", 1.0, {"revison": "x"})]), "unknown option 'revison'"),
    (dict(datasets=[("a.jsonl", 1.0, {"format": "chatml"})]), "datasets: a.jsonl: format: 'chatml' is not one of"),
    (dict(datasets=[("a.jsonl", 1.0, {"max_rows": 0})]), "max_rows is a count >= 1"),
    (dict(datasets=[("a.jsonl", 1.0)], dataset="b.jsonl"), "dataset: set with datasets"),
    (dict(datasets=[("a.jsonl", 1.0)], dataset_revision="abc"), "give it per source: (source, share, {'revision'"),
    (dict(datasets=[("a.jsonl", 1.0)], eval_dataset="b.jsonl"), "each source holds out its own rows"),
])
def test_a_bad_mixture_is_one_clear_config_error(settings, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(experiment="x", **settings)
    assert message in str(e.value)


def test_sources_are_named_and_take_the_run_defaults():
    cfg = TrainConfig(experiment="x", dataset_format="guanaco", datasets=[
        ("org/data", 0.5, {"revision": "abc", "files": "a.jsonl"}), ("org/data", 2, {"revision": "abc"}),
        # a list, as config.json has it
        ["org/data", None, {"revision": "abc", "files": "a.jsonl", "format": "alpaca"}]])
    names = [(s.name, s.share, s.format, s.revision) for s in cfg.sources()]
    assert names == [("org/data:a.jsonl", 0.5, "guanaco", "abc"), ("org/data", 2, "guanaco", "abc"),
                     ("org/data:a.jsonl#2", None, "alpaca", "abc")]
    single = TrainConfig(experiment="x", dataset="d.jsonl", max_rows=5).sources()
    assert [(s.dataset, s.share, s.max_rows) for s in single] == [("d.jsonl", None, 5)]


def test_a_share_is_a_fraction_or_a_count_and_repeats_beyond_the_rows():
    rows = list(range(10))
    assert take_share(rows, None, seed=0) is rows and take_share(rows, 1.0, seed=0) == rows
    half = take_share(rows, 0.5, seed=0)
    assert len(half) == 5 and half == sorted(half) and set(half) <= set(rows)
    assert take_share(rows, 0.5, seed=0) == half and take_share(rows, 0.5, seed=1) != half  # seeded
    assert take_share(rows, 3, seed=0) == take_share(rows, 0.3, seed=0)
    more = take_share(rows, 2.5, seed=0)
    assert len(more) == 25 and more[:20] == rows + rows and len(set(more[20:])) == 5
    assert len(take_share(rows, 23, seed=0)) == 23
    with pytest.raises(ConfigError, match="no rows"):
        take_share(rows, 0.01, seed=0)


def test_a_mixture_reads_each_source_in_its_format_and_counts_it(tiny_config, tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca(40))
    g = write_jsonl(tmp_path / "g.jsonl", guanaco(20) + [{"text": "no markers at all"}])
    cfg = tiny_config(max_rows=None, eval_rows=4,
                      datasets=[(a, 0.5, {"format": "alpaca"}), (g, 30, {"format": "guanaco"})])
    prepared = prepare_data(cfg, tokenizer)
    stats = prepared.stats
    by_name = {s["name"]: s for s in stats["sources"]}
    assert list(by_name) == [a, g] and prepared.source_names == [a, g]
    assert (by_name[a]["format"], by_name[g]["format"]) == ("alpaca", "guanaco")
    assert (by_name[a]["rows_read"], by_name[a]["eval_conversations"], by_name[a]["train_conversations"]) == (40, 4, 18)
    assert (by_name[g]["rows_read"], by_name[g]["rows_kept"], by_name[g]["train_conversations"]) == (21, 20, 30)
    assert sum(by_name[g]["rows_rejected"].values()) == 1 and stats["rows_read"] == 61
    assert stats["train_conversations"] == 48 and stats["eval_conversations"] == 8
    for split in ("train", "eval"):  # the sources add up to the split
        for key in ("examples", "tokens", "supervised_tokens"):
            assert sum(s[split][key] for s in stats["sources"]) == stats[split][key]
    texts = [tokenizer.decode(e.input_ids) for e in prepared.train]
    assert sum("backwards" in t for t in texts) == 30 and sum("Double" in t for t in texts) == 18
    # held-out examples alternate between the sources, so the first samples show both
    assert prepared.eval_sources == [0, 1] * 4
    assert ["backwards" in tokenizer.decode(e.input_ids) for e in prepared.eval] == [False, True] * 4
    assert "backwards" in json.dumps(prepared.eval_conversations[1])
    assert prepare_data(cfg, tokenizer).cache_hit
    assert not prepare_data(cfg.replace(datasets=[(a, 0.5, {"format": "alpaca"}), (g, 31)]), tokenizer).cache_hit


def test_a_bad_row_names_its_own_source(tiny_config, tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca(10))
    bad = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 2000}]}]
    m = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}]}] * 9 + bad)
    with pytest.raises(DataError, match=rf"dataset {m}: (train|held-out) row 10 has \d+ tokens, more than max_length"):
        prepare_data(tiny_config(max_rows=None, eval_rows=1, datasets=[(a, None), (m, None)]), tokenizer)


def test_a_mixed_run_logs_a_held_out_loss_per_source(tiny_config, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca(30))
    g = write_jsonl(tmp_path / "g.jsonl", guanaco(30))
    folder = run(tiny_config(max_rows=None, eval_rows=5, datasets=[(a, None), (g, None)], max_steps=2))
    evals = read_metrics(folder.path, "eval")
    stats = json.loads((folder.path / "data_stats.json").read_text())
    targets = {s["name"]: s["eval"]["supervised_tokens"] for s in stats["sources"]}
    for record in evals:
        by_source = record["eval_loss_by_source"]
        assert list(by_source) == [a, g] and by_source[a] != by_source[g]
        weighted = sum(by_source[k] * targets[k] for k in targets) / sum(targets.values())
        assert record["eval_loss"] == pytest.approx(weighted, rel=1e-9)
    labels = [line.get_label() for line in plot_loss_curves(load_run(folder.path)).axes[0].lines]
    assert labels == ["train loss", "eval loss", "eval loss: a.jsonl", "eval loss: g.jsonl"]
