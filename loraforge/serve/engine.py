"""Continuous batching over one LoraModel: requests for different adapters share every forward pass.

One scheduler thread owns the model. Each turn it
  1. admits waiting generations (while the batch has room): prefills them together, every row with its
     own adapter, picks their first token and joins them to the running batch (batch.py);
  2. runs one decode step for every running row: one token each, per-row adapters, KV cache;
  3. lets go of rows that are done (end-of-sequence token, max_new_tokens, a stop string, cancelled).
Results go back through each generation's `emit` callback, on the scheduler thread.

Greedy decoding picks the argmax of the fp32 logits, as `generate(do_sample=False)` does, so an answer
equals `loraforge chat`'s: a row's numbers differ from a single-row run only by the order of fp32 sums
(docs/serving.md has the measurement).
"""

from __future__ import annotations

import copy
import inspect
import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from loraforge.errors import LoraforgeError
from loraforge.lora import LoraModel
from loraforge.serve.batch import (RunningBatch, cache_keyword, check_full_attention, decode_cache, left_padded,
                                   left_padding_mask, pad_left, positions_of)
from loraforge.serve.text import TextStream

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy, as `loraforge chat`
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: every answer runs to max_new_tokens
    logprobs: bool = False  # return each chosen token's log-probability (at this temperature, before top-p)


@dataclass(frozen=True)
class Delta:
    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    index: int
    text: str
    reason: str  # "stop" (end-of-sequence token or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()  # the completion as generated (text alone would not round-trip)
    logprobs: tuple[float, ...] | None = None  # with SamplingParams.logprobs


@dataclass(frozen=True)
class Failed:
    index: int
    message: str


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Generation:
    """One answer to produce. `adapter` is a name inside the LoraModel (None: the base model). `emit` receives
    Delta events (only when `stream`), then one Finished or Failed; `on_exit` runs once the row has left the
    engine for good, after which its adapter may be unloaded."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    emit: Callable[[Event], None] = lambda event: None
    index: int = 0
    stream: bool = False
    strip: bool = False
    on_exit: Callable[[], None] | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    text: TextStream | None = None
    generator: torch.Generator | None = None
    # Keys and values per layer, (KV heads, len(prompt_ids) - 1, head size) each: the KV cache of every prompt
    # token but the last, computed elsewhere (the comparison's scoring pass). The row then joins without a
    # prefill, and its last prompt token is the input of its first decode step.
    prefilled: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def cancel(self) -> None:
        self.cancelled = True  # read by the scheduler between steps


@dataclass
class EngineStats:
    """Counters since start: forwards, tokens, and the most rows / distinct adapters one forward carried."""

    prefills: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    peak_rows: int = 0
    peak_adapters: int = 0  # distinct adapters (the base model counts as one) in one forward

    def record(self, rows: list[Generation], prefill: bool) -> None:
        if prefill:
            self.prefills += 1
        else:
            self.decode_steps += 1
        self.peak_rows = max(self.peak_rows, len(rows))
        self.peak_adapters = max(self.peak_adapters, len({g.adapter for g in rows}))


class Engine:
    def __init__(self, lora: LoraModel, tokenizer: PreTrainedTokenizerBase, model_lock: threading.Lock | None = None,
                 max_batch: int = 32, max_prefill_tokens: int = 4096, threads: int | None = None) -> None:
        self.lora = lora
        # Its own copy: the HTTP side encodes prompts on other threads, and a fast tokenizer refuses concurrent use.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.model_lock = model_lock or threading.Lock()
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.threads = threads
        self.device = next(lora.parameters()).device
        model = lora.model
        check_full_attention(model.config)
        self.eos_ids = end_of_answer_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        # The head only needs the last position of a prefill; most causal LMs take `logits_to_keep`.
        self._last_logits_only = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cache_keyword = cache_keyword(model)
        self._waiting: deque[Generation] = deque()
        self._batch = RunningBatch(self._cache_keyword)
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = EngineStats()

    # -- life cycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the scheduler thread (serving). The model stays in eval mode from here on; batch jobs use run(),
        which switches it only while it runs."""
        if self._thread is None:
            self.lora.eval()
            self._thread = threading.Thread(target=self._run, name="loraforge-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, generations: Sequence[Generation]) -> None:
        for generation in generations:
            generation.text = TextStream(self.tokenizer, generation.params.stop, generation.strip)
            if generation.params.temperature > 0:
                seed = generation.params.seed
                seed = random.getrandbits(63) if seed is None else seed + generation.index
                generation.generator = torch.Generator(self.device).manual_seed(seed)
        with self._wakeup:
            if self._stopping:
                raise LoraforgeError("the engine is shutting down")
            self._waiting.extend(generations)
            self._wakeup.notify()

    def generate(self, generations: Sequence[Generation]) -> list[Finished | Failed]:
        """Submit, wait (the engine must be started) and return each generation's final event, in order."""
        done = threading.Event()
        results = _final_events(generations, when_all=done.set)
        self.submit(generations)
        done.wait()
        return [results[i] for i in range(len(generations))]

    def run(self, generations: Sequence[Generation]) -> list[Finished | Failed]:
        """Submit and step until every generation is done, on the calling thread (for batch jobs: evaluation,
        rollouts; the scheduler thread must not be running). The model's train/eval mode is restored after."""
        results = _final_events(generations)
        was_training = self.lora.training
        self.lora.eval()
        try:
            # Shortest first: rows admitted together share a length, and so little padding.
            self.submit(sorted(generations, key=lambda g: len(g.prompt_ids)))
            while len(results) < len(generations):
                self.step()
        finally:
            self.lora.train(was_training)
        return [results[i] for i in range(len(generations))]

    # -- the scheduler thread ------------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # intra-op threads of this thread (OpenMP's setting is per thread)
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not (self._waiting or self._batch or self._stopping):
                        self._wakeup.wait()
                    if self._stopping:
                        break
                self.step()
        with self._wakeup:
            self._fail([*self._waiting, *self._batch.rows], "the server is shutting down")
            self._waiting.clear()
            self._batch = RunningBatch(self._cache_keyword)

    @torch.inference_mode()
    def step(self) -> None:
        """One turn: admit and prefill waiting generations, then one decode step for every running row.
        The scheduler thread calls it in a loop; tests call it directly, without starting the thread."""
        with self._wakeup:
            admitted = self._admit()
        try:
            fresh = [g for g in admitted if g.prefilled is None]
            if fresh:
                self._prefill(fresh)
            if len(fresh) < len(admitted):
                self._join_prefilled([g for g in admitted if g.prefilled is not None])
            self._drop_done()
            if self._batch:
                self._decode()
                self._drop_done()
        except Exception as error:  # one bad step fails its rows, not the server
            logger.exception("generation step failed")
            # The client learns that and what kind; the text (paths, tensor shapes) stays in the server's log.
            self._fail([*dict.fromkeys([*admitted, *self._batch.rows])],
                       f"generation failed on the server ({type(error).__name__}); the server log has the details")
            self._batch = RunningBatch(self._cache_keyword)

    def _admit(self) -> list[Generation]:
        admitted: list[Generation] = []
        longest = 0
        while self._waiting and len(self._batch) + len(admitted) < self.max_batch:
            generation = self._waiting[0]
            if generation.cancelled:
                self._exit(self._waiting.popleft())
                continue
            longest = max(longest, len(generation.prompt_ids))
            if admitted and longest * (len(admitted) + 1) > self.max_prefill_tokens:
                break  # the rest waits for the next turn: one prefill stays bounded in padded tokens
            admitted.append(self._waiting.popleft())
        return admitted

    def _prefill(self, generations: list[Generation]) -> None:
        """Prefill the admitted rows together; rows with the same prompt and adapter (n completions of one prompt,
        a GRPO group) are computed once and their cache copied, so a group of 8 costs one prompt's prefill."""
        keys = [(tuple(g.prompt_ids), g.adapter) for g in generations]
        unique = list(dict.fromkeys(keys))
        first = {key: i for i, key in enumerate(unique)}
        ids, mask = left_padded([list(key[0]) for key in unique], self.pad_id, self.device)
        cache = decode_cache(self.lora.model.config)
        extra = dict(logits_to_keep=1) if self._last_logits_only else {}
        with self.model_lock:
            out = self.lora(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask),
                            use_cache=True, adapter_names=[key[1] for key in unique],
                            **{self._cache_keyword: cache}, **extra)
        self.stats.record(generations, prefill=True)
        logits = out.logits[:, -1]
        if len(unique) < len(keys):
            index = torch.tensor([first[key] for key in keys], device=self.device)
            logits, mask = logits[index], mask[index]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        tokens = self._choose(logits, generations)
        self._batch.join(generations, cache, mask)
        self._accept(generations, tokens)

    def _join_prefilled(self, generations: list[Generation]) -> None:
        """Rows that bring their own KV cache: left-padded to one length and joined, no forward pass."""
        lengths = [g.prefilled[0][0].shape[1] for g in generations]
        longest = max(lengths)
        cache = decode_cache(self.lora.model.config)
        for layer in range(len(generations[0].prefilled)):
            keys, values = (torch.stack([pad_left(g.prefilled[layer][part], longest, dim=1) for g in generations])
                            for part in (0, 1))
            cache.update(keys, values, layer)
        for generation in generations:
            generation.prefilled = None  # the batch's cache holds it now
        self._batch.join(generations, cache, left_padding_mask(lengths, self.device))

    def _decode(self) -> None:
        rows = self._batch.rows
        # A row's latest token: its last generated one, or for a prefilled row its last prompt token.
        inputs = self._batch.decode_inputs([(g.tokens or g.prompt_ids)[-1] for g in rows])
        with self.model_lock:
            out = self.lora(**inputs, adapter_names=[g.adapter for g in rows])
        self.stats.record(rows, prefill=False)
        self._accept(rows, self._choose(out.logits[:, -1], rows))

    def _choose(self, logits: torch.Tensor, generations: list[Generation]) -> list[int]:
        logits = logits.float()
        tokens = logits.argmax(-1)
        for i, generation in enumerate(generations):
            if generation.params.temperature > 0:
                tokens[i] = _sample(logits[i], generation.params, generation.generator)
        wanted = [i for i, g in enumerate(generations) if g.params.logprobs]
        if wanted:
            # The distribution the token was drawn from: logits / temperature (greedy rows: the model's own).
            temperature = torch.tensor([generations[i].params.temperature or 1.0 for i in wanted],
                                       device=logits.device)[:, None]
            chosen = torch.log_softmax(logits[wanted] / temperature, -1).gather(1, tokens[wanted, None])[:, 0].tolist()
            for i, logprob in zip(wanted, chosen):
                generations[i].logprobs.append(logprob)
        return tokens.tolist()

    def _accept(self, generations: list[Generation], tokens: list[int]) -> None:
        """Append each row's new token; send its text; finish rows that are done."""
        for generation, token in zip(generations, tokens):
            generation.tokens.append(token)
            self.stats.generated_tokens += 1
            if generation.cancelled:
                continue
            params, text = generation.params, generation.text
            if generation.stream or text.stop:  # otherwise the text is decoded once, at the end
                piece = text.update(generation.tokens)
                if piece and generation.stream:
                    generation.emit(Delta(generation.index, piece))
            reason = ("stop" if text.stopped or (token in self.eos_ids and not params.ignore_eos)
                      else "length" if len(generation.tokens) >= params.max_new_tokens else None)
            if reason:
                piece = text.finish(generation.tokens)
                if piece and generation.stream:
                    generation.emit(Delta(generation.index, piece))
                generation.emit(Finished(generation.index, text.text, reason, len(generation.prompt_ids),
                                         len(generation.tokens), tuple(generation.tokens),
                                         tuple(generation.logprobs) if params.logprobs else None))
                generation.done = True

    def _drop_done(self) -> None:
        rows = self._batch.rows
        if not any(g.done or g.cancelled for g in rows):
            return
        leaving = [g for g in rows if g.done or g.cancelled]
        self._batch.keep([i for i, g in enumerate(rows) if not (g.done or g.cancelled)])
        for generation in leaving:
            self._exit(generation)

    def _fail(self, generations: list[Generation], message: str) -> None:
        for generation in generations:
            if not generation.done:
                generation.done = True
                generation.emit(Failed(generation.index, message))
            self._exit(generation)

    @staticmethod
    def _exit(generation: Generation) -> None:
        callback, generation.on_exit = generation.on_exit, None
        if callback is not None:
            callback()


def _final_events(generations: Sequence[Generation], when_all: Callable[[], None] = lambda: None
                  ) -> dict[int, Finished | Failed]:
    """Point each generation's `emit` at a dict that collects its final event under its position; `when_all`
    runs once every generation has one."""
    results: dict[int, Finished | Failed] = {}

    def collect(position: int, event: Event) -> None:
        if isinstance(event, (Finished, Failed)):
            results[position] = event
            if len(results) == len(generations):
                when_all()

    for position, generation in enumerate(generations):
        generation.emit = lambda event, position=position: collect(position, event)
    return results


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Temperature, then nucleus (top-p): the smallest set of likeliest tokens whose probability reaches top_p."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def end_of_answer_ids(model, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The tokens that end an answer: the generation config's (as `generate` uses), else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise LoraforgeError("the model has no end-of-sequence token (generation_config.eos_token_id or the "
                             "tokenizer's eos_token); answers could not stop")
    return frozenset([eos] if isinstance(eos, int) else eos)
