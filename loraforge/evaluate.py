"""Held-out loss, answers, consistency and resources: how much better is the model with the adapter, and
what does it cost to run."""

from __future__ import annotations

import hashlib
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from loraforge.atomic import write_text
from loraforge.data import IGNORE_INDEX, Example, Messages, collate, prompt_ids, render
from loraforge.loss import loss_and_predictions, perplexity, token_logprobs
from loraforge.metrics import choose_metrics, normalize, score


# Scoring without gradients holds one layer's activations at a time, so a batch can take more rows than a training
# micro-batch (whose step holds every layer's) in the same memory, and more rows share their common prefix
# (loss.py) among more of them: 8 → 32 rows scores the demo's validation split ~15% faster on 2 CPU cores.
SCORING_ROWS = 32


def scoring_rows(training_rows: int, checkpointing: bool) -> int:
    """Rows per batch when scoring between training steps: four micro-batches' worth, at most SCORING_ROWS; just one
    micro-batch under gradient checkpointing, whose step holds little more than a layer's activations."""
    return training_rows if checkpointing else max(training_rows, min(SCORING_ROWS, 4 * training_rows))


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], pad_token_id: int, batch_size: int,
                  device: torch.device, autocast=nullcontext,
                  logprobs: Callable[[dict], torch.Tensor] | None = None) -> dict[str, float]:
    """Mean token loss and perplexity over examples (model put in eval mode for the call). `logprobs`: what
    computes a batch's token log-probs when not the model itself (training's DDP / FSDP2 wrapper)."""
    logprobs = logprobs or (lambda batch: token_logprobs(model, batch))
    was_training = model.training
    model.eval()
    # Rows of similar length share a batch, so little padding is computed; the summed loss is order-free.
    ordered = sorted(examples, key=lambda example: len(example.input_ids))
    total, count = 0.0, 0
    for start in range(0, len(ordered), batch_size):
        batch = {k: v.to(device) for k, v in collate(ordered[start : start + batch_size], pad_token_id).items()}
        with autocast():
            scores = logprobs(batch)
        total, count = total - scores.sum().item(), count + scores.numel()
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": count}


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Messages],
                     max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding and the KV cache."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    was_training = model.training
    model.eval()
    texts = [render(tokenizer, prompt, generation_prompt=True) for prompt in prompts]
    by_index: dict[int, str] = {}
    try:
        # Longest first: rows of similar length waste less padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            inputs = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(device)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            for i, row in zip(chunk, out[:, inputs["input_ids"].shape[1] :]):
                by_index[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [by_index[i] for i in range(len(texts))]


@dataclass
class PartialAnswer:
    """A greedy answer being written: the tokens known so far, and how many more it may have."""

    prompt_ids: list[int]
    tokens: list[int]
    budget: int
    done: bool
    # The KV cache of prompt_ids + tokens[:-1] from the scoring pass (keys, values per layer), so that decoding
    # the rest starts without a prefill; None where the engine cannot take it.
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@torch.no_grad()
def score_and_answer(lora, tokenizer: PreTrainedTokenizerBase, conversations: Sequence, adapter: str | None,
                     max_new_tokens: int, batch_size: int, max_seq_len: int,
                     autocast=nullcontext) -> tuple[dict[str, float], list[PartialAnswer]]:
    """The loss of the reference answers (as evaluate_loss) and the start of each greedy answer, from the same
    forward pass: the argmax at each reference position says how far greedy decoding would follow the
    reference (speculative decoding with the reference as the draft). A model that learned the task writes its
    whole answer there; only the rest is decoded (finish_answers), from where it leaves the reference."""
    from transformers import DynamicCache

    from loraforge.data import tokenize
    from loraforge.errors import LoraforgeError
    from loraforge.serve.batch import cache_keyword, check_full_attention
    from loraforge.serve.engine import end_of_answer_ids

    eos = end_of_answer_ids(lora.model, tokenizer)
    try:  # keep each diverging row's KV cache for finish_answers where its engine can take it
        check_full_attention(lora.model.config)
        keyword = cache_keyword(lora.model)
    except LoraforgeError:
        keyword = None
    rows = []
    for conversation in conversations:
        example = tokenize(tokenizer, conversation.messages, max_seq_len)
        prompt = prompt_ids(tokenizer, conversation.messages[:-1])
        # The reference is the labelled run right after the generation prompt (the template may not allow that).
        start = len(prompt)
        matches = example.input_ids[:start] == prompt and start < len(example.labels) and \
            example.labels[start] != IGNORE_INDEX
        end = start
        while matches and end < len(example.labels) and example.labels[end] != IGNORE_INDEX:
            end += 1
        rows.append((example, prompt, example.input_ids[start:end]))
    device = next(lora.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0].input_ids))
    total, count, answers = 0.0, 0, [None] * len(rows)
    was_training = lora.training
    lora.eval()
    try:
        with lora.using(adapter):
            for begin in range(0, len(order), batch_size):
                chunk = order[begin : begin + batch_size]
                batch = {k: v.to(device) for k, v in
                         collate([rows[i][0] for i in chunk], tokenizer.pad_token_id).items()}
                cache = {keyword: DynamicCache(config=lora.model.config)} if keyword else None
                with autocast():
                    loss_sum, n, predictions = loss_and_predictions(lora.model, batch, cache)
                total, count = total + loss_sum, count + n
                per_row = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).tolist()
                for row, (i, row_predictions) in enumerate(zip(chunk, torch.split(predictions, per_row))):
                    example, prompt, reference = rows[i]
                    # The reference run is the row's last labelled run: its predictions are the last ones.
                    greedy = row_predictions.tolist()[len(row_predictions) - len(reference):] if reference else []
                    answers[i] = answer = _follow(prompt, reference, greedy, max_new_tokens, eos)
                    cached = len(prompt) + len(answer.tokens) - 1  # right padding: a row's tokens come first
                    if cache and not answer.done and answer.tokens and cached > 0:
                        answer.cache = [(layer.keys[row, :, :cached].clone(), layer.values[row, :, :cached].clone())
                                        for layer in cache[keyword].layers]
    finally:
        lora.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": count}, answers


def _follow(prompt: list[int], reference: list[int], greedy: list[int], max_new_tokens: int,
            eos: frozenset[int]) -> PartialAnswer:
    """The greedy answer as far as the reference pass shows it: the reference up to the first token greedy
    decoding would not write, plus the token it would write there."""
    k = next((j for j, (want, got) in enumerate(zip(reference, greedy)) if want != got), len(reference))
    tokens = list(reference[:k]) + ([greedy[k]] if k < len(reference) else [])
    stop = next((j for j, token in enumerate(tokens) if token in eos), None)
    if stop is not None:
        tokens = tokens[: stop + 1]
    tokens = tokens[:max_new_tokens]
    done = (bool(tokens) and tokens[-1] in eos) or len(tokens) >= max_new_tokens
    return PartialAnswer(prompt, tokens, max_new_tokens - len(tokens), done)


def finish_answers(lora, tokenizer: PreTrainedTokenizerBase, answers: dict[str | None, list[PartialAnswer]],
                   batch_size: int, autocast=nullcontext) -> dict[str | None, list[str]]:
    """Greedy-decode what each answer still lacks, every adapter's rows in the same batches (continuous
    batching: rows leave when they end), and return the texts."""
    from loraforge.errors import LoraforgeError
    from loraforge.serve.engine import Engine, Failed, Generation, SamplingParams

    open_rows = [(adapter, answer) for adapter, rows in answers.items() for answer in rows if not answer.done]
    if open_rows:
        longest = max(len(a.prompt_ids) + len(a.tokens) + a.budget for _, a in open_rows)
        try:
            engine = Engine(lora, tokenizer, max_batch=decode_rows(lora.model, longest, batch_size))
        except LoraforgeError:  # a cache the engine cannot batch (sliding windows): one row at a time
            engine = None
        if engine is not None:
            generations = [Generation(a.prompt_ids + a.tokens, adapter, SamplingParams(a.budget), index=i,
                                      prefilled=a.cache) for i, (adapter, a) in enumerate(open_rows)]
            for _, answer in open_rows:
                answer.cache = None  # the engine holds it now, and lets go of it when the row is decoded
            with autocast():
                events = engine.run(generations)
            for (adapter, answer), event in zip(open_rows, events):
                if isinstance(event, Failed):
                    raise LoraforgeError(f"generating an answer failed: {event.message}")
                answer.tokens += event.token_ids
        else:
            for adapter, answer in open_rows:
                with lora.using(adapter), autocast():
                    answer.tokens += _generate_ids(lora, tokenizer, answer.prompt_ids + answer.tokens, answer.budget)
    return {adapter: [tokenizer.decode(a.tokens, skip_special_tokens=True).strip() for a in rows]
            for adapter, rows in answers.items()}


# Rows decoded together when their KV cache fits this: on a 2-core CPU a decode step of 64 rows made as many
# tokens per second as one of 100, and 1.25× those of 32 (the comparison's 100 base answers: 63-70 s at 32 rows,
# 53 s at 64); GPUs gain more still from wide batches.
DECODE_ROWS, DECODE_KV_BYTES = 64, 512 * 2**20


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes of keys and values one token adds to a KV cache: layers × 2 × KV heads × head size × element."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = getattr(model, "dtype", torch.float32).itemsize  # the model's float dtype (autocast may halve it)
    return config.num_hidden_layers * 2 * kv_heads * head_dim * element


def decode_rows(model: nn.Module, longest: int, batch_size: int) -> int:
    """How many rows to decode at once: `batch_size`, raised to DECODE_ROWS where that many rows of `longest`
    tokens keep their KV cache within DECODE_KV_BYTES (never lowered: the caller's batch is its choice)."""
    fitting = DECODE_KV_BYTES // max(1, kv_bytes_per_token(model) * longest)
    return max(batch_size, min(DECODE_ROWS, fitting), 1)


def _generate_ids(lora, tokenizer, ids: list[int], max_new_tokens: int) -> list[int]:
    device = next(lora.parameters()).device
    was_training = lora.training
    lora.eval()
    try:
        out = lora.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                            device=device), max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    finally:
        lora.train(was_training)
    return out[0, len(ids):].tolist()


def _answer_prompts(conversations: Sequence, limit: int | None) -> tuple[list[Messages], list[str]]:
    chosen = list(conversations)[:limit]
    return [c.messages[:-1] for c in chosen], [c.messages[-1]["content"] for c in chosen]


@dataclass
class BaseSideCache:
    """The base model's side of a comparison — its held-out loss and answers — kept between runs: it depends
    only on the base model, the prompts and the settings, so a second run on the same base and data (another
    learning rate, rank, adapter method) skips it. `identity` says what the caller knows the base side depends
    on (the base's files, quantization, precision, versions); evaluate_models adds the tokenized rows and the
    generation settings. One JSON file per key, compared whole on reading; anything unreadable is recomputed."""

    folder: Path
    identity: dict

    def _path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.folder / f"{digest[:32]}.json"

    def load(self, key: dict) -> tuple[dict, Path] | None:
        path = self._path(key)
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(stored, dict) or stored.get("key") != key or not isinstance(stored.get("base"), dict):
            return None
        return stored["base"], path

    def save(self, key: dict, base: dict) -> None:
        try:
            write_text(self._path(key), json.dumps({"key": key, "base": base}, ensure_ascii=False))
        except OSError:
            pass  # a read-only cache only means computing the base side again next time


def evaluate_models(lora, tokenizer: PreTrainedTokenizerBase, conversations: Sequence, adapters: Sequence[str],
                    metric_names: Sequence[str] | str = "auto", limit: int | None = 100, max_new_tokens: int = 64,
                    batch_size: int = 16, max_seq_len: int = 512, with_loss: bool = True,
                    autocast=nullcontext, base_cache: BaseSideCache | None = None) -> dict:
    """Base and each adapter on the same held-out conversations: loss / perplexity, answer metrics and the
    answers themselves (the evaluation.json the report shows). `autocast`: a factory of the precision context
    (after training: the one training used, so bf16 where the hardware computes it fast). `base_cache`: the
    base side is read from it when an earlier evaluation left it there (`base_from_cache` names the file)."""
    chosen = list(conversations)[:limit]
    prompts, references = _answer_prompts(chosen, None)
    names = choose_metrics(references, metric_names)
    labels = {"base": None, **{a: a for a in adapters}}
    models: dict[str, dict] = {label: {} for label in labels}
    answers: dict[str, list[str]] = {}
    key = cached = None
    if base_cache is not None:
        from loraforge.data import tokenize

        rows = [tokenize(tokenizer, c.messages, max_seq_len).input_ids for c in chosen]
        key = {**base_cache.identity, "rows": hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
               "max_new_tokens": max_new_tokens, "max_seq_len": max_seq_len, "with_loss": with_loss}
        cached = base_cache.load(key)
        if cached is not None:
            models["base"].update(cached[0]["model"])
            answers["base"] = cached[0]["answers"]
            labels.pop("base")
    if with_loss:
        started: dict[str | None, list[PartialAnswer]] = {}
        for label, adapter in labels.items():
            loss, started[adapter] = score_and_answer(lora, tokenizer, chosen, adapter, max_new_tokens, batch_size,
                                                      max_seq_len, autocast)
            models[label].update(loss=loss["loss"], perplexity=loss["perplexity"])
        texts = finish_answers(lora, tokenizer, started, batch_size, autocast)
        answers.update({label: texts[adapter] for label, adapter in labels.items()})
    else:
        for label, adapter in labels.items():
            with lora.using(adapter), autocast():
                answers[label] = generate_answers(lora, tokenizer, prompts, max_new_tokens, batch_size)
    if base_cache is not None and cached is None:
        base_cache.save(key, {"model": dict(models["base"]), "answers": answers["base"]})
    for label in models:
        models[label].update(score(answers[label], references, names))
    samples = [{"prompt": p[-1]["content"], "reference": r, "answers": {m: answers[m][i] for m in models}}
               for i, (p, r) in enumerate(zip(prompts, references))]
    evaluation = {"n": len(references), "metric_names": names, "models": models, "samples": samples}
    if cached is not None:
        evaluation["base_from_cache"] = str(cached[1])
    return evaluation


@torch.no_grad()
def consistency(lora, tokenizer: PreTrainedTokenizerBase, conversations: Sequence, adapters: Sequence[str],
                prompts: int = 10, samples_per_prompt: int = 5, temperature: float = 0.7,
                max_new_tokens: int = 64, seed: int = 0) -> dict[str, dict]:
    """Ask the same question several times at a temperature: how often the answers agree with the most
    common one, and how many distinct answers there are, per model."""
    questions, _ = _answer_prompts(conversations, prompts)
    device = next(lora.parameters()).device
    result = {}
    for label, adapter in [("base", None)] + [(a, a) for a in adapters]:
        agreement, distinct = [], []
        with lora.using(adapter):
            torch.manual_seed(seed)
            for question in questions:
                inputs = tokenizer(render(tokenizer, question, generation_prompt=True), return_tensors="pt",
                                   add_special_tokens=False).to(device)
                out = lora.generate(**inputs, do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                                    num_return_sequences=samples_per_prompt, pad_token_id=tokenizer.pad_token_id)
                texts = [normalize(tokenizer.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True))
                         for row in out]
                counts = Counter(texts)
                agreement.append(counts.most_common(1)[0][1] / len(texts))
                distinct.append(len(counts))
        result[label] = {"agreement": sum(agreement) / len(agreement), "distinct": sum(distinct) / len(distinct),
                         "samples_per_prompt": samples_per_prompt, "temperature": temperature,
                         "prompts": len(questions)}
    return result


class PeakMemory:
    """Peak memory of a block: max allocated on CUDA, else the process's resident set sampled every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb = device, 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        process, self._stop = psutil.Process(), threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2**20)
                self._stop.wait(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()


@torch.no_grad()
def generation_latency(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 32,
                       repeats: int = 3) -> dict[str, float]:
    """Median milliseconds per generated token (greedy, a fixed number of tokens) and peak memory."""
    model.generate(input_ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
    times = []
    with PeakMemory(input_ids.device) as memory:
        for _ in range(repeats):
            if input_ids.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            if input_ids.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000 / new_tokens)
    return {"ms_per_token": statistics.median(times), "peak_mb": memory.peak_mb}


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def resources(lora, tokenizer: PreTrainedTokenizerBase, adapter: str, adapter_dir: Path | None,
              base_dir: Path | None, prompt: Messages, new_tokens: int = 32) -> dict:
    """Adapter size vs base, trainable parameters, and generation latency / peak memory for the base,
    the adapter unmerged, and the adapter merged (which must cost what the base costs). A 4-bit / 8-bit base
    cannot be merged in place (`loraforge merge` dequantizes), so it has no merged latency."""
    from loraforge.quant import model_quant

    adapter_params = sum(p.numel() for p in lora.adapter_parameters(adapter))
    total = sum(p.numel() for p in lora.parameters())
    base_params = total - sum(p.numel() for name in lora.configs for p in lora.adapter_parameters(name))
    device = next(lora.parameters()).device
    input_ids = tokenizer(render(tokenizer, prompt, generation_prompt=True), return_tensors="pt",
                          add_special_tokens=False)["input_ids"].to(device)
    latency = {}
    with lora.using(None):
        latency["base"] = generation_latency(lora, input_ids, new_tokens)
    with lora.using(adapter):
        latency["unmerged"] = generation_latency(lora, input_ids, new_tokens)
        # Base and merged both run through the (then idle) wrappers, so the gap to the base is the adapter's
        # own cost: zero once merged.
        if model_quant(lora.model) == "none":
            lora.merge([adapter])
            try:
                latency["merged"] = generation_latency(lora, input_ids, new_tokens)
            finally:
                lora.unmerge()
    return {
        "base_params": base_params, "trainable_params": adapter_params,
        "trainable_percent": 100 * adapter_params / max(base_params, 1),
        "adapter_mb": folder_mb(adapter_dir) if adapter_dir else None,
        "base_mb": folder_mb(base_dir) if base_dir else None,
        "latency": latency,
    }
