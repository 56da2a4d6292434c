"""Adapters (finetune="lora"): the base stays bitwise frozen, the merged model is base plus adapter, checkpoints
hold the adapter and resume bitwise, and packing, accumulation and two processes train as in full finetuning."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import sft.modeling
from sft.analysis import read_metrics
from sft.config import TrainConfig
from sft.errors import ConfigError
from sft.loop import train_step
from sft.lora import add_adapters, flops_per_token
from sft.loss import LossModel
from sft.run import run
from sft.setup import build
from tests.test_distributed import CHILD as TWO_PROCESS_CHILD, ROOT, free_port
from tests.test_packing import demo_examples as demo_examples, micro_batches  # the fixture, shared
from tests.test_resume import losses, run_child

LORA = dict(finetune="lora", lora_r=4, lora_alpha=8, lr=1e-2)


def train_losses(folder) -> list[float]:
    return [m["loss"] for m in read_metrics(folder, "train")]


def test_training_moves_the_adapters_only_and_records_what_trained(tiny_config):
    setup = build(tiny_config(**LORA, max_steps=2))
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters()}
    for batches in setup.batches():
        train_step(setup, batches)
    after = dict(setup.model.named_parameters())
    frozen = [n for n in before if "lora_" not in n]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)  # bitwise unchanged
    assert all(not after[n].requires_grad for n in frozen)
    moved = [n for n in before if "lora_B" in n and not torch.equal(before[n], after[n])]
    assert len(moved) == 2 * 7  # every linear layer of both decoder layers (all-linear), the head excluded
    derived = setup.derived
    assert derived["trainable_parameters"] == sum(p.numel() for n, p in after.items() if "lora_" in n)
    assert derived["num_parameters"] == sum(p.numel() for p in after.values())
    assert derived["bf16_update"] is None and derived["optimizer"] == "AdamW (foreach)"
    assert derived["adapter"]["r"] == 4 and derived["adapter"]["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert derived["adapter"]["adapted_layers"] == 2 * 7
    assert all(p.dtype == torch.float32 for p in after.values() if p.requires_grad)


def test_adapter_folder_merged_model_and_inference_loading_agree(tiny_config, tiny_model_dir):
    from peft import PeftModel

    folder = run(tiny_config(**LORA, save_model=True, merge_adapter=True)).path
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in (folder / "model").iterdir()}
    assert not (folder / "model" / "model.safetensors").exists()  # the adapter only, not the base
    adapter_config = json.loads((folder / "model" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 200, 3000, 17, 4]])
    base = sft.modeling.load_model(str(tiny_model_dir))
    with_adapter = PeftModel.from_pretrained(base, str(folder / "model")).eval()
    merged = sft.modeling.load_model(str(folder / "model_merged")).eval()
    loaded = sft.modeling.load_model(str(folder / "model")).eval()  # what sft.chat and sft.evaluate load
    with torch.no_grad():
        want = with_adapter(input_ids=ids).logits
        plain = sft.modeling.load_model(str(tiny_model_dir))(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert (want - plain).abs().max() > 1e-3  # the adapter changed the model
    summary = json.loads((folder / "summary.json").read_text())
    assert 0 < summary["trainable_parameters"] < summary["num_parameters"] / 10


def test_an_adapter_run_resumes_bitwise_from_checkpoints_that_hold_the_adapter_only(tiny_config, tmp_path):
    settings = tiny_config(**LORA, max_steps=4, checkpoint_every=2, keep_checkpoints_after_completion=1,
                           lora_dropout=0.1, task_metric=None, num_samples=0).to_dict()
    reference_run = run(TrainConfig(**dict(settings, runs_root=str(tmp_path / "reference")))).path
    saved = torch.load(reference_run / "checkpoints" / "step-000004" / "pytorch_model.bin", weights_only=True)
    assert saved and all("lora_" in k for k in saved)  # no frozen weight in the checkpoint

    settings = dict(settings, runs_root=str(tmp_path / "killed"))
    proc = run_child(settings, 3, "SIGTERM")
    assert proc.returncode == 143, proc.stderr[-2000:]
    (folder,) = list((tmp_path / "killed").iterdir())
    run(TrainConfig(**dict(settings, resume=str(folder))))
    assert losses(folder) == losses(reference_run)  # dropout's random state is restored too
    assert read_metrics(folder, "eval")[-1]["eval_loss"] == read_metrics(reference_run, "eval")[-1]["eval_loss"]


@pytest.mark.parametrize("impl", ["full", "selected"])
def test_adapter_loss_and_grads_packed_equal_each_example_alone(tiny_model_dir, chatml_tokenizer, demo_examples,
                                                                impl):
    model = sft.modeling.load_model(str(tiny_model_dir), attn_implementation="sdpa")
    add_adapters(model, TrainConfig(experiment="x", **LORA))
    with torch.no_grad():  # lora_B starts at zero, where the adapters change nothing: give them weight
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    lm = LossModel(model, impl, chunk_tokens=8)
    names = [n for n, p in lm.model.named_parameters() if p.requires_grad]

    def loss_and_grads(batches):
        lm.zero_grad()
        total = sum(lm(**{k: v for k, v in b.items() if k != "num_real_tokens"}) for b in batches)
        total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in lm.model.named_parameters() if n in names}

    alone = loss_and_grads([{"input_ids": torch.tensor([e.input_ids]), "targets": torch.tensor([e.targets])}
                            for e in demo_examples])
    packed = loss_and_grads(micro_batches(demo_examples, packing=True, rows_per_batch=2, row_length=96,
                                          pad_id=chatml_tokenizer.pad_token_id, seed=0))
    torch.testing.assert_close(packed[0], alone[0], rtol=1e-5, atol=0)
    assert all(alone[1][n].abs().max() > 0 for n in names)
    for n in names:
        torch.testing.assert_close(packed[1][n], alone[1][n], rtol=1e-4, atol=1e-4 * alone[1][n].abs().max().item())


@pytest.mark.parametrize("variant", [{}, dict(use_dora=True, use_rslora=True)])
def test_accumulated_micro_batches_equal_one_batch_under_adapters(tiny_config, variant):
    common = dict(LORA, **variant, packing=True, group_by_length=False, max_length=64, task_metric=None,
                  num_samples=0)
    big = run(tiny_config(micro_batch_size=4, grad_accum_steps=1, **common)).path
    accumulated = run(tiny_config(micro_batch_size=1, grad_accum_steps=4, **common)).path
    assert train_losses(big) == pytest.approx(train_losses(accumulated), rel=1e-5)
    assert train_losses(big)[-1] < train_losses(big)[0]


def test_two_processes_match_one_process_under_adapters(tiny_config, tmp_path):
    one = run(tiny_config(**LORA, micro_batch_size=2, grad_accum_steps=2, runs_root=str(tmp_path / "one"))).path
    settings = tiny_config(**LORA, micro_batch_size=2, grad_accum_steps=1, runs_root=str(tmp_path / "two")).to_dict()
    script = tmp_path / "child.py"
    script.write_text(TWO_PROCESS_CHILD)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "sft" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port",
                           str(free_port()), str(script), json.dumps(settings)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (two,) = list((tmp_path / "two").iterdir())
    assert json.loads((two / "config.json").read_text())["derived"]["world_size"] == 2
    assert train_losses(two) == pytest.approx(train_losses(one), rel=1e-5)
    assert [m["eval_loss"] for m in read_metrics(two, "eval")] == pytest.approx(
        [m["eval_loss"] for m in read_metrics(one, "eval")], rel=1e-5)


def test_modules_to_save_train_in_full_and_keep_tied_embeddings_tied(tiny_config):
    setup = build(tiny_config(**LORA, modules_to_save=("embed_tokens",), max_steps=1))
    train_step(setup, next(setup.batches()))
    inner = setup.model
    assert inner.get_input_embeddings().modules_to_save["default"].weight.requires_grad
    assert inner.get_output_embeddings().weight.data_ptr() == \
        inner.get_input_embeddings().modules_to_save["default"].weight.data_ptr()  # still one matrix


@pytest.mark.parametrize("settings, message", [
    (dict(lora_r=8), "^lora_r: applies to adapters; set finetune='lora'"),
    (dict(merge_adapter=True), "^merge_adapter: applies to adapters"),
    (dict(LORA, lora_r=0), "^lora_r: must be > 0"),
    (dict(LORA, lora_dropout=1.0), r"^lora_dropout: must be in \[0, 1\)"),
    (dict(LORA, lora_target_modules=()), "^lora_target_modules: 'all-linear' or module names"),
    (dict(LORA, precision="bf16_pure", optimizer_state_dtype="int8"),
     "^optimizer_state_dtype: 'int8' cannot be combined with finetune='lora'"),
    (dict(LORA, precision="bf16_pure", optimizer_kernel="triton"), "^optimizer_kernel: 'triton' cannot be combined"),
    (dict(LORA, precision="bf16_pure", optimizer_in_backward=True, grad_accum_steps=1, max_grad_norm=None),
     "^optimizer_in_backward: True cannot be combined with finetune='lora'"),
    (dict(LORA, precision="bf16_pure", float8=True), "^float8: True cannot be combined with finetune='lora'"),
    (dict(LORA, precision="bf16_pure", modules_to_save=("embed_tokens",)),
     "^modules_to_save: modules trained in full need fp32 weights"),
    (dict(LORA, load_in_4bit=True, precision="fp32"), "^load_in_4bit: the 4-bit base computes in bf16"),
])
def test_each_invalid_adapter_combination_is_one_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(experiment="x", **settings)


def test_qlora_without_a_cuda_gpu_stops_before_the_data_and_the_model(tiny_config, monkeypatch):
    monkeypatch.setattr(sft.modeling, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(sft.setup, "prepare_data", lambda *a, **k: pytest.fail("the data was read"))
    with pytest.raises(ConfigError, match="^load_in_4bit: 4-bit NF4 weights .* need a CUDA GPU, and this run is on "
                                          "cpu; set load_in_4bit=False"):
        run(tiny_config(**LORA, load_in_4bit=True, precision="bf16_pure"))


def test_target_modules_that_match_nothing_are_one_error(tiny_config):
    with pytest.raises(ConfigError, match="^lora_target_modules: .*nonexistent"):
        run(tiny_config(**LORA, lora_target_modules=("nonexistent",)))


def test_mfu_counts_no_weight_gradient_matmuls_for_frozen_weights():
    assert flops_per_token(1000, None) == 6000
    assert flops_per_token(1000, 10) == 4 * 1000 + 2 * 10  # 4 x frozen 990 + 6 x trainable 10


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A finished adapter run with its merged model, whose held-out set is a separate file."""
    from tests.test_evaluate import QUESTIONS
    from tests.conftest import write_jsonl

    tmp = tmp_path_factory.mktemp("lora_run")
    held_out = write_jsonl(tmp / "held_out.jsonl", [{"messages": [{"role": "user", "content": q},
                                                                  {"role": "assistant", "content": a}]}
                                                    for q, a in QUESTIONS])
    cfg = TrainConfig(experiment="lora", model=str(tiny_model_dir), max_rows=64, eval_dataset=held_out,
                      max_length=128, micro_batch_size=2, max_steps=3, task_metric_rows=4, num_samples=2,
                      max_new_tokens=4, runs_root=str(tmp / "runs"), precision="fp32", report_to=(),
                      merge_adapter=True, **LORA)
    return run(cfg).path, held_out


def test_evaluate_chat_card_and_upload_work_on_an_adapter_run(lora_run):
    from sft import chat, hub
    from sft.card import card_data
    from sft.analysis import load_run
    from sft.evaluate import evaluate

    path, held_out = lora_run
    result = json.loads(evaluate(path, dataset=held_out).read_text())
    summary = json.loads((path / "summary.json").read_text())
    assert result["eval_loss"] == pytest.approx(summary["eval_loss_final"], rel=1e-5)  # base + adapter, merged
    assert result["exact_match"] == summary["task_metric_after"]
    model_path, _ = chat.resolve(str(path))
    assert model_path == str(path / "model")
    data, card = card_data(load_run(path)), (path / "model" / "README.md").read_text()
    assert data.library_name == "peft" and "lora" in data.tags
    assert "LoRA adapter (rank 4, alpha 8, on down_proj, gate_proj" in card
    assert "library_name: transformers" in (path / "model_merged" / "README.md").read_text()
    assert hub.prepare_upload(path, "me/tuned").folder == path / "model_merged"  # the merged model is served


def test_an_lm_eval_task_on_an_adapter_run(lora_run, tmp_path):
    pytest.importorskip("lm_eval")
    from tests.test_evaluate import QUESTIONS
    from tests.conftest import write_jsonl

    path, _ = lora_run
    data = write_jsonl(tmp_path / "mc.jsonl", [{"question": q, "choices": [a, "none of these"], "answer": 0}
                                                for q, a in QUESTIONS])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_local.yaml").write_text(
        "task: tiny_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + data + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    done = subprocess.run([sys.executable, "-m", "sft.evaluate", str(path), "--lm-eval-tasks", "tiny_local",
                           "--lm-eval-include", str(tmp_path / "tasks"), "--name", "lm_eval"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((path / "eval" / "lm_eval.json").read_text())["lm_eval"]["results"]["tiny_local"]
    assert 0.0 <= results["acc,none"] <= 1.0


def test_adapters_train_alike_with_recomputation_and_compiled_layers(tiny_config):
    """Activation checkpointing recomputes the adapted layers, regional compile compiles them: the losses are
    those of the plain eager run (compiled kernels round differently: to float tolerance)."""
    common = dict(LORA, max_steps=2, task_metric=None, num_samples=0)
    plain = train_losses(run(tiny_config(**common)).path)
    recomputed = train_losses(run(tiny_config(**common, gradient_checkpointing=True)).path)
    compiled = train_losses(run(tiny_config(**common, compile=True)).path)
    assert recomputed == pytest.approx(plain, rel=1e-6)
    assert compiled == pytest.approx(plain, rel=1e-4)


def test_a_bf16_base_keeps_fp32_adapters_and_fp32_adamw(tiny_config):
    setup = build(tiny_config(**LORA, precision="bf16_pure", max_steps=1))
    params = dict(setup.model.named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    assert isinstance(getattr(setup.optimizer, "optimizer", setup.optimizer), torch.optim.AdamW)
    assert setup.derived["bf16_update"] is None  # no bf16 weight takes an update
    assert train_step(setup, next(setup.batches())).loss > 0


def test_mpt_packed_attention_trains_adapters(tmp_path):
    """MPT's own attention module (sft.mpt_attention) calls the adapted Wqkv and out_proj layers."""
    from bench.synthetic import model_folder
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"say {i}", "completion": f"{i} {i}"} for i in range(24)])
    cfg = TrainConfig(experiment="mpt", model=f"random-init:{model_folder('tiny-mpt', tmp_path / 'mpt')}",
                      dataset=data, template="plain", eval_rows=4, max_length=64, micro_batch_size=2, max_steps=2,
                      task_metric=None, num_samples=0, save_model=False, precision="fp32", report_to=(),
                      runs_root=str(tmp_path / "runs"), **LORA)
    setup = build(cfg)
    assert setup.derived["attn_implementation"] != "eager"  # the packed ALiBi path
    adapted = {n.split(".")[-4] for n, _ in setup.model.named_parameters() if "lora_A" in n}
    assert {"Wqkv", "out_proj"} <= adapted
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters() if "lora_B" in n}
    train_step(setup, next(setup.batches()))
    assert all(not torch.equal(before[n], p) for n, p in setup.model.named_parameters() if "lora_B" in n)
