import io
import warnings

import pytest
import torch

from sft.errors import ConfigError
from sft.optim import (BF16_UPDATES, BF16AdamW, build_optimizer, param_groups_for_weight_decay,
                       stochastic_round_to_bf16)

# The CUDA cases run where a GPU is (bench/gpu_run.sh runs them with `-k cuda`): there the steps are
# compiled into Triton kernels and the optimizer's scalars travel through pinned memory.
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))
DEVICES = ["cpu", CUDA]


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 values at |x| (8 significant bits): x = m * 2^e with m in [0.5, 1) -> 2^(e-8)."""
    _, exponent = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8)


def train_on_constant_gradients(bf16_update: str | None, w0: torch.Tensor, grad: torch.Tensor, steps: int,
                                lr: float):
    w = torch.nn.Parameter(w0.float() if bf16_update is None else w0.clone())
    opt = build_optimizer([w], bf16_update=bf16_update, lr=lr)
    for _ in range(steps):
        w.grad = grad.to(w.dtype)
        opt.step()
    return w.detach().float()


def test_small_updates_are_lost_in_plain_bf16_but_kept_by_stochastic_rounding_and_kahan():
    # Weights of magnitude in [1, 2) have a bf16 ulp of 2^-7 ~ 0.0078. With a constant gradient Adam's
    # step is ~lr = 1e-3 per step, below half an ulp, so round-to-nearest drops every step.
    n, steps, lr = 4096, 200, 1e-3
    gen = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1.0
    w0 = (sign * (1 + torch.rand(n, generator=gen))).to(torch.bfloat16)
    grad = torch.randint(0, 2, (n,), generator=gen) * 2 - 1.0  # each weight moves up or down
    runs = {update: train_on_constant_gradients(update, w0, grad, steps, lr) for update in (None, *BF16_UPDATES)}
    ref = runs[None]  # fp32 weights
    moved = lambda w: ((w0.float() - w) * grad).mean().item()  # distance travelled against the gradient

    assert moved(ref) == pytest.approx(steps * lr, rel=1e-3)
    assert torch.equal(runs["none"], w0.float())  # not a single step landed
    # Kahan keeps the exact trajectory in weight + compensation, so the bf16 weight is the exact weight
    # rounded to nearest (<= 0.5 ulp, plus the compensation's own bf16 rounding): allow 1 ulp.
    assert ((runs["kahan"] - ref).abs() <= bf16_ulp(ref)).all()
    # Stochastic rounding is unbiased but each weight does a random walk around the exact trajectory:
    # per step the error has std ulp * sqrt(p(1-p)) with p = lr/ulp ~ 0.13, so after 200 steps about
    # 4.7 ulp ~ 0.037 per weight; the mean over 4096 weights has std ~ 6e-4. Allow 5 sigma on the mean
    # and twice the expected per-weight rms.
    sr = runs["stochastic_rounding"]
    assert moved(sr) == pytest.approx(moved(ref), abs=3e-3)
    assert (sr - ref).pow(2).mean().sqrt() < 0.075


@pytest.mark.parametrize("bf16_update", ["stochastic_rounding", "kahan", "none"])
def test_one_step_matches_torch_adamw_within_one_bf16_ulp(bf16_update):
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    grad = torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    ref = torch.nn.Parameter(w0.float())
    ref_opt = torch.optim.AdamW([ref], foreach=False, **hyper)
    ref.grad = grad.float()
    ref_opt.step()
    w = torch.nn.Parameter(w0.clone())
    opt = BF16AdamW([w], bf16_update=bf16_update, **hyper)
    w.grad = grad.clone()
    opt.step()

    # Same fp32 math in a different order: the fp32 results differ by at most an fp32 ulp, so rounding
    # to bf16 (either way) lands on one of the two bf16 neighbours of the reference.
    assert ((w.float() - ref.detach()).abs() <= bf16_ulp(ref.detach())).all()
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[w][key], ref_opt.state[ref][key])
    if bf16_update != "stochastic_rounding":  # round to nearest: nearly always the very same bf16 value
        assert (w != ref.detach().to(torch.bfloat16)).float().mean() < 0.01


def test_stochastic_rounding_is_unbiased_for_both_signs():
    gen = torch.Generator().manual_seed(2)
    n, low, ulp = 200_000, 1.0, 2.0**-7
    for value in (low + 0.3 * ulp, -(low + 0.3 * ulp), 3.0):
        rounded = stochastic_round_to_bf16(torch.full((n,), value), gen).float()
        neighbours = {value} if value == 3.0 else {torch.tensor(value).to(torch.bfloat16).item(),
                                                   value + (0.7 if value > 0 else -0.7) * ulp}
        assert set(rounded.unique().tolist()) <= neighbours
        # The mean of n Bernoulli(0.3) choices has std ulp*sqrt(0.21/n) ~ 8e-6; allow 5 sigma.
        assert rounded.mean().item() == pytest.approx(value, abs=4e-5)


def test_lr_is_read_per_param_group_each_step():
    frozen, moving = (torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16)) for _ in range(2))
    opt = BF16AdamW([{"params": [frozen], "lr": 0.0}, {"params": [moving]}], lr=0.0, bf16_update="kahan")
    opt.param_groups[1]["lr"] = 0.1  # what an LR scheduler does
    frozen.grad, moving.grad = torch.ones(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    assert torch.equal(frozen, torch.ones(4, dtype=torch.bfloat16))
    assert torch.allclose(moving.float(), torch.full((4,), 0.9), atol=2**-8)


@pytest.mark.parametrize("bf16_update,state_dtype", [("stochastic_rounding", "float32"),
                                                        ("stochastic_rounding", "bfloat16"),
                                                        ("kahan", "float32"), ("kahan", "bfloat16")])
def test_resume_from_state_dict_continues_bitwise_identically(bf16_update, state_dtype):
    torch.manual_seed(3)
    data = [(torch.randn(8, 16).to(torch.bfloat16), torch.randn(8, 4).to(torch.bfloat16)) for _ in range(6)]

    def setup(seed):
        model = torch.nn.Linear(16, 4).to(torch.bfloat16)
        groups = param_groups_for_weight_decay(model, weight_decay=0.1)
        return model, build_optimizer(groups, bf16_update=bf16_update, lr=1e-3, seed=seed,
                                      state_dtype=state_dtype)

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    model, opt = setup(seed=0)
    train(model, opt, data[:3])
    checkpoint = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, checkpoint)
    train(model, opt, data[3:])

    # A different seed proves the rounding noise comes from the checkpoint, not from the constructor.
    resumed, resumed_opt = setup(seed=123)
    checkpoint.seek(0)
    saved = torch.load(checkpoint)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.state[resumed.weight]["exp_avg"].dtype == getattr(torch, state_dtype)
    train(resumed, resumed_opt, data[3:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    state, resumed_state = opt.state_dict()["state"], resumed_opt.state_dict()["state"]
    for i in state:
        for key in state[i]:
            assert torch.equal(state[i][key], resumed_state[i][key])


def test_weight_decay_groups_exclude_params_with_fewer_than_two_dims():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    model[2].bias.requires_grad_(False)
    decay, no_decay = param_groups_for_weight_decay(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[1].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].bias), id(model[2].weight)}  # frozen: left out


def test_build_optimizer_rejects_unknown_bf16_update_naming_the_valid_ones():
    params = [torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))]
    with pytest.raises(ConfigError) as err:
        build_optimizer(params, bf16_update="bf16", lr=1e-3)
    assert "'bf16'" in str(err.value)
    assert all(name in str(err.value) for name in BF16_UPDATES)


def test_build_optimizer_refuses_torch_adamw_on_bf16_params():
    # torch.optim.AdamW on bf16 params is exactly bf16_update="none"; it must not pass as fp32 weights.
    with pytest.raises(ConfigError, match="float32 parameters"):
        build_optimizer([torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))], bf16_update=None, lr=1e-3)
    opt = build_optimizer([torch.nn.Parameter(torch.ones(2))], bf16_update=None, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["foreach"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_fused_step_equals_the_eager_step_up_to_the_rounding_draw(state_dtype, device):
    """The compiled one-kernel step (what CUDA runs) does the eager step's math: fp32 moments agree to
    fp32 rounding, and every bf16 value is one of the two bf16 neighbours of the eager fp32 result."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(3000, generator=gen).to(torch.bfloat16)
    grads = [torch.randn(3000, generator=gen).to(torch.bfloat16) for _ in range(3)]
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, state_dtype=torch.float32)
    ref = torch.nn.Parameter(w0.float())  # fp32 reference trajectory with the same moments
    ref_opt = torch.optim.AdamW([ref], foreach=False, **{k: v for k, v in hyper.items() if k != "state_dtype"})
    w = torch.nn.Parameter(w0.clone().to(device))
    opt = BF16AdamW([w], bf16_update="stochastic_rounding", fused=True, **dict(hyper, state_dtype=state_dtype))
    assert opt.fused
    for grad in grads:
        ref.data.copy_(w.detach().float())  # compare one step at a time, from the same bf16 weights
        ref.grad, w.grad = grad.float(), grad.clone().to(device)
        if state_dtype == torch.bfloat16:  # the reference starts each step from the same (rounded) moments
            for key in ("exp_avg", "exp_avg_sq"):
                if key in opt.state[w]:
                    ref_opt.state[ref][key].copy_(opt.state[w][key].float())
        before = ref.detach().clone()
        ref_opt.step()
        opt.step()
        error = (w.detach().float().cpu() - ref.detach()) / bf16_ulp(ref.detach())
        assert (error.abs() <= 1).all()
        # unbiased: no drift along the weight (decay) or along the update; 3000 draws, std <= 0.5/sqrt(3000)
        for direction in (ref.detach().sign(), (ref.detach() - before).sign()):
            assert (error * direction).mean().abs() < 0.05
        for key in ("exp_avg", "exp_avg_sq"):
            expected, got = ref_opt.state[ref][key], opt.state[w][key].float().cpu()
            if state_dtype == torch.float32:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)  # fp32 rounding of terms ~0.1
            else:
                assert ((got - expected).abs() <= bf16_ulp(expected)).all()


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.int8])
def test_fused_step_keeps_small_updates_like_the_eager_one(state_dtype):
    n, steps, lr = 4096, 200, 1e-3
    gen = torch.Generator().manual_seed(0)
    w0 = ((torch.randint(0, 2, (n,), generator=gen) * 2 - 1.0) * (1 + torch.rand(n, generator=gen))).to(torch.bfloat16)
    grad = torch.randint(0, 2, (n,), generator=gen) * 2 - 1.0
    ref = train_on_constant_gradients(None, w0, grad, steps, lr)
    w = torch.nn.Parameter(w0.clone())
    opt = BF16AdamW([w], lr=lr, betas=(0.9, 0.95), bf16_update="stochastic_rounding", fused=True,
                    state_dtype=state_dtype)
    for _ in range(steps):
        w.grad = grad.to(torch.bfloat16)
        opt.step()
    moved = lambda x: ((w0.float() - x) * grad).mean().item()
    assert moved(w.detach().float()) == pytest.approx(moved(ref), abs=3e-3)  # as the eager test: 5 sigma
    assert (w.detach().float() - ref).pow(2).mean().sqrt() < 0.075


def test_fused_is_for_stochastic_rounding_and_auto_only_on_cuda():
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = BF16AdamW([w], bf16_update="stochastic_rounding")
    assert not opt.fused and opt.kernel == "torch"  # a CPU parameter: the eager step, not the Triton kernel
    with pytest.raises(ConfigError, match="fused=True is implemented for stochastic rounding"):
        BF16AdamW([w], bf16_update="kahan", fused=True)
    with pytest.raises(ConfigError, match="kernel='cuda' is not one of auto, triton, torch"):
        BF16AdamW([w], kernel="cuda")


def test_the_triton_kernel_setting_needs_pure_bf16_weights_with_stochastic_rounding():
    from sft.config import TrainConfig

    TrainConfig(experiment="x", precision="bf16_pure", optimizer_kernel="triton")
    for settings in (dict(precision="bf16_autocast"), dict(precision="bf16_pure", bf16_update="kahan")):
        with pytest.raises(ConfigError, match="^optimizer_kernel: 'triton' is the step of precision='bf16_pure'"):
            TrainConfig(experiment="x", optimizer_kernel="triton", **settings)
    with pytest.raises(ConfigError, match="^optimizer_kernel"):
        TrainConfig(experiment="x", precision="bf16_pure", optimizer_kernel="fused")


def test_compiled_and_eager_torch_steps_round_with_the_same_noise():
    """The kernels' noise is a hash of (key, position), so compiling the step changes none of it: rounding
    the same fp32 values gives the same bf16 values, whatever the length (one compiled graph for all)."""
    from sft.kernels import kernel
    from sft.optim import _stochastic_round

    for n, key in ((1000, 12345), (3001, 2**31 - 1)):
        x = torch.randn(n, generator=torch.Generator().manual_seed(n))
        assert torch.equal(kernel(_stochastic_round, True)(x, key), _stochastic_round(x, key))
    assert not torch.equal(_stochastic_round(x, 1), _stochastic_round(x, 2))


def fused_run(steps: int, seed: int, disturb: bool = False, resume_at: int | None = None,
              state_dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """Trains one bf16 vector with the fused step; `disturb` draws from torch's default generator before
    every step (what sampling or dropout does elsewhere in a process); `resume_at` restarts the
    optimizer from its state_dict."""
    gen = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter(torch.randn(4096, generator=gen).to(torch.bfloat16).to(device))
    grads = [torch.randn(4096, generator=gen).to(torch.bfloat16).to(device) for _ in range(steps)]
    opt = BF16AdamW([w], lr=1e-3, bf16_update="stochastic_rounding", fused=True, seed=seed, state_dtype=state_dtype)
    for k, grad in enumerate(grads):
        if disturb:
            torch.rand(k + 1, device=device)
        if k == resume_at:
            saved = io.BytesIO()
            torch.save(opt.state_dict(), saved)
            opt = BF16AdamW([w], lr=1e-3, bf16_update="stochastic_rounding", fused=True, seed=seed,
                            state_dtype=state_dtype)
            opt.load_state_dict(torch.load(io.BytesIO(saved.getvalue())))
        w.grad = grad
        opt.step()
    return w.detach().clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.int8])
def test_fused_rounding_noise_depends_only_on_the_seed_and_the_step(state_dtype, device):
    """Data-parallel copies of a model must round identically, or they drift apart for good; and a
    resumed run must continue as the uninterrupted one (8-bit states included)."""
    run = lambda steps, seed, **kw: fused_run(steps, seed, state_dtype=state_dtype, device=device, **kw)
    torch.manual_seed(0)
    reference = run(6, 1)
    torch.manual_seed(123)  # another process state, and draws in between: same weights
    assert torch.equal(run(6, 1, disturb=True), reference)
    assert torch.equal(run(6, 1, resume_at=3), reference)
    assert not torch.equal(run(6, 2), reference)  # the noise does come from the seed
    states = torch.random.get_rng_state(), torch.cuda.get_rng_state() if device == "cuda" else None
    run(1, 1)
    assert torch.equal(torch.random.get_rng_state(), states[0])  # the process's generators are left as they were
    if device == "cuda":
        assert torch.equal(torch.cuda.get_rng_state(), states[1])


def test_a_non_contiguous_parameter_takes_the_eager_step():
    w = torch.nn.Parameter(torch.randn(8, 6).to(torch.bfloat16).t())  # a transposed view: not contiguous
    opt = BF16AdamW([w], lr=1e-2, bf16_update="stochastic_rounding", fused=True)
    w.grad = torch.ones_like(w)
    opt.step()
    assert (w.detach().float() < 10).all() and opt.state[w]["step"].item() == 1


def test_int8_states_round_each_value_to_the_nearest_entry_of_the_dynamic_map():
    from sft.optim import INT8_BLOCK, _dequantize, _int8_maps, _quantize_

    gen = torch.Generator().manual_seed(7)
    n = 4 * INT8_BLOCK
    magnitude = 10 ** (-4 * torch.rand(n, generator=gen))  # values over four decades inside each block
    x = torch.randn(n, generator=gen).sign() * magnitude
    x[-INT8_BLOCK:] = 0.0  # an all-zero block (a moment that never moved) stays exactly zero
    signed, unsigned = _int8_maps(torch.device("cpu"))
    for values, qmap in ((x, signed), (x * x, unsigned)):
        codes, scale = torch.empty(n, dtype=torch.uint8), torch.empty(n // INT8_BLOCK)
        _quantize_(values, codes, scale, qmap)
        blocks = values.view(-1, INT8_BLOCK)
        torch.testing.assert_close(scale[:-1], blocks.abs().amax(-1)[:-1])
        restored = _dequantize(codes, scale, qmap)
        per_value_scale = scale.repeat_interleave(INT8_BLOCK)
        nearest = (qmap[None, :] * per_value_scale[:, None] - values[:, None]).abs().min(-1).values
        assert ((restored - values).abs() <= nearest + 1e-6 * per_value_scale).all()
        assert (restored[-INT8_BLOCK:] == 0).all()
        if qmap is signed:  # first moments four decades below their block's largest keep their sign
            assert (restored[:-INT8_BLOCK].sign() == values[:-INT8_BLOCK].sign()).all()


def test_int8_states_take_about_two_bytes_per_parameter_and_small_tensors_keep_fp32():
    layer = torch.nn.Linear(128, 64).to(torch.bfloat16)  # weight: 8192 values, bias: 64
    opt = BF16AdamW(layer.parameters(), lr=1e-3, state_dtype=torch.int8)
    layer(torch.randn(4, 128, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    weight, bias = opt.state[layer.weight], opt.state[layer.bias]
    assert weight["exp_avg_codes"].dtype == weight["exp_avg_sq_codes"].dtype == torch.uint8
    state_bytes = sum(v.numel() * v.element_size() for k, v in weight.items() if k != "step")
    assert state_bytes / layer.weight.numel() == pytest.approx(2 + 8 / 256)
    assert bias["exp_avg"].dtype == torch.float32 and "exp_avg_codes" not in bias


@pytest.mark.parametrize("fused", [False, True])
def test_int8_states_follow_fp32_adamw_on_a_regression(fused):
    """bf16 weights with stochastic rounding and 8-bit moments take the fp32-master trajectory: the loss
    tracks torch.optim.AdamW's from 1.6 down by four orders of magnitude."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=gen)
    y = x @ (0.1 * torch.randn(128, 64, generator=gen))

    def losses(make_optimizer, dtype):
        torch.manual_seed(1)
        layer = torch.nn.Linear(128, 64, bias=False).to(dtype)
        opt = make_optimizer(layer.parameters())
        out = []
        for _ in range(100):
            loss = (layer(x.to(dtype)).float() - y).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    reference = losses(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0), torch.float32)
    int8 = losses(lambda p: BF16AdamW(p, lr=1e-2, state_dtype=torch.int8, fused=fused), torch.bfloat16)
    assert reference[-1] < 1e-3 * reference[0]
    for step in (10, 30, 60):
        assert int8[step] == pytest.approx(reference[step], rel=0.1)
    assert int8[-1] < 3 * reference[-1]


def test_int8_states_need_stochastic_rounding():
    w = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    with pytest.raises(ConfigError, match="8-bit states are implemented for stochastic rounding"):
        BF16AdamW([w], bf16_update="kahan", state_dtype=torch.int8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bf16_update,state_dtype", [("kahan", torch.float32), ("stochastic_rounding", torch.int8)])
def test_step_in_backward_equals_the_step_after_backward_and_holds_one_gradient_at_a_time(bf16_update, state_dtype,
                                                                                          device):
    """Kahan's update has no noise, and the 8-bit step seeds its noise per parameter: stepping inside the
    backward pass, in the backward's order, gives the very weights of stepping after it."""
    from sft.optim_backward import StepInBackward

    gen = torch.Generator().manual_seed(8)
    batches = [torch.randn(16, 64, generator=gen).to(torch.bfloat16).to(device) for _ in range(3)]

    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
        return net.to(torch.bfloat16).to(device)

    def loss(net, x):
        return net(x).float().pow(2).mean()

    reference = model()
    ref_opt = BF16AdamW(reference.parameters(), lr=1e-2, bf16_update=bf16_update, state_dtype=state_dtype)
    ref_norms = []
    for x in batches:
        loss(reference, x).backward()
        ref_norms.append(torch.nn.utils.get_total_norm([p.grad.float() for p in reference.parameters()]))
        ref_opt.step()
        ref_opt.zero_grad()

    net = model()
    opt = BF16AdamW(net.parameters(), lr=1e-2, bf16_update=bf16_update, state_dtype=state_dtype)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    in_backward = StepInBackward(opt)
    live, step_parameter = [], opt.step_parameter
    opt.step_parameter = lambda p: (live.append(sum(q.grad is not None for q in net.parameters())), step_parameter(p))
    for x, ref_norm in zip(batches, ref_norms):
        loss(net, x).backward()
        with warnings.catch_warnings():  # the scheduler knows the optimizer has stepped
            warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
            schedule.step()
        torch.testing.assert_close(in_backward.grad_norm(), ref_norm, rtol=1e-5, atol=0)
        assert all(p.grad is None for p in net.parameters())
    assert live == [1] * 4 * len(batches)  # each parameter steps alone: no other gradient is held
    for a, b in zip(net.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    in_backward.remove()
    loss(net, batches[0]).backward()  # hooks removed: gradients stay for a normal step
    assert all(p.grad is not None for p in net.parameters())


def test_parameters_added_later_get_their_own_noise_seed_and_the_dtype_check():
    first, second = (torch.nn.Parameter(torch.randn(4096).to(torch.bfloat16)) for _ in range(2))
    opt = BF16AdamW([first], lr=1e-3, state_dtype=torch.int8)
    opt.add_param_group({"params": [second], "lr": 1e-2})
    first.grad, second.grad = torch.ones_like(first), torch.ones_like(second)
    opt.step()
    assert opt.state[second]["step"].item() == 1 and opt._index[second] == 1
    with pytest.raises(ConfigError, match="BF16AdamW needs bfloat16 parameters"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(4))]})


@pytest.mark.parametrize("bf16_update", ["stochastic_rounding", "kahan"])
def test_bf16_second_moment_keeps_decaying_with_either_weight_rounding(bf16_update):
    """v <- 0.999 v moves v by less than half a bf16 step: rounded to nearest, v would stay where it is."""
    w = torch.zeros(4096, dtype=torch.bfloat16, requires_grad=True)
    opt = BF16AdamW([w], lr=1e-3, betas=(0.9, 0.999), bf16_update=bf16_update, state_dtype=torch.bfloat16, fused=False)
    v_exact = torch.zeros(())
    for g in [1.0] + [1e-3] * 1999:
        w.grad = torch.full_like(w, g)
        opt.step()
        v_exact = 0.999 * v_exact + 0.001 * g * g
    v = opt.state[w]["exp_avg_sq"].float().mean()
    assert v == pytest.approx(float(v_exact), rel=0.02)  # about 1.36e-4; round-to-nearest leaves about 1e-3
