"""Adapters on a frozen base model: LoRA, DoRA and QLoRA, built by peft (`finetune="lora"`).

peft injects the adapters into the loaded transformers model in place, so the rest of the toolkit trains
that very model: the loss, packing, regional compile and activation checkpointing see the same modules,
now with adapters inside the targeted linear layers. The `PeftModel` that wraps it is kept for what peft
does best: the adapter's files (`adapter_config.json`, `adapter_model.safetensors`, peft's hub format)
and merging.

- The trainable weights (adapters, and `modules_to_save`) are fp32 whatever the base's dtype, so they
  take fp32 AdamW (torch's) and their updates are precise; with `precision="bf16_pure"` the frozen base
  is bf16, with `load_in_4bit` (QLoRA) 4-bit NF4 with double quantization and bf16 compute.
- Checkpoints hold the trainable weights and the optimizer state only (`checkpoint_hooks`); resume
  reloads the base from its source and the adapters from the checkpoint, and continues bitwise.
- A run's `model/` is the adapter and the tokenizer; `adapter_config.json` names the base as the run did
  (`base_model_name_or_path`: the hub id, local folder or embedded name, `revision`: its commit), and
  `merged_model` loads the base with the adapter merged for inference (`sft.chat`, `sft.evaluate`).
- MFU counts 4 x parameters + 2 x trainable parameters FLOPs per token (`flops_per_token`): the forward
  and input-gradient matmuls of every weight, and the weight-gradient matmuls of the trainable ones only
  (the frozen weights' are never done).
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch

from .errors import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MFU_COUNT = "4 x parameters + 2 x trainable parameters per token (the frozen weights' gradient matmuls are not done)"


def lora_config(cfg, model):
    """peft's LoraConfig for the run's settings; tied embeddings stay tied when `modules_to_save` names one."""
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    modules = list(cfg.modules_to_save) if cfg.modules_to_save else None
    tying = {"ensure_weight_tying": True} if modules and getattr(model.config, "tie_word_embeddings", False) else {}
    return LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets if isinstance(targets, str) else list(targets),
                      use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, modules_to_save=modules, **tying)


def add_adapters(model, cfg):
    """Injects the adapters into `model` (in place) and returns the PeftModel around it. Only the adapters and
    `modules_to_save` train, in fp32; the adapter's config names the base as the run does."""
    from peft import get_peft_model

    try:
        with _quiet():
            wrapped = get_peft_model(model, lora_config(cfg, model), autocast_adapter_dtype=True)
    except ValueError as e:  # target modules that match nothing, or modules peft cannot adapt
        raise ConfigError(f"lora_target_modules: {' '.join(str(e).split())}") from e
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # modules_to_save's copies come in the base's dtype
    adapter = wrapped.peft_config["default"]
    adapter.base_model_name_or_path, adapter.revision = cfg.model, cfg.model_revision
    return wrapped


def adapted_layers(model: torch.nn.Module) -> int:
    """How many layers carry an adapter."""
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_token(num_parameters: int, trainable: int | None) -> int:
    """Training matmul FLOPs per token: 6 x parameters in full finetuning; with adapters (trainable given), the
    frozen weights do the forward (2) and input-gradient (2) matmuls but no weight-gradient ones."""
    return 6 * num_parameters if trainable is None else 4 * num_parameters + 2 * trainable


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The PeftModel's state dict from the trained model's (transformers names): what save_pretrained keeps."""
    return {f"base_model.model.{k}": v for k, v in state.items()}


def save_adapter(wrapped, state: dict[str, torch.Tensor], path: Path) -> None:
    """Writes the adapter's files (peft's format) from the trained model's state dict."""
    # the embeddings are saved when they train (modules_to_save), never because peft cannot tell whether the
    # vocabulary changed: this toolkit never resizes it
    wrapped.save_pretrained(path, state_dict=adapter_state(state), save_embedding_layers=False)


def is_adapter(folder) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_base(folder) -> tuple[str, str | None]:
    """The base model an adapter folder names, and its revision."""
    record = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    base = record.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"model: {folder} is an adapter that names no base model (base_model_name_or_path)")
    return base, record.get("revision")


def merged_model(folder, *, dtype: torch.dtype, attn_implementation: str | None = None,
                 trust_remote_code: bool = False, device: torch.device | str = "cpu"):
    """The base model with the adapter of `folder` merged into its weights: a plain transformers model."""
    from peft import PeftModel

    from .modeling import load_model

    base, revision = adapter_base(folder)
    model = load_model(base, revision, dtype=dtype, attn_implementation=attn_implementation,
                       trust_remote_code=trust_remote_code, device=device)
    with _quiet():
        return PeftModel.from_pretrained(model, str(folder)).merge_and_unload()


def checkpoint_hooks(accelerator) -> None:
    """Checkpoints of an adapter run keep the trainable weights only: each model's saved state drops the frozen
    weights, and loading one restores exactly the trainable weights (the base comes from its source)."""

    def keep_trainable(models, weights, output_dir) -> None:
        for model, state in zip(models, weights):
            trainable = _trainable_names(model)
            for key in [k for k in state if k not in trainable]:
                del state[key]

    def load_trainable(models, input_dir) -> None:
        for i, model in enumerate(models):
            path = Path(input_dir) / ("pytorch_model.bin" if i == 0 else f"pytorch_model_{i}.bin")
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing = _trainable_names(model) - set(state)
            if missing or set(state) - _trainable_names(model):
                raise ConfigError(f"resume: the checkpoint {input_dir} holds other adapter weights than this run "
                                  f"trains ({len(state)} saved, {len(_trainable_names(model))} trained)")
            model.load_state_dict(state, strict=False)
        models.clear()  # loaded here: accelerate would load each again, strictly, and find the frozen base missing

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)


@contextlib.contextmanager
def _quiet():
    """peft asks transformers about checkpointing through a name that transformers deprecates: not the user's
    to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}
