"""The training loss: summed token cross-entropy over the supervised positions of a batch.

`LossModel` wraps a causal LM so that the forward pass that distributed wrappers (DDP, FSDP) see
returns the loss itself. It returns the SUM of token losses; the training loop divides by the number
of supervised tokens of the whole optimizer step (all micro-batches, all processes), which is the only
normalization under which gradient accumulation gives the same update as one large batch.

With `impl="selected"` the output projection runs only on positions that carry a target (on
instruction data many positions are prompt tokens), in chunks of `chunk_tokens` positions, and the
gradients of each chunk are computed in the forward pass, right after its loss (a fused linear
cross-entropy): no [tokens x vocab] logit tensor is stored, and none is recomputed, so the output
projection costs three matmuls per token as in plain autograd. A full fp32 logit tensor would be the
largest activation of a small model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .attention import IMPLEMENTATION as VARLEN, cu_seqlens_from_position_ids, segment_kwargs
from .errors import ConfigError
from .kernels import compile_available, kernel
from .templates import IGNORE_INDEX

# Config attributes of architectures whose logits are not simply lm_head(hidden): these need impl="full".
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def resolve_loss_impl(model, impl: str, partitioned_weights: bool = False) -> str:
    """'selected' reads lm_head's weight and bias itself (the fused loss), so it needs a plain nn.Linear
    head with no hooks, logits that are just lm_head(hidden), and weights that are whole on every process
    (not DeepSpeed ZeRO-3, which gathers a weight only inside its own module's forward)."""
    head = model.get_output_embeddings()
    reasons = [f"this model also applies {a}" for a in _LOGIT_TRANSFORMS
               if getattr(model.config, a, None) not in (None, 1, 1.0)]
    if type(head) is not torch.nn.Linear:
        reasons.append(f"its output layer is a {type(head).__name__}, not a plain torch.nn.Linear")
    elif head._forward_hooks or head._forward_pre_hooks:
        reasons.append("its output layer has forward hooks")
    if partitioned_weights:
        reasons.append("DeepSpeed ZeRO-3 partitions the output layer's weight")
    if impl == "auto":
        return "full" if reasons else "selected"
    if impl == "selected" and reasons:
        raise ConfigError(f"loss_impl: 'selected' computes the loss from lm_head's weight directly, but "
                          f"{'; '.join(reasons)}; use loss_impl='full' (or 'auto')")
    return impl


class LossModel(torch.nn.Module):
    def __init__(self, model, impl: str = "selected", chunk_tokens: int = 4096):
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP wraps these layers
        self.impl = impl
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids, targets, position_ids=None, attention_mask=None, cu_seqlens=None,
                supervised_positions=None) -> torch.Tensor:
        """`cu_seqlens` and `supervised_positions` (host_indices) are optional: without them they are found on
        the device, at the cost of a host sync each."""
        inputs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      use_cache=False)  # a KV cache would also switch off packed-sequence masking
        if getattr(self.model.config, "_attn_implementation", None) == VARLEN:  # segments once, not per layer
            positions = position_ids if position_ids is not None else \
                torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            inputs.update(segment_kwargs(positions.expand_as(input_ids), attention_mask, cu_seqlens))
            if attention_mask is None:  # the segments already isolate each row's padding
                # Given no mask, transformers scans position_ids for packed rows (a host sync), for a result
                # varlen does not read: it has the segments.
                inputs["attention_mask"] = torch.ones_like(input_ids, dtype=torch.bool)
        if self.impl == "full":
            logits = self.model(**inputs).logits.float()
            return F.cross_entropy(rearrange(logits, "b t v -> (b t) v"), rearrange(targets, "b t -> (b t)"),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        hidden = self.model.base_model(**inputs).last_hidden_state
        if supervised_positions is None:
            supervised_positions = find_supervised_positions(targets)
        return selected_cross_entropy(rearrange(hidden, "b t d -> (b t) d").index_select(0, supervised_positions),
                                      rearrange(targets, "b t -> (b t)").index_select(0, supervised_positions),
                                      self.model.get_output_embeddings(), self.chunk_tokens)


def find_supervised_positions(targets: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions of a [B, T] batch that carry a target (their count is data, so on a
    GPU this copies back to the host)."""
    return rearrange(targets != IGNORE_INDEX, "b t -> (b t)").nonzero().flatten()


def host_indices(batch: dict) -> dict:
    """The index tensors LossModel.forward would otherwise compute on the device, each at the cost of a
    host sync, computed from a micro-batch's CPU tensors before they move: the packed segments (for
    varlen attention) and the supervised positions (for the selected loss)."""
    input_ids = batch["input_ids"]
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    cu_seqlens, _ = cu_seqlens_from_position_ids(positions, batch.get("attention_mask"))
    return {"cu_seqlens": cu_seqlens, "supervised_positions": find_supervised_positions(batch["targets"])}


def selected_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module,
                           chunk_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of lm_head(hidden) [N, vocab] against targets [N] (all supervised), chunk by
    chunk. Where gradients are wanted they are computed here, chunk by chunk (_LinearCrossEntropy)."""
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens, dtype)
    total = hidden.new_zeros((), dtype=torch.float32)
    with torch.autocast(device, enabled=False):
        for h, y in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
            logits = _chunk_logits(h, weight, bias, dtype).float()
            total += (logits.logsumexp(-1) - logits.gather(1, y[:, None]).squeeze(1)).sum()
    return total


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    return F.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def _loss_and_logit_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy (computed in fp32) and d loss / d logits = softmax - onehot, in the
    logits' dtype. Eager, the softmax overwrites one fp32 copy of the logits; compiled (on GPUs), the
    whole function reads the [tokens x vocab] logits twice and writes the gradient once, where eager
    torch makes some seven passes (over 2 GB each, per 4096 tokens of a 128k vocabulary)."""
    logits32 = logits.float()  # a copy, unless the logits are fp32 already (a temporary either way)
    lse = logits32.logsumexp(-1)
    loss = (lse - logits32.gather(1, targets[:, None]).squeeze(1)).sum()
    grad = logits32.sub_(lse[:, None]).exp_()
    grad[torch.arange(targets.shape[0], device=targets.device), targets] -= 1
    return loss, grad.to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = sum_i CE(h_i W^T + b, y_i). Forward computes, per chunk: logits in the compute dtype, the
    loss in fp32, and d loss / d logits = softmax - onehot, which gives the chunk's gradients for h, W
    and b at once. Backward only scales the stored gradients by the incoming one. Weight and bias
    gradients are summed over chunks in fp32. The softmax part is compiled on GPUs (one graph for every
    chunk length)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, dtype):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]  # a frozen head needs no weight gradient
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
            w = weight.to(dtype)
            total = hidden.new_zeros((), dtype=torch.float32)
            compiled = kernel(_loss_and_logit_grad, compiled=compile_available(hidden.device))
            for start in range(0, hidden.shape[0], chunk_tokens):
                h, y = hidden[start:start + chunk_tokens].to(dtype), targets[start:start + chunk_tokens]
                # a one-token chunk would compile a second, specialized graph; it is cheap eagerly
                loss_and_grad = compiled if y.shape[0] > 1 else _loss_and_logit_grad
                loss, d_logits = loss_and_grad(_chunk_logits(h, w, bias, dtype), y)
                total += loss
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk_tokens] = d_logits @ w
                if grad_weight is not None:
                    grad_weight += d_logits.T @ h
                if grad_bias is not None:
                    grad_bias += d_logits.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_output).to(weight_dtype),
                None if grad_bias is None else (grad_bias * grad_output).to(bias_dtype), None, None, None)
