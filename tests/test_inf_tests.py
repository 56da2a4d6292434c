"""The inference runtime script on a tiny random-init Llama: its CSV, forced token counts, fast-path outputs,
decoding settings and errors."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from inf_tests import runtime
from sft.errors import ConfigError

NEW_TOKENS = 5


def _run(model_dir, out_dir, *extra: str, tag: str | None = None) -> pd.DataFrame:
    argv = ["--models", f"random-init:{model_dir}", "--device", "cpu", "--batch-sizes", "1", "2",
            "--prompt-tokens", "40", "--new-tokens", str(NEW_TOKENS), "--repeats", "1", "--warmup", "0",
            "--out-dir", str(out_dir), *extra, *(["--tag", tag] if tag else [])]
    assert runtime.main(argv) == 0
    return pd.read_csv(out_dir / (f"runtime_cpu_{tag}.csv" if tag else "runtime_cpu.csv"), comment="#")


@pytest.fixture(scope="module")
def greedy(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("inf-greedy")
    return _run(tiny_model_dir, out), out


def test_csv_has_one_row_per_variant_batch_and_prompt_with_the_documented_columns(greedy):
    frame, out = greedy
    assert list(frame.columns) == runtime.COLUMNS
    assert sorted(zip(frame["variant"], frame["batch_size"])) == [
        ("generate", 1), ("generate", 2), ("static_cache", 1), ("static_cache", 2)]
    assert (out / "runtime_cpu.png").stat().st_size > 0
    assert (frame["peak_mem_kind"] == "process_peak_rss_growth").all()
    assert frame["bandwidth_bound_tok_s"].isna().all()  # no bandwidth table on the CPU
    assert frame["other_cpu_pct"].between(0, 100).all()
    assert (frame["ttft_ms_p50"] > 0).all() and (frame["latency_ms_p50"] > frame["ttft_ms_p50"]).all()
    assert list(frame["decode_tok_s_batch"]) == pytest.approx(list(frame["decode_tok_s"] * frame["batch_size"]),
                                                             rel=1e-3)  # the CSV keeps 3 decimals


def test_every_run_generates_exactly_new_tokens(greedy):
    frame, _ = greedy
    assert (frame["new_tokens_generated"] == NEW_TOKENS).all()


def test_greedy_static_cache_gives_the_same_tokens_as_plain_generate(greedy):
    frame, _ = greedy
    static = frame[frame["variant"] == "static_cache"]
    assert static["matches_generate"].all()
    digests = frame.pivot(index="batch_size", columns="variant", values="output_digest")
    assert (digests["generate"] == digests["static_cache"]).all()


def test_greedy_records_no_temperature_or_top_p(greedy):
    frame, _ = greedy
    assert frame["temperature"].isna().all() and frame["top_p"].isna().all()
    assert not frame["do_sample"].any()


def test_seeded_sampling_repeats_itself_and_differs_from_greedy(greedy, tiny_model_dir, tmp_path):
    frame, _ = greedy
    sample = ["--do-sample", "--temperature", "1.0", "--seed", "3", "--variants", "generate"]
    first = _run(tiny_model_dir, tmp_path, *sample, tag="a")
    second = _run(tiny_model_dir, tmp_path, *sample, tag="b")
    assert list(first["output_digest"]) == list(second["output_digest"])
    plain = frame[frame["variant"] == "generate"].sort_values("batch_size")
    assert set(first["output_digest"]).isdisjoint(plain["output_digest"])
    assert (first["temperature"] == 1.0).all() and first["do_sample"].all()


def test_sampling_settings_reach_generate_unchanged(tiny_model_dir, chatml_tokenizer):
    """transformers fills fields left None from its defaults (top_k=50); the config passed leaves none open."""
    from sft.modeling import load_model

    model = load_model(f"random-init:{tiny_model_dir}")
    settings = runtime.settings_from_args(["--device", "cpu", "--do-sample", "--temperature", "0.7",
                                           "--top-p", "0.9", "--new-tokens", "7"])
    # generate's own merge of the passed config with the model's and library defaults
    effective, _ = model._prepare_generation_config(runtime.generation_config("generate", chatml_tokenizer, settings))
    assert (effective.do_sample, effective.temperature, effective.top_p, effective.top_k) == (True, 0.7, 0.9, 0)
    assert effective.min_new_tokens == effective.max_new_tokens == 7
    assert effective.cache_implementation == "dynamic"


def test_fast_path_variants_configure_cache_and_compilation(chatml_tokenizer):
    settings = runtime.settings_from_args(["--device", "cpu"])
    static = runtime.generation_config("static_cache", chatml_tokenizer, settings)
    assert static.cache_implementation == "static" and static.disable_compile  # else a GPU would compile it
    compiled = runtime.generation_config("static_cache+compile", chatml_tokenizer, settings)
    assert compiled.cache_implementation == "static" and not compiled.disable_compile
    assert compiled.compile_config.mode == runtime.COMPILE_MODE


def test_prompts_have_the_exact_length_keep_the_chat_template_and_differ_by_row(chatml_tokenizer):
    ids = runtime.prompt_batch(chatml_tokenizer, 64, 3)
    assert ids.shape == (3, 64)
    assert len({tuple(row) for row in ids.tolist()}) == 3
    text = chatml_tokenizer.decode(ids[0])
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nSummarize these meeting notes" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_a_prompt_shorter_than_the_chat_template_is_refused(chatml_tokenizer):
    with pytest.raises(ConfigError, match="prompt_tokens: 20 leaves no room"):
        runtime.prompt_batch(chatml_tokenizer, 20, 1)


def test_a_bad_model_path_stops_with_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert runtime.main(["--models", str(missing), "--device", "cpu", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: model: {str(missing)!r} is neither an existing folder" in err
    assert not (tmp_path / "out").exists()


def test_a_run_folder_given_as_the_model_is_refused_naming_its_model_folder(tmp_path, capsys):
    run = tmp_path / "2026-01-01_00-00-00_demo"
    (run / "model").mkdir(parents=True)
    (run / "config.json").write_text('{"config": {}, "derived": {}}')
    (run / "metrics.jsonl").write_text("")
    assert runtime.main(["--models", str(run), "--device", "cpu", "--out-dir", str(tmp_path / "out")]) == 2
    assert f"error: model: {run} is a run folder, not a model folder; its finetuned model is in {run / 'model'}" \
        in capsys.readouterr().err


def test_compiling_on_the_cpu_is_refused_before_anything_loads(tmp_path, capsys):
    assert runtime.main(["--device", "cpu", "--variants", "static_cache+compile", "--out-dir", str(tmp_path)]) == 2
    assert "'static_cache+compile' needs a GPU" in capsys.readouterr().err


def test_bandwidth_bound_uses_the_weights_a_decode_step_reads(tiny_model_dir):
    from sft.modeling import load_model

    from transformers import AutoModelForCausalLM, LlamaConfig

    model = load_model(f"random-init:{tiny_model_dir}")  # tied embeddings: the table is read as the output layer
    assert runtime.weight_bytes_per_step(model) == sum(p.numel() * 4 for p in model.parameters())
    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        untied = AutoModelForCausalLM.from_config(config)
    all_bytes = sum(p.numel() * 4 for p in untied.parameters())
    assert runtime.weight_bytes_per_step(untied) == all_bytes - 1000 * 32 * 4  # only the output table is read
    assert runtime.memory_bandwidth(torch.device("cpu")) is None  # sft.perf: no bound on the CPU


def test_a_run_stopped_midway_keeps_its_rows_and_the_last_complete_results(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "runtime_cpu.csv").write_text("the last complete results\n")
    measure, calls = runtime.measure, []

    def stopped_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a timeout or Ctrl-C would stop it
        return measure(*args, **kwargs)

    monkeypatch.setattr(runtime, "measure", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model_dir, tmp_path)
    assert (tmp_path / "runtime_cpu.csv").read_text() == "the last complete results\n"
    partial = pd.read_csv(tmp_path / "runtime_cpu.partial.csv", comment="#")
    assert list(zip(partial["variant"], partial["batch_size"])) == [("generate", 1), ("static_cache", 1)]
