"""The model card (generated from the run folder alone, metadata that huggingface_hub reads back) and the
hub upload (prepared and checked offline; a failure leaves the run completed and says why)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sft.analysis import read_samples
from sft.card import base_model, card_text, main as card_main
from sft.errors import ConfigError, DataError
from sft.hub import prepare_upload
from sft.run import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    from sft.config import TrainConfig

    root = tmp_path_factory.mktemp("card-runs")
    cfg = TrainConfig(experiment="card", model=str(tiny_model_dir), eval_rows=8, max_rows=64, max_length=128,
                      micro_batch_size=2, grad_accum_steps=2, lr=1e-3, max_steps=3, task_metric_rows=4, num_samples=2,
                      max_new_tokens=4, runs_root=str(root), save_model=True, precision="fp32")
    return run(cfg).path


def test_every_finished_run_gets_a_card_that_the_hub_client_reads(finished):
    from huggingface_hub import ModelCard

    readme = finished / "model" / "README.md"
    card = ModelCard.load(readme)
    summary = json.loads((finished / "summary.json").read_text())
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.license == "other"  # a local model folder whose README gives no licence
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"loss": round(summary["eval_loss_final"], 4),
                       "exact_match": round(summary["task_metric_after"], 4)}
    text = readme.read_text()
    for section in ("## Results", "## Usage", "## Training settings", "## Data", "## Loss curve",
                    "## Samples (held-out prompts)", "## Environment"):
        assert section in text, section
    assert (finished / "model" / "loss_curves.png").stat().st_size > 1000
    samples = read_samples(finished)
    assert all(s["response"].replace("|", "\\|") in text for s in samples if s["stage"] == "after" and s["response"])
    assert "`embedded:demo-tasks`" in text and "max_new_tokens=4, do_sample=False" in text
    assert card_text(finished) == text  # from the folder's files alone: the same card every time


def test_the_cards_usage_snippet_generates_what_the_run_generates(finished):
    from sft.chat import reply
    from sft.generation import Decoding
    from sft.modeling import load_model, load_tokenizer

    text = (finished / "model" / "README.md").read_text()
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0].replace('path = "."', f'path = "{finished / "model"}"')
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {})
    model, tokenizer = load_model(str(finished / "model")), load_tokenizer(str(finished / "model"))
    expected = reply(model, tokenizer, [{"role": "user", "content": "Hello!"}], Decoding(max_new_tokens=4, seed=42))
    assert printed.getvalue().strip() == expected


def test_base_model_and_licence_come_from_what_the_run_started_from(tmp_path):
    assert base_model({"model": "embedded:smollm2-135m-instruct"}) == ("HuggingFaceTB/SmolLM2-135M-Instruct",
                                                                       "apache-2.0")
    assert base_model({"model": "meta-llama/Llama-3.1-8B"}) == ("meta-llama/Llama-3.1-8B", "other")
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    assert base_model({"model": str(tmp_path)}) == (None, "mit")


@pytest.mark.parametrize("settings, on_hub, named_in_text", [
    ({"dataset": "org/train-set", "dataset_revision": "abc123", "eval_dataset": "org/test-set",
      "eval_dataset_revision": "def456", "eval_rows": 8}, ["org/train-set", "org/test-set"], []),
    ({"eval_dataset": "data/held_out.jsonl", "eval_rows": 8}, None,  # a relative path that is not here now
     ["`embedded:demo-tasks` (embedded in this toolkit)", "`data/held_out.jsonl` (a local file or folder)"]),
])
def test_hub_datasets_are_in_the_cards_metadata_and_other_data_in_its_text(finished, tmp_path, settings, on_hub,
                                                                          named_in_text):
    import shutil

    from huggingface_hub import ModelCard

    copy = tmp_path / finished.name
    shutil.copytree(finished, copy)
    record = json.loads((copy / "config.json").read_text())
    record["config"].update(settings)
    (copy / "config.json").write_text(json.dumps(record))
    text = card_text(copy)
    assert ModelCard(text).data.datasets == on_hub
    for name in named_in_text:
        assert name in text.split("## Results")[0]


def test_card_command_prints_the_card_and_refuses_an_unfinished_run(finished, tmp_path, capsys):
    assert card_main([str(finished), "--stdout"]) == 0
    assert capsys.readouterr().out.strip() == (finished / "model" / "README.md").read_text().strip()
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((finished / "config.json").read_text())
    (unfinished / "summary.json").write_text(json.dumps({"status": "running"}))
    assert card_main([str(unfinished)]) == 2
    assert "has not completed" in capsys.readouterr().err


def test_the_upload_is_prepared_and_checked_before_the_network(finished, tmp_path):
    plan = prepare_upload(finished, "me/tiny-sft")
    assert plan.private and plan.revision is None and plan.folder == finished / "model"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "loss_curves.png"} <= set(plan.files)
    with pytest.raises(ConfigError, match="push_to_hub: 'no-owner' is not of the form owner/name|not a hub"):
        prepare_upload(finished, "no-owner")
    bare = tmp_path / "bare"
    (bare / "model").mkdir(parents=True)
    (bare / "model" / "config.json").write_text("{}")
    with pytest.raises(DataError, match="the model has no card"):
        prepare_upload(bare, "me/tiny-sft")


@pytest.fixture(scope="module")
def refusing_hub():
    """A local server that answers every request as the hub answers a bad token: 401."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refuse(BaseHTTPRequestHandler):
        def _refuse(self):
            body = b'{"error": "Invalid credentials in Authorization header"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_HEAD = _refuse

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.mark.parametrize("env, reason", [
    ({"HF_HUB_OFFLINE": "1"}, "the hub client is in offline mode"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_not_a_real_token"}, "the hub is unreachable from here"),
    ({"HF_ENDPOINT": "REFUSING", "HF_TOKEN": "hf_not_a_real_token"}, "the hub refused the upload (401)"),
])
def test_a_failed_upload_says_why(finished, refusing_hub, env, reason):
    env = {k: refusing_hub if v == "REFUSING" else v for k, v in env.items()}
    done = subprocess.run([sys.executable, "-m", "sft.hub", str(finished), "me/tiny-sft"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert done.returncode == 1 and f"could not upload to me/tiny-sft: {reason}" in done.stderr, done.stderr


def test_a_run_whose_upload_fails_stays_completed(tiny_config, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = run(tiny_config(save_model=True, push_to_hub="me/tiny-sft", max_steps=1))
    summary = json.loads((folder.path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["push_to_hub"]["status"] == "failed"
    assert "offline mode" in summary["push_to_hub"]["reason"]
    assert summary["push_to_hub"]["retry"] == f"python -m sft.hub {folder.path} me/tiny-sft"
    assert "the run is complete, but uploading to me/tiny-sft failed" in capsys.readouterr().err
