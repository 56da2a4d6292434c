"""One typed, validated config for a finetuning run.

An experiment script fills a `TrainConfig` from the constants at its top. Every field is checked when
the object is built, so a nonsense setting stops the run with a message naming the field before any
data is read or any model is loaded. The resolved config is written verbatim to the run folder.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError
from .formats import FORMATS
from .sources import Source, mixture_sources

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_DATASET = "embedded:demo-tasks"
# runs/ beside the sft package: the repository's, wherever a script is started from (pip install -e .)
DEFAULT_RUNS_ROOT = str(Path(__file__).resolve().parents[1] / "runs")

# The choices of each setting, as the types its field is annotated with: validation reads them (typing.get_args).
Precision = Literal["auto", "fp32", "bf16_autocast", "bf16_pure"]
Bf16Update = Literal["stochastic_rounding", "kahan"]  # of sft.optim.BF16_UPDATES; "none" is for the comparison only
LrSchedule = Literal["cosine", "linear", "constant"]
LossOn = Literal["assistant", "all"]
TooLong = Literal["error", "truncate", "drop"]
MultiTurn = Literal["per_turn", "last_turn", "error"]
Attention = Literal["auto", "sdpa", "eager", "varlen", "flex_attention"]
LossImpl = Literal["auto", "selected", "full"]
StateDtype = Literal["float32", "bfloat16", "int8"]
OptimizerKernel = Literal["auto", "triton", "torch"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]
DatasetFormat = Literal[("auto", *FORMATS)]
TaskMetric = Literal["exact_match", "tool_call_match"]
Tracker = Literal["tensorboard", "wandb", "trackio", "mlflow"]
Finetune = Literal["full", "lora"]
TEMPLATES = ("auto", "tokenizer", "plain", "chatml-tools")  # or the path of a .jinja file, so the field is a str


@dataclass
class TrainConfig:
    experiment: str                      # the run folder's suffix: runs/<date>_<time>_<experiment>/
    model: str = EMBEDDED_MODEL          # "embedded:smollm2-135m-instruct", a local model folder, or a hub id
    model_revision: str | None = None    # the hub commit (sha or tag) of a hub model; required for one
    trust_remote_code: bool = False      # run the model repository's own code (transformers' flag)
    dataset: str = EMBEDDED_DATASET      # "embedded:demo-...", a local file/folder (json/jsonl/parquet/csv), a hub id
    # a mixture instead of DATASET: [(source, share), ...] or (source, share, {"format": ..., "revision": ...,
    # "files": ..., "split": ..., "max_rows": ...}); share: a float is that fraction of the source's training
    # rows (above 1 repeats them), an int that many rows, None all of them; each source holds out its own rows
    datasets: list | None = None
    dataset_revision: str | None = None  # the hub commit of a hub dataset; required for one
    dataset_format: DatasetFormat = "auto"  # how rows become conversations; "auto": detected from the columns
    dataset_split: str = "train"         # the split of a hub dataset
    dataset_files: str | None = None     # files inside a hub dataset repo (e.g. one of dolphin's jsonl files)
    max_rows: int | None = None          # first N rows of the source (streamed from the hub)
    eval_dataset: str | None = None      # a separate held-out source; else `eval_rows` are split off
    eval_dataset_split: str = "test"     # the split of `eval_dataset`, when it is a hub dataset
    eval_dataset_revision: str | None = None  # None: dataset_revision when eval_dataset is the same repo
    eval_dataset_files: str | None = None     # files inside eval_dataset's hub repo (never dataset_files)
    eval_rows: int | float | None = None  # count or fraction split off; None: 5%, or all of eval_dataset
    template: str = "auto"               # "auto": the tokenizer's chat template if it has one, else plain;
                                         # "tokenizer", "plain", "chatml-tools" (ChatML with tool calls and
                                         # reasoning, for ChatML models), or the path of a Jinja template file
    multi_turn: MultiTurn = "per_turn"   # a template that renders earlier turns differently from the last
                                         # (Qwen3, gpt-oss): "per_turn" makes an example of each assistant turn
                                         # the last rendering does not hold; "last_turn" trains the last only;
                                         # "error" refuses
    reasoning_tags: tuple[str, str] | None = None  # for templates with no place for reasoning: write each
                                         # turn's reasoning inline before its content in these tags
    system_prompt: str | None = None     # system message of conversations without one; None: the template's own
                                         # (SmolLM2's adds "You are a helpful AI assistant named SmolLM, ..."); "": none
    eos_token: str | None = None         # end-of-turn token to learn, if not the tokenizer's EOS (e.g. "<|im_end|>")
    max_length: int = 2048               # tokens per example, and per packed row
    too_long: TooLong = "error"          # examples over max_length: stop, truncate (the cut reply loses its
                                         # end-of-turn), or drop (counted)
    loss_on: LossOn = "assistant"        # which tokens carry loss: the assistant turns, or every token
    packing: bool = True                 # several examples per row of max_length tokens, never attending to each other
    group_by_length: bool = True         # without packing: batch examples of similar length (less padding)
    padding_free: bool = False           # instead of packing: one unpadded row of whole examples per micro-batch
    num_proc: int | str = "auto"         # tokenization processes; "auto": the available cores for large sets
    epochs: int = 1                      # passes over the training examples
    max_steps: int | None = None         # cap on optimizer steps (the schedule is built for the real count)
    micro_batch_size: int = 4            # rows per forward pass, per process
    grad_accum_steps: int = 1            # micro-batches per optimizer step, per process
    lr: float = 2e-5                     # the peak learning rate, after warmup
    lr_schedule: LrSchedule = "cosine"   # the decay after warmup, reaching lr * min_lr_ratio at the last step
    warmup_ratio: float = 0.03           # the share of optimizer steps with a linear warmup from 0
    min_lr_ratio: float = 0.0            # the learning rate at the last step, as a share of lr
    weight_decay: float = 0.0            # AdamW's decoupled weight decay (not on norms and biases)
    adam_betas: tuple[float, float] = (0.9, 0.95)  # AdamW's moment decays
    adam_eps: float = 1e-8               # AdamW's epsilon
    max_grad_norm: float | None = 1.0    # gradients clipped to this global norm; None: not clipped
    seed: int = 42                       # the held-out split, shares, batch order, initialization and sampling
    finetune: Finetune = "full"          # "full": every weight trains; "lora": low-rank adapters (peft), base frozen
    lora_r: int = 16                     # with lora: the adapters' rank
    lora_alpha: float = 32               # with lora: adapter outputs scale by lora_alpha / lora_r (rslora: / sqrt(r))
    lora_dropout: float = 0.0            # with lora: dropout on the adapters' input
    lora_target_modules: str | tuple[str, ...] = "all-linear"  # with lora: "all-linear" (every linear layer
                                         # but the output head), or module names such as ("q_proj", "v_proj")
    use_dora: bool = False               # with lora: DoRA, weight-decomposed adapters (a trained magnitude per output)
    use_rslora: bool = False             # with lora: rank-stabilized scaling, lora_alpha / sqrt(lora_r)
    modules_to_save: tuple[str, ...] | None = None  # with lora: modules trained in full beside the adapters and
                                         # saved with them, e.g. ("embed_tokens", "lm_head") when tokens are added
    load_in_4bit: bool = False           # with lora: QLoRA, the frozen base in 4-bit NF4 with double quantization
                                         # and bf16 compute (bitsandbytes, CUDA GPUs)
    merge_adapter: bool = False          # with lora: also write the base with the adapters merged to model_merged/
    precision: Precision = "auto"        # "auto": bf16_autocast on a bf16-capable GPU (bf16_pure with lora, whose
                                         # trainable weights are fp32 anyway), fp32 on the CPU
    bf16_update: Bf16Update = "stochastic_rounding"  # how pure-bf16 weights keep small updates
    optimizer_state_dtype: StateDtype = "float32"  # "bfloat16" halves AdamW's moments, "int8" quarters them (bf16_pure)
    optimizer_kernel: OptimizerKernel = "auto"  # AdamW step (bf16_pure): "triton" or "torch"; "auto": triton on GPUs
    optimizer_in_backward: bool = False  # step each parameter in the backward pass, freeing its gradient (bf16_pure)
    gradient_checkpointing: bool = False  # recompute decoder layers in the backward pass instead of keeping activations
    checkpoint_every_n_layers: int = 1   # with gradient_checkpointing: 1 = every layer; 2 = every other one...
    attn_implementation: Attention = "auto"  # "auto": varlen flash attention on GPUs with bf16, else sdpa
    loss_impl: LossImpl = "auto"         # "selected": lm_head only on supervised positions, in chunks
    loss_chunk_tokens: int = 4096        # supervised positions per chunk of the selected loss
    compile: bool = False                # torch.compile each decoder layer (one graph shared by all)
    compile_mode: CompileMode = "default"  # torch.compile mode of the layers; "reduce-overhead" adds CUDA graphs
    float8: bool = False                 # float8 matmuls (torchao, rowwise scales) in the decoder layers, on GPUs
                                         # with float8 tensor cores (sm89+); elsewhere the matmuls stay as they are
    activation_offload: bool = False     # activations saved for the backward pass wait in pinned host memory
    log_every: int = 1                   # optimizer steps between train lines of metrics.jsonl
    eval_every: int | None = None        # optimizer steps between held-out evals (always at start and end)
    eval_batch_size: int = 8             # held-out examples per forward pass
    task_metric: TaskMetric | None = "exact_match"  # scored on generations before and after training; None: none
    task_metric_rows: int = 64           # held-out prompts scored by generation, before and after training
    num_samples: int = 8                 # held-out prompts whose generations are saved before and after
    max_new_tokens: int = 64             # tokens generated per held-out prompt, at most
    do_sample: bool = False              # sample instead of greedy decoding
    temperature: float = 1.0             # with do_sample
    top_p: float = 1.0                   # with do_sample: nucleus sampling's probability mass
    generation_batch_size: int = 16      # prompts per generate call
    report_to: tuple[Tracker, ...] = ("tensorboard",)  # trackers fed what metrics.jsonl gets: "tensorboard" (events
                                         # in the run folder), "wandb", "trackio", "mlflow"; () for none
    runs_root: str = DEFAULT_RUNS_ROOT    # a relative path is taken from the current directory
    save_model: bool = True              # write the final model and tokenizer to model/
    push_to_hub: str | None = None       # "user/name": upload model/ and its card after a completed run
    push_private: bool = True            # a private repository (when it is created)
    push_revision: str | None = None     # a branch to upload to (made if missing); None: main
    checkpoint_every: int | None = None  # optimizer steps between checkpoints (also saved on SIGTERM/SIGINT)
    keep_checkpoints: int = 2            # the newest checkpoints kept while training
    keep_checkpoints_after_completion: int = 0  # checkpoints left once the model is saved; with >= 1, the last
                                         # one holds the final step, and raising EPOCHS or MAX_STEPS with RESUME
                                         # set to the completed run trains it further
    resume: str | None = None            # a run folder: continue it from its newest checkpoint, in place
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes recorded with the run

    def __post_init__(self) -> None:
        self._check_types()
        self._check_choices()
        self._check_lora()
        self._check_precision()
        self._check_optimizer()
        self._check_outputs()
        self._check_data()
        self._check_counts()
        self._check_generation()

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value, types_ = getattr(self, f.name), _accepted(_hints()[f.name])
            if types_ is None:
                continue
            if isinstance(value, bool) and bool not in types_:
                raise ConfigError(f"{f.name}: expected {_describe(f.type)}, got {value!r}")
            if not isinstance(value, types_):
                raise ConfigError(f"{f.name}: expected {_describe(f.type)}, got {value!r} ({type(value).__name__})")

    def _check_choices(self) -> None:
        """Every setting annotated with a Literal holds one of its values (each element, for a tuple of them)."""
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), _hints()[f.name]
            for item in (value if get_origin(hint) is tuple else (value,)):
                allowed = _choices(hint)
                if allowed and item is not None:
                    _choice(f.name, item, allowed)
        if self.template not in TEMPLATES and not (self.template.endswith(".jinja")
                                                   and Path(self.template).expanduser().is_file()):
            raise ConfigError(f"template: one of {', '.join(TEMPLATES)} or the path of a .jinja chat template file, "
                              f"got {self.template!r}")
        if self.reasoning_tags is not None and (len(self.reasoning_tags) != 2 or not all(
                isinstance(t, str) and t.strip() for t in self.reasoning_tags)):
            raise ConfigError(f"reasoning_tags: an opening and a closing tag, e.g. ('<think>', '</think>'), "
                              f"got {self.reasoning_tags!r}")
        if len(set(self.report_to)) != len(self.report_to):
            raise ConfigError(f"report_to: names a tracker twice: {list(self.report_to)}")

    def _check_lora(self) -> None:
        """The adapter settings, and what adapters cannot be combined with."""
        if self.finetune == "full":
            for name in LORA_SETTINGS:
                if getattr(self, name) != _DEFAULTS[name]:
                    raise ConfigError(f"{name}: applies to adapters; set finetune='lora' to train them")
            return
        _positive("lora_r", self.lora_r)
        _positive("lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        targets = (self.lora_target_modules,) if isinstance(self.lora_target_modules, str) else self.lora_target_modules
        if not targets or not all(isinstance(t, str) and t.strip() for t in (*targets, *(self.modules_to_save or ()))):
            raise ConfigError(f"lora_target_modules: 'all-linear' or module names, got {self.lora_target_modules!r}")
        for name, value, why in LORA_CONFLICTS:
            if getattr(self, name) == value:
                raise ConfigError(f"{name}: {value!r} cannot be combined with finetune='lora': {why}")
        if self.modules_to_save and self.precision == "bf16_pure":
            raise ConfigError("modules_to_save: modules trained in full need fp32 weights beside the bf16 base, "
                              "which precision='bf16_pure' does not keep; use precision='bf16_autocast' (or 'auto')")
        if self.load_in_4bit and self.precision == "fp32":
            raise ConfigError("load_in_4bit: the 4-bit base computes in bf16; use precision 'bf16_pure', "
                              "'bf16_autocast' or 'auto'")

    def _check_precision(self) -> None:
        """Settings that only work with some precisions."""
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"compile_mode: {self.compile_mode!r} applies to compiled layers; set compile=True")
        if self.float8 and self.precision == "fp32":
            raise ConfigError("float8: float8 matmuls replace bf16 ones; use precision 'bf16_autocast' or "
                              "'bf16_pure' (or 'auto', which falls back to plain matmuls on the CPU)")
        if self.attn_implementation == "varlen" and self.precision == "fp32":
            raise ConfigError("attn_implementation: 'varlen' runs flash-attention kernels in bf16; use precision "
                              "'bf16_autocast' or 'bf16_pure' (or 'auto' on a GPU), or attn_implementation 'sdpa'")
        if self.padding_free and self.packing:
            raise ConfigError("padding_free: replaces packing; set packing=False to use it")
        if self.optimizer_state_dtype != "float32" and self.precision != "bf16_pure":
            raise ConfigError(f"optimizer_state_dtype: {self.optimizer_state_dtype!r} needs precision='bf16_pure'")
        if self.optimizer_state_dtype == "int8" and self.bf16_update != "stochastic_rounding":
            raise ConfigError(f"optimizer_state_dtype: 'int8' is implemented with bf16_update='stochastic_rounding', "
                              f"not {self.bf16_update!r}")
        if self.optimizer_kernel == "triton" and (self.precision, self.bf16_update) != ("bf16_pure",
                                                                                          "stochastic_rounding"):
            raise ConfigError("optimizer_kernel: 'triton' is the step of precision='bf16_pure' with "
                              "bf16_update='stochastic_rounding'")

    def _check_optimizer(self) -> None:
        """Stepping in the backward pass, and the optimizer's own numbers."""
        if self.optimizer_in_backward:
            if self.precision != "bf16_pure":
                raise ConfigError("optimizer_in_backward: needs precision='bf16_pure', whose AdamW steps one "
                                  "parameter at a time (fp32 master weights use torch's fused AdamW over all at once)")
            if self.grad_accum_steps != 1:
                raise ConfigError(f"optimizer_in_backward: the parameters step in every backward pass, so it needs "
                                  f"grad_accum_steps=1, got {self.grad_accum_steps} (raise micro_batch_size instead)")
            if self.max_grad_norm is not None:
                raise ConfigError(f"optimizer_in_backward: clipping to max_grad_norm={self.max_grad_norm} needs the "
                                  f"norm of every gradient before the first parameter steps; set max_grad_norm=None "
                                  f"(the gradient norm is still logged)")
        _positive("lr", self.lr)
        _positive("adam_eps", self.adam_eps)
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay: must be a finite number >= 0, got {self.weight_decay}")
        if len(self.adam_betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                and 0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas: two numbers in [0, 1), got {self.adam_betas}")

    def _check_outputs(self) -> None:
        """The run's name and where its model goes."""
        if self.push_to_hub is not None:
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", self.push_to_hub):
                raise ConfigError(f"push_to_hub: a hub repository id of the form owner/name, got {self.push_to_hub!r}")
            if not self.save_model:
                raise ConfigError("push_to_hub: uploads the saved model; set save_model=True")
        if not self.experiment.strip() or any(c in self.experiment for c in "/\\ "):
            raise ConfigError(f"experiment: a non-empty name without spaces or slashes, got {self.experiment!r}")
        for name in ("model", "dataset"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name}: must not be empty")

    def _check_data(self) -> None:
        """The mixture and the held-out rows."""
        if self.datasets is not None:
            self._check_mixture()
        if isinstance(self.eval_rows, float) and not 0 < self.eval_rows < 1:  # None passes both checks
            raise ConfigError(f"eval_rows: a count >= 1 or a fraction in (0, 1), got {self.eval_rows}")
        if isinstance(self.eval_rows, int) and self.eval_rows < 1:
            raise ConfigError(f"eval_rows: a count >= 1 or a fraction in (0, 1), got {self.eval_rows}")
        if self.eval_dataset is not None and isinstance(self.eval_rows, float):
            raise ConfigError(f"eval_rows: with eval_dataset, a count of its first rows, got {self.eval_rows}")

    def _check_counts(self) -> None:
        """Counts and sizes: positive where zero makes no sense, in range where they have one."""
        for name in ("max_length", "micro_batch_size", "grad_accum_steps", "epochs", "log_every",
                     "eval_batch_size", "max_new_tokens", "generation_batch_size", "checkpoint_every_n_layers",
                     "loss_chunk_tokens", "keep_checkpoints"):
            _positive(name, getattr(self, name))
        if self.num_proc != "auto":
            if isinstance(self.num_proc, str):
                raise ConfigError(f"num_proc: 'auto' or a number of processes, got {self.num_proc!r}")
            _positive("num_proc", self.num_proc)
        if not 0 <= self.keep_checkpoints_after_completion <= self.keep_checkpoints:
            raise ConfigError(f"keep_checkpoints_after_completion: from 0 to keep_checkpoints "
                              f"({self.keep_checkpoints}), got {self.keep_checkpoints_after_completion}")
        for name in ("max_steps", "max_rows", "eval_every", "checkpoint_every"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("task_metric_rows", "num_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:  # the range torch, numpy and random all accept
            raise ConfigError(f"seed: must be in [0, 2**32), got {self.seed}")

    def _check_generation(self) -> None:
        if self.do_sample:
            _positive("temperature", self.temperature)
            if not 0 < self.top_p <= 1:
                raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")

    def _check_mixture(self) -> None:
        if not isinstance(self.datasets, (list, tuple)) or not self.datasets:
            raise ConfigError(f"datasets: a non-empty list of (source, share) pairs, got {self.datasets!r}")
        for name, default in (("dataset", EMBEDDED_DATASET), ("dataset_revision", None), ("dataset_files", None),
                              ("max_rows", None), ("eval_dataset", None)):
            if getattr(self, name) != default:
                where = ("each source holds out its own rows (eval_rows of each)" if name == "eval_dataset" else
                         "give it per source: (source, share, {'" + name.removeprefix("dataset_") + "': ...})"
                         if name != "dataset" else "list every source in datasets")
                raise ConfigError(f"{name}: set with datasets, which replaces it; {where}")
        self.sources()  # every entry parses

    def sources(self) -> list["Source"]:
        """The run's datasets: the one `dataset`, or each entry of `datasets`."""
        if self.datasets is None:
            return [Source(self.dataset, None, self.dataset_format, self.dataset_revision, self.dataset_files,
                           self.dataset_split, self.max_rows, self.dataset)]
        return mixture_sources(self.datasets, default_format=self.dataset_format,
                               default_split=self.dataset_split)

    @classmethod
    def from_record(cls, record: dict[str, Any], **changes: Any) -> "TrainConfig":
        """The config a run folder's config.json records (JSON lists back to tuples), with `changes`."""
        return cls(**{**record, "adam_betas": tuple(record["adam_betas"]), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


LORA_SETTINGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_dora", "use_rslora",
                 "modules_to_save", "load_in_4bit", "merge_adapter")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
# (setting, value, why): each is one clear error with finetune="lora"
LORA_CONFLICTS = (
    ("optimizer_state_dtype", "bfloat16", "the adapters' weights are fp32 and keep fp32 AdamW states"),
    ("optimizer_state_dtype", "int8", "the adapters' weights are fp32 and keep fp32 AdamW states"),
    ("optimizer_kernel", "triton", "it steps bf16 weights, and the adapters' weights are fp32"),
    ("optimizer_in_backward", True, "it steps bf16 weights one at a time, and the adapters' are fp32"),
    ("float8", True, "float8 matmuls would also take over the adapters' own small linear layers"),
)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}: must be > 0, got {value!r}")


def _hints() -> dict[str, Any]:
    """The fields' types, resolved from their annotations (strings under `from __future__ import annotations`)."""
    global _HINTS
    if _HINTS is None:
        _HINTS = get_type_hints(TrainConfig)
    return _HINTS


_HINTS: dict[str, Any] | None = None
_PLAIN = {int: (int,), float: (int, float), str: (str,), bool: (bool,), type(None): (type(None),), list: (list,),
          dict: (dict,), tuple: (tuple, list)}


def _accepted(hint) -> tuple[type, ...] | None:
    """The Python types a setting of this type may hold (None: not checked)."""
    origin = get_origin(hint)
    if origin is Literal:
        return tuple({type(v) for v in get_args(hint)})
    if origin in (types.UnionType, Union):
        parts = [_accepted(h) for h in get_args(hint)]
        return None if None in parts else tuple(t for p in parts for t in p)
    return _PLAIN.get(origin or hint)


def _choices(hint) -> tuple | None:
    """The values a Literal-typed setting (or each element of a tuple of them) may take."""
    origin = get_origin(hint)
    if origin is Literal:
        return get_args(hint)
    if origin is tuple:
        return _choices(get_args(hint)[0])
    if origin in (types.UnionType, Union):
        found = [c for c in map(_choices, get_args(hint)) if c]
        return found[0] if found else None
    return None


def _describe(hint: str) -> str:
    """A field's type as an error names it: its annotation, with each choice type as the str it holds."""
    named = re.sub(r"\b[A-Z]\w*\b", lambda m: "str" if get_origin(globals().get(m[0])) is Literal else m[0], hint)
    return " or ".join(part.strip() for part in named.split("|"))


def settings_from(namespace: dict[str, Any]) -> dict[str, Any]:
    """The settings of an experiment script: its UPPER_CASE constants, named after TrainConfig fields.
    A constant that names no field is an error, so a typo never silently leaves a default in place; so
    is a value named like a setting but not in upper case (`lr = 1e-3`), which would be ignored. Names
    starting with `_` are the script's own; imported modules, functions and classes are not settings."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {}
    for name, value in namespace.items():
        if name.startswith("_"):
            continue
        if not name.isupper():
            if name.lower() in fields and not (isinstance(value, types.ModuleType) or callable(value)):
                raise ConfigError(f"{name}: settings are UPPER_CASE constants; write {name.upper()} = ...")
            continue
        if name.lower() not in fields:
            raise ConfigError(_not_a_setting(name, fields))
        settings[name.lower()] = value
    return settings


def _not_a_setting(name: str, fields: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(f.upper() for f in fields), n=3)
    guess = f" (did you mean {' or '.join(close)}?)" if close else ""
    return (f"{name}: not a setting{guess}; the settings are the fields of TrainConfig (sft/config.py) in "
            f"upper case, and a constant of the script's own starts with _ (e.g. _{name})")


def script_spelling(message: str) -> str:
    """An error message with the settings it names spelt as in the experiment scripts: the leading
    `field:` and the `field=` mentions in the text, for the fields of TrainConfig.

    >>> script_spelling("padding_free: replaces packing; set packing=False to use it")
    'PADDING_FREE: replaces packing; set PACKING=False to use it'
    """
    names = "|".join(f.name for f in dataclasses.fields(TrainConfig))
    message = re.sub(rf"^({names}):", lambda m: f"{m[1].upper()}:", message)
    # only after a space or "(", so that a path or value holding "lr=" keeps its spelling
    return re.sub(rf"(?<![^\s(])({names})=", lambda m: f"{m[1].upper()}=", message)
