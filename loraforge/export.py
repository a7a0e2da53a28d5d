"""Adapters where people run models: llama.cpp / Ollama (GGUF), vLLM — and a check of what each target cannot take.

    loraforge check-adapter runs/mine/best --target vllm
    loraforge export --adapter runs/mine/best --format gguf --output mine.gguf [--dtype f16|bf16|q8_0|f32]
    loraforge export --adapter runs/mine/best --format ollama --output ollama/     # adapter GGUF + Modelfile
    loraforge export --adapter runs/mine/best --target vllm --output vllm-adapter/

Every export goes through one form, plain LoRA: per adapted Linear an A (r × in), a B (out × r) and a scale. A
plain LoRA file is taken as it is (exact); DoRA, LoHa, LoKr and AdaLoRA become plain LoRA by the truncated SVD of
their weight update ΔW = W' − W0 (W' the merged weight, so DoRA's magnitude is included), and each layer's relative
error ‖ΔW − B·A‖ / ‖ΔW‖ is reported. What no plain LoRA can hold (modules_to_save copies, LoRA on embeddings or
expert tensors) is refused, naming the tensor.

- GGUF (llama.cpp's LoRA adapter format, as its convert_lora_to_gguf.py writes it): `general.type=adapter`,
  `adapter.type=lora`, `adapter.lora.alpha`, tensors `<base tensor>.lora_a` / `.lora_b` under the base model's GGUF
  names (gguf's TensorNameMap). llama.cpp scales each layer by alpha / rank, so every other scale (rsLoRA's
  α/√r, per-module rank_pattern / alpha_pattern, a conversion) is folded into B; llama-family q/k projections get
  the same row permutation llama.cpp's converter applies to the base weights.
- vLLM: a PEFT folder of plain LoRA with the rank padded with zeros to a value `max_lora_rank` accepts, the scale
  folded into B (lora_alpha = r), no DoRA, no rank_pattern.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loraforge.errors import AdapterError, ConfigError
from loraforge.lora.model import DEFAULT_ADAPTER

# vLLM's LoRAConfig.max_lora_rank accepts these values only.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
TARGETS = ("vllm", "llamacpp", "ollama", "peft")


# -- what a target cannot take -------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    what: str  # the key or tensor
    reason: str
    fix: str
    convertible: bool  # export converts it; False: nothing can, the fix says what to do instead


def check_adapter(directory: Path, target: str) -> list[Finding]:
    """What `target` cannot take as the adapter stands, each with the reason and the fix (files only, no model)."""
    from loraforge.lora.files import read_adapter_files

    if target not in TARGETS:
        raise ConfigError(f"--target: one of {', '.join(TARGETS)}")
    config, tensors = read_adapter_files(directory)
    if target == "peft":
        return []  # loraforge writes PEFT's format (tests/test_peft_interop.py loads it in peft both ways)
    converts = f"`loraforge export --adapter {directory} --{'target vllm' if target == 'vllm' else 'format gguf'}`"
    name = "vLLM" if target == "vllm" else "llama.cpp" if target == "llamacpp" else "Ollama (llama.cpp)"
    findings = []
    if config.method != "lora":
        findings.append(Finding("peft_type", f"{name} loads plain LoRA (lora_A / lora_B) only, this is {config.method}",
                                f"{converts} converts it by truncated SVD of each layer's ΔW, reporting the error",
                                True))
    if config.use_dora:
        findings.append(Finding("use_dora", f"{name} rejects DoRA adapters (the magnitude vectors)",
                                f"{converts} converts ΔW of the merged DoRA weight by truncated SVD", True))
    instead = ("train without it, or merge the adapter (`loraforge merge`) and serve the merged model")
    if config.modules_to_save:
        findings.append(Finding(f"modules_to_save {config.modules_to_save}",
                                f"{name} cannot load full copies of modules", instead, False))
    embedding = next((key for key in sorted(tensors) if ".lora_embedding_" in key), None)
    if embedding is not None:
        findings.append(Finding(embedding, f"{name} export takes LoRA on Linear layers, not on an embedding", instead,
                                False))
    ranks = {config.r, *config.rank_pattern.values()}
    if target == "vllm":
        if max(ranks) > VLLM_RANKS[-1]:
            findings.append(Finding("r", f"rank {max(ranks)} is above vLLM's largest max_lora_rank "
                                         f"{VLLM_RANKS[-1]}", f"{converts} --rank {VLLM_RANKS[-1]} (truncated SVD)",
                                    True))
        elif any(r not in VLLM_RANKS for r in ranks):
            findings.append(Finding("r", f"vLLM's max_lora_rank accepts only {VLLM_RANKS}; this adapter has rank(s) "
                                         f"{sorted(ranks)}", f"{converts} pads the rank with zeros (exact)", True))
    else:
        if config.use_rslora:
            findings.append(Finding("use_rslora", "llama.cpp scales every layer by alpha / r, rsLoRA by alpha / √r",
                                    f"{converts} rewrites alpha (exact)", True))
    if config.rank_pattern or config.alpha_pattern:
        findings.append(Finding("rank_pattern", f"{name} applies one rank and alpha to every layer",
                                f"{converts} folds each layer's scale into its B (exact)", True))
    return findings


# -- the plain-LoRA form every export writes -----------------------------------------------------------------
@dataclass
class PlainLayer:
    a: torch.Tensor  # r × in
    b: torch.Tensor  # out × r, the layer's whole scale folded in
    error: float | None  # relative error of a conversion; None when taken exactly


@torch.no_grad()
def plain_lora(lora, name: str, rank: int | None = None) -> dict[str, PlainLayer]:
    """Adapter `name` of a LoraModel as plain LoRA per module (the scale folded into B): exact for plain LoRA,
    otherwise the truncated SVD (to `rank`, default the adapter's r) of each layer's ΔW = W' − W0."""
    from loraforge.lora.layers import LoraLinear, ModulesToSave

    config = lora.configs[name]
    for module_name, module in lora.wrappers():
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            raise AdapterError(f"{module_name}: a modules_to_save copy has no plain-LoRA form; train without "
                               "modules_to_save or merge the adapter")
    layers = {}
    for module_name, layer in lora.lora_layers():
        if name not in layer.ranks:
            continue
        if type(layer.base_layer) is not nn.Linear:
            raise AdapterError(f"{module_name}: only nn.Linear layers export as plain LoRA ({type(layer).__name__} "
                               f"on {type(layer.base_layer).__name__} does not)")
        if isinstance(layer, LoraLinear) and config.method == "lora" and not layer.variants(name):
            a, b = layer.factors(name)
            layers[module_name] = PlainLayer(a.float().clone(), (b.float() * layer.scaling[name]).clone(), None)
            continue
        delta = layer.merged_weight([name]).float() - layer.dense_base_weight().float()
        r = min(rank or layer.ranks[name], *delta.shape)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        root = s[:r].sqrt()
        a, b = root[:, None] * vh[:r], u[:, :r] * root
        error = float(torch.linalg.norm(delta - b @ a) / torch.linalg.norm(delta).clamp(min=1e-30))
        layers[module_name] = PlainLayer(a.contiguous(), b.contiguous(), error)
    if not layers:
        raise AdapterError(f"adapter {name!r} adapts no Linear layer")
    return layers


# -- llama.cpp / Ollama ------------------------------------------------------------------------------------------
# HF model_type → (gguf architecture, whether llama.cpp's converter permutes q/k rows for its rope layout).
GGUF_ARCHS = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py's LlamaModel.permute): each head's two rotary halves
    interleaved. Applied to B, since W = B·A permutes as its rows do."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


@dataclass
class GgufLayout:
    """Where llama.cpp expects a base's tensors: GGUF names (gguf's TensorNameMap) and the q/k row order."""

    arch_name: str
    names: object  # gguf.TensorNameMap
    permutes: bool
    heads: int
    kv_heads: int

    @classmethod
    def of(cls, config) -> GgufLayout:
        import gguf

        if config.model_type not in GGUF_ARCHS:
            raise AdapterError(f"GGUF export knows the tensor layout of {', '.join(GGUF_ARCHS)} bases; this one is "
                               f"{config.model_type!r}")
        arch_name, permutes = GGUF_ARCHS[config.model_type]
        heads = config.num_attention_heads
        return cls(arch_name, gguf.TensorNameMap(getattr(gguf.MODEL_ARCH, arch_name), config.num_hidden_layers),
                   permutes, heads, getattr(config, "num_key_value_heads", None) or heads)

    def writer(self, path: Path):
        import gguf

        return gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, self.arch_name)])

    def name(self, hf_name: str) -> str:
        gguf_name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise AdapterError(f"{hf_name}: no GGUF tensor name in llama.cpp's {self.arch_name} layout")
        return gguf_name

    def rows(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (a weight, or the B of its update) in llama.cpp's row order for `gguf_name`."""
        if self.permutes and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            return permute_rows(tensor, self.heads if ".attn_q." in gguf_name else self.kv_heads)
        return tensor


def _write_gguf(layout: GgufLayout, output: Path, fill) -> Path:
    """A GGUF file at `output`, written aside and renamed into place when complete (atomic.write_file): `fill`
    adds the keys and tensors to the writer."""
    from loraforge.atomic import write_file

    def write(path: Path) -> None:
        writer = layout.writer(path)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_file(output, write)
    return output


def _gguf_array(tensor: torch.Tensor, dtype: str):
    """(data, raw dtype) for GGUFWriter.add_tensor: numpy for f32/f16; gguf.quants' packed bytes for bf16/q8_0."""
    import gguf

    data = tensor.detach().float().cpu().numpy()
    if dtype == "f32":
        return data.astype(np.float32), None
    if dtype == "f16":
        return data.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        return data.astype(np.float16), None  # q8_0 packs rows in blocks of 32: a rank-r A row may not fill one
    return gguf.quants.quantize(data, kind), kind


def write_gguf_adapter(layers: dict[str, PlainLayer], model_config, output: Path, dtype: str = "f16",
                       base_name: str | None = None) -> Path:
    """The adapter as llama.cpp's LoRA GGUF. alpha = the largest rank: each layer's B carries rank/alpha × its own
    folded scale, so llama.cpp's alpha / rank gives exactly the trained update."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"--dtype: one of {', '.join(GGUF_DTYPES)}")
    layout = GgufLayout.of(model_config)
    alpha = float(max(layer.a.shape[0] for layer in layers.values()))

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        if base_name:
            writer.add_name(f"{base_name} LoRA adapter")
        for module_name, layer in sorted(layers.items()):
            gguf_name = layout.name(module_name.removeprefix("base_model.model.") + ".weight")
            b = layout.rows(gguf_name, layer.b * (layer.a.shape[0] / alpha))
            for suffix, tensor in (("lora_a", layer.a), ("lora_b", b)):
                data, raw = _gguf_array(tensor, dtype)
                writer.add_tensor(f"{gguf_name}.{suffix}", data, raw_dtype=raw)

    return _write_gguf(layout, output, fill)


def write_gguf_model(model, tokenizer, output: Path, dtype: str = "f16") -> Path:
    """A whole (merged) llama-family / qwen2 model as GGUF that llama.cpp and transformers' GGUF loader read: the
    architecture's keys, every weight under its GGUF name (q/k rows permuted as llama.cpp's converter does), and
    the tokenizer through gguf's own vocab readers (BPE tokens, merges, special ids, chat template)."""
    import tempfile

    import gguf

    config = model.config
    layout = GgufLayout.of(config)

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(getattr(config, "_name_or_path", "") or "loraforge merged model")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(layout.heads)
        writer.add_head_count_kv(layout.kv_heads)
        writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // layout.heads)
        writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or
                                        (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            vocab = gguf.vocab.BpeVocab(Path(folder))
            tokens, _, types = zip(*vocab.all_tokens())
            writer.add_tokenizer_model(vocab.tokenizer_model)
            writer.add_token_list(list(tokens))
            writer.add_token_types(list(types))
            gguf.vocab.SpecialVocab(Path(folder), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer,
                                                                                                   quiet=True)
        tied = getattr(config, "tie_word_embeddings", False)
        for hf_name, tensor in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp reads the tied head from token_embd
            gguf_name = layout.name(hf_name)
            tensor = layout.rows(gguf_name, tensor.detach().float())
            # Norms and biases stay f32 (as llama.cpp's converter keeps 1-D tensors).
            data, raw = _gguf_array(tensor, dtype if tensor.dim() > 1 else "f32")
            writer.add_tensor(gguf_name, data, raw_dtype=raw)

    return _write_gguf(layout, output, fill)


# ChatML as Ollama's Go template (the embedded default and Qwen use ChatML).
CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def write_modelfile(folder: Path, adapter_file: str, base: str, tokenizer) -> Path:
    """An Ollama Modelfile: FROM the base, ADAPTER the GGUF; the template and stop token from the tokenizer when
    it is ChatML (another template is left to the base GGUF's own)."""
    lines = [f"FROM {base}", f"ADAPTER ./{adapter_file}"]
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_start|>" in template:
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', 'PARAMETER stop "<|im_end|>"']
    elif tokenizer.eos_token:
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    path = folder / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- vLLM ----------------------------------------------------------------------------------------------------
def write_vllm_adapter(layers: dict[str, PlainLayer], output: Path, base_name: str | None) -> int:
    """A PEFT folder vLLM loads: plain LoRA, rank zero-padded to an allowed max_lora_rank, lora_alpha = r (the
    scale is in B). Returns the rank written."""
    from safetensors.torch import save_file

    from loraforge.atomic import write_folder

    need = max(layer.a.shape[0] for layer in layers.values())
    rank = next(r for r in VLLM_RANKS if r >= need)
    tensors = {}
    for module_name, layer in layers.items():
        r = layer.a.shape[0]
        a = torch.zeros(rank, layer.a.shape[1])
        b = torch.zeros(layer.b.shape[0], rank)
        a[:r], b[:, :r] = layer.a, layer.b
        key = module_name if module_name.startswith("base_model.model.") else f"base_model.model.{module_name}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a.contiguous(), b.contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base_name,
              "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers})}

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    write_folder(output, fill)
    return rank


# -- the commands -------------------------------------------------------------------------------------------
def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `loraforge export` and `loraforge check-adapter`."""
    export = commands.add_parser("export", help="an adapter as llama.cpp / Ollama GGUF or a vLLM folder",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("--adapter", required=True, help="adapter folder (PEFT format)")
    export.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    export.add_argument("--format", choices=("gguf", "ollama", "vllm", "safetensors"),
                        help="what to write (safetensors: with --merged, a plain Hugging Face folder)")
    export.add_argument("--merged", action="store_true",
                        help="the base with the adapter merged in (gguf: one file llama.cpp runs alone)")
    export.add_argument("--target", choices=("vllm", "llamacpp", "ollama"), help="same as --format for that target")
    export.add_argument("--output", required=True, help="file (gguf) or folder (ollama, vllm)")
    export.add_argument("--dtype", default="f16", choices=GGUF_DTYPES,
                        help="GGUF tensor type (default f16; norms stay f32)")
    export.add_argument("--rank", type=int, help="rank of converted (SVD) layers (default: the adapter's r)")
    export.add_argument("--ollama-base", help="Ollama FROM line (default: the base model's GGUF when known)")
    export.set_defaults(run=_export)
    check = commands.add_parser("check-adapter", help="what vLLM / llama.cpp / Ollama / PEFT cannot take, and the fix")
    check.add_argument("adapter", help="adapter folder")
    check.add_argument("--target", required=True, choices=TARGETS)
    check.set_defaults(run=_check)


def _check(args: argparse.Namespace) -> int:
    from loraforge.console import make_console

    console = make_console()
    findings = check_adapter(Path(args.adapter), args.target)
    if not findings:
        console.print(f"{args.target}: nothing to fix; {args.adapter} loads as it is", markup=False)
        return 0
    for finding in findings:
        mark = "convert" if finding.convertible else "refused"
        console.print(f"[{mark}] {finding.what}: {finding.reason}. Fix: {finding.fix}", markup=False)
    return 0 if all(f.convertible for f in findings) else 1


def _load(args: argparse.Namespace):
    """The base (--model, else the adapter's base_model_name_or_path) with the adapter on it, and the tokenizer."""
    from loraforge.lora import LoraModel
    from loraforge.lora.files import read_adapter_files
    from loraforge.models import load_model

    model, tokenizer = load_model(args.model or read_adapter_files(Path(args.adapter))[0].base_model_name_or_path)
    return LoraModel.from_pretrained(model, args.adapter), tokenizer


def _export(args: argparse.Namespace) -> None:
    from loraforge.console import make_console

    console = make_console()
    kind = args.format or {"llamacpp": "gguf", "ollama": "ollama", "vllm": "vllm"}.get(args.target or "")
    if kind is None:
        raise ConfigError("export: give --format gguf|ollama|vllm (or --target)")
    if args.merged:
        if kind not in ("gguf", "safetensors"):
            raise ConfigError("--merged: --format gguf or safetensors")
        lora, tokenizer = _load(args)
        model, output = lora.merge_and_unload(), Path(args.output)
        if kind == "safetensors":
            model.save_pretrained(output)
            tokenizer.save_pretrained(output)
        else:
            write_gguf_model(model, tokenizer, output, args.dtype)
        console.print(f"merged model ({kind}) in {output}", markup=False)
        return
    if kind == "safetensors":
        raise ConfigError("--format safetensors writes a merged model: add --merged (an adapter is already "
                          "safetensors in PEFT's format)")
    for finding in check_adapter(Path(args.adapter), "vllm" if kind == "vllm" else "llamacpp"):
        if not finding.convertible:
            raise AdapterError(f"{finding.what}: {finding.reason}. {finding.fix}")
    lora, tokenizer = _load(args)
    layers = plain_lora(lora, DEFAULT_ADAPTER, args.rank)
    converted = {k: v.error for k, v in layers.items() if v.error is not None}
    if converted:
        worst = max(converted, key=converted.get)
        console.print(f"converted {len(converted)} layers to plain LoRA by truncated SVD: relative error of ΔW "
                      f"mean {sum(converted.values()) / len(converted):.2e}, worst {converted[worst]:.2e} ({worst})",
                      markup=False)
    base_name = lora.configs[DEFAULT_ADAPTER].base_model_name_or_path
    output = Path(args.output)
    if kind == "vllm":
        rank = write_vllm_adapter(layers, output, base_name)
        console.print(f"vLLM adapter (rank {rank}) in {output}: vllm serve BASE --enable-lora --max-lora-rank {rank} "
                      f"--lora-modules mine={output}", markup=False)
        return
    gguf_path = output / "adapter.gguf" if kind == "ollama" else output
    write_gguf_adapter(layers, lora.model.config, gguf_path, args.dtype, base_name)
    console.print(f"llama.cpp LoRA adapter ({args.dtype}) in {gguf_path}: llama-cli -m BASE.gguf --lora {gguf_path}",
                  markup=False)
    if kind == "ollama":
        from loraforge.models import default_gguf, is_default_model

        base = args.ollama_base or (str(default_gguf()) if is_default_model(args.model or base_name or "")
                                    else base_name)
        modelfile = write_modelfile(output, gguf_path.name, base, tokenizer)
        console.print(f"Ollama: {modelfile}; ollama create mine -f {modelfile} && ollama run mine", markup=False)
