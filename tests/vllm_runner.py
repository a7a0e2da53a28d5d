"""Run inside the vLLM venv (`make test-interop`): greedy answers of vLLM for each exported adapter.

    python tests/vllm_runner.py JOB.json OUT.json

JOB: {"base": folder, "prompts": [chat prompt strings, already templated], "adapters": {name: folder},
"max_tokens": n, "max_lora_rank": r}. OUT: {name: [token ids per prompt]} ("base" included). Imports only vLLM.
"""

import json
import os
import sys


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: a few short prompts need no more
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    job = json.load(open(sys.argv[1]))
    llm = LLM(model=job["base"], enable_lora=True, max_lora_rank=job["max_lora_rank"], max_loras=len(job["adapters"]),
              max_model_len=512, dtype="float32", enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    answers = {}
    for index, (name, folder) in enumerate([("base", None), *job["adapters"].items()]):
        request = LoRARequest(name, index, folder) if folder else None
        outputs = llm.generate(job["prompts"], params, lora_request=request)
        answers[name] = [list(o.outputs[0].token_ids) for o in outputs]
    json.dump(answers, open(sys.argv[2], "w"))


if __name__ == "__main__":  # vLLM's CPU workers start by spawn: the entry point must be guarded
    main()
