"""TrainConfig: every nonsense setting stops with a ConfigError naming the field; valid ones round-trip.
Experiment scripts: their settings are their UPPER_CASE constants, and their errors name them so."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

from sft.config import TrainConfig, script_spelling, settings_from
from sft.errors import ConfigError

BAD_SETTINGS = [
    ("lr", 0.0),
    ("lr", -1e-5),
    ("lr", math.nan),
    ("lr", math.inf),
    ("micro_batch_size", 0),
    ("micro_batch_size", -2),
    ("grad_accum_steps", 0),
    ("max_length", 0),
    ("precision", "fp16"),
    ("loss_on", "prompt"),
    ("too_long", "ignore"),
    ("template", "chatml"),
    ("epochs", "2"),
    ("epochs", 2.0),
    ("packing", "yes"),
    ("packing", 1),
    ("micro_batch_size", True),
    ("lr", "2e-5"),
    ("warmup_ratio", 1.5),
    ("warmup_ratio", 1.0),
    ("warmup_ratio", -0.1),
    ("eval_rows", 0.0),
    ("eval_rows", 1.5),
    ("eval_rows", 0),
    ("max_steps", 0),
    ("adam_betas", (0.9, 1.0)),
    ("max_grad_norm", 0.0),
    ("seed", -1),
    ("seed", 2**32),
]


@pytest.mark.parametrize("field,value", BAD_SETTINGS, ids=[f"{f}={v!r}" for f, v in BAD_SETTINGS])
def test_nonsense_setting_is_a_config_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}:") as err:
        TrainConfig(experiment="x", **{field: value})
    assert repr(value) in str(err.value) or str(value) in str(err.value)


@pytest.mark.parametrize("name", ["a/b", "a\\b", "two words", "", "  "])
def test_experiment_name_must_be_usable_as_a_folder_name(name):
    with pytest.raises(ConfigError, match="^experiment:"):
        TrainConfig(experiment=name)


def test_sampling_settings_are_checked_only_when_sampling():
    TrainConfig(experiment="x", temperature=0.0, top_p=0.0)  # greedy decoding ignores them
    with pytest.raises(ConfigError, match="^temperature:"):
        TrainConfig(experiment="x", do_sample=True, temperature=0.0)
    with pytest.raises(ConfigError, match="^top_p:"):
        TrainConfig(experiment="x", do_sample=True, top_p=1.5)


def test_valid_values_of_the_checked_kinds_are_accepted():
    cfg = TrainConfig(experiment="ok-name_1", lr=1, eval_rows=0.5, warmup_ratio=0.0, max_steps=None,
                      precision="bf16_pure", loss_on="all", packing=False)
    assert cfg.lr == 1 and cfg.eval_rows == 0.5
    with_eval_file = TrainConfig(experiment="x", eval_dataset="other.jsonl", eval_rows=None)
    assert with_eval_file.eval_rows is None


def test_valid_config_round_trips_through_to_dict():
    cfg = TrainConfig(experiment="round-trip", lr=3e-4, micro_batch_size=8, eval_rows=16, packing=False,
                      max_steps=10, extra={"note": "hello"})
    d = cfg.to_dict()
    assert d["experiment"] == "round-trip" and d["lr"] == 3e-4 and d["extra"] == {"note": "hello"}
    assert TrainConfig(**d) == cfg
    from_json = TrainConfig(**json.loads(json.dumps(d)))  # as read back from a run folder's config.json
    assert json.dumps(from_json.to_dict(), sort_keys=True) == json.dumps(d, sort_keys=True)


def test_replace_validates_the_new_value():
    cfg = TrainConfig(experiment="x")
    assert cfg.replace(lr=1e-3).lr == 1e-3
    with pytest.raises(ConfigError, match="^lr:"):
        cfg.replace(lr=0.0)


def test_int8_optimizer_states_need_pure_bf16_and_stochastic_rounding():
    TrainConfig(experiment="x", precision="bf16_pure", optimizer_state_dtype="int8")
    with pytest.raises(ConfigError, match="^optimizer_state_dtype: 'int8' needs precision='bf16_pure'"):
        TrainConfig(experiment="x", precision="bf16_autocast", optimizer_state_dtype="int8")
    with pytest.raises(ConfigError, match="^optimizer_state_dtype: 'int8' is implemented with bf16_update"):
        TrainConfig(experiment="x", precision="bf16_pure", bf16_update="kahan", optimizer_state_dtype="int8")


def test_optimizer_in_backward_needs_pure_bf16_one_micro_batch_and_no_clipping():
    TrainConfig(experiment="x", precision="bf16_pure", optimizer_in_backward=True, max_grad_norm=None)
    for settings, message in ((dict(precision="bf16_autocast", max_grad_norm=None), "needs precision='bf16_pure'"),
                              (dict(precision="bf16_pure", max_grad_norm=None, grad_accum_steps=2),
                               "needs grad_accum_steps=1, got 2"),
                              (dict(precision="bf16_pure"), "clipping to max_grad_norm=1.0")):
        with pytest.raises(ConfigError, match=f"^optimizer_in_backward: .*{re.escape(message)}"):
            TrainConfig(experiment="x", optimizer_in_backward=True, **settings)


def test_the_default_runs_root_is_the_repositorys_runs_folder_wherever_python_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(experiment="x").runs_root == str(Path(__file__).resolve().parents[1] / "runs")
    assert TrainConfig(**settings_from({"EXPERIMENT": "x", "RUNS_ROOT": "mine"})).runs_root == "mine"


@pytest.mark.parametrize("name", ["lr", "Lr"])
def test_a_setting_not_in_upper_case_is_an_error_not_ignored(name):
    with pytest.raises(ConfigError, match=rf"^{name}: settings are UPPER_CASE constants; write LR = "):
        settings_from({"EXPERIMENT": "x", name: 1e-3})


def test_the_scripts_own_names_imports_and_functions_are_not_settings():
    namespace = {"EXPERIMENT": "x", "_LR": 1e-3, "_lr": 1e-3, "__name__": "__main__", "seed": lambda: 0,
                 "json": json, "model": TrainConfig, "helper": 3}
    assert settings_from(namespace) == {"experiment": "x"}


def test_an_unknown_constant_gets_the_closest_settings_and_the_underscore_rule():
    with pytest.raises(ConfigError) as err:
        settings_from({"EXPERIMENT": "x", "LR_SCHEDUEL": "linear"})
    message = str(err.value)
    assert message.startswith("LR_SCHEDUEL: not a setting (did you mean LR_SCHEDULE?)")
    assert "starts with _ (e.g. _LR_SCHEDUEL)" in message
    assert "WEIGHT_DECAY" not in message and len(message) < 250  # no list of every setting


def run_main(namespace: dict, argv: list[str], monkeypatch, capsys) -> str:
    """What `main` prints when it stops on a user error before any data is read."""
    from sft.run import main

    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main(namespace)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    return line


SCRIPT = {"__name__": "__main__", "__file__": "exp.py"}


def test_a_script_given_command_line_arguments_stops_with_one_line(monkeypatch, capsys):
    line = run_main({**SCRIPT, "EXPERIMENT": "x", "LR": -1.0}, ["exp.py", "--lr", "1e-3"], monkeypatch, capsys)
    assert line.startswith("error: unexpected arguments '--lr 1e-3': an experiment script takes none")


def test_arguments_that_are_not_the_scripts_own_are_left_alone(monkeypatch, capsys):
    # a notebook kernel's arguments, or a script that is imported rather than run: the settings are checked
    notebook = {"__name__": "__main__", "EXPERIMENT": "x", "LR": -1.0}
    assert run_main(notebook, ["kernel.py", "-f", "k.json"], monkeypatch, capsys).startswith("error: LR:")
    imported = {"__name__": "exp", "__file__": "exp.py", "EXPERIMENT": "x", "LR": -1.0}
    assert run_main(imported, ["other.py", "--flag"], monkeypatch, capsys).startswith("error: LR:")


def test_errors_from_a_script_name_settings_as_the_script_spells_them(monkeypatch, capsys):
    line = run_main({**SCRIPT, "EXPERIMENT": "x", "LR": -1.0}, ["exp.py"], monkeypatch, capsys)
    assert line == "error: LR: must be > 0, got -1.0"
    line = run_main({**SCRIPT, "EXPERIMENT": "x", "PADDING_FREE": True}, ["exp.py"], monkeypatch, capsys)
    assert line == "error: PADDING_FREE: replaces packing; set PACKING=False to use it"


def test_a_script_without_experiment_is_told_what_to_write(monkeypatch, capsys):
    line = run_main({**SCRIPT, "LR": 1e-4}, ["exp.py"], monkeypatch, capsys)
    assert line.startswith('error: EXPERIMENT: not set; every experiment script sets EXPERIMENT = "<name>"')


def test_script_spelling_leaves_values_and_other_words_alone():
    assert script_spelling("model: /data/lr=3/x is missing") == "MODEL: /data/lr=3/x is missing"
    assert script_spelling("dataset file x.jsonl, line 2: bad (use lr=1)") == \
        "dataset file x.jsonl, line 2: bad (use LR=1)"
    assert script_spelling("loss_on: raise micro_batch_size") == "LOSS_ON: raise micro_batch_size"
