"""Tiny random models built from configs in code (never downloaded) and the adapter cases tested on them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MixtralConfig, Qwen2Config

from loraforge import LoraConfig, LoraModel, hardware
from loraforge.lora.layers import LoraLayer, ModulesToSave

VOCAB = 96
# The whole suite also runs on a GPU: LORAFORGE_TEST_DEVICE=cuda pytest
DEVICE = torch.device(os.environ.get("LORAFORGE_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":
    torch.backends.cudnn.allow_tf32 = False  # the tolerances below are for true fp32 arithmetic
    torch.backends.cuda.matmul.allow_tf32 = False


REAL_CPU_BF16_CAPABILITY = hardware.cpu_bf16_capability  # what tests/test_hardware.py asks the real CPU with


@pytest.fixture(autouse=True, scope="session")
def cpu_without_native_bf16():
    """precision=auto resolves as on a CPU without native bf16 (fp32), so the suite computes the same on every CPU;
    tests/test_hardware.py probes explicitly, and tests that want bf16 ask for precision=bf16. Session-wide:
    module-scoped fixtures that train are set up before any function-scoped one, and a function-scoped patch
    left them computing in bf16 on AVX-512 BF16 CPUs while the tests that compared with them ran fp32."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hardware, "cpu_bf16_capability", lambda: (False, "tests: no native bf16"))
        yield


class TinyConvNet(nn.Module):
    """A small image classifier, for LoRA on Conv2d (and a Linear head)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        return self.fc(h.mean((2, 3)))


def _causal_lm(config) -> nn.Module:
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


ARCHITECTURES = {
    "llama": lambda: _causal_lm(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)),
    "qwen2": lambda: _causal_lm(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)),
    "gpt2": lambda: _causal_lm(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)),
    "mixtral": lambda: _causal_lm(MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)),
    "convnet": TinyConvNet,
}


def make_model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ARCHITECTURES[arch]().eval().to(DEVICE)


def make_inputs(arch: str, batch: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if arch == "convnet":
        return torch.randn(batch, 3, 8, 8, generator=generator).to(DEVICE)
    return torch.randint(0, VOCAB, (batch, 7), generator=generator).to(DEVICE)


def check_merge_round_trip(lora: LoraModel, inputs: torch.Tensor, atol: float, unload: bool = True) -> torch.Tensor:
    """merge() gives the unmerged outputs, unmerge() gives back every base weight (to fp32 rounding) and the
    outputs, merge_and_unload() a plain model (no LoRA module left) with the same outputs. Returns them."""
    unmerged = run(lora, inputs)
    originals = {n: layer.base_weight.detach().clone() for n, layer in lora.lora_layers()}
    lora.merge()
    torch.testing.assert_close(run(lora, inputs), unmerged, atol=atol, rtol=0)
    lora.unmerge()
    for name, layer in lora.lora_layers():
        torch.testing.assert_close(layer.base_weight, originals[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(lora, inputs), unmerged, atol=atol, rtol=0)
    if unload:
        plain = lora.merge_and_unload()
        assert lora_modules(plain) == []
        assert not any("lora_" in name or "base_layer" in name for name, _ in plain.named_parameters())
        torch.testing.assert_close(run(plain, inputs), unmerged, atol=atol, rtol=0)
    return unmerged


def run(model: nn.Module, inputs: torch.Tensor, **kwargs) -> torch.Tensor:
    out = model(inputs, **kwargs)
    return out.logits if hasattr(out, "logits") else out


@dataclass
class Case:
    """One architecture with one adapter configuration (a layer type and/or option under test)."""

    id: str
    arch: str
    lora: dict = field(default_factory=dict)
    mixable: bool = True  # expert tensors cannot take a different adapter per row

    def config(self, **overrides) -> LoraConfig:
        # AdaLoRA reads no `r` (its ranks are adalora.init_r / target_r): the case's rank is for the others.
        rank = {} if self.lora.get("method") == "adalora" else {"r": 4}
        return LoraConfig(**{**rank, "alpha": 8, **self.lora, **overrides})


CASES = [
    Case("llama-all-linear", "llama", {"targets": "all-linear"}),
    Case("llama-embedding-qv-rslora", "llama", {"targets": ["embed_tokens", "q_proj", "v_proj"], "use_rslora": True}),
    Case("llama-patterns-layers-gaussian", "llama", {
        "targets": ["q_proj", "down_proj", "o_proj"], "layers_to_transform": [1], "rank_pattern": {"down_proj": 2},
        "alpha_pattern": {"q_proj": 3.0}, "init": "gaussian"}),
    Case("qwen2-all-linear-save-head", "qwen2", {"targets": "all-linear", "modules_to_save": ["lm_head"]}),
    Case("qwen2-regex-mlp", "qwen2", {"targets": r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"}),
    Case("gpt2-conv1d", "gpt2", {"targets": ["c_attn", "c_proj", "c_fc"], "dropout": 0.1}),
    Case("mixtral-experts", "mixtral", {
        "targets": ["q_proj", "o_proj"], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]},
        mixable=False),
    Case("mixtral-all-linear", "mixtral", {"targets": "all-linear"}),
    Case("convnet-conv2d", "convnet", {"targets": ["conv1", "conv2", "fc"]}),
]


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request) -> Case:
    return request.param


def perturb(lora: LoraModel, name: str, std: float = 0.2, seed: int = 7) -> None:
    """Give an adapter non-zero random factors (fresh adapters have B = 0 and change nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora.wrappers():
            if isinstance(module, LoraLayer) and name in module.ranks:
                for tensor in module.peft_tensors(name).values():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
            elif isinstance(module, ModulesToSave) and name in module.modules_to_save:
                for tensor in module.modules_to_save[name].parameters():
                    tensor.add_(torch.randn(tensor.shape, generator=generator).to(tensor.device) * std)


def lora_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))]


# -- a tiny tokenizer and model folder, built offline, for data / trainer / CLI tests ------------------
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-3 style: a bos in the text, headers, and <|eot_id|> ending each turn.
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
CORPUS = [
    "Extract the order as JSON. Hi, this is Maria. Please send 3 blue mugs to Oslo.",
    '{"name": "Maria", "item": "blue mugs", "quantity": 3, "city": "Oslo"}',
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "system user assistant hello world answer question 0123456789",
]


def make_tokenizer(template: str = CHATML, eos: str = "<|im_end|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A llama-shaped model folder with the tiny ChatML tokenizer: what `model=` points at in CLI tests."""
    folder = tmp_path_factory.mktemp("tiny-chat-model")
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    # A large init range: with the default 0.02 the frozen head's logits are nearly flat and a LoRA cannot
    # move the loss far from ln(vocab), which would make "the loss went down" a weak test.
    model = _causal_lm(LlamaConfig(
        initializer_range=0.5, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def crash_loss_at_call(monkeypatch, call: int):
    """Make the training loop's loss raise RuntimeError("power cut") at its `call`-th call (a crash mid-run);
    returns the real loss function, to put back with monkeypatch.setattr before resuming."""
    import loraforge.train.client as client_module

    original = client_module.token_logprobs
    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == call:
            raise RuntimeError("power cut")
        return original(model, batch)

    monkeypatch.setattr(client_module, "token_logprobs", crashing)
    return original


def crash_when_taking_step(monkeypatch, stage_class, step: int):
    """Make a stage raise RuntimeError("power cut") when the loop asks for step `step`'s micro-batches (a crash
    mid-run, after the checkpoints before it); returns the real method, to put back before resuming."""
    original = stage_class.micro_batches

    def crashing(self, client, state):
        if state.step == step - 1:
            raise RuntimeError("power cut")
        return original(self, client, state)

    monkeypatch.setattr(stage_class, "micro_batches", crashing)
    return original
