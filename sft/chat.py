"""Talk to a finetuned model in the terminal, with the chat template and decoding settings of its run.

    python -m sft.chat runs/<run>                 # the run's model/, decoding as its samples were made
    python -m sft.chat runs/<run> --prompt "Hi"   # one answer, then exit
    python -m sft.chat path/to/model_folder       # any model folder (default decoding: greedy, 64 tokens)

Replies stream as they are generated. The conversation is multi-turn; `/reset` starts a new one,
`/settings` shows the decoding settings and `/settings temperature=0.7 do_sample=true` changes them,
`/quit` (or Ctrl-D) exits. Prompts are encoded by `sft.templates.encode_chat`, the function that encoded
the training examples, and decoded with `sft.generation`'s settings: what the run's samples show is what
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

from .errors import ConfigError, SFTError
from .generation import Decoding, generation_config, only_given_settings
from .templates import encode_chat

HELP = "/reset starts a new conversation, /settings shows or changes decoding (key=value ...), /quit exits"


def resolve(path: str) -> tuple[str, Decoding]:
    """The model to load and the decoding settings: a run folder's model/ and its run's decoding, or a model
    folder (or embedded model) with the default decoding."""
    folder = Path(path)
    if (folder / "config.json").is_file() and "config" in json.loads((folder / "config.json").read_text()):
        cfg = json.loads((folder / "config.json").read_text())["config"]
        if not (folder / "model" / "config.json").is_file():
            raise ConfigError(f"{folder}: the run saved no model (model/ is missing; it was made with "
                              f"save_model=False or has not finished)")
        return str(folder / "model"), Decoding(cfg["max_new_tokens"], cfg["do_sample"], cfg["temperature"],
                                               cfg["top_p"], cfg["seed"])
    if not path.startswith("embedded:") and not (folder / "config.json").is_file():
        raise ConfigError(f"{path}: neither a run folder nor a model folder (no config.json)")
    return path, Decoding()


def change(decoding: Decoding, assignments: list[str]) -> Decoding:
    """`decoding` with `key=value` changes, each value read as its field's type.

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
            updates[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise ConfigError(f"settings: {key} takes a {kind.__name__}, got {value!r}") from None
    return dataclasses.replace(decoding, **updates)


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict], decoding: Decoding, stream=None) -> str:
    """The model's answer to a conversation ending with a user turn, printed to `stream` token by token."""
    from transformers import TextStreamer

    device = next(model.parameters()).device
    ids = torch.tensor([encode_chat(tokenizer, messages, add_generation_prompt=True).input_ids], device=device)
    streamer = None
    if stream is not None:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda text, stream_end=False: print(text, end="" if not stream_end else "\n",
                                                                          file=stream, flush=True)
    with only_given_settings(model, decoding.seed):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=generation_config(tokenizer, decoding), streamer=streamer)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        path, decoding = resolve(args.path)
        decoding = change(decoding, args.set)
        model, tokenizer = load(path, args.device)
    except SFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        reply(model, tokenizer, start + [{"role": "user", "content": args.prompt}], decoding, sys.stdout)
        return 0
    with contextlib.suppress(ImportError):  # line editing and history in input() (not on every platform)
        import readline  # noqa: F401
    print(f"chatting with {path} ({json.dumps(decoding.record())}); {HELP}", flush=True)
    messages = list(start)
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            return 0
        command, *rest = text.strip().split() or [""]
        if command == "/quit":
            return 0
        if command == "/reset":
            messages = list(start)
            print("(new conversation)", flush=True)
            continue
        if command == "/settings":
            try:
                decoding = change(decoding, rest)
            except ConfigError as e:
                print(f"error: {e}", flush=True)
            print(json.dumps(decoding.record()), flush=True)
            continue
        if command.startswith("/") or not text.strip():
            print(HELP, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        messages.append({"role": "assistant", "content": reply(model, tokenizer, messages, decoding, sys.stdout)})


if __name__ == "__main__":
    sys.exit(main())
