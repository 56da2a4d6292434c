"""The terminal chat, driven through a pseudo-terminal as a person would use it: streamed replies equal to
what the run's generation gives for the same conversation, several turns, /settings, /reset, --prompt."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft.chat import reply
from sft.generation import Decoding
from sft.modeling import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    from sft.config import TrainConfig
    from sft.run import run

    cfg = TrainConfig(experiment="chat", model=str(tiny_model_dir), eval_rows=8, max_rows=64, max_length=128,
                      micro_batch_size=2, grad_accum_steps=2, lr=1e-3, max_steps=2, task_metric_rows=2, num_samples=2,
                      max_new_tokens=6, runs_root=str(tmp_path_factory.mktemp("chat-runs")), save_model=True,
                      precision="fp32", report_to=())
    return run(cfg).path


class Terminal:
    """The chat in a child process whose standard input and output are a pseudo-terminal."""

    def __init__(self, args: list[str]):
        self.fd, child = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "sft.chat", *args], cwd=ROOT, stdin=child, stdout=child,
                                     stderr=child, close_fds=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        os.close(child)
        self.seen = ""

    def read_until(self, marker: str, timeout: float = 120) -> str:
        """What the chat printed up to the next `marker`."""
        end = time.time() + timeout
        while marker not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, end - time.time()))
            if not ready:
                raise TimeoutError(f"no {marker!r} after {self.seen[-500:]!r}")
            self.seen += os.read(self.fd, 4096).decode(errors="replace").replace("\r\n", "\n")
        out, _, self.seen = self.seen.partition(marker)
        return out

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())


def test_a_conversation_in_the_terminal(finished):
    model, tokenizer = load_model(str(finished / "model")), load_tokenizer(str(finished / "model"))
    run_decoding = Decoding(max_new_tokens=6, do_sample=False, seed=42)  # the run's samples' settings
    chat = Terminal([str(finished)])
    banner = chat.read_until("you> ")
    assert f"chatting with {finished / 'model'}" in banner and '"max_new_tokens": 6' in banner
    first = [{"role": "user", "content": "What is 2+2?"}]
    chat.send(first[0]["content"])
    answer = chat.read_until("you> ").split("model> ", 1)[1].strip()
    expected = reply(model, tokenizer, first, run_decoding)
    assert answer == expected.strip()
    chat.send("And 3+3?")  # a second turn: the reply follows the whole conversation
    second = first + [{"role": "assistant", "content": expected}, {"role": "user", "content": "And 3+3?"}]
    assert chat.read_until("you> ").split("model> ", 1)[1].strip() == reply(model, tokenizer, second, run_decoding)
    chat.send("/settings max_new_tokens=2 do_sample=false")
    assert json.loads(chat.read_until("you> ").strip().splitlines()[-1])["max_new_tokens"] == 2
    chat.send("/reset")
    assert "(new conversation)" in chat.read_until("you> ")
    chat.send("What is 2+2?")
    short = reply(model, tokenizer, first, Decoding(max_new_tokens=2, seed=42))
    assert chat.read_until("you> ").split("model> ", 1)[1].strip() == short
    chat.send("/quit")
    assert chat.proc.wait(timeout=30) == 0


def test_prompt_answers_once_and_exits(finished):
    done = subprocess.run([sys.executable, "-m", "sft.chat", str(finished), "--prompt", "What is 2+2?"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model, tokenizer = load_model(str(finished / "model")), load_tokenizer(str(finished / "model"))
    expected = reply(model, tokenizer, [{"role": "user", "content": "What is 2+2?"}], Decoding(6, False, seed=42))
    assert done.stdout.strip() == expected


def test_a_folder_without_a_model_is_one_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sft.chat", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and re.search("neither a run folder nor a model folder", done.stderr)


def test_bad_settings_are_refused_when_given_and_no_question_ends_the_chat(finished):
    chat = Terminal([str(finished)])
    chat.read_until("you> ")
    for bad, says in [("temperature=0 do_sample=true", "temperature: must be > 0, got 0.0"),
                      ("top_p=abc", "top_p takes a float, got 'abc'"),
                      ("do_sample=maybe", "do_sample takes a bool, got 'maybe'"),
                      ("max_new_tokens=0", "max_new_tokens: must be > 0, got 0")]:
        chat.send(f"/settings {bad}")
        out = chat.read_until("you> ").strip().splitlines()
        assert out[-2] == f"error: settings: {says}; nothing was changed" or says in out[-2], out
        assert json.loads(out[-1]) == {"max_new_tokens": 6, "do_sample": False, "seed": 42}
        chat.send("What is 2+2?")
        assert "model> " in chat.read_until("you> ")
    chat.send("/settings temperature=0")  # accepted while greedy, where it plays no part ...
    assert json.loads(chat.read_until("you> ").strip().splitlines()[-1])["do_sample"] is False
    chat.send("/settings do_sample=true")  # ... and refused once it would
    assert "error: settings: temperature: must be > 0, got 0.0 (with do_sample=True)" in chat.read_until("you> ")
    chat.send("What is 3+3?")
    assert "model> " in chat.read_until("you> ")
    chat.send("/quit")
    assert chat.proc.wait(timeout=30) == 0
    assert "Traceback" not in chat.seen


def test_a_reply_that_fails_is_one_error_line_and_the_chat_goes_on(finished, monkeypatch, capsys):
    import builtins

    import sft.chat
    from sft.template_traits import Reply

    lines = iter(["What is 2+2?", "And 3+3?", "/quit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    answers = iter([RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"), "6"])

    def flaky(model, tokenizer, messages, decoding, stream=None, tools=None):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        assert [m["content"] for m in messages] == ["And 3+3?"]  # the failed question is left out
        return Reply(answer)

    monkeypatch.setattr(sft.chat, "respond", flaky)
    assert sft.chat.main([str(finished)]) == 0
    out = capsys.readouterr().out
    assert "error: CUDA out of memory. Tried to allocate 2 GiB; the question is left out of the conversation" in out


def test_a_reply_with_reasoning_and_calls_is_shown_in_parts_and_kept_as_the_next_turn():
    from sft.chat import assistant_turn, show
    from sft.formats import validate_conversation
    from sft.template_traits import Reply

    answer = Reply("", "I need the calculator.", ({"name": "calculator", "arguments": {"expression": "2 + 2"}},))
    assert show(answer).splitlines() == ["  [reasoning] I need the calculator.",
                                         '  [tool call] calculator({"expression": "2 + 2"})']
    assert show(Reply("4")) == ""
    conversation = [{"role": "user", "content": "2 + 2?"}, assistant_turn(answer),
                    {"role": "tool", "name": "calculator", "content": "4"}, {"role": "assistant", "content": "4"}]
    assert validate_conversation(conversation)[1] == assistant_turn(answer)  # the form training reads
