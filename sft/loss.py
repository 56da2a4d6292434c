"""The training loss: summed token cross-entropy over the loss-bearing positions of a batch.

`LossModel` wraps a causal LM so that the forward pass that distributed wrappers (DDP, FSDP) see
returns the loss itself. It returns the SUM of token losses; the training loop divides by the number
of supervised tokens of the whole optimizer step (all micro-batches, all processes), which is the only
normalization under which gradient accumulation gives the same update as one large batch.

With `impl="selected"` the output projection runs only on positions that carry a target, in chunks
whose fp32 logits are recomputed in the backward pass instead of stored: on instruction data most
positions are prompt tokens, and a full [tokens x vocab] fp32 logit tensor is the largest activation
of a small model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError
from .templates import IGNORE_INDEX

# Config attributes of architectures whose logits are not simply lm_head(hidden): these need impl="full".
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def resolve_loss_impl(model, impl: str) -> str:
    transformed = [a for a in _LOGIT_TRANSFORMS if getattr(model.config, a, None) not in (None, 1, 1.0)]
    if impl == "auto":
        return "full" if transformed else "selected"
    if impl == "selected" and transformed:
        raise ConfigError(f"loss_impl: 'selected' computes lm_head(hidden) directly, but this model also applies "
                          f"{transformed}; use loss_impl='full'")
    return impl


class LossModel(torch.nn.Module):
    def __init__(self, model, impl: str = "selected", chunk_tokens: int = 4096):
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP wraps these layers
        self.impl = impl
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids, targets, position_ids=None, attention_mask=None) -> torch.Tensor:
        inputs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      use_cache=False)  # a KV cache would also switch off packed-sequence masking
        if self.impl == "full":
            logits = self.model(**inputs).logits.float()
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        hidden = self.model.base_model(**inputs).last_hidden_state
        keep = targets != IGNORE_INDEX
        return selected_cross_entropy(hidden[keep], targets[keep], self.model.get_output_embeddings(),
                                      self.chunk_tokens)


def selected_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module,
                           chunk_tokens: int) -> torch.Tensor:
    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lm_head(h).float(), y, reduction="sum")

    if hidden.shape[0] <= chunk_tokens:
        return chunk_loss(hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        total = total + checkpoint(chunk_loss, h, y, use_reentrant=False)
    return total
