"""Interop with the real `peft` package, both ways, for every case: same logits within 1e-5."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import CASES, make_inputs, make_model, perturb, run
from loraforge import LoraModel

peft = pytest.importorskip("peft")

ATOL = 1e-5


def _peft_load(arch: str, directory) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out and saved embeddings; not our concern
        return peft.PeftModel.from_pretrained(make_model(arch), str(directory)).eval()


def test_our_adapter_loads_in_peft_with_same_logits(case, tmp_path):
    lora = LoraModel(make_model(case.arch), case.config())
    perturb(lora, "default")
    inputs = make_inputs(case.arch)
    ours = run(lora, inputs)
    lora.save(tmp_path)
    theirs = run(_peft_load(case.arch, tmp_path), inputs)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def test_peft_saved_adapter_loads_in_ours_with_same_logits(case, tmp_path):
    # Let PEFT build the adapter from the same config, randomise it on PEFT's side, save with PEFT.
    LoraModel(make_model(case.arch), case.config()).save(tmp_path / "config_only")
    peft_model = _peft_load(case.arch, tmp_path / "config_only")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    inputs = make_inputs(case.arch)
    theirs = run(peft_model, inputs)
    peft_model.save_pretrained(str(tmp_path / "from_peft"))
    ours = run(LoraModel.from_pretrained(make_model(case.arch), tmp_path / "from_peft"), inputs)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_native_peft_config_all_linear_loads_in_ours(arch, tmp_path):
    """An adapter made entirely by PEFT (its own config object, 'all-linear', random init) loads in ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                 use_rslora=(arch == "qwen2"))
        peft_model = peft.get_peft_model(make_model(arch), config).eval()
    inputs = make_inputs(arch)
    theirs = run(peft_model, inputs)
    peft_model.save_pretrained(str(tmp_path))
    ours = LoraModel.from_pretrained(make_model(arch), tmp_path)
    torch.testing.assert_close(run(ours, inputs), theirs, atol=ATOL, rtol=0)
    peft_names = {n.removeprefix("base_model.model.").replace(".default", "")
                  for n, _ in peft_model.named_parameters() if "lora_" in n}
    our_names = {n.removeprefix("model.").replace(".default", "")
                 for n, _ in ours.named_parameters() if "lora_" in n}
    assert our_names == peft_names  # the same modules were adapted


def test_peft_mixed_adapter_inference_matches_ours(tmp_path):
    lora = LoraModel(make_model("llama"), CASES[0].config(), adapter_name="a")
    lora.add_adapter("b", CASES[0].config(r=2))
    perturb(lora, "a", seed=1)
    perturb(lora, "b", seed=2)
    lora.save(tmp_path, ["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "a"), adapter_name="a")
        peft_model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    inputs = make_inputs("llama", batch=3)
    names = ["a", "__base__", "b"]
    theirs = peft_model(inputs, adapter_names=names).logits
    ours = run(lora, inputs, adapter_names=["a", None, "b"])
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
