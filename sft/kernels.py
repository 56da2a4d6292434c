"""Small functions compiled once for tensors of any length: the AdamW step (`sft.optim`) and the loss's
softmax gradient (`sft.loss`). Written as plain torch code, they run eagerly wherever compiling is not
wanted (the CPU by default); compiled, each becomes one or two fused kernels that read and write their
tensors once, where eager torch makes a pass per operation with fp32 temporaries."""
from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

_compiled: dict[Callable, Callable] = {}


def kernel(fn: Callable, compiled: bool) -> Callable:
    """`fn` compiled with dynamic shapes (one graph for every length, no recompiles), or `fn` itself."""
    if not compiled:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[fn]


def compile_available(device: torch.device) -> bool:
    """Whether these functions are compiled by default on `device`: on CUDA, where torch.compile generates
    Triton kernels (when Triton is installed, as it is with torch's Linux CUDA wheels)."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None
