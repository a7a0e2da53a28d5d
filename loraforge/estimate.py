"""Know before you train: parameters, memory, FLOPs and time of a fine-tuning job, without loading a weight.

    loraforge estimate llama-3-8b lora.r=16 'lora.targets=[q_proj,v_proj]' batch_size=4 max_seq_len=2048
    loraforge estimate default batch_size=8 max_seq_len=128 --calibrate     # two real steps: predicted vs measured

The model (a preset shipped in loraforge/presets, a config.json, a Hugging Face folder or `default`) is built on
PyTorch's `meta` device: every shape is real, no memory is used. Trainable parameters come from our own
targeting (a LoraModel on the meta model). Memory is counted per part, for full fine-tuning, LoRA and QLoRA:

  weights      frozen weights in `dtype` (QLoRA: the Linear weights in NF4); adapters in fp32
  gradients    one per trainable parameter, in its dtype
  optimizer    AdamW's two fp32 states per trainable parameter
  activations  what autograd keeps for backward (see `saved_elements_per_token`)
  logits       full fine-tuning: the fp32 log-probabilities of the target tokens (at most one chunk of them, see
               loss.head_cross_entropy) and two gradient buffers of that size; LoRA and QLoRA (a frozen head):
               one chunk of logits during forward, in fp32 and the compute dtype (loss._FrozenHeadCrossEntropy)

Peak = weights + optimizer + max(activations + logits + first gradients, all gradients): backward starts with
every activation alive (and the output head's gradient), and ends with every gradient alive.

Per device with several processes (`--world-size N`, distributed.py): DDP adds one bucket copy of the trainable
gradients; FSDP (LoRA only) keeps 1/N of the frozen weights plus, whole, what is outside the decoder layers (the
root group: embeddings, head, final norm) and two layers (the one computing and the next, prefetched), and one flat
buffer of the adapter's gradients. Activations are per micro-batch, the same on every device.
FLOPs per token follow Kaplan et al. 2020 (forward = 2·N + 2·layers·seq·d_attn): full fine-tuning is 3 forwards;
LoRA is 2 forwards plus 6 per adapter parameter, since W0 gets no weight gradient (≈ 2/3 of full).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from loraforge.advise import AdapterLayout, adapter_layout
from loraforge.config import LoraConfig, TrainConfig, load_train_config
from loraforge.console import make_console
from loraforge.errors import ConfigError, LoraforgeError
from loraforge.hardware import autocast_for, compact_cpu_allocator, dtype_named, grad_scaler_for, trim_cpu_heap
from loraforge.loss import FROZEN_HEAD_CHUNK_ELEMENTS, LOGITS_CHUNK_ELEMENTS
from loraforge.lora.fused_mlp import SWIGLU_MLPS
from loraforge.lora.targeting import layer_index
from loraforge.memory import frozen_embedding_weights
from loraforge.rms_norm import RMS_NORMS

PRESETS = Path(__file__).parent / "presets"
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAPTER_BYTES = 4  # adapters train in fp32 whatever the base holds (lora/layers.py: adapter_dtype)
ADAMW_STATE_BYTES = 8  # exp_avg and exp_avg_sq, fp32
# QLoRA's NF4 (Dettmers et al. 2023, §3): 4 bits per weight, one 8-bit absmax per 64-weight block and, with double
# quantization, one fp32 constant per 256 absmax values: 4 + 8/64 + 32/(64·256) bits.
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
LOGIT_BUFFERS = 3  # log-probs, d(log-probs), d(logits) of one chunk: fp32, alive together in backward
FROZEN_HEAD_LOGIT_BUFFERS = 2  # a frozen head's chunk of logits: in fp32, and in the compute dtype for the matmuls
ATTENTION_OUTPUT = re.compile(r"(^|\.)(o_proj|out_proj|dense|c_proj|wo)$")
MLP_OUTPUT = re.compile(r"(^|\.)(down_proj|c_proj|fc2|w2|dense_4h_to_h)$")
MODES = ("full", "lora", "qlora")


# -- the model ------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.json"))


def load_model_config(model: str):
    """A transformers config from a preset name, a config.json file, a model folder or 'default'."""
    from transformers import AutoConfig

    from loraforge.models import is_default_model, resolve_model_path

    path = Path(model).expanduser()
    if (PRESETS / f"{model}.json").is_file():
        path = PRESETS / f"{model}.json"
    elif is_default_model(model):
        path = resolve_model_path(model) / "config.json"
    elif path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"model {model!r}: not a preset ({', '.join(preset_names())}), nor a config.json or a "
                          "model folder with one")
    try:
        raw = json.loads(path.read_text())
        # Keys starting with "_" are notes (presets) or transformers' bookkeeping, not architecture.
        return AutoConfig.for_model(**{k: v for k, v in raw.items() if not k.startswith("_")})
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: not a transformers model config ({error})") from None


def meta_model(config) -> nn.Module:
    """The model with every parameter on the meta device: real shapes, no memory, no initialisation cost."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def config_dtype(config) -> str:
    """The model's own weight dtype as fp32 / bf16 / fp16 (fp32 when the config names none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(name, "fp32")


@dataclass(frozen=True)
class Architecture:
    """The widths that activation memory and FLOPs depend on."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int  # per expert for a mixture of experts
    q_dim: int  # attention heads × head_dim
    kv_dim: int  # key/value heads × head_dim
    vocab: int
    experts: int = 0
    experts_per_token: int = 1

    @classmethod
    def from_config(cls, config) -> Architecture:
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
        intermediate = (getattr(config, "moe_intermediate_size", None) if experts else None) or \
            getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        return cls(model_type=config.model_type, layers=config.num_hidden_layers, hidden=hidden,
                   intermediate=intermediate, q_dim=heads * head_dim,
                   kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim, vocab=config.vocab_size,
                   experts=experts, experts_per_token=getattr(config, "num_experts_per_tok", 1) if experts else 1)


@dataclass
class Parameters:
    total: int
    per_token: int  # weights in one token's matmuls: active experts only, the head, not the embedding lookup
    head: int  # the output head, whose gradient backward allocates first
    quantizable: int  # Linear weights but the head: what QLoRA keeps in NF4
    outside_layers: int  # weights in no decoder layer (embeddings, head, final norm): FSDP's root group
    embeddings: int  # frozen input embedding and head left plain by the adapter (tied: once), memory.store_embeddings_in
    adapter: AdapterLayout  # what the LoRA config trains, by loraforge's own targeting


def count_parameters(config, lora_config: LoraConfig) -> Parameters:
    """Count on meta models: the base, then the base with the LoRA config applied by loraforge's targeting."""
    from loraforge.lora import LoraModel

    model = meta_model(config)
    arch = Architecture.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    head_module = model.get_output_embeddings()
    embedding = model.get_input_embeddings().weight
    tied = head_module is not None and head_module.weight is embedding
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    inactive = experts * (1 - arch.experts_per_token / arch.experts) if arch.experts else 0
    quantizable = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head_module)
    counting = lora_config.model_copy(update={"init": "kaiming"})  # PiSSA's SVD cannot run on meta; counts agree
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a target that matches nothing is reported by `train`, not here
        layout = adapter_layout(LoraModel(model, counting))
    outside = sum(p.numel() for n, p in model.named_parameters() if layer_index(n, None) is None)
    return Parameters(total=total, per_token=int(total - (0 if tied else embedding.numel()) - inactive),
                      head=head_module.weight.numel() if head_module is not None else 0, quantizable=quantizable,
                      outside_layers=outside, embeddings=sum(w.numel() for w in frozen_embedding_weights(model)),
                      adapter=layout)


# -- memory -----------------------------------------------------------------------------------------
def saved_elements_per_token(arch: Architecture, mode: str, adapted: list[str], r: int, dropout: float,
                             seq_len: int, padded: bool = True, norm_outputs: bool = False) -> tuple[float, float]:
    """Activation elements autograd keeps per token, all decoder layers together: (all of them, those of the
    residual stream — the RMSNorm inputs, 2h a layer —, which stay in the weights' dtype under autocast while the
    rest is in the compute dtype). Counted op by op with
    torch.autograd.graph.saved_tensors_hooks on transformers' Llama (SDPA attention), per layer:

    - whenever gradient flows through a layer: both RMSNorm inputs (2h); q after RoPE, k, v and the attention
      output (2·q_dim + 2·kv_dim; with a padding mask SDPA gets k, v repeated to q_dim and keeps an fp32 mask
      row of seq_len per token); the MLP's gate, SiLU(gate) and up (3·I per active expert);
    - full fine-tuning adds each norm's normalised input and its output (4h) and the down projection's input (I);
    - LoRA adds, once per layer and group, the input its A factors need: the norm output for q/k/v, the norm
      output for gate/up (h each), the down projection's input (I); and A's output (r) per adapted module. With
      dropout, each adapted module keeps its dropped input and the mask (2 × fan-in) instead.
    - A Llama-style MLP with gate, up and down adapted and no dropout runs fused (lora/fused.py): SiLU(gate) and
      the down projection's input are recomputed in backward, 2·I fewer.
    Gradient never flows below the first adapted layer, so LoRA layers below it keep nothing.
    - `norm_outputs` (LoRA under bf16 autocast over an fp32 stream, rms_norm.py): each norm keeps its output in the
      compute dtype instead of its input — the very copy an adapted layer reading it keeps already.
    """
    h, q = arch.hidden, arch.q_dim
    kv = q if padded else arch.kv_dim
    mlp = arch.intermediate * arch.experts_per_token
    per_layer = 2 * h + 2 * q + 2 * kv + 3 * mlp + (seq_len if padded else 0)
    if mode == "full":
        return arch.layers * (per_layer + 4 * h + mlp), arch.layers * 2 * h
    first_layer, extra, inputs = arch.layers, 0.0, {}
    for name in adapted:
        layer = layer_index(name, None)
        first_layer = min(first_layer, 0 if layer is None else layer)
        attention = re.search(r"attn|attention", name) is not None
        output = (ATTENTION_OUTPUT if attention else MLP_OUTPUT).search(name) is not None
        width = (q if attention else mlp) if output else h
        extra += r
        if dropout > 0:
            extra += 2 * width
        elif not (attention and output):  # SDPA keeps the attention output already
            inputs[(layer, attention, output)] = width
    fused_mlps = 0
    if dropout == 0 and arch.model_type in SWIGLU_MLPS:
        projections: dict[int | None, set[str]] = {}
        for name in adapted:
            projections.setdefault(layer_index(name, None), set()).add(name.rpartition(".")[2])
        fused_mlps = sum(1 for found in projections.values() if {"gate_proj", "up_proj", "down_proj"} <= found)
    layers = arch.layers - first_layer
    total = layers * per_layer + extra + sum(inputs.values()) - fused_mlps * 2 * mlp
    if norm_outputs:
        norms_read_by_adapters = sum(1 for layer, _, output in inputs if layer is not None and not output)
        return total - norms_read_by_adapters * h, 0
    return total, layers * 2 * h


@dataclass
class Memory:
    """Bytes of one training setup, per part."""

    weights: float
    gradients: float
    optimizer: float
    activations: float  # with the configured gradient checkpointing
    activations_other: float  # with the other setting, for comparison
    logits: float
    first_gradients: float  # allocated when backward starts (the output head's)

    @property
    def peak(self) -> float:
        return self.weights + self.optimizer + max(self.activations + self.logits + self.first_gradients,
                                                   self.gradients)


def memory(arch: Architecture, params: Parameters, mode: str, lora: LoraConfig, dtype: str, activation_dtype: str,
           batch_size: int, seq_len: int, target_fraction: float, checkpointing: bool,
           frozen_dtype: str | None = None, world_size: int = 1, strategy: str = "ddp") -> Memory:
    """Bytes of full fine-tuning ("full"), LoRA ("lora") or QLoRA ("qlora") for one micro-batch, on each device of
    `world_size` (strategy ddp or fsdp; fsdp trains LoRA only: the other modes are NaN).
    frozen_dtype: how LoRA stores the adapted layers' frozen weights (train's base_dtype), default `dtype`."""
    if world_size > 1 and strategy == "fsdp" and mode != "lora":
        return Memory(**{part.name: math.nan for part in fields(Memory)})
    weight_bytes = DTYPE_BYTES[dtype]
    full = mode == "full"
    trainable = params.total if full else params.adapter.trainable
    weights = params.total * weight_bytes + (0 if full else trainable * ADAPTER_BYTES)
    if mode == "qlora":
        weights -= params.quantizable * (weight_bytes - NF4_BYTES)
    elif mode == "lora" and frozen_dtype:
        weights -= params.adapter.linear_weights * max(0, weight_bytes - DTYPE_BYTES[frozen_dtype])
    # The frozen embedding and head are kept in the compute dtype when the adapted weights are (train's build_trainee).
    embeddings_saved = 0
    if not full and frozen_dtype == activation_dtype:
        embeddings_saved = params.embeddings * max(0, weight_bytes - DTYPE_BYTES[activation_dtype])
    weights -= embeddings_saved
    tokens = batch_size * seq_len
    targets = tokens * target_fraction
    # A trained head (full fine-tuning) holds logits for at most a chunk of rows and recomputes chunks in backward
    # (loss.head_cross_entropy); a frozen one has a chunk of them only during forward and keeps, per target, the
    # gradient with respect to its input instead (loss._FrozenHeadCrossEntropy).
    if full:
        logit_rows = min(targets, max(1, LOGITS_CHUNK_ELEMENTS // arch.vocab))
        logits = LOGIT_BUFFERS * logit_rows * arch.vocab * 4
    else:
        logit_rows = min(targets, max(1, FROZEN_HEAD_CHUNK_ELEMENTS // arch.vocab))
        logits = FROZEN_HEAD_LOGIT_BUFFERS * logit_rows * arch.vocab * 4
    kind = "full" if full else "lora"
    # LoRA's norms keep their bf16 output where the stream is fp32 under bf16 autocast (train's build_trainee).
    norm_outputs = (not full and dtype == "fp32" and activation_dtype == "bf16" and arch.model_type in RMS_NORMS)
    layers, stream = saved_elements_per_token(arch, kind, params.adapter.adapted, lora.r, lora.dropout, seq_len,
                                              norm_outputs=norm_outputs)
    # Outside the layers: the final norm (its input; full fine-tuning also its two outputs) and one hidden-sized row
    # per target (a trained head's input; a frozen head's input gradient).
    outside = tokens * (3 * arch.hidden if full else arch.hidden) + targets * arch.hidden
    act_bytes, stream_bytes = DTYPE_BYTES[activation_dtype], DTYPE_BYTES[dtype]
    layer_bytes = tokens * ((layers - stream) * act_bytes + stream * stream_bytes)  # the residual stream: as loaded
    plain = layer_bytes + outside * act_bytes
    # Checkpointing keeps each layer's input (the residual stream) and recomputes one layer at a time in backward.
    checkpointed = tokens * arch.layers * arch.hidden * stream_bytes + outside * act_bytes + layer_bytes / arch.layers
    # An adapted expert tensor is used as W0 + ΔW, built in the weights' dtype and kept for backward.
    materialized = 0 if full else params.adapter.materialized * weight_bytes
    activations = (checkpointed if checkpointing else plain) + materialized
    other = (plain if checkpointing else checkpointed) + materialized
    gradients = trainable * (weight_bytes if full else ADAPTER_BYTES)
    if world_size > 1:
        if strategy == "fsdp":
            adapters = trainable * ADAPTER_BYTES
            frozen = weights - adapters
            outside = params.outside_layers * weight_bytes - embeddings_saved
            weights = frozen / world_size + outside + 2 * (frozen - outside) / arch.layers + adapters
        gradients *= 2  # DDP's bucket copy of the gradients / FSDP's flat all-reduce buffer of the adapter's
    return Memory(weights=weights, gradients=gradients,
                  optimizer=trainable * ADAMW_STATE_BYTES, activations=activations, activations_other=other,
                  logits=logits,
                  first_gradients=params.head * weight_bytes if full else 0)


def flops_per_token(arch: Architecture, params: Parameters, mode: str, seq_len: int) -> float:
    """Training FLOPs per token (Kaplan et al. 2020 accounting): full = 3 forwards; LoRA and QLoRA = 2 forwards
    (the backward still computes activation gradients) + 6 per adapter parameter."""
    forward = 2 * params.per_token + 2 * arch.layers * seq_len * arch.q_dim
    return 3 * forward if mode == "full" else 2 * forward + 6 * params.adapter.trainable


# -- one estimate ---------------------------------------------------------------------------------------
@dataclass
class Estimate:
    model: str
    architecture: Architecture
    parameters: Parameters
    dtype: str
    activation_dtype: str
    batch_size: int
    grad_accum: int
    seq_len: int
    target_fraction: float
    checkpointing: bool
    memory: dict[str, Memory]  # per device
    flops_per_token: dict[str, float]
    world_size: int = 1
    strategy: str = "ddp"

    @property
    def tokens_per_step(self) -> int:
        """Over all devices."""
        return self.batch_size * self.grad_accum * self.seq_len * self.world_size

    def seconds_per_step(self, mode: str, tflops: float) -> float:
        """Each device computes its share at `tflops` (communication not counted)."""
        return self.tokens_per_step / self.world_size * self.flops_per_token[mode] / (tflops * 1e12)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["parameters"]["adapter"].pop("adapted")
        for mode, mem in self.memory.items():
            data["memory"][mode]["peak"] = mem.peak
        return data


def estimate(model: str, config: TrainConfig, dtype: str | None = None, target_fraction: float = 1.0,
             model_config=None, world_size: int = 1) -> Estimate:
    """Parameters, memory and FLOPs of `config` (batch_size, max_seq_len, lora, gradient_checkpointing, precision,
    distributed.strategy) on `model`, memory per device of `world_size`. dtype: the base weights' dtype (default:
    the model's own)."""
    if not 0 < target_fraction <= 1:
        raise ConfigError("target fraction must be in (0, 1]: the share of tokens that carry loss")
    model_config = model_config or load_model_config(model)
    arch = Architecture.from_config(model_config)
    params = count_parameters(model_config, config.lora)
    dtype = dtype or config_dtype(model_config)
    activation_dtype = config.precision if config.precision in ("bf16", "fp16") else dtype
    # train's base_dtype: auto stores adapted weights in the autocast dtype (hardware.frozen_storage_dtype)
    frozen_dtype = activation_dtype if config.base_dtype == "auto" else config.base_dtype
    shape = dict(batch_size=config.batch_size, seq_len=config.max_seq_len, target_fraction=target_fraction,
                 checkpointing=config.gradient_checkpointing is True)  # auto: estimated without (it may not turn on)
    strategy = config.distributed.strategy
    return Estimate(
        model=model, architecture=arch, parameters=params, dtype=dtype, activation_dtype=activation_dtype,
        grad_accum=config.grad_accum, **shape,
        memory={mode: memory(arch, params, mode, config.lora, dtype, activation_dtype, frozen_dtype=frozen_dtype,
                             world_size=world_size, strategy=strategy, **shape) for mode in MODES},
        flops_per_token={mode: flops_per_token(arch, params, mode, config.max_seq_len) for mode in MODES},
        world_size=world_size, strategy=strategy)


# -- gradient_checkpointing=auto --------------------------------------------------------------------
FIT_FRACTION = 0.8  # of the free memory a step may plan on: allocator slack, the rest of the process, other users


def free_memory(device: torch.device) -> float:
    """Bytes still free for this process on `device`: the GPU's free memory, else the host's available RAM."""
    import psutil

    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available


def checkpointing_needed(config: TrainConfig, model_config, free: float, precision: str = "fp32",
                         sharing: int = 1, world_size: int = 1) -> tuple[bool, str]:
    """(whether gradient checkpointing must turn on, why): on when a training step's estimated memory beyond the
    weights, without checkpointing, exceeds FIT_FRACTION of `free` (measured with the model already loaded),
    which `sharing` processes of one host divide; `precision` is the resolved autocast one. A micro-batch holds
    batch_size rows (DPO: chosen and rejected, twice as many; GRPO: group_size completions per prompt); every
    token is counted as a target (the upper bound)."""
    rows = config.batch_size * {"dpo": 2, "grpo": config.grpo.group_size}.get(config.stage, 1)
    mode = "full" if config.finetune == "full" else "qlora" if config.quant == "nf4" else "lora"
    shaped = config.model_copy(update={"batch_size": rows, "gradient_checkpointing": False, "precision": precision})
    mem = estimate("model", shaped, dtype="fp32", model_config=model_config, world_size=world_size).memory[mode]
    without, budget = mem.peak - mem.weights, FIT_FRACTION * free / sharing
    needed = without > budget
    return needed, (f"a step needs ~{without / 1e9:.2f} GB beyond the weights without it, "
                    f"{'over' if needed else 'within'} {budget / 1e9:.2f} GB ({FIT_FRACTION:.0%} of the free "
                    f"memory{f' shared by {sharing} processes' if sharing > 1 else ''})")


# -- calibration: two real steps on this machine ---------------------------------------------------
def calibrate(est: Estimate, model_config, config: TrainConfig, modes: tuple[str, ...] = ("lora", "full"),
              seed: int = 0) -> list[dict]:
    """Build the model (random weights: memory and time do not depend on their values) on this machine and run
    two training steps per mode on a random batch of the estimated shape. Returns predicted vs measured peak
    memory (above what the process held before) and step time; the step time is predicted from the FLOPs and
    the rate this machine reaches on a forward pass of the same batch."""
    from loraforge.hardware import autocast_dtype, resolve_precision

    device, precision = resolve_precision(config)
    # The steps compute in the precision the estimate assumed: `auto` is estimated in the weights' dtype (estimate()
    # does not probe the hardware), so it is measured without autocast even where training would pick bf16.
    amp_dtype = autocast_dtype(precision) if config.precision != "auto" else None
    available = free_memory(device)
    if device.type == "cpu":
        track_freed_memory()
    needed = max(est.memory[mode].peak for mode in modes)
    if needed > 0.8 * available:
        raise LoraforgeError(f"calibration needs about {needed / 1e9:.1f} GB but {device} has {available / 1e9:.1f} "
                             "GB free; calibrate on a smaller model (e.g. a preset like smollm2-135m) or batch")
    return [_measure(est, model_config, config, mode, device, amp_dtype, seed) for mode in modes]


def _measure(est: Estimate, model_config, config: TrainConfig, mode: str, device: torch.device, amp_dtype,
             seed: int) -> dict:
    from transformers import AutoModelForCausalLM

    from loraforge.evaluate import PeakMemory
    from loraforge.loss import causal_lm_loss
    from loraforge.optim import build_optimizer, build_scheduler
    from loraforge.train.client import TrainingClient
    from loraforge.train.step import train_step
    from loraforge.train.trainee import build_trainee

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    autocast = autocast_for(device, amp_dtype)
    torch.manual_seed(seed)
    batch = _random_batch(est, model_config.vocab_size, device)
    _release_memory(device)
    baseline = memory_in_use(device)
    model = AutoModelForCausalLM.from_config(model_config, dtype=dtype_named(est.dtype)).to(device)
    model.train()
    # As `train` builds it: the frozen weights' storage dtype and the checkpointing the estimate assumed.
    shaped = config.model_copy(update={"finetune": "full" if mode == "full" else "lora",
                                       "gradient_checkpointing": est.checkpointing})
    trainee = build_trainee(shaped, model, None, 2, amp_dtype, lambda line: None)
    # The steps' peak above the process before the model: the weights as kept, not the set-up's transient (weights
    # narrowed from the dtype they were built in), which the estimate does not price.
    _release_memory(device)
    with PeakMemory(device) as peak:
        optimizer = build_optimizer(trainee.parameter_groups(config), config)
        scheduler = build_scheduler(optimizer, config, 2)
        client = TrainingClient(trainee, optimizer, scheduler, scaler=grad_scaler_for(device, amp_dtype),
                                autocast=autocast, max_grad_norm=1.0)
        step_seconds = []
        for step in (1, 2):  # the first step also creates the optimizer states
            sync()
            start = time.perf_counter()
            train_step(client, [batch])
            sync()
            step_seconds.append(time.perf_counter() - start)
        with torch.no_grad(), autocast():
            sync()
            start = time.perf_counter()
            causal_lm_loss(model, batch)
            sync()
            forward_seconds = time.perf_counter() - start
    measured_peak = peak.peak_mb * 2**20 - baseline
    del model, trainee, optimizer, scheduler, client
    _release_memory(device)
    forward_flops = est.flops_per_token["full"] / 3 * est.batch_size * est.seq_len
    rate = forward_flops / forward_seconds
    predicted_step = est.flops_per_token[mode] * est.batch_size * est.seq_len / rate
    return {"mode": mode, "predicted_peak": est.memory[mode].peak, "measured_peak": measured_peak,
            "predicted_step_s": predicted_step, "measured_step_s": step_seconds[-1], "tflops": rate / 1e12}


def _random_batch(est: Estimate, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    shape = (est.batch_size, est.seq_len)
    input_ids = torch.randint(0, vocab, shape)
    labels = input_ids.clone()
    labels[:, : round(est.seq_len * (1 - est.target_fraction))] = -100  # prompts carry no loss
    attention_mask = torch.ones(shape, dtype=torch.long)
    attention_mask[0, -1] = 0  # real batches are padded: SDPA then takes the masked path (as estimated)
    labels[0, -1] = -100
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": attention_mask.to(device)}


def memory_in_use(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


def _release_memory(device: torch.device) -> None:
    """Free what is unreachable and give it back: on CPU, what earlier work freed (on a fresh machine the GGUF
    conversion of the default model, ~1 GB; between modes the previous mode's model) would otherwise stay in the
    heap, be reused by the next measured steps and make them read up to 20% low."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        trim_cpu_heap()


def track_freed_memory() -> None:
    """Make the resident set follow live tensors on CPU: glibc raises its mmap threshold as large blocks are
    freed and then keeps freed heap pages, which would make the measured peak grow step after step."""
    compact_cpu_allocator(trim_at_once=True)
    _release_memory(torch.device("cpu"))


# -- the command ------------------------------------------------------------------------------------------
ESTIMATE_HELP = """Parameters, memory (full fine-tuning, LoRA, QLoRA), FLOPs and time of a job, before training;
then the advisors (learning rate, capacity, targets, batch size).

MODEL: a preset ({presets}), a config.json, a model folder or 'default' (SmolLM2-135M).
Training keys as for `loraforge train`, e.g.
  loraforge estimate llama-3-8b lora.r=16 'lora.targets=[q_proj,v_proj]' batch_size=4 max_seq_len=2048
  loraforge estimate default data=chats.jsonl --calibrate     # + dataset capacity, + two real steps here"""

# Throughputs for the time columns when --tflops is not given: bf16 dense peaks at a typical 40% utilisation.
REFERENCE_TFLOPS = {"A100 (40% of 312 TFLOP/s)": 125.0, "H100 (40% of 989 TFLOP/s)": 400.0}


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `loraforge estimate`."""
    parser = commands.add_parser("estimate", help="parameters, memory, FLOPs and time of a job, before training",
                                 description=ESTIMATE_HELP.format(presets=", ".join(preset_names())),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="preset name, config.json, model folder or 'default'")
    parser.add_argument("overrides", nargs="*", help="training keys: batch_size=4 max_seq_len=2048 lora.r=16 …")
    parser.add_argument("--config", dest="config_file", help="YAML file of training keys (as for `loraforge train`)")
    parser.add_argument("--dtype", choices=list(DTYPE_BYTES), help="dtype of the base weights (default: the model's)")
    parser.add_argument("--target-fraction", type=float,
                        help="share of tokens that carry loss (default: measured on data=, else 1)")
    parser.add_argument("--tflops", type=float, action="append", help="achieved TFLOP/s for the time rows (repeatable)")
    parser.add_argument("--tokens", type=int, help="training tokens per epoch (default: counted on data= when given)")
    parser.add_argument("--calibrate", action="store_true",
                        help="run two real steps here (random weights) and print predicted vs measured")
    parser.add_argument("--world-size", type=int, default=1,
                        help="devices training together (torchrun's processes): memory per device with "
                             "distributed.strategy=ddp or fsdp, steps over all of them")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    from loraforge.advise import print_advice, training_advice

    config = load_train_config(args.config_file, [f"model={args.model}", *args.overrides])
    model_config = load_model_config(args.model)
    precision_note = None
    if config.precision == "auto":  # what `train` would pick here: the bytes of the weights and activations follow
        from loraforge.hardware import resolve_precision

        device, precision = resolve_precision(config)
        config = config.model_copy(update={"precision": precision.name})
        precision_note = (f"precision=auto is {precision.name} on this machine's {device.type} ({precision.why}); "
                          "set precision= to estimate another device")
    # The token and information figures are SFT's; DPO and GRPO count one bit per pair / episode (said at train time).
    data = _data_figures(args.model, config) if config.data.path and config.stage == "sft" else None
    fraction = args.target_fraction or (data["target_tokens"] / data["tokens"] if data else 1.0)
    if args.world_size < 1:
        raise ConfigError("--world-size: at least 1 device")
    est = estimate(args.model, config, args.dtype, fraction, model_config, args.world_size)
    tokens = args.tokens or (data["tokens"] if data else None)
    per_step = config.batch_size * config.grad_accum * args.world_size
    steps = config.max_steps or (math.ceil(config.epochs * data["examples"] / per_step) if data else None)
    layout = None if config.finetune == "full" else est.parameters.adapter
    advice = training_advice(config, model_config, layout, steps, data["bits"] if data else None)
    calibration = calibrate(est, model_config, config) if args.calibrate else []
    rates = {f"{t:g} TFLOP/s": t for t in args.tflops or []} or dict(REFERENCE_TFLOPS)
    if calibration:
        rates = {"this machine (measured)": calibration[0]["tflops"], **rates}
    if args.json:
        print(json.dumps({"estimate": est.to_dict(), "data": data, "advice": [asdict(a) for a in advice],
                          "calibration": calibration, "precision": config.precision}, indent=1))
        return
    console = make_console()
    _print_estimate(est, console, rates, tokens)
    if precision_note:
        console.print(f"[dim]{precision_note}[/]")
    if data:
        console.print(f"data: {data['examples']} training conversations, {data['tokens']:,} tokens "
                      f"({data['target_tokens']:,} with loss)")
    elif config.stage != "sft":
        console.print(f"[dim]stage={config.stage}: the capacity check counts about one bit per "
                      f"{'preference pair' if config.stage == 'dpo' else 'episode'} trained; training prints it[/]")
    elif config.data.path is None:
        console.print("[dim]give data=FILE (with a model folder or 'default') for tokens per epoch and the capacity "
                      "check[/]")
    if config.gradient_checkpointing == "auto":
        console.print(f"[dim]gradient_checkpointing=auto: estimated off; training turns it on where a step's memory "
                      f"beyond the weights would exceed {FIT_FRACTION:.0%} of its device's free memory[/]")
    print_advice(advice, console)
    if calibration:
        _print_calibration(calibration, console)


def _data_figures(model: str, config: TrainConfig) -> dict:
    """Tokens of the training split and its information in bits (one forward pass of the real base model)."""
    from loraforge.advise import dataset_bits
    from loraforge.data import prepare_data
    from loraforge.models import is_default_model, load_model

    if not (is_default_model(model) or Path(model).expanduser().is_dir()):
        raise ConfigError(f"data= needs the model's tokenizer and weights; {model!r} is a preset or config file, "
                          "pass a model folder (or 'default') to count tokens and measure the dataset")
    base, tokenizer = load_model(model)
    data = prepare_data(config.data, tokenizer, config.max_seq_len, config.seed)
    train = data.train.examples
    return {"examples": len(train), "tokens": data.report.tokens["train"],
            "target_tokens": data.report.target_tokens["train"],
            "bits": dataset_bits(base, train, tokenizer.pad_token_id, config.batch_size, torch.device("cpu"))}


def _gb(value: float) -> str:
    return "—" if math.isnan(value) else f"{value / 1e9:,.2f}"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def _print_estimate(est: Estimate, console, rates: dict[str, float], tokens: int | None) -> None:
    from rich.table import Table

    arch, params = est.architecture, est.parameters
    adapter = params.adapter
    moe = f", {arch.experts} experts ({arch.experts_per_token} per token)" if arch.experts else ""
    console.print(f"[bold]{est.model}[/] ({arch.model_type}): {params.total:,} parameters, {arch.layers} layers, "
                  f"hidden {arch.hidden}{moe}", highlight=False)
    console.print(f"LoRA: {adapter.trainable:,} trainable ({100 * adapter.trainable / params.total:.3f}%) in "
                  f"{len(adapter.adapted)} adapted modules/parameters; micro-batch {est.batch_size} × {est.seq_len} "
                  f"tokens ({est.target_fraction:.0%} with loss); weights {est.dtype}, activations "
                  f"{est.activation_dtype}; gradient checkpointing {'on' if est.checkpointing else 'off'}",
                  highlight=False)
    if est.world_size > 1:
        console.print(f"{est.world_size} devices ({est.strategy}), a micro-batch of {est.batch_size} on each"
                      + ("; full and QLoRA do not run under fsdp" if est.strategy == "fsdp" else ""), highlight=False)
    table = Table(title="memory (GB)" + (" per device" if est.world_size > 1 else ""))
    table.add_column("")
    for column in ("full", "LoRA", "QLoRA (NF4)"):
        table.add_column(column, justify="right")
    other = "activations " + ("without" if est.checkpointing else "with") + " checkpointing"
    for label, part in [("weights", "weights"), ("gradients", "gradients"), ("optimizer (AdamW)", "optimizer"),
                        ("activations", "activations"), (other, "activations_other"), ("logits", "logits")]:
        table.add_row(label, *(_gb(getattr(est.memory[m], part)) for m in MODES))
    table.add_row("[bold]peak[/]", *(f"[bold]{_gb(est.memory[m].peak)}[/]" for m in MODES))
    console.print(table)
    compute = Table(title="compute")
    compute.add_column("")
    compute.add_column("full", justify="right")
    compute.add_column("LoRA / QLoRA", justify="right")
    compute.add_row("GFLOPs per token", *(f"{est.flops_per_token[m] / 1e9:,.2f}" for m in ("full", "lora")))
    for name, tflops in rates.items():
        compute.add_row(f"step ({est.tokens_per_step:,} tokens) at {name}",
                        *(_duration(est.seconds_per_step(m, tflops)) for m in ("full", "lora")))
        if tokens:
            compute.add_row(f"epoch ({tokens:,} tokens) at {name}" + (" each" if est.world_size > 1 else ""),
                            *(_duration(tokens * est.flops_per_token[m] / (tflops * 1e12 * est.world_size))
                              for m in ("full", "lora")))
    console.print(compute)


def _print_calibration(rows: list[dict], console) -> None:
    from rich.table import Table

    table = Table(title="calibration: two real steps on this machine (random weights)")
    for column in ("", "peak predicted (GB)", "measured", "ratio", "step predicted", "measured", "ratio"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["mode"], _gb(row["predicted_peak"]), _gb(row["measured_peak"]),
                      f"{row['measured_peak'] / row['predicted_peak']:.2f}", _duration(row["predicted_step_s"]),
                      _duration(row["measured_step_s"]), f"{row['measured_step_s'] / row['predicted_step_s']:.2f}")
    console.print(table)
    console.print(f"[dim]forward pass rate here: {rows[0]['tflops'] * 1000:.1f} GFLOP/s; the step time is predicted "
                  "from the FLOPs at that rate[/]")
