"""Padding-free attention for packed rows on the GPU: one flash-attention call per layer over all the
examples of a micro-batch, without a [T, T] mask.

Packed rows carry position ids that restart at 0 for every example (see sft.packing). Here they become
cumulative sequence lengths (`cu_seqlens`): the [B, T] batch is flattened into one sequence of B*T
tokens and `torch.nn.attention.varlen.varlen_attn` runs causal attention inside each segment, so no
example sees another and no work is spent on masked-out blocks. sdpa with packed position ids instead
gets a dense block-diagonal mask from transformers and loses its flash kernel.

- The segments are found once per forward pass: every layer receives the same `position_ids` tensor,
  so the index math and its device-to-host copy (one host sync per forward, not per layer) are cached
  on that tensor. The trainer computes them on the host before the batch moves, so it has no sync.
- A padding mask (held-out batches, left-padded generation prompts) adds segment boundaries where it
  switches between padding and tokens, so padding is never attended to by real tokens.
- Decoding against a KV cache (fewer queries than keys) goes to sdpa with the mask transformers builds
  for it, so a model loaded with this implementation also generates.
- varlen_attn runs flash-attention kernels: CUDA only, compute capability 8.0 or newer, bf16/fp16. The
  index helpers below are pure functions, tested on the CPU against a reference.
- torch.compile: packed rows always have the static shape [micro_batch_size, max_length]. The training
  loss (sft.loss.LossModel) computes the segments before the decoder layers and passes them down as
  `cu_seq_lens_q`/`max_length_q` keyword arguments, so compiled layers hold no host sync; varlen_attn is
  a registered custom op (torch >= 2.11). Callers that pass no segments (generation, direct model
  calls) get them from a lookup that runs outside any graph (`torch.compiler.disable`).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import contextmanager

import torch
from einops import rearrange, repeat

from .errors import ConfigError

IMPLEMENTATION = "sft_varlen"


def segment_starts(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool: True where a segment begins. A segment begins at the start of every row, wherever
    the position does not continue the previous one (packed examples restart at 0), and wherever the
    padding mask switches between padding and tokens."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if attention_mask is not None:
        mask = attention_mask.bool()
        starts[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    return starts


def cu_seqlens_from_position_ids(position_ids: torch.Tensor,
                                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Cumulative segment lengths over the flattened batch (int32, [segments + 1], starting at 0 and
    ending at B*T) and the longest segment, as varlen attention takes them."""
    starts = segment_starts(position_ids, attention_mask).flatten()
    bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([starts.numel()])])
    return bounds.to(torch.int32), int(bounds.diff().max())


def flatten_batch(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] (transformers' layout) -> [B*T, H, D]; token t of row b lands at b*T + t."""
    return rearrange(x, "b h t d -> (b t) h d")


def unflatten_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B*T, H, D] -> [B, T, H, D], the layout transformers expects from an attention function."""
    return rearrange(x, "(b t) h d -> b t h d", b=batch)


def make_varlen_call(varlen_attn: Callable, kernel_gqa: bool = False) -> Callable:
    """Causal varlen attention (q [N, Hq, D], k/v [N, Hkv, D], cu_seqlens, max_seqlen, scale) -> [N, Hq, D]
    through whichever signature this torch has: 2.10 takes `is_causal`; 2.11 takes `window_size=(-1, 0)`
    and `scale`; 2.13 adds `enable_gqa`. Without that flag, grouped key/value heads go to the kernel as
    they are when `kernel_gqa` (the flash kernel reads head h // groups itself: probed on the device by
    register_varlen_attention), else they are repeated to one per query head."""
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    native_gqa, takes_scale = "enable_gqa" in params, "scale" in params

    def call(query, key, value, cu_seqlens, max_seqlen, scale):
        if query.dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(f"attn_implementation: 'varlen' runs in bf16 or fp16, got {query.dtype}; use "
                              f"precision 'bf16_autocast' or 'bf16_pure', or attn_implementation 'sdpa'")
        kwargs = dict(causal)
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            if native_gqa:
                kwargs["enable_gqa"] = True
            elif not kernel_gqa:  # query head h reads key/value head h // groups, as transformers' repeat_kv
                key, value = (repeat(t, "n h d -> n (h g) d", g=groups) for t in (key, value))
        if takes_scale:
            kwargs["scale"] = scale
        elif scale != query.shape[-1] ** -0.5:  # the kernel applies 1/sqrt(head_dim) itself
            query = query * (scale * query.shape[-1] ** 0.5)
        return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)

    return call


def _not_registered(*args, **kwargs):
    raise ConfigError("attn_implementation: the varlen kernel is not set up; call "
                      "sft.attention.register_varlen_attention(device) before loading the model")


_varlen: Callable = _not_registered  # set by register_varlen_attention (or, inside a block, varlen_kernel)
_grouped_heads = "unset"  # how grouped key/value heads reach the kernel: "flag", "kernel" or "repeated"


def grouped_heads() -> str:
    """How grouped key/value heads reach the kernel that register_varlen_attention set up: "flag" (torch's
    `enable_gqa`), "kernel" (the kernel reads head h // groups itself), "repeated" (one copy per query head),
    or "unset" before it ran. A benchmark names it with its results."""
    return _grouped_heads


@contextmanager
def varlen_kernel(call: Callable):
    """Inside the block, varlen attention runs `call` (q [N, Hq, D], k/v [N, Hkv, D], cu_seqlens, max_seqlen,
    scale -> [N, Hq, D], what make_varlen_call returns) in place of the registered kernel: a plain-torch
    kernel runs the whole path on the CPU. The kernel set before the block is back after it."""
    global _varlen
    before, _varlen = _varlen, call
    try:
        yield
    finally:
        _varlen = before


class _SegmentCache:
    """The segments of the forward pass in progress, keyed on the identity of its position ids and
    padding mask (held here, so an id cannot be reused by a new tensor while cached)."""

    def __init__(self):
        self.key: tuple = (None, None, None)
        self.value: tuple[torch.Tensor, int] | None = None

    @torch.compiler.disable
    def lookup(self, position_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch: int, length: int,
               device: torch.device) -> tuple[torch.Tensor, int]:
        cached_pos, cached_mask, cached_shape = self.key
        if cached_pos is position_ids and cached_mask is attention_mask and cached_shape == (batch, length):
            return self.value
        self.key = (position_ids, attention_mask, (batch, length))
        self.value = host_segments(position_ids, attention_mask, batch, length, device)
        return self.value


def host_segments(position_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch: int, length: int,
                  device: torch.device) -> tuple[torch.Tensor, int]:
    """cu_seqlens (on `device`) and the longest segment, computed on the host: the one host sync of a
    forward pass."""
    positions = position_ids.expand(batch, length).cpu()
    mask = attention_mask.cpu() if attention_mask is not None else None
    cu_seqlens, max_seqlen = cu_seqlens_from_position_ids(positions, mask)
    return cu_seqlens.to(device, non_blocking=True), max_seqlen


_segments = _SegmentCache()


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query [B, Hq, T, D], key/value [B, Hkv, S, D];
    returns ([B, T, Hq, D], None)."""
    if query.shape[2] != key.shape[2] or (attention_mask is not None and attention_mask.ndim == 4):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    unsupported = [name for name in ("sliding_window", "softcap", "s_aux") if kwargs.get(name) is not None]
    unsupported += ["attention dropout"] * bool(dropout)
    unsupported += ["bidirectional attention"] * (not kwargs.get("is_causal", getattr(module, "is_causal", True)))
    if unsupported:
        raise ConfigError(f"attn_implementation: 'varlen' supports plain causal attention; this model uses "
                          f"{', '.join(unsupported)}; use 'sdpa' or 'flex_attention'")
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ConfigError("attn_implementation: 'varlen' finds packed examples through position ids, and this "
                          "architecture does not pass them to its attention layers; use 'sdpa'")
    batch, _, length, head_dim = query.shape
    if kwargs.get("cu_seq_lens_q") is not None:  # computed once per forward by the caller (segment_kwargs)
        cu_seqlens, max_seqlen = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    else:
        cu_seqlens, max_seqlen = _segments.lookup(position_ids, attention_mask, batch, length, query.device)
    query, key, value = (flatten_batch(t) for t in (query, key, value))
    if torch.is_autocast_enabled(query.device.type):  # rotary embeddings leave query and key in fp32
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    out = _varlen(query, key, value, cu_seqlens, max_seqlen, scaling if scaling is not None else head_dim ** -0.5)
    return unflatten_batch(out, batch), None


def segment_kwargs(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   cu_seqlens: torch.Tensor | None = None) -> dict:
    """The segments of a [B, T] batch as the keyword arguments transformers passes through every layer
    to its attention function. Computed once per forward pass, before the decoder layers, so a compiled
    layer contains no host sync and no graph break; `cu_seqlens` computed on the host beforehand (from
    the batch's CPU tensors, see sft.loss.host_indices) saves the one sync left. The longest segment is
    given as T, an upper bound that the kernel accepts, so that every batch of one shape compiles to the
    same graph."""
    batch, length = position_ids.shape[0], position_ids.shape[-1]
    if cu_seqlens is None:
        cu_seqlens, _ = host_segments(position_ids, attention_mask, batch, length, position_ids.device)
    torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)  # one entry per example: a new count must not recompile
    return dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=length, max_length_k=length)


def varlen_mask(batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor | None:
    """transformers' mask-function interface. With as many queries as keys (training, evaluation,
    prefill) it builds nothing: segments come from the position ids, plus the [B, T] padding mask passed
    through as is. Decoding against a KV cache gets sdpa's mask, for the sdpa fallback above."""
    if q_length == kv_length:
        return attention_mask
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                                attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Registers the attention and mask functions with transformers under IMPLEMENTATION (harmless on
    any device; running them needs register_varlen_attention's kernel)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, varlen_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, varlen_mask)
    return IMPLEMENTATION


def _import_varlen_attn() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_available(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or _import_varlen_attn() is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def register_varlen_attention(device: torch.device | str) -> str:
    """Sets up the varlen kernel for this torch and registers the implementation; returns the name to
    pass as `attn_implementation`. Raises ConfigError where it cannot run."""
    global _varlen
    device = torch.device(device)
    if device.type != "cuda":
        raise ConfigError(f"attn_implementation: 'varlen' runs flash-attention kernels on a CUDA GPU; this run is "
                          f"on the {device.type.upper()}, use 'sdpa' (or 'auto')")
    varlen_attn = _import_varlen_attn()
    if varlen_attn is None:
        raise ConfigError(f"attn_implementation: 'varlen' needs torch.nn.attention.varlen.varlen_attn "
                          f"(PyTorch >= 2.10); this is torch {torch.__version__}; use 'flex_attention' or 'sdpa'")
    if torch.cuda.get_device_capability(device) < (8, 0):
        raise ConfigError(f"attn_implementation: 'varlen' needs compute capability 8.0 or newer (A100, H100, ...); "
                          f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}")
    global _grouped_heads
    kernel_gqa = kernel_reads_grouped_heads(varlen_attn, device)
    _varlen = make_varlen_call(varlen_attn, kernel_gqa=kernel_gqa)
    _grouped_heads = ("flag" if "enable_gqa" in inspect.signature(varlen_attn).parameters
                     else "kernel" if kernel_gqa else "repeated")
    return register()


def kernel_reads_grouped_heads(varlen_attn: Callable, device: torch.device) -> bool:
    """Whether this torch's varlen kernel takes fewer key/value heads than query heads without a flag
    (flash attention does; torch < 2.13 does not say so): one tiny forward and backward on the device,
    compared with repeated heads. Saves a copy of keys and values per layer when it holds."""
    params = inspect.signature(varlen_attn).parameters
    if "enable_gqa" in params:
        return False  # the flag is the documented way
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(24, heads, 64, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
               for heads in (4, 2, 2))
    cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=device)
    try:
        grouped = make_varlen_call(varlen_attn, kernel_gqa=True)(q, k, v, cu, 14, 0.125)
        grads = torch.autograd.grad(grouped.float().square().sum(), (q, k, v))
    except Exception:  # noqa: BLE001 - any refusal means: repeat the heads
        return False
    repeated = make_varlen_call(varlen_attn, kernel_gqa=False)(q, k, v, cu, 14, 0.125)
    expected = torch.autograd.grad(repeated.float().square().sum(), (q, k, v))
    same = lambda a, b: bool(((a.float() - b.float()).norm() <= 0.02 * b.float().norm() + 1e-6).item())
    return same(grouped, repeated) and all(same(a, b) for a, b in zip(grads, expected))
