"""Attention in a training step on CPU: transformers' sdpa against loraforge's short-row attention, one layer.

    python bench/bench_attention.py            # SmolLM2's heads (9 query, 3 K/V, dim 64), batch 8, bf16

Forward + backward of one attention call per shape (query × key positions; a padding mask, as training batches
have), then forward alone under no_grad; medians of --repeats, the two paths alternating. attention.py takes its
explicit path with gradients up to SHORT_ROW_SCORES positions a head (the rows here say where that pays; both
paths run at every shape) and leaves calls without gradients to sdpa.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
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
