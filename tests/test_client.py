"""The training primitives: forward_backward / optim_step / sample / save_state, and several clients training
their own adapters in the same forward passes."""

import pytest
import torch

from loraforge.config import LoraConfig
from loraforge.objectives import CROSS_ENTROPY, Objective
from loraforge.serve.engine import SamplingParams
from loraforge.train.client import Datum, SharedBase, forward_backward_together

PROMPT = [{"role": "user", "content": "Extract the order as JSON. Hi, this is Maria."}]


def _datums(base: SharedBase, answers: list[str]) -> list[Datum]:
    rows = []
    for answer in answers:
        prompt = base.prompt_ids(PROMPT)
        completion = base.tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append(Datum(prompt + completion, [-100] * len(prompt) + completion))
    return rows


A_DATA = ['{"name": "Maria"}', '{"city": "Oslo"}']
B_DATA = ["The quick brown fox.", "Paris.", "hello world answer"]


def _clients(base: SharedBase):
    torch.manual_seed(1)
    a = base.training_client("a", LoraConfig(r=2, alpha=8), lr=2e-2)
    torch.manual_seed(2)
    b = base.training_client("b", LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]), lr=1e-2)
    return a, b


def _tensors(client) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in client.trainee.checkpoint_tensors().items()}


def test_two_clients_in_one_forward_equal_two_separate_runs(tiny_model_dir):
    together = SharedBase.load(str(tiny_model_dir), device="cpu")
    a, b = _clients(together)
    separate_a, separate_b = SharedBase.load(str(tiny_model_dir), device="cpu"), SharedBase.load(str(tiny_model_dir),
                                                                                                 device="cpu")
    alone_a, _ = _clients(separate_a)
    _, alone_b = _clients(separate_b)
    start_a = _tensors(a)
    for _ in range(3):
        results = forward_backward_together([(a, _datums(together, A_DATA), "cross_entropy"),
                                             (b, _datums(together, B_DATA), CROSS_ENTROPY)])
        a.optim_step(), b.optim_step()
        alone = [alone_a.forward_backward(_datums(separate_a, A_DATA)),
                 alone_b.forward_backward(_datums(separate_b, B_DATA))]
        alone_a.optim_step(), alone_b.optim_step()
        for r, s in zip(results, alone):
            assert r.loss == pytest.approx(s.loss, rel=1e-5) and r.count == s.count
    for mine, theirs in ((a, alone_a), (b, alone_b)):
        got, want = _tensors(mine), _tensors(theirs)
        assert got.keys() == want.keys()
        for key in got:
            torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4)
    assert any(not torch.equal(start_a[k], _tensors(a)[k]) for k in start_a)  # it did train


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_samples_carry_the_log_probs_training_computes_after_each_step(tiny_model_dir, temperature):
    base = SharedBase.load(str(tiny_model_dir), device="cpu")
    client, _ = _clients(base)
    params = SamplingParams(max_new_tokens=6, temperature=temperature, seed=3, logprobs=True)
    for _ in range(2):
        (sample,) = client.sample([PROMPT], 1, params)[0]
        prompt = base.prompt_ids(PROMPT)
        tokens = list(sample.token_ids)
        scored = client.forward([Datum(prompt + tokens, [-100] * len(prompt) + tokens, {"temperature": temperature})])
        assert scored.logprobs.tolist() == pytest.approx(list(sample.logprobs), abs=1e-4)
        client.forward_backward(_datums(base, A_DATA))
        client.optim_step()  # the sampler must see the new weights (the fused optimizer bumps no version)


def test_n_samples_of_a_prompt_differ_and_are_seeded(tiny_model_dir):
    base = SharedBase.load(str(tiny_model_dir), device="cpu")
    client, _ = _clients(base)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=11)
    first = [s.token_ids for s in client.sample([PROMPT], 4, params)[0]]
    again = [s.token_ids for s in client.sample([PROMPT], 4, params)[0]]
    assert first == again and len(set(first)) > 1


def test_save_and_load_state_continue_exactly(tiny_model_dir, tmp_path):
    base = SharedBase.load(str(tiny_model_dir), device="cpu")
    client, _ = _clients(base)
    client.forward_backward(_datums(base, A_DATA))
    client.optim_step()
    client.save_state(tmp_path / "state")
    client.forward_backward(_datums(base, B_DATA))
    client.optim_step()
    straight = _tensors(client)
    client.load_state(tmp_path / "state")
    assert client.steps == 1
    client.forward_backward(_datums(base, B_DATA))
    client.optim_step()
    assert all(torch.equal(straight[k], v) for k, v in _tensors(client).items())


def test_a_custom_objective_over_log_probs(tiny_model_dir):
    base = SharedBase.load(str(tiny_model_dir), device="cpu")
    client, _ = _clients(base)
    # Raise the probability of the worst-predicted token of each batch: a loss no built-in objective has.
    worst = Objective("worst_token", lambda logprobs, batch: (-logprobs.min(), {"min": float(logprobs.min().detach())}),
                      lambda batch: 1)
    before = client.forward(_datums(base, A_DATA), worst).stats["min"]
    for _ in range(5):
        result = client.forward_backward(_datums(base, A_DATA), worst)
        client.optim_step()
    assert result.count == 1 and client.forward(_datums(base, A_DATA), worst).stats["min"] > before


def test_a_groups_shared_prefill_answers_as_one_prompt_alone(tiny_model_dir):
    base = SharedBase.load(str(tiny_model_dir), device="cpu")
    client, _ = _clients(base)
    params = SamplingParams(max_new_tokens=8, logprobs=True)  # greedy: every copy must equal its lone answer
    prompts = [PROMPT, [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]]
    alone = [client.sample([prompt], 1, params)[0][0] for prompt in prompts]
    assert alone[0].token_ids != alone[1].token_ids  # else a mixed-up cache copy could not show
    groups = client.sample(prompts, 3, params)  # both groups admitted, and prefilled, together
    for lone, group in zip(alone, groups):
        assert all(s.token_ids == lone.token_ids for s in group)
        assert all(s.logprobs == pytest.approx(lone.logprobs, abs=1e-5) for s in group)
