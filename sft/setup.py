"""Everything the loop needs, built from a validated config: `build(cfg)` runs the named stages in order
(precision, float8, tokenizer and template, data, steps, held-out batches, model, loss, optimizer, schedule,
prepare) into a `Setup`. Also the checks of the process layout (`check_runtime`) and the record of what
the run resolved (`run_description`, config.json's `derived`).

modeling's functions are called through the module, so that a test can replace one (load_model) where it
is defined.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import lora, modeling
from .config import TrainConfig
from .data import PreparedData, example_lengths, prepare_data, set_aside
from .errors import ConfigError
from .evaluation import held_out_batches
from .loss import LossModel, resolve_loss_impl
from .optim import (build_optimizer, describe_optimizer, bf16_update_for,
                    param_groups_for_weight_decay)
from .optim_backward import StepInBackward
from .packing import MicroBatch, collated_steps, packing_efficiency, plan_steps
from .template_traits import traits as template_traits
from .templates import setup_template, system_prompt_record


@dataclass
class Setup:
    accelerator: object
    tokenizer: object
    data: PreparedData
    model: torch.nn.Module
    loss_model: LossModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps: list[list[MicroBatch]]  # each optimizer step's micro-batches, as plans over data.train
    eval_batches: list[tuple[int, dict]]  # (dataset index, collated held-out examples of that dataset)
    derived: dict
    in_backward: StepInBackward | None = None  # set when the optimizer steps inside the backward pass
    adapter: object | None = None  # with finetune="lora": the PeftModel around `model`, which saves the adapter
    offload: bool = False  # activations saved for the backward pass wait in pinned host memory
    max_grad_norm: float | None = None  # gradients clipped to this norm (None: not clipped)
    steps_per_epoch: int = 1  # optimizer steps in an epoch (a logged record's epoch is step / steps_per_epoch)

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[list[dict]]:
        """Steps `start` to `stop` as collated micro-batches, prepared a few steps ahead in the background."""
        return collated_steps(self.steps[start:stop], self.data.train, self.tokenizer.pad_token_id,
                              pin_memory=self.accelerator.device.type == "cuda")


def build(cfg: TrainConfig, data: PreparedData | None = None, *, attn_implementation: str | None = None) -> Setup:
    """Everything the loop needs. `data` replaces the dataset named in the config (benchmarks feed synthetic
    token ids this way); `attn_implementation` replaces the attention the config resolves to (a registered
    implementation: tests run a CPU kernel in the varlen kernel's place)."""
    from accelerate.utils import set_seed

    accelerator, precision, bf16_update = _setup_precision(cfg)
    zero3 = check_runtime(cfg, accelerator, bf16_update)  # before anything is loaded
    device, world = accelerator.device, accelerator.num_processes
    float8 = _setup_float8(cfg, accelerator, precision)  # before the data: a missing torchao costs no tokenizing
    tokenizer, template, system_prompt, system_note = _setup_tokenizer(cfg)
    data = _setup_data(cfg, accelerator, tokenizer, data)
    if system_note and accelerator.is_main_process:  # after the data: an error in it stays the only line
        print(f"note: {system_note}", file=sys.stderr)
    # the steps and their warmup check come before the model: a plan that cannot train loads nothing
    lengths, steps, steps_per_epoch = _setup_steps(cfg, data, world)
    eval_batches = held_out_batches(data, cfg.eval_batch_size, tokenizer.pad_token_id)

    # right before the model: whatever preparing the data drew, initialisation and dropout start from the seed
    set_seed(cfg.seed)
    model, adapter, attention_used = _setup_model(cfg, device, precision, float8, attn_implementation)
    loss_impl, loss_model = _setup_loss(cfg, model, zero3, device)
    optimizer = _setup_optimizer(cfg, model, bf16_update)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(steps)))
    if cfg.compile:
        modeling.compile_layers(model, cfg.compile_mode)
    num_parameters = modeling.count_parameters(model)  # before prepare: DeepSpeed ZeRO-3 leaves each process a shard
    trainable = lora.trainable_parameters(model)
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)
    if adapter is not None:
        lora.checkpoint_hooks(accelerator)
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    in_backward = StepInBackward(inner_optimizer) if cfg.optimizer_in_backward else None

    derived = run_description(cfg, accelerator, data, model, inner_optimizer, in_backward is not None, steps,
                              steps_per_epoch, lengths, precision=precision, bf16_update=bf16_update,
                              attn_implementation=attention_used, float8=float8, loss_impl=loss_impl, template=template,
                              system_prompt=system_prompt, chat_template=template_traits(tokenizer).record(),
                              num_parameters=num_parameters, trainable_parameters=trainable,
                              **_adapter_record(cfg, adapter))
    data.stats["packing_efficiency"] = derived["packing_efficiency"]
    return Setup(accelerator, tokenizer, data, model, loss_model, optimizer, scheduler, steps, eval_batches, derived,
                 in_backward, adapter, cfg.activation_offload, cfg.max_grad_norm, steps_per_epoch)


def _setup_precision(cfg: TrainConfig) -> tuple[object, str, str]:
    """The accelerator, the precision `auto` resolves to on this machine, and its bf16 update (None: fp32 weights)."""
    from accelerate import Accelerator

    probe = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg, probe)
    # cpu=True on a machine without CUDA lets processes started by `accelerate launch` (torch.distributed.run)
    # join one gloo process group instead of each training alone.
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16_autocast" else "no",
                              cpu=probe.type == "cpu")
    # with adapters the trainable weights are fp32 whatever the base's precision: no bf16 update
    return accelerator, precision, None if cfg.finetune == "lora" else bf16_update_for(precision, cfg.bf16_update)


def _setup_float8(cfg: TrainConfig, accelerator, precision: str) -> bool:
    """Whether the matmuls run in float8: asked for, and possible here (torchao is required then)."""
    device = accelerator.device
    float8 = cfg.float8 and precision != "fp32" and modeling.float8_unavailable(device) is None
    if float8:
        modeling.require_torchao()
    elif cfg.float8 and accelerator.is_main_process:
        print(f"note: float8: {modeling.float8_unavailable(device) or 'fp32 precision'}; the matmuls stay in "
              f"{'bf16' if precision != 'fp32' else 'fp32'}", file=sys.stderr)
    return float8


def _setup_tokenizer(cfg: TrainConfig) -> tuple[object, str, str | None, str | None]:
    """The tokenizer with its chat template set up; the template's name; the system prompt as recorded, and a
    note about it (printed after the data)."""
    tokenizer = modeling.load_tokenizer(cfg.model, cfg.model_revision, cfg.trust_remote_code, cfg.eos_token)
    template = setup_template(tokenizer, cfg.template, cfg.system_prompt, cfg.reasoning_tags)
    system_prompt, system_note = system_prompt_record(tokenizer, cfg.system_prompt)
    return tokenizer, template, system_prompt, system_note


def _setup_data(cfg: TrainConfig, accelerator, tokenizer, data: PreparedData | None) -> PreparedData:
    """The prepared data (the config's datasets unless given), with what was set aside noted."""
    if data is None:
        data = prepare_data(cfg, tokenizer)
        if accelerator.is_main_process:
            for line in set_aside(data.stats):
                print(f"note: {line}", file=sys.stderr)
    return data


def _setup_steps(cfg: TrainConfig, data: PreparedData, world: int) -> tuple[list[int], list, int]:
    """The training examples' lengths and the step plan (plans, collated as training reaches them:
    Setup.batches), with the steps of an epoch; refuses a warmup that would last the whole run."""
    lengths = example_lengths(data.train)
    steps, steps_per_epoch = plan_steps(
        lengths, epochs=cfg.epochs, micro_batches_per_step=cfg.grad_accum_steps * world, seed=cfg.seed,
        max_steps=cfg.max_steps, packing=cfg.packing, rows_per_batch=cfg.micro_batch_size, row_length=cfg.max_length,
        group_by_length=cfg.group_by_length, padding_free=cfg.padding_free)
    if cfg.warmup_ratio > 0 and warmup_steps(cfg, len(steps)) >= len(steps):
        raise ConfigError(f"warmup_ratio: {cfg.warmup_ratio} of this run's {len(steps)} optimizer steps is "
                          f"{warmup_steps(cfg, len(steps))} warmup steps, so the learning rate would never reach "
                          f"lr; lower warmup_ratio or train for more steps")
    return lengths, steps, steps_per_epoch


def _setup_model(cfg: TrainConfig, device: torch.device, precision: str, float8: bool,
                 attn_implementation: str | None) -> tuple[torch.nn.Module, object | None, str]:
    """The model on the device in its training dtype, with the attention it runs, the adapters (finetune="lora")
    and the memory switches (activation checkpointing, float8) applied; returns it with the PeftModel around
    it (None in full finetuning) and the attention implementation used."""
    model_type = modeling.read_model_config(cfg.model, cfg.model_revision, cfg.trust_remote_code).model_type
    attention = attn_implementation or resolve_attention(cfg, device, precision, model_type)
    dtype = torch.bfloat16 if precision == "bf16_pure" else torch.float32
    model = modeling.load_model(cfg.model, cfg.model_revision, dtype=dtype, attn_implementation=attention,
                                trust_remote_code=cfg.trust_remote_code, device=device, load_in_4bit=cfg.load_in_4bit)
    attention_used = model.config._attn_implementation
    if model_type == "mpt":
        from .mpt_attention import choose_kind, install
        if kind := choose_kind(cfg.attn_implementation, device):
            attention_used = install(model, kind)
    if cfg.packing or cfg.padding_free:
        modeling.check_packing_support(model)
    # the adapters before checkpointing: the recomputed layers hold them
    adapter = lora.add_adapters(model, cfg) if cfg.finetune == "lora" else None
    if cfg.gradient_checkpointing:
        modeling.enable_activation_checkpointing(model, cfg.checkpoint_every_n_layers)
    if float8:
        modeling.convert_to_float8(model)
    return model, adapter, attention_used


def _adapter_record(cfg: TrainConfig, adapter) -> dict:
    """config.json's record of what trained: in full every weight; with adapters, peft's config of them."""
    if adapter is None:
        return {"adapter": None, "mfu_flops": "6 x parameters per token"}
    record = adapter.peft_config["default"].to_dict()
    shown = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora", "modules_to_save",
             "base_model_name_or_path", "revision")
    kept = {k: sorted(v) if isinstance(v, (set, list)) else v for k, v in record.items() if k in shown}
    # peft may list every adapted layer by its full name: the record names each kind once, and counts the layers
    kept["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in kept["target_modules"]})
    return {"mfu_flops": lora.MFU_COUNT, "adapter": dict(kept, adapted_layers=lora.adapted_layers(adapter))}


def _setup_loss(cfg: TrainConfig, model, zero3: bool, device: torch.device) -> tuple[str, LossModel]:
    """The loss implementation for this model and layout, and the model wrapped to return the summed loss."""
    loss_impl = resolve_loss_impl(model, cfg.loss_impl, partitioned_weights=zero3)
    return loss_impl, LossModel(model, loss_impl, cfg.loss_chunk_tokens).to(device)


def _setup_optimizer(cfg: TrainConfig, model, bf16_update: str | None) -> torch.optim.Optimizer:
    """AdamW over the model's parameters, weight decay only where it belongs."""
    return build_optimizer(param_groups_for_weight_decay(model, cfg.weight_decay), bf16_update=bf16_update,
                           lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                           weight_decay=cfg.weight_decay, seed=cfg.seed, state_dtype=cfg.optimizer_state_dtype,
                           kernel=cfg.optimizer_kernel)


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        if cfg.precision != "fp32" and device.type == "cpu":
            print(f"note: precision={cfg.precision} on the CPU is correct but slow without bf16 instructions",
                  file=sys.stderr)
        return cfg.precision
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if not bf16_ok:
        return "fp32"
    # adapters train in fp32 over a frozen base, which needs no fp32 copy (unless modules train in full too)
    return "bf16_pure" if cfg.finetune == "lora" and not cfg.modules_to_save else "bf16_autocast"


def resolve_attention(cfg: TrainConfig, device: torch.device, precision: str, model_type: str) -> str | None:
    """The attention implementation to load the model with; None lets transformers pick its default
    (sdpa where the architecture supports it, eager otherwise). MPT loads with its own (eager) attention,
    which sft.mpt_attention replaces once it is loaded."""
    if model_type == "mpt":
        from .mpt_attention import choose_kind
        choose_kind(cfg.attn_implementation, device)  # refuses what MPT cannot run, before the model loads
        return None
    if cfg.attn_implementation != "auto":
        if cfg.attn_implementation == "varlen":
            from .attention import register_varlen_attention
            return register_varlen_attention(device)
        return cfg.attn_implementation
    if device.type == "cuda" and (cfg.packing or cfg.padding_free) and precision != "fp32":
        from .attention import register_varlen_attention, varlen_available
        if varlen_available(device):
            return register_varlen_attention(device)
    return None


def check_runtime(cfg: TrainConfig, accelerator, bf16_update: str | None) -> bool:
    """Refuses the settings that the process layout (FSDP, DeepSpeed, several processes) cannot run, before
    anything is loaded; returns whether DeepSpeed ZeRO-3 partitions the weights."""
    kind = accelerator.distributed_type.name
    if cfg.load_in_4bit and (reason := modeling.four_bit_unavailable(accelerator.device)):
        raise ConfigError(f"load_in_4bit: {reason}; set load_in_4bit=False to train the adapters on a bf16 base")
    if cfg.load_in_4bit and kind in ("FSDP", "DEEPSPEED"):
        raise ConfigError(f"load_in_4bit: a 4-bit base is not sharded by {kind} here; run QLoRA on one GPU or "
                          f"with DDP (accelerate launch without an FSDP or DeepSpeed config)")
    if kind == "FSDP" and bf16_update is not None:
        raise ConfigError("FSDP shards parameters as DTensors, which BF16AdamW's bf16 update does not handle: use "
                          "precision='bf16_autocast' (fp32 master weights) with FSDP, or 'bf16_pure' on one GPU or DDP")
    if cfg.optimizer_in_backward and accelerator.num_processes > 1:
        raise ConfigError(f"optimizer_in_backward: with {accelerator.num_processes} processes the gradients are "
                          f"averaged across processes after each one's backward pass, too late for a step inside "
                          f"it; run it in one process")
    if kind == "DEEPSPEED" and (cfg.grad_accum_steps != 1 or bf16_update is not None):
        raise ConfigError("DeepSpeed steps the optimizer inside every backward pass and keeps its own fp32 master "
                          "weights: use grad_accum_steps=1 (raise micro_batch_size or the process count) and "
                          "precision='bf16_autocast' or 'fp32'")
    return kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3


def run_description(cfg: TrainConfig, accelerator, data: PreparedData, model, optimizer, in_backward: bool,
                    steps: list, steps_per_epoch: int, lengths: list[int], **resolved) -> dict:
    """What the run resolved and planned, for config.json's `derived` record (read by people and by the
    analysis, never by the loop): the settings `auto` became, the optimizer, the step plan and the data's size."""
    world = accelerator.num_processes
    return {**resolved,
            "optimizer": describe_optimizer(optimizer) + (", stepped per parameter in the backward pass"
                                                          if in_backward else ""),
            "max_grad_norm": cfg.max_grad_norm, "model_commit": getattr(model.config, "_commit_hash", None),
            "device": str(accelerator.device), "world_size": world, "optimizer_steps": len(steps),
            "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup_steps(cfg, len(steps)),
            "micro_batches_per_step": cfg.grad_accum_steps * world,
            "rows_per_optimizer_step": cfg.micro_batch_size * cfg.grad_accum_steps * world,
            "train_examples": len(data.train), "eval_examples": len(data.eval),
            "multi_turn": {split: data.stats.get(split, {}).get("multi_turn") for split in ("train", "eval")},
            "packing_efficiency": round(packing_efficiency([b for s in steps for b in s], lengths), 4)}


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return round(cfg.warmup_ratio * total)


def lr_lambda(cfg: TrainConfig, total: int):
    """Linear warmup, then decay that reaches `min_lr_ratio` exactly after the last real step."""
    warm = warmup_steps(cfg, total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        if cfg.lr_schedule == "constant":
            return 1.0
        if cfg.lr_schedule == "linear":
            return 1.0 - (1.0 - cfg.min_lr_ratio) * progress
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
