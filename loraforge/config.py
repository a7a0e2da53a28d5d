"""Typed configuration. Parsed once at the edge (CLI / YAML / Python), then passed down as sections."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraforge.errors import ConfigError

ALL_LINEAR = "all-linear"


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AdaLoraOptions(Section):
    """AdaLoRA (Zhang et al. 2023): SVD-form adapters P·Λ·Q whose total rank is pruned from init_r to target_r
    per layer on average, by an EMA of |weight × gradient| sensitivity. Names follow PEFT's AdaLoraConfig."""

    init_r: int = Field(12, ge=1, description="Rank every layer starts with.")
    target_r: int = Field(8, ge=1, description="Average rank per layer at the end of the budget schedule.")
    tinit: int = Field(0, ge=0, description="Warmup steps before any rank is pruned.")
    tfinal: int = Field(0, ge=0, description="Final steps that train with the budget fixed.")
    delta_t: int = Field(1, ge=1, description="Steps between two budget allocations (PEFT: deltaT).")
    beta1: float = Field(0.85, ge=0, lt=1, description="EMA factor of the sensitivity.")
    beta2: float = Field(0.85, ge=0, lt=1, description="EMA factor of the sensitivity's uncertainty.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality regulariser on P and Q.")
    total_step: int | None = Field(None, ge=1, description="Steps of the run (the trainer fills it in).")
    rank_pattern: dict[str, list[bool]] | None = Field(
        None, description="Set by pruning and loading, not by hand: which of the init_r triplets each module's "
        "tensors keep, keyed '<module>.lora_E' (PEFT's rank_pattern). None while every module holds init_r."
    )

    @field_validator("target_r")
    @classmethod
    def _target_within_init(cls, value: int, info) -> int:
        if "init_r" in info.data and value > info.data["init_r"]:
            raise ValueError(f"must not exceed init_r ({info.data['init_r']}): ranks are only ever pruned")
        return value


class LycorisOptions(Section):
    """Options of LoHa and LoKr (the LyCORIS family). Names follow PEFT's LoHaConfig / LoKrConfig."""

    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on rank components during training.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of skipping the whole update.")
    use_effective_conv2d: bool = Field(False, description="Conv2d: Tucker-style factors for the kernel (LyCORIS).")
    decompose_both: bool = Field(False, description="LoKr: factor the left Kronecker matrix too.")
    decompose_factor: int = Field(-1, description="LoKr: split of each dimension (-1: as square as possible).")
    rank_dropout_scale: bool = Field(
        False, description="LoKr: rescale the rows kept by rank dropout (LoHa always does)."
    )
    init_weights: bool | Literal["lycoris"] = Field(
        True, description="True: a fresh adapter changes nothing (LoHa W2b = 0, LoKr W1 = 0); 'lycoris' (LoKr): "
        "W2 = 0 instead, as the LyCORIS repository; False: every factor random (fresh ≠ base)."
    )


class LoraConfig(Section):
    """One adapter's shape and placement: h = W0·x + s·B·A·dropout(x), s = alpha/r (alpha/√r with rsLoRA).

    `method` picks the update's form: lora (B·A, optionally DoRA-normalised), loha (Hadamard product of two
    low-rank products), lokr (Kronecker product) or adalora (P·Λ·Q with rank pruning)."""

    method: Literal["lora", "loha", "lokr", "adalora"] = Field("lora", description="Form of the weight update.")

    r: int = Field(8, ge=1, description="Rank of the update B·A.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator; the update is multiplied by alpha/r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input (training only).")
    targets: list[str] | str = Field(
        ALL_LINEAR,
        description=(
            "Modules to adapt: a list of name suffixes (e.g. [q_proj, v_proj] or q_proj,v_proj), a regex matched against the full "
            "module name, or 'all-linear' (every Linear / GPT-2 Conv1D except the output head). An empty list "
            "adapts only target_parameters."
        ),
    )
    target_parameters: list[str] = Field(
        default_factory=list,
        description="Parameter paths to adapt directly, e.g. 'mlp.experts.gate_up_proj' for MoE experts stored "
        "as 3-D tensors (one LoRA per expert).",
    )
    layers_to_transform: list[int] | None = Field(None, description="Only adapt these layer indices.")
    layers_pattern: str | None = Field(
        None, description="Name of the layer list used by layers_to_transform (e.g. 'layers', 'h'); default: the "
        "first numbered path segment."
    )
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="Per-module rank by name suffix/regex.")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="Per-module alpha by name suffix/regex.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full as a copy per adapter (e.g. the lm_head)."
    )
    use_rslora: bool = Field(False, description="Scale by alpha/√r (rank-stabilised LoRA) instead of alpha/r.")
    plus_ratio: float = Field(
        1.0, gt=0, description="LoRA+: learning rate of B = plus_ratio × that of A (Hayou et al. 2024 suggest 16)."
    )
    use_dora: bool = Field(
        False, description="DoRA: learn a per-output magnitude on top of the LoRA direction (Linear layers)."
    )
    init: str = Field(
        "kaiming", description="Initialisation: 'kaiming' or 'gaussian' (A random, B zero: a fresh adapter equals "
        "the base), 'pissa' (A, B from the top-r singular vectors of W0, which keeps the residual) or "
        "'pissa_niter_N' (the same by randomized SVD with N power iterations: fast on large layers)."
    )
    adalora: AdaLoraOptions = Field(default_factory=AdaLoraOptions, description="Options of method=adalora.")
    lycoris: LycorisOptions = Field(default_factory=LycorisOptions, description="Options of method=loha / lokr.")
    base_model_name_or_path: str | None = Field(None, description="Recorded in adapter_config.json.")

    @field_validator("targets", mode="before")
    @classmethod
    def _comma_list_of_names(cls, value):
        # LLaMA-Factory / axolotl users write `q_proj,v_proj`: as a regex that would match no module at all.
        if isinstance(value, str) and "," in value:
            names = [part.strip() for part in value.split(",")]
            if all(re.fullmatch(r"[\w.\-]+", name) for name in names):
                return names
        return value

    @field_validator("targets")
    @classmethod
    def _targets_valid(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str) and value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regex: {exc}") from None
        return value

    @model_validator(mode="after")
    def _only_what_the_method_reads(self) -> LoraConfig:
        # One flat section serves four methods; an option the chosen method would ignore is an error naming the
        # key, never a silent no-op (lora.r on AdaLoRA was printed and ignored).
        for key, reason in unread_options(self):
            raise ValueError(f"{key}: {reason}")
        return self

    @field_validator("init")
    @classmethod
    def _init_known(cls, value: str) -> str:
        if value not in ("kaiming", "gaussian", "pissa") and not re.fullmatch(r"pissa_niter_[1-9][0-9]*", value):
            raise ValueError("must be 'kaiming', 'gaussian', 'pissa' or 'pissa_niter_N' (N ≥ 1)")
        return value


# LoRA options (with their defaults) that the other methods do not have. LoHa / LoKr: their own dropouts are
# lycoris.rank_dropout / module_dropout, and they have no B for LoRA+. AdaLoRA (as PEFT's): no DoRA, rsLoRA,
# PiSSA, alpha_pattern or expert tensors; dropout it has, and LoRA+ (a learning rate for its B) is the trainer's.
NOT_READ_BY = {
    "loha": {"dropout": 0.0, "use_rslora": False, "use_dora": False, "init": "kaiming", "plus_ratio": 1.0},
    "lokr": {"dropout": 0.0, "use_rslora": False, "use_dora": False, "init": "kaiming", "plus_ratio": 1.0},
    "adalora": {"use_rslora": False, "use_dora": False, "init": "kaiming", "alpha_pattern": {},
                "target_parameters": []},
}


def unread_options(config: LoraConfig) -> list[tuple[str, str]]:
    """(key, why) for every option set away from its default that config.method does not read."""
    method, unread = config.method, []
    if method != "adalora" and config.adalora != AdaLoraOptions():
        unread.append(("adalora", f"options of method=adalora; method={method} does not read them"))
    if method not in ("loha", "lokr") and config.lycoris != LycorisOptions():
        unread.append(("lycoris", f"options of method=loha / lokr; method={method} does not read them"))
    if method == "adalora":
        if config.r != LoraConfig.model_fields["r"].default:
            unread.append(("r", "method=adalora does not read it: every module starts at adalora.init_r and is "
                                "pruned towards adalora.target_r"))
        if config.rank_pattern and not config.adalora.rank_pattern:
            unread.append(("rank_pattern", "method=adalora sets the ranks itself (pruning writes "
                                           "adalora.rank_pattern); a hand-written one would mean something else"))
    for key, default in NOT_READ_BY.get(method, {}).items():
        if getattr(config, key) != default:
            unread.append((key, f"a LoRA option that method={method} does not have; leave it at {default!r}"))
    return unread


class DataConfig(Section):
    """Where the conversations come from and how they are cleaned, split and tokenized."""

    path: Path | None = Field(None, description="JSONL/JSON file of conversations (default: the bundled demo data).")
    format: Literal["auto", "messages", "alpaca", "sharegpt"] = Field(
        "auto", description="Row format; 'auto' detects it per row from its keys."
    )
    skip_invalid: bool = Field(False, description="Skip (and count) invalid rows instead of stopping at the first.")
    dedupe: bool = Field(True, description="Drop exact-duplicate conversations.")
    split: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="Train/validation/test fractions of a seeded shuffle."
    )
    validation_path: Path | None = Field(None, description="Explicit validation file (then no split is taken).")
    test_path: Path | None = Field(None, description="Explicit test file.")

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(part < 0 for part in value) or abs(sum(value) - 1.0) > 1e-6 or value[0] == 0:
            raise ValueError("must be three non-negative fractions summing to 1, with a non-empty train part")
        return value


class DpoOptions(Section):
    """Direct preference optimisation (Rafailov et al. 2023) on prompt / chosen / rejected rows. The reference
    model is the base with the adapter switched off: no second copy in memory."""

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference (TRL's default 0.1).")
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO's loss; ipo: Azar et al.'s squared loss on per-token average "
        "log-probabilities (as TRL)."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO: the share of labels assumed flipped.")


class DistributedOptions(Section):
    """Several processes under torchrun (distributed.py); one process ignores this section."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every rank holds the whole base, adapter gradients are all-reduced; fsdp: FSDP2 "
        "shards the frozen base over the ranks (one layer all-gathered at a time), for bases that do not fit one "
        "device."
    )
    timeout_s: float = Field(
        600, ge=10, description="A collective (a step's all-reduce, a barrier) that waits longer raises: a rank that "
        "died or hangs takes the job down instead of leaving the others waiting."
    )


class GrpoOptions(Section):
    """Group relative policy optimisation (Shao et al. 2024) on prompt rows and a reward written in Python."""

    reward: list[str] | str = Field(
        default_factory=list, description="Reward function(s): 'path/to/file.py:function' or 'module:function', "
        "called as function(prompt_messages, completion_text, row) -> float with row the raw data row; a list for "
        "several (summed with reward_weights)."
    )
    reward_weights: list[float] | None = Field(None, description="One weight per reward (default: all 1).")
    group_size: int = Field(8, ge=2, description="Completions sampled per prompt (TRL: num_generations).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    max_new_tokens: int = Field(64, ge=1, description="Completion length cap of the rollouts.")
    beta: float = Field(0.0, ge=0, description="KL penalty to the base model (0, as TRL: no reference pass).")
    epsilon: float = Field(0.2, gt=0, description="Clipping of the probability ratio: [1-epsilon, 1+epsilon_high].")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip (DAPO's clip-higher; default epsilon).")
    iterations: int = Field(1, ge=1, description="Optimizer steps on each rollout batch (TRL: num_iterations, μ).")
    scale_rewards: bool = Field(True, description="Divide advantages by the group's std (false: Dr. GRPO).")
    loss_type: Literal["dapo", "grpo"] = Field(
        "dapo", description="dapo: token-level mean over the step's completion tokens (TRL's default); grpo: the "
        "paper's mean per completion, then over completions."
    )

    @field_validator("reward", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value


class TrainConfig(Section):
    """One fine-tuning job: `loraforge train [config.yaml] [key=value ...]`."""

    model: str = Field("default", description="Base model: a local Hugging Face folder, or 'default' (SmolLM2-135M).")
    stage: Literal["sft", "dpo", "grpo"] = Field(
        "sft", description="sft: supervised answers; dpo: preference pairs (prompt/chosen/rejected); grpo: "
        "reinforcement learning from a reward on prompt rows."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="A file path, or a data section.")
    output: Path = Field(Path("runs/demo"), description="Run folder: adapter, checkpoints, metrics, plots.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (when max_steps is unset).")
    batch_size: int = Field(8, ge=1, description="Conversations per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (LoRA's optimum is ~10× full fine-tuning's).")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: no clipping).")
    max_seq_len: int = Field(512, ge=8, description="Tokens per conversation; longer ones are truncated.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast dtype. auto: bf16 on CUDA GPUs that have it; on a CPU bf16 where it has native "
        "bf16 (AVX-512 BF16 / AMX) and a probe matmul ran ≥ 2× faster than fp32 (cached per machine), else fp32."
    )
    base_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Storage of the adapted layers' frozen weights. auto: the autocast dtype under bf16/fp16 "
        "autocast (what every matmul casts them to anyway, so nothing changes but the bytes), else fp32. bf16 on "
        "CPU halves those bytes and still computes in fp32 (weights are widened per use). Where the storage dtype "
        "is the autocast dtype, a frozen input embedding and output head are kept in it too (rows widened as "
        "they are looked up)."
    )
    compact_cpu_memory: bool = Field(
        False, description="On Linux CPUs, have glibc return every freed block above 128 KiB to the system at once, "
        "for the rest of the process: peak RSS −30% on the demo job, but steps are slower (fresh pages every step). "
        "With base_dtype=bf16 the demo job peaks at under half of PEFT+TRL's memory (BENCHMARKS.md)."
    )
    quant: Literal["none", "nf4", "int8"] = Field(
        "none", description="QLoRA: keep the frozen base's linear weights in 4-bit NF4 (double-quantized, "
        "blocksize 64) or 8-bit via bitsandbytes; adapters stay in full precision."
    )
    finetune: Literal["lora", "full"] = Field(
        "lora", description="'full' trains every weight instead of an adapter (for comparisons); writes a model."
    )
    packing: bool = Field(
        False, description="Pack several short conversations into one row (padding-free; attention never "
        "crosses conversations)."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute layer activations in backward: less memory, ~30% more compute. 'auto': on "
        "when the estimated step would not fit in this device's free memory without it."
    )
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', …")
    eval_every: int | None = Field(None, ge=1, description="Validation loss every N steps (default: 10 evals, "
                                   "fewer where a 16-row sample would cost over 10% of an interval's training).")
    val_samples: int | None = Field(
        None, ge=1, description="Validation rows evaluated at each interval, the same rows every time (default: as "
        "many as cost ≤ 10% of the interval's training compute, at least 16); the full split is evaluated once, "
        "at the end."
    )
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (default: at the end only).")
    keep_checkpoints: int = Field(2, ge=1, description="Newest complete checkpoints kept.")
    patience: int | None = Field(None, ge=1, description="Stop after N evaluations without improvement.")
    max_bad_steps: int = Field(5, ge=1, description="Stop after this many NaN/inf losses in a row.")
    seed: int = Field(0)
    resume: bool = Field(False, description="Continue the run in output/ from its newest complete checkpoint (the "
                         "base model, data and result-changing keys must match; max_steps, intervals, patience may "
                         "change).")
    overwrite: bool = Field(False, description="Start a new run in an output/ that holds another: the old run is "
                            "moved aside to output.old-TIMESTAMP, never deleted.")
    compare: bool = Field(True, description="After training, answer held-out test prompts with base and tuned model.")
    compare_samples: int = Field(100, ge=0, description="Test prompts answered by base and tuned model.")
    compare_cache: bool = Field(True, description="Keep the base model's side of the comparison (its test loss and "
                                "answers) in the cache ($LORAFORGE_CACHE/comparisons) and reuse it in later runs with "
                                "the same base model files, test prompts and settings.")
    max_new_tokens: int = Field(64, ge=1, description="Answer length cap for the comparison.")
    eval_metrics: list[str] | str = Field(
        "auto", description="Answer metrics of the comparison: 'auto', or a list of exact_match, token_f1, rouge1, "
        "rouge2, rougeL, bleu, chrf, accuracy, macro_f1."
    )
    report: bool = Field(True, description="Write report.html / report.json into the run folder at the end.")
    tensorboard: bool = Field(True, description="Write TensorBoard logs to output/tensorboard.")
    dpo: DpoOptions = Field(default_factory=DpoOptions, description="Options of stage=dpo.")
    grpo: GrpoOptions = Field(default_factory=GrpoOptions, description="Options of stage=grpo.")
    distributed: DistributedOptions = Field(default_factory=DistributedOptions,
                                            description="torchrun: how the ranks share the work.")

    @model_validator(mode="after")
    def _stage_options(self) -> TrainConfig:
        if self.stage != "sft" and self.finetune == "full":
            raise ValueError(f"stage: {self.stage} uses the base with the adapter off as its reference; "
                             "finetune=full has no adapter to switch off")
        if self.stage != "sft" and self.packing:
            raise ValueError(f"packing: packs SFT conversations; stage={self.stage} keeps one sequence per row")
        if self.distributed.strategy == "fsdp":
            if self.quant != "none":
                raise ValueError(
                    f"distributed.strategy: fsdp cannot shard a {self.quant} base: bitsandbytes' quantized weights have "
                    "no FSDP2 all-gather extension (fsdp_pre_all_gather / fsdp_post_all_gather), so sharding would "
                    "drop their quantization state (Answer.AI's fsdp_qlora needs FSDP1 with quant storage in the "
                    "compute dtype). Use distributed.strategy=ddp: each device holds the 4-bit base")
            if self.finetune == "full":
                raise ValueError("distributed.strategy: fsdp shards the frozen base and keeps the adapter whole; "
                                 "finetune=full has no frozen base (use ddp)")
            if self.stage == "grpo":
                raise ValueError("distributed.strategy: stage=grpo samples on each rank's own engine, which needs the "
                                 "whole model on the rank (use ddp)")
        for name, options in (("dpo", DpoOptions), ("grpo", GrpoOptions)):
            if self.stage != name and getattr(self, name) != options():
                raise ValueError(f"{name}: options of stage={name}; stage={self.stage} does not read them")
        if self.stage == "grpo":
            if not self.grpo.reward:
                raise ValueError("grpo.reward: stage=grpo needs a reward function, e.g. "
                                 "grpo.reward=rewards.py:score")
            weights = self.grpo.reward_weights
            if weights is not None and len(weights) != len(self.grpo.reward):
                raise ValueError(f"grpo.reward_weights: {len(weights)} weights for {len(self.grpo.reward)} rewards")
        return self

    @field_validator("data", mode="before")
    @classmethod
    def _data_path_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, (str, Path)) else value


def parse_section(section: type[Section], values: dict, where: str = "") -> Section:
    """Build a section from a plain dict, turning pydantic's errors into a ConfigError that names each key."""
    try:
        return section.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key, message = ".".join(str(part) for part in error["loc"]), error["msg"]
            if not key:  # a whole-section check (LoraConfig's unread options) names its key as "key: reason"
                key, _, message = message.removeprefix("Value error, ").partition(": ")
            problems.append(f"{where}.{key}: {message}" if where else f"{key}: {message}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None


def apply_override(values: dict, dotted: str) -> None:
    """Apply `key.sub=value` to a nested dict; the value is read as YAML (numbers, lists, true/false, null)."""
    key, sep, raw = dotted.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {dotted!r} must look like key=value (e.g. lora.r=16)")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot read {raw!r}: {exc}") from None
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, (str, Path)) and part == "data":
            child = {"path": child}  # `data=file` then `data.format=…`
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) + dotted overrides → one validated TrainConfig. Errors name the key."""
    values: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(loaded).__name__}")
        values = loaded or {}
    for override in overrides or []:
        apply_override(values, override)
    return parse_section(TrainConfig, values)


def config_to_yaml(config: Section) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
