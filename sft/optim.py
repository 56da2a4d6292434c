"""AdamW whose updates keep fp32 precision when the weights are bf16.

Pure-bf16 AdamW silently drops small updates: bf16 has 8 significant bits, so `w + lr * update` rounds
back to `w` whenever |lr * update| < ulp(w) / 2 (about 0.2% of |w|), which is the normal size of a
finetuning step. With `precision="fp32"` or `"bf16_autocast"` the parameters themselves are fp32 (fp32
master weights under autocast) and the step is plain `torch.optim.AdamW`. With `precision="bf16_pure"`
the config field `bf16_update` (one name from the setting to `config.json`'s `derived` and the optimizer's
argument) picks how the bf16 weights keep the update precise:

- "stochastic_rounding": the new weight is computed in fp32 and rounded to bf16 up or down with
  probabilities that make the rounding unbiased, so small updates land on average.
- "kahan": a bf16 compensation buffer per parameter carries the bits lost in rounding over to the next
  step (Kahan summation); costs 2 bytes per parameter.
- "none": round-to-nearest and no compensation. It drops small updates and is an argument of the
  optimizer only, so that tests and the precision comparison can show the problem; no run trains with it.

With bf16 weights the moments can be kept in fp32 (8 bytes per parameter), bf16 (4 bytes, stochastically
rounded so they keep decaying) or int8 (about 2 bytes): block-wise 8-bit states as in Dettmers et al.,
"8-bit Optimizers via Block-wise Quantization" (2110.02861), in the format of bitsandbytes' and torchao's
8-bit Adam. Each block of 256 values stores a scale (its largest magnitude) and one byte per value, an
index into a 256-entry "dynamic" map whose entries are spaced logarithmically, so small moments next to
large ones keep their relative precision.
"""

import importlib.util
from collections.abc import Iterable

import torch

from .errors import ConfigError
from .kernels import compile_available, kernel

BF16_UPDATES = ("stochastic_rounding", "kahan", "none")  # see the module docstring
KERNELS = ("auto", "triton", "torch")  # the step of BF16AdamW with stochastic rounding; see BF16AdamW



def bf16_update_for(precision: str, bf16_update: str) -> str | None:
    """The bf16 update a run's precision uses: the setting with bf16 weights, None with fp32 weights.

    >>> bf16_update_for("bf16_pure", "kahan"), bf16_update_for("bf16_autocast", "kahan")
    ('kahan', None)
    """
    return bf16_update if precision == "bf16_pure" else None


# int8 marks block-wise 8-bit states (uint8 codes + an fp32 scale per block), not int8 tensors
_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}
INT8_BLOCK = 256
INT8_MIN_NUMEL = 4096  # smaller tensors (norm scales, biases) keep fp32 states, as in bitsandbytes and torchao


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round fp32 `x` to bf16, up or down in magnitude with probability proportional to proximity.

    bf16 is the top 16 bits of fp32. Adding a uniform integer in [0, 2^16) to the low bits carries into
    bit 16 with probability (low bits) / 2^16, then zeroing the low bits truncates. fp32 is
    sign-magnitude, so this acts on |x| and is unbiased for both signs. Inf and canonical NaN survive
    because their low 16 bits are zero.
    """
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return _round_with_noise(x, noise)


def pcg_hash(x: torch.Tensor) -> torch.Tensor:
    """A hash of 32-bit integers held in int64: PCG's output permutation, the hash that Jarzynski and Olano,
    "Hash Functions for GPU Rendering" (JCGT 2020), recommend. Every product stays below 2^63.

    >>> pcg_hash(torch.tensor([0, 1, 2**32 - 1])).tolist()
    [129708002, 2831084092, 3861530882]
    """
    state = (x * 747796405 + 2891336453) & 0xFFFFFFFF
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & 0xFFFFFFFF
    return (word >> 22) ^ word


def rounding_noise(n: int, key: int, device: torch.device) -> torch.Tensor:
    """The stochastic-rounding noise of the steps that compute it in their kernels: for position i of a
    flat tensor, the top 16 bits of pcg(pcg(i) + key) (mod 2^32), a uniform integer in [0, 2^16). A function
    of (key, i) alone, it is the same whichever kernel computes it (compiled, eager, sft.optim_triton)."""
    hashed = pcg_hash(torch.arange(n, dtype=torch.int64, device=device))
    return (pcg_hash((hashed + key) & 0xFFFFFFFF) >> 16).to(torch.int32)


def _stochastic_round(x: torch.Tensor, key: int) -> torch.Tensor:
    """stochastic_round_to_bf16 in a form torch.compile fuses: the noise is computed inside the kernel
    instead of being stored."""
    return _round_with_noise(x, rounding_noise(x.numel(), key, x.device))


def _round_with_noise(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    # -65536 == 0xFFFF0000 as int32; the result is exact in bf16 because its low 16 bits are zero
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _adamw_(p: torch.Tensor, g32: torch.Tensor, m32: torch.Tensor, v32: torch.Tensor,
            hyper: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The AdamW step of the compiled kernels, in fp32: writes the stochastically rounded weight into
    bf16 `p` (noise key `key`) and returns the new moments. `hyper` holds [lr, 1 - beta1, beta2, 1 - beta2,
    eps, lr * weight_decay, lr / bias_correction1, sqrt(bias_correction2)] as a tensor, so a changing
    learning rate or step count does not recompile (nor does `key`: the kernels are compiled for any int)."""
    lr, one_minus_beta1, beta2, one_minus_beta2, eps, lr_wd, step_size, bc2_sqrt = hyper.unbind()
    p32 = p.float()
    m32 = m32 + (g32 - m32) * one_minus_beta1
    v32 = v32 * beta2 + g32 * g32 * one_minus_beta2
    new = p32 - step_size * m32 / (v32.sqrt() / bc2_sqrt + eps) - lr_wd * p32
    p.copy_(_stochastic_round(new, key))
    return m32, v32


def _fused_update_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   hyper: torch.Tensor, key: int) -> None:
    """One BF16AdamW step with stochastic rounding on flat tensors, written to be compiled into one kernel:
    it reads the bf16 weight, gradient and moments once and writes them once (about 14 bytes per
    parameter), where the eager step makes some ten passes with fp32 temporaries."""
    m32, v32 = _adamw_(p, grad.float(), exp_avg.float(), exp_avg_sq.float(), hyper, key)
    exp_avg.copy_(_stochastic_round(m32, key + 1) if exp_avg.dtype == torch.bfloat16 else m32)
    exp_avg_sq.copy_(_stochastic_round(v32, key + 2) if exp_avg_sq.dtype == torch.bfloat16 else v32)


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 values an 8-bit state can take, relative to its block's largest magnitude: 0, 1, and for
    k = 0..6 the decade [0.1, 1] * 10^(k-6) cut into 2^k (signed: each sign) or 2^(k+1) (unsigned) equal
    parts, represented by their midpoints. This is the dynamic map of bitsandbytes' 8-bit optimizers
    (Dettmers et al. 2110.02861): dense near the block's maximum, still able to represent values six
    decades below it."""
    values = [0.0, 1.0]
    for k in range(7):
        edges = torch.linspace(0.1, 1, (2**k if signed else 2 ** (k + 1)) + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)).tolist()
        values += mids + ([-v for v in mids] if signed else [])
    return torch.tensor(sorted(values), dtype=torch.float32)


def _scalars_to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """A small fp32 tensor on `device` without waiting for the device: a plain host-to-GPU copy
    synchronizes the stream, which would stall the host until the backward pass has finished and then
    leave the GPU idle while the host launches the optimizer's kernels one by one."""
    values = torch.tensor(values, dtype=torch.float32)
    return values.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else values.to(device)


def _midpoints(qmap: torch.Tensor) -> torch.Tensor:
    return (qmap[1:] + qmap[:-1]) * 0.5


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    return (qmap[codes.int()].view(-1, INT8_BLOCK) * scale.view(-1, 1)).view(-1)


def _quantize_(x32: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, qmap: torch.Tensor) -> None:
    """Block-wise: each block is divided by its largest magnitude, then each value takes the nearest
    entry of the map, found among the midpoints between entries (round to nearest: the moments are
    running averages, unbiased rounding buys nothing there)."""
    blocks = x32.view(-1, INT8_BLOCK)
    block_max = blocks.abs().amax(-1).clamp_min(1e-30)
    # a value on a midpoint takes the lower entry (bucketize's right=False), as in sft.optim_triton
    codes.copy_(torch.bucketize(blocks / block_max.view(-1, 1), _midpoints(qmap)).view(-1))
    scale.copy_(block_max)


def _int8_update_(p: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor, m_scale: torch.Tensor,
                  v_codes: torch.Tensor, v_scale: torch.Tensor, signed_map: torch.Tensor, unsigned_map: torch.Tensor,
                  hyper: torch.Tensor, key: int) -> None:
    """The step with 8-bit moments, on flat tensors whose length is a multiple of INT8_BLOCK: dequantize,
    update in fp32, quantize again. The weight update uses the fp32 moments of this step."""
    m32, v32 = _adamw_(p, grad.float(), _dequantize(m_codes, m_scale, signed_map),
                       _dequantize(v_codes, v_scale, unsigned_map), hyper, key)
    _quantize_(m32, m_codes, m_scale, signed_map)
    _quantize_(v32, v_codes, v_scale, unsigned_map)


_maps: dict[str, tuple[torch.Tensor, ...]] = {}


def _int8_tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    key = str(device)
    if key not in _maps:
        maps = dynamic_map(signed=True).to(device), dynamic_map(signed=False).to(device)
        _maps[key] = maps + tuple(_midpoints(qmap) for qmap in maps)
    return _maps[key]


def _int8_maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed (first moment) and unsigned (second moment) dynamic maps, on the device."""
    return _int8_tables(device)[:2]


def _int8_midpoints(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The midpoints between consecutive entries of the two maps, which decide the nearest entry."""
    return _int8_tables(device)[2:]


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) for bf16 parameters, with the math in fp32.

    bf16_update (one of BF16_UPDATES): "stochastic_rounding" rounds the new weight stochastically; "kahan"
    keeps a bf16 compensation buffer per parameter; "none" rounds to nearest and drops small updates (for
    demonstration only).
    state_dtype=torch.bfloat16 halves the moment memory (rounded stochastically, except with "none",
    so that they keep decaying); torch.int8 keeps them as block-wise 8-bit states (see the module
    docstring; stochastic rounding only).

    kernel (one of KERNELS), with stochastic rounding: "triton" steps each contiguous parameter with one
    hand-written kernel (sft.optim_triton) that reads and writes its bytes once, whatever its states;
    "torch" runs the steps written in torch (below); "auto" is "triton" where every parameter is on a GPU
    and Triton is installed. The torch step also takes the tensors the Triton kernel does not cover.
    fused: run the torch step of each parameter as one compiled kernel (None: on CUDA only).

    The eager step takes its noise from a generator seeded with `seed` and saved in state_dict. The
    kernels' steps (Triton, fused, and with 8-bit states every step, compiled or not) compute it as a
    hash of each value's position and a key drawn from (`seed`, parameter, its step count), the same in
    all of them: the noise depends on nothing else the process did, so data-parallel copies of the model
    round alike and stay identical, resume is exact, and stepping parameters in another order (in the
    backward pass) changes nothing.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, bf16_update: str = "stochastic_rounding",
                 state_dtype: torch.dtype = torch.float32, seed: int = 0, fused: bool | None = None,
                 kernel: str = "auto"):
        if bf16_update not in BF16_UPDATES:
            raise ConfigError(f"bf16_update={bf16_update!r} is not one of {', '.join(BF16_UPDATES)}")
        stochastic = bf16_update == "stochastic_rounding"
        if fused and not stochastic:
            raise ConfigError(f"fused=True is implemented for stochastic rounding, not {bf16_update!r}")
        if kernel not in KERNELS:
            raise ConfigError(f"kernel={kernel!r} is not one of {', '.join(KERNELS)}")
        if kernel == "triton" and not stochastic:
            raise ConfigError(f"kernel='triton' is implemented for stochastic rounding, not {bf16_update!r}")
        if state_dtype not in _STATE_DTYPES.values():
            raise ConfigError(f"state_dtype={state_dtype}; expected torch.float32, torch.bfloat16 or torch.int8")
        if state_dtype == torch.int8 and not stochastic:
            raise ConfigError(f"8-bit states are implemented for stochastic rounding, not {bf16_update!r}")
        self._index: dict[torch.Tensor, int] = {}  # seeds each parameter's noise
        self._group_of: dict[torch.Tensor, int] = {}
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.bf16_update, self.state_dtype, self.seed = bf16_update, state_dtype, seed
        params = [p for g in self.param_groups for p in g["params"]]
        on_gpus = stochastic and all(compile_available(p.device) for p in params)  # with Triton
        self.fused = on_gpus if fused is None else fused
        if kernel == "triton":
            if importlib.util.find_spec("triton") is None:
                raise ConfigError("kernel='triton' needs Triton (pip install triton)")
            if not _triton().INTERPRETED and not all(p.is_cuda for p in params):
                raise ConfigError("kernel='triton' steps CUDA tensors (CPU ones only under TRITON_INTERPRET=1)")
        self.kernel = kernel if kernel != "auto" else "triton" if on_gpus else "torch"
        self._generators: dict[str, torch.Generator] = {}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.dtype != torch.bfloat16:
                raise ConfigError(f"BF16AdamW needs bfloat16 parameters, got {p.dtype} "
                                  "(torch.optim.AdamW steps fp32 parameters: build_optimizer with bf16_update=None)")
            self._index.setdefault(p, len(self._index))
            # the group's position, not its dict: load_state_dict (which accelerate calls) replaces the dicts
            self._group_of[p] = len(self.param_groups) - 1

    def _generator(self, device: torch.device) -> torch.Generator:
        # One generator per device: CUDA noise must come from a CUDA generator.
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def _store(self, dst: torch.Tensor, src32: torch.Tensor, stochastic: bool) -> None:
        """Write the fp32 scratch `src32` (which may be overwritten) into `dst`."""
        if dst.dtype == torch.bfloat16 and stochastic:
            dst.copy_(stochastic_round_to_bf16(src32, self._generator(dst.device)))
        else:
            dst.copy_(src32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hyper: dict[tuple, torch.Tensor] = {}  # the kernels' scalars, one tensor per (step, device)
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, hyper)
        return loss

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor) -> None:
        """Updates one parameter from its gradient: the optimizer step inside the backward pass
        (`StepInBackward`). With the same seed it gives the same weights as `step()` wherever the noise
        is computed in a kernel (Triton, fused or 8-bit steps), since that noise is keyed per parameter."""
        self._update(p, self.param_groups[self._group_of[p]], {})

    def _noise_in_kernels(self) -> bool:
        return self.kernel == "triton" or self.fused or self.state_dtype == torch.int8

    def _update(self, p: torch.Tensor, group: dict, hyper: dict[tuple, torch.Tensor]) -> None:
        """One parameter's AdamW step, in place: its moments, then its bf16 weight (with stochastic rounding
        or Kahan compensation); `hyper` holds the step's scalars on the parameter's device."""
        if p.grad.is_sparse:
            raise RuntimeError("BF16AdamW does not support sparse gradients")
        state = self.state[p]
        if not state:
            self._init_state(p, state)
        state["step"] += 1
        step = state["step"].item()
        int8 = "exp_avg_codes" in state
        tensors = None if int8 else (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
        # with noise drawn in kernels, every contiguous parameter takes the kernels' path (compiled when fused)
        if int8 or (self._noise_in_kernels() and all(t.is_contiguous() for t in tensors)):
            self._kernel_step(p, group, state, step, hyper)
        else:
            self._eager_step(p, group, state, step)

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        # step as a CPU fp32 scalar tensor, like torch.optim.AdamW, so checkpoints look alike.
        state["step"] = torch.tensor(0.0)
        if self._int8(p):
            for name in ("exp_avg", "exp_avg_sq"):
                state[f"{name}_codes"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                state[f"{name}_scale"] = torch.zeros(p.numel() // INT8_BLOCK, device=p.device)
        else:
            dtype = torch.float32 if self.state_dtype == torch.int8 else self.state_dtype
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        if self.bf16_update == "kahan":
            state["compensation"] = torch.zeros_like(p)

    def _kernel_step(self, p: torch.Tensor, group: dict, state: dict, step: float,
                     hyper: dict[tuple, torch.Tensor]) -> None:
        """The step as one kernel per parameter (Triton, or compiled torch), noise drawn inside it."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        key = (step, p.device)
        if key not in hyper:
            bc1, bc2 = 1 - beta1**step, 1 - beta2**step
            hyper[key] = _scalars_to_device([lr, 1 - beta1, beta2, 1 - beta2, eps, lr * wd, lr / bc1, bc2**0.5],
                                            p.device)
        # The noise of this parameter's step depends only on (seed, parameter, step): the same in
        # every data-parallel process, on resume, and whatever order the parameters step in. The
        # moments' bf16 rounding takes noise_key + 1 and + 2. Python's hash of a tuple of ints is the
        # same in every process.
        noise_key = hash((self.seed, self._index[p], int(step))) & 0x7FFFFFFF
        triton = self.kernel == "triton" and _triton().covers(p)
        if "exp_avg_codes" in state:
            work = p.detach().contiguous()  # p itself unless p is a strided view
            update = _triton().int8_update_ if triton else kernel(_int8_update_, self.fused)
            update(work.view(-1), p.grad.contiguous().view(-1),
                   *(state[k].view(-1) for k in ("exp_avg_codes", "exp_avg_scale", "exp_avg_sq_codes",
                                                 "exp_avg_sq_scale")),
                   *_int8_maps(p.device), hyper[key], noise_key)
            if work.data_ptr() != p.data_ptr():
                p.copy_(work)
        else:
            update = _triton().fused_update_ if triton else kernel(_fused_update_, self.fused)
            tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
            update(*(t.detach().view(-1) for t in tensors), hyper[key], noise_key)

    def _eager_step(self, p: torch.Tensor, group: dict, state: dict, step: float) -> None:
        """The step in eager torch ops, noise from the optimizer's generator (or Kahan compensation)."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        grad = p.grad.float()
        exp_avg, exp_avg_sq = state["exp_avg"].float(), state["exp_avg_sq"].float()  # no copy if fp32
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        # Same order of operations as torch.optim.AdamW (single-tensor path), but as a delta so
        # Kahan can compensate it: delta = -lr*wd*p - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
        bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
        delta = exp_avg_sq.sqrt().div_(bias_correction2**0.5).add_(eps)
        torch.div(exp_avg, delta, out=delta).mul_(-lr / bias_correction1)
        p32 = p.float()
        if wd != 0:
            delta.add_(p32, alpha=-lr * wd)
        if self.bf16_update == "kahan":
            comp = state["compensation"]
            delta.add_(comp)
            new = (p32 + delta).to(torch.bfloat16)
            # Carry what rounding lost, delta - (new - old), to the next step; old and new are
            # nearby bf16 values, so their difference is exact in fp32.
            comp.copy_(p32.sub_(new).add_(delta))
            p.copy_(new)
        else:
            self._store(p, p32.add_(delta), stochastic=self.bf16_update == "stochastic_rounding")

        if state["exp_avg"].dtype != torch.float32:
            # bf16 moments round stochastically with Kahan weights too: rounded to nearest, v * beta2 lies
            # within half a bf16 step of v, so the second moment would never decay.
            self._store(state["exp_avg"], exp_avg, stochastic=self.bf16_update != "none")
            self._store(state["exp_avg_sq"], exp_avg_sq, stochastic=self.bf16_update != "none")

    def _int8(self, p: torch.Tensor) -> bool:
        return (self.state_dtype == torch.int8 and p.numel() >= INT8_MIN_NUMEL
                and p.numel() % INT8_BLOCK == 0)

    def state_dict(self):
        sd = super().state_dict()
        sd["rng"] = {device: g.get_state() for device, g in self._generators.items()}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        rng = state_dict.pop("rng", {})
        super().load_state_dict(state_dict)
        # Optimizer.load_state_dict casts float state to the parameter dtype (bf16), which would round
        # fp32 moments and break exact resume, and it shares `step` with the source dict; put back
        # copies of the saved tensors with their own dtype.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(i, {}).items():
                device = "cpu" if key == "step" else p.device
                self.state[p][key] = value.to(device=device, copy=True)
        self._generators = {}
        for device, g_state in rng.items():
            self._generator(torch.device(device)).set_state(g_state)


def _triton():
    from . import optim_triton  # imported on first use: Triton is optional

    return optim_triton


def _as_list(params) -> list[torch.Tensor]:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _tensors(params_or_groups: list) -> list[torch.Tensor]:
    return [p for item in params_or_groups for p in (item["params"] if isinstance(item, dict) else [item])]


def build_optimizer(params_or_groups: Iterable, *, bf16_update: str | None, lr: float,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                    seed: int = 0, state_dtype: str = "float32", fused: bool | None = None,
                    kernel: str = "auto") -> torch.optim.Optimizer:
    """AdamW for fp32 parameters (`bf16_update=None`: torch.optim.AdamW) or BF16AdamW with the bf16 update
    named (one of BF16_UPDATES), see the module docstring; with stochastic rounding, `kernel` (one of
    KERNELS) picks its step (see BF16AdamW)."""
    if bf16_update is not None and bf16_update not in BF16_UPDATES:
        raise ConfigError(f"bf16_update={bf16_update!r} is not one of {', '.join(BF16_UPDATES)} "
                          "(or None for fp32 parameters)")
    if state_dtype not in _STATE_DTYPES:
        raise ConfigError(f"state_dtype={state_dtype!r} is not one of {', '.join(_STATE_DTYPES)}")
    # Materialise groups (and each group's params) so the dtype checks below do not exhaust iterators.
    params_or_groups = [dict(item, params=_as_list(item["params"])) if isinstance(item, dict) else item
                        for item in params_or_groups]
    tensors = _tensors(params_or_groups)
    if bf16_update is None:
        if any(p.dtype != torch.float32 for p in tensors):
            raise ConfigError("bf16_update=None (torch.optim.AdamW) needs float32 parameters; load the model in "
                              "float32 (bf16 autocast is fine) or name a bf16_update")
        if state_dtype != "float32":
            raise ConfigError(f"state_dtype={state_dtype!r} needs bf16 parameters and a bf16_update; with fp32 "
                              "parameters the optimizer states are fp32 like them")
        # fused kernels exist only for CUDA; foreach is the fast path elsewhere.
        fast = {"fused": True} if tensors and all(p.is_cuda for p in tensors) else {"foreach": True}
        return torch.optim.AdamW(params_or_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 **fast)
    return BF16AdamW(params_or_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                     bf16_update=bf16_update, state_dtype=_STATE_DTYPES[state_dtype], seed=seed,
                     fused=fused, kernel=kernel)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """How the step runs, for the run's config: class and kernel."""
    if isinstance(optimizer, BF16AdamW):
        states = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "8-bit block-wise"}[optimizer.state_dtype]
        step = ("triton kernel" if optimizer.kernel == "triton" else "fused compiled" if optimizer.fused
                else "eager")
        return f"BF16AdamW ({optimizer.bf16_update}, {states} states, {step} step)"
    defaults = optimizer.defaults
    kernel = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "single-tensor"
    return f"{type(optimizer).__name__} ({kernel})"


def param_groups_for_weight_decay(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay, params with ndim < 2 (biases, norm scales) do not.

    Embedding tables are matrices and so decay, as in nanoGPT and most LLM recipes.
    Frozen parameters are left out.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
