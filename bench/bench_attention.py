"""Attention on a CPU: in a training step, transformers' sdpa against loraforge's short-row attention (one layer);
in decoding, the serving engine's KV cache against transformers' DynamicCache (the whole model).

    python bench/bench_attention.py            # SmolLM2's heads (9 query, 3 K/V, dim 64), batch 8, bf16
    python bench/bench_attention.py --decode   # SmolLM2, 64 rows of 80 prompt tokens, 48 decode steps, bf16

Forward + backward of one attention call per shape (query × key positions; a padding mask, as training batches
have), then forward alone under no_grad; medians of --repeats, the two paths alternating. attention.py takes its
explicit path with gradients up to SHORT_ROW_SCORES positions a head (the rows here say where that pays; both
paths run at every shape) and leaves calls without gradients to sdpa.

--decode: the embedded SmolLM2 as the comparison decodes it (LoRA on all linear layers, frozen weights and
embedding in bf16, bf16 autocast, a left-padded batch), one decode step at a time with each cache; median step
and total over the steps, the two caches alternating for --rounds rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch

from loraforge import attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SHAPES = ((58, 72), (96, 96), (128, 128), (192, 192), (256, 256))


def one_call(forward, module, q, k, v, mask, grad) -> float:
    start = time.perf_counter()
    out, _ = forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    if grad is not None:
        out.backward(grad)
    return time.perf_counter() - start


def decode(rounds: int, rows: int = 64, prompt: int = 80, steps: int = 48) -> None:
    from transformers import DynamicCache

    from loraforge.config import LoraConfig
    from loraforge.lora import LoraModel
    from loraforge.memory import store_embeddings_in
    from loraforge.models import load_model
    from loraforge.serve.batch import cache_keyword, decode_cache

    model, _ = load_model("default", device="cpu")
    LoraModel(model, LoraConfig(r=16, alpha=32, targets="all-linear")).store_frozen_weights(torch.bfloat16)
    store_embeddings_in(model, torch.bfloat16)
    model.eval()
    keyword = cache_keyword(model)
    ids = torch.randint(0, model.config.vocab_size, (rows, prompt), generator=torch.Generator().manual_seed(0))

    def run(cache) -> tuple[float, float]:
        mask = torch.ones(rows, prompt, dtype=torch.long)
        mask[0, :7] = 0  # left padding, as the engine's batches have
        times = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{keyword: cache})
            for _ in range(steps):
                token = out.logits[:, -1:].argmax(-1)
                mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
                start = time.perf_counter()
                out = model(input_ids=token, attention_mask=mask, use_cache=True, **{keyword: cache})
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000, sum(times)

    print(f"| decode ({rows} rows, {prompt} prompt tokens, {steps} steps, bf16) | median step (ms) | steps (s) |")
    print("|---|---|---|")
    for round_ in range(rounds):
        for name, cache in (("DynamicCache", DynamicCache(config=model.config)),
                            ("decode_cache (RoomyLayer)", decode_cache(model.config))):
            median, total = run(cache)
            print(f"| round {round_ + 1}: {name} | {median:.1f} | {total:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--decode", action="store_true", help="the KV cache in decoding instead")
    parser.add_argument("--rounds", type=int, default=3, help="--decode: alternating rounds")
    args = parser.parse_args()
    if args.decode:
        return decode(args.rounds)
    module = types.SimpleNamespace(num_key_value_groups=args.heads // args.kv_heads, is_causal=True)

    def explicit(module, q, k, v, mask, scaling):  # the explicit path at every shape, past the gate
        return attention.explicit_attention(q, k, v, mask, scaling)

    print(f"| query × key positions (batch {args.batch}, {args.heads}/{args.kv_heads} heads of {args.dim}, bf16) "
          "| gradients | sdpa (ms) | short-row (ms) | ratio |")
    print("|---|---|---|---|---|")
    for with_grad in (True, False):
        for q_len, k_len in SHAPES:
            make = lambda h, t: torch.randn(args.batch, h, t, args.dim, dtype=torch.bfloat16,  # noqa: E731
                                            requires_grad=with_grad)
            q, k, v = make(args.heads, q_len), make(args.kv_heads, k_len), make(args.kv_heads, k_len)
            mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)[None, None]
            mask = mask.repeat(args.batch, 1, 1, 1)
            mask[0, :, :, -3:] = False  # one padded row
            grad = torch.randn(args.batch, q_len, args.heads, args.dim, dtype=torch.bfloat16) if with_grad else None
            times: dict[str, list[float]] = {"sdpa": [], "short": []}
            with torch.set_grad_enabled(with_grad):
                for _ in range(args.repeats + 1):  # the first round warms up, alternating
                    times["sdpa"].append(one_call(sdpa_attention_forward, module, q, k, v, mask, grad))
                    times["short"].append(one_call(explicit, module, q, k, v, mask, grad))
            sdpa, short = (statistics.median(t[1:]) * 1000 for t in (times["sdpa"], times["short"]))
            print(f"| {q_len} × {k_len} | {'yes' if with_grad else 'no'} | {sdpa:.2f} | {short:.2f} | "
                  f"{short / sdpa:.2f}× |")


if __name__ == "__main__":
    main()
