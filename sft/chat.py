"""Talk to a finetuned model in the terminal, with the chat template and decoding settings of its run.

    python -m sft.chat runs/<run>                 # the run's model/, decoding as its samples were made
    python -m sft.chat runs/<run> --prompt "Hi"   # one answer, then exit
    python -m sft.chat path/to/model_folder       # any model folder (default decoding: greedy, 64 tokens)

Replies stream as they are generated. The conversation is multi-turn; `/reset` starts a new one,
`/settings` shows the decoding settings and `/settings temperature=0.7 do_sample=true` changes them,
`/quit` (or Ctrl-D) exits. `--tools tools.json` gives the model function schemas (a JSON list, as a row's
`tools`); when it calls one, `/tool <result>` answers the call and the model goes on. A reply with reasoning
or tool calls is shown again in its parts after it streams. Prompts are encoded by
`sft.templates.encode_chat`, the function that encoded the training examples, and decoded with
`sft.generation`'s settings: what the run's samples show is what
this chat gives for the same conversation.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch

from .config import TrainConfig
from .errors import ConfigError, SFTError
from .generation import Decoding, generation_config, only_given_settings
from .modeling import is_model_folder
from .run_folder import read_config
from .template_traits import Reply, parse_reply
from .templates import encode_chat

HELP = ("/reset starts a new conversation, /settings shows or changes decoding (key=value ...), /tool TEXT answers "
        "the model's tool call with TEXT, /quit exits")


def resolve(path: str) -> tuple[str, Decoding]:
    """The model to load and the decoding settings: a run folder's model/ and its run's decoding, or a model
    folder (or embedded model) with the default decoding."""
    folder = Path(path)
    record = read_config(folder)
    if record is not None and "config" in record:
        if not is_model_folder(folder / "model"):
            raise ConfigError(f"{folder}: the run saved no model (model/ is missing; it was made with "
                              f"save_model=False or has not finished)")
        return str(folder / "model"), Decoding.from_config(record["config"])
    if not path.startswith("embedded:") and not is_model_folder(folder):
        raise ConfigError(f"{path}: neither a run folder nor a model folder (no config.json)")
    return path, Decoding()


def change(decoding: Decoding, assignments: list[str]) -> Decoding:
    """`decoding` with `key=value` changes, each value read as its field's type and the result checked as a
    run's decoding settings are (so a setting that generation would refuse is refused here, when given).

    >>> change(Decoding(), ["temperature=0.7", "do_sample=true", "max_new_tokens=20"])
    Decoding(max_new_tokens=20, do_sample=True, temperature=0.7, top_p=1.0, seed=0)
    """
    fields = {f.name: f for f in dataclasses.fields(Decoding)}
    updates = {}
    for item in assignments:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            raise ConfigError(f"settings: expected key=value with a key among {', '.join(fields)}, got {item!r}")
        kind = type(getattr(decoding, key))
        try:
            updates[key] = BOOLEANS[value.lower()] if kind is bool else kind(value)
        except (ValueError, KeyError):
            raise ConfigError(f"settings: {key} takes a {kind.__name__}, got {value!r}") from None
    changed = dataclasses.replace(decoding, **updates)
    try:
        TrainConfig(experiment="chat", **dataclasses.asdict(changed))
    except ConfigError as e:
        raise ConfigError(f"settings: {e}" + ("" if changed.do_sample == decoding.do_sample or "do_sample" not in
                                              updates else f" (with do_sample={changed.do_sample})")
                          + "; nothing was changed") from None
    return changed


BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict], decoding: Decoding, stream=None, tools=None) -> str:
    """The model's answer to a conversation ending with a user turn, printed to `stream` token by token."""
    return respond(model, tokenizer, messages, decoding, stream, tools).content


def respond(model, tokenizer, messages: list[dict], decoding: Decoding, stream=None, tools=None) -> Reply:
    """The model's reply to a conversation ending with a user or tool turn (printed to `stream` token by token),
    split into reasoning, answer and tool calls in the chat template's format."""
    from transformers import TextStreamer

    device = next(model.parameters()).device
    ids = torch.tensor([encode_chat(tokenizer, messages, add_generation_prompt=True, tools=tools).input_ids],
                       device=device)
    streamer = None
    if stream is not None:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda text, stream_end=False: print(text, end="" if not stream_end else "\n",
                                                                          file=stream, flush=True)
    with only_given_settings(model, decoding.seed):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=generation_config(tokenizer, decoding), streamer=streamer)
    return parse_reply(tokenizer, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False))


def show(answer: Reply) -> str:
    """The reply's parts apart, after the streamed text: its reasoning, answer and tool calls ("" for a plain
    answer)."""
    if answer.reasoning is None and not answer.tool_calls:
        return ""
    lines = [f"  [reasoning] {answer.reasoning}"] if answer.reasoning is not None else []
    lines += [f"  [answer] {answer.content}"] if answer.content else []
    lines += [f"  [tool call] {c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})"
              for c in answer.tool_calls]
    return "\n".join(lines)


def assistant_turn(answer: Reply) -> dict:
    """The reply as the conversation's next assistant turn (in the form training reads)."""
    turn = {"role": "assistant", "content": answer.content}
    if answer.reasoning:
        turn["reasoning_content"] = answer.reasoning
    if answer.tool_calls:
        turn["tool_calls"] = [{"type": "function", "function": c} for c in answer.tool_calls]
    return turn


def read_tools(path: str | None) -> list | None:
    """The function schemas of a `--tools` file, checked as a row's `tools` are."""
    if path is None:
        return None
    from .formats import MalformedRow, validate_tools

    try:
        return validate_tools(json.loads(Path(path).read_text()))
    except (OSError, ValueError, MalformedRow) as e:
        raise ConfigError(f"--tools: {path} is not a JSON list of function schemas ({e})") from None


def load(path: str, device: str):
    from .modeling import load_model, load_tokenizer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return load_model(path, dtype=dtype, device=device).eval(), load_tokenizer(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run folder, a model folder, or embedded:smollm2-135m-instruct")
    parser.add_argument("--prompt", help="answer this once and exit")
    parser.add_argument("--system", help="a system message at the start of every conversation")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="decoding changes, as /settings")
    parser.add_argument("--tools", help="a JSON file of function schemas the model may call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        path, decoding = resolve(args.path)
        decoding = change(decoding, args.set)
        tools = read_tools(args.tools)
        model, tokenizer = load(path, args.device)
    except SFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        answer = respond(model, tokenizer, start + [{"role": "user", "content": args.prompt}], decoding, sys.stdout,
                         tools)
        if show(answer):
            print(show(answer), flush=True)
        return 0
    with contextlib.suppress(ImportError):  # line editing and history in input() (not on every platform)
        import readline  # noqa: F401
    print(f"chatting with {path} ({json.dumps(decoding.record())}); {HELP}", flush=True)
    return Session(model, tokenizer, decoding, tools, start).loop()


@dataclasses.dataclass
class Session:
    """A terminal conversation: the turns so far and the decoding settings, changed by the commands."""
    model: object
    tokenizer: object
    decoding: Decoding
    tools: list | None
    start: list[dict]

    def loop(self) -> int:
        self.messages = list(self.start)
        while True:
            try:
                text = input("you> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                return 130
            command, *rest = text.strip().split() or [""]
            if command == "/quit":
                return 0
            question = self.command(command, rest, text)
            if question is not None:
                self.ask(question)

    def command(self, command: str, rest: list[str], text: str) -> list[dict] | None:
        """The conversation to answer next, or None after a command that only changes the settings."""
        if command == "/reset":
            self.messages = list(self.start)
            print("(new conversation)", flush=True)
        elif command == "/settings":
            try:
                self.decoding = change(self.decoding, rest)
            except ConfigError as e:
                print(f"error: {e}", flush=True)
            print(json.dumps(self.decoding.record()), flush=True)
        elif command == "/tool":
            last = self.messages[-1] if self.messages else {}
            calls = last.get("tool_calls") if last.get("role") == "assistant" else None
            if calls and rest:
                return self.messages + [{"role": "tool", "name": calls[-1]["function"]["name"],
                                         "content": text.strip()[len("/tool"):].strip()}]
            print("error: /tool TEXT answers the model's last tool call; there is none to answer" if not calls
                  else "error: /tool needs the tool's result", flush=True)
        elif command.startswith("/") or not text.strip():
            print(HELP, flush=True)
        else:
            return self.messages + [{"role": "user", "content": text}]
        return None

    def ask(self, question: list[dict]) -> None:
        """The model's reply to `question`; a reply that fails or is stopped leaves the conversation as it was."""
        print("model> ", end="", flush=True)
        try:
            answer = respond(self.model, self.tokenizer, question, self.decoding, sys.stdout, self.tools)
        except KeyboardInterrupt:
            print("\n(stopped; the question is left out of the conversation)", flush=True)
            return
        except Exception as e:  # noqa: BLE001 - a reply that fails ends that reply, never the chat
            print(f"\nerror: {' '.join(str(e).split()) or type(e).__name__}; the question is left out of the "
                  f"conversation", flush=True)
            return
        if show(answer):
            print(show(answer), flush=True)
        self.messages = question + [assistant_turn(answer)]


if __name__ == "__main__":
    sys.exit(main())
