"""ALiBi attention for MPT models over packed rows, without the [batch, heads, T, T] score matrix of
transformers' MPT code, and with packed examples kept apart.

transformers' MPT attention is eager: every layer builds the full score matrix, adds the ALiBi bias and takes
the softmax in fp32, and it takes no position ids, so packed examples would attend to each other. `install`
switches a loaded MPT model to this path without editing transformers' files:

- a forward pre-hook on the base model reads the batch's position ids (handed over from the causal LM's
  own call, which keeps them to itself) and padding mask, and turns them into document numbers: a
  document starts wherever positions restart (a packed
  example) and wherever the padding mask switches (see sft.attention.segment_starts);
- the base model asks `build_mpt_alibi_tensor` for the bias it hands every layer; for a training or held-out
  batch it gets, once per forward pass, the attention pattern instead: on GPUs a flex-attention block mask
  (causal, same document), elsewhere an additive bias (ALiBi where allowed, -inf elsewhere) for sdpa;
- each layer's attention (`PackedAlibiAttention`) computes q, k, v as transformers does (`clip_qkv`
  clamps them, `softmax_scale` scales the scores) and runs flex attention with ALiBi as a score
  modification, or sdpa with the bias.

ALiBi depends only on the distance between a query and a key: transformers adds slope * (key - last key),
this path slope * (key - query); the two differ by a constant per query, which the softmax cancels. Inside
a document the bias is the unpacked one; only keys of other documents are masked. Decoding against a KV
cache (generation) keeps transformers' eager path, which reads the cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from transformers.models.mpt.modeling_mpt import MptAttention, build_mpt_alibi_tensor

from .attention import segment_starts
from .errors import ConfigError

KINDS = ("flex_attention", "sdpa")


def choose_kind(requested: str, device: torch.device) -> str | None:
    """The MPT path for `attn_implementation`: "auto" takes flex attention on GPUs and sdpa elsewhere;
    "eager" keeps transformers' own attention (which cannot pack); None means eager."""
    if requested == "varlen":
        raise ConfigError("attn_implementation: 'varlen' has no ALiBi bias, which MPT needs; use 'auto', "
                          "'flex_attention' or 'sdpa'")
    if requested == "eager":
        return None
    if requested == "auto":
        return "flex_attention" if device.type == "cuda" else "sdpa"
    return requested


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Each head's ALiBi slope, as transformers' MPT computes them (its bias at key distance 1 is -slope)."""
    return -build_mpt_alibi_tensor(num_heads, 2)[:, 0, 0].float()


def install(model, kind: str) -> str:
    """Switches an MPT model's attention to `kind` ("flex_attention" or "sdpa") for batches without a KV
    cache; returns a description for the run's records."""
    if kind not in KINDS:
        raise ConfigError(f"attn_implementation: {kind!r} is not one of {', '.join(map(repr, KINDS))} for MPT")
    base = model.base_model
    attn_config = model.config.attn_config
    if kind == "flex_attention" and attn_config.attn_pdrop:
        raise ConfigError(f"attn_implementation: flex attention has no attention dropout, and this MPT config sets "
                          f"attn_pdrop={attn_config.attn_pdrop}; use 'sdpa'")
    slopes = alibi_slopes(base.num_heads).to(base.wte.weight.device)
    pattern = _Pattern(kind, slopes, base.build_mpt_alibi_tensor)
    base.register_forward_pre_hook(pattern.before_forward, with_kwargs=True)
    if model is not base:  # MptForCausalLM keeps position ids to itself: they are handed over here
        model.register_forward_pre_hook(pattern.hand_over, with_kwargs=True)
    base.build_mpt_alibi_tensor = pattern.build  # the instance's, not the class's
    for module in model.modules():
        if type(module) is MptAttention:
            module.__class__ = PackedAlibiAttention
            module.score_mod = pattern.score_mod
    model.packed_attention = kind  # check_packing_support reads it
    return f"packed ALiBi ({kind})"


class _Pattern:
    """Who attends to whom in the forward pass in progress, made once by the pre-hook, handed to every layer
    in place of transformers' ALiBi tensor."""

    def __init__(self, kind: str, slopes: torch.Tensor, eager_alibi):
        self.kind, self.slopes, self.eager_alibi = kind, slopes, eager_alibi
        self.pending = None
        self.handed_over = None  # the position ids given to the causal LM, for its base model

    def hand_over(self, module, args, kwargs):
        self.handed_over = kwargs.get("position_ids")

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score + self.slopes[h] * (kv_idx - q_idx)

    def before_forward(self, module, args, kwargs):
        self.pending, handed_over, self.handed_over = None, self.handed_over, None
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = module.config.use_cache and not (module.gradient_checkpointing and module.training)
        if kwargs.get("cache", kwargs.get("past_key_values")) is not None or use_cache:
            return  # generation: transformers' eager attention, which reads and fills the KV cache
        batch, length = (ids if ids is not None else embeds).shape[:2]
        device = (ids if ids is not None else embeds).device
        positions = kwargs.get("position_ids", handed_over)
        if positions is None:
            positions = torch.arange(length, device=device)
        positions = positions.expand(batch, length)
        mask = kwargs.get("attention_mask")
        documents = segment_starts(positions, mask if mask is not None and mask.ndim == 2 else None).cumsum(-1)
        if self.kind == "flex_attention":
            from torch.nn.attention.flex_attention import create_block_mask

            def same_document(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (documents[b, q_idx] == documents[b, kv_idx])

            self.pending = create_block_mask(same_document, batch, None, length, length, device=device)
        else:
            self.pending = self.dense_bias(documents, embeds.dtype if embeds is not None else _compute_dtype(module))

    def dense_bias(self, documents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, H, T, T]: slope * (key - query) where the key is visible (same document, not later), -inf elsewhere."""
        length = documents.shape[1]
        index = torch.arange(length, device=documents.device)
        distance = (index[None, :] - index[:, None]).float()  # key - query
        visible = (distance <= 0) & (documents[:, :, None] == documents[:, None, :])
        bias = self.slopes[None, :, None, None] * distance
        return bias.masked_fill(~visible[:, None], float("-inf")).to(dtype)

    def build(self, num_heads, sequence_length, alibi_bias_max=8, device=None):
        if self.pending is None:
            return self.eager_alibi(num_heads, sequence_length, alibi_bias_max, device=device)
        pattern, self.pending = self.pending, None
        return pattern


def _compute_dtype(model) -> torch.dtype:
    device = model.wte.weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else model.wte.weight.dtype


_flex = None


def _flex_attention():
    """flex_attention compiled once (run eagerly it would materialize the scores it exists to avoid)."""
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex = torch.compile(flex_attention, dynamic=False)
    return _flex


class PackedAlibiAttention(MptAttention):
    """MPT attention that takes the pattern `_Pattern.build` made (a block mask or a dense bias) as its
    `position_bias`; given transformers' ALiBi tensor (generation with a KV cache), it is MptAttention."""

    score_mod = None  # set by install

    def forward(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
        dense = isinstance(position_bias, torch.Tensor)
        if cache is not None or (dense and position_bias.ndim != 4):
            return super().forward(hidden_states, position_bias, cache=cache, attention_mask=attention_mask, **kwargs)
        mixed_qkv = self.Wqkv(hidden_states)
        if self.clip_qkv:
            mixed_qkv = mixed_qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        query, key, value = (rearrange(t, "b t (h d) -> b h t d", h=self.n_heads) for t in mixed_qkv.chunk(3, dim=2))
        if dense:
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=position_bias.to(query.dtype), scale=self.softmax_scale,
                dropout_p=self.attn_dropout_p if self.training else 0.0)
        else:
            context = _flex_attention()(query, key, value, score_mod=self.score_mod, block_mask=position_bias,
                                        scale=self.softmax_scale)
        context = rearrange(context, "b h t d -> b t (h d)")
        return self.out_proj(context), None
