"""stage=grpo: prompt rows, rewards loaded from a file or a module, a reward that fails stops the run cleanly,
a tiny model learns a trivial reward, a step-exact resume mid-rollout, and the bundled RL demo (slow)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import crash_when_taking_step
from safetensors.torch import load_file

from loraforge.config import DataConfig, LoraConfig, load_train_config
from loraforge.data import DataReport
from loraforge.errors import ConfigError, DataError, TrainingError
from loraforge.loss import token_logprobs
from loraforge.report import learning_curve_figure
from loraforge.train import train
from loraforge.train.checkpoint import complete_checkpoints, verify_checkpoint
from loraforge.train.client import Datum, SharedBase, batch_of
from loraforge.train.grpo import (GrpoStage, PromptRow, Reward, load_prompts, load_reward, score,
                                  shared_prompt_inputs)

REWARDS = '''
calls = 0

def vowels(prompt, completion, row):
    """The share of the completion's letters that are row["letter"]: something a tiny model can learn fast."""
    letters = [c for c in completion.lower() if c.isalpha()]
    return sum(c == row["letter"] for c in letters) / max(len(letters), 1)

def flaky(prompt, completion, row):
    global calls
    calls += 1
    if calls > 20:
        raise ValueError("the grader is down")
    return 0.5

def not_a_number(prompt, completion, row):
    return "high"
'''


@pytest.fixture(scope="module")
def rewards_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "rewards.py"
    path.write_text(REWARDS)
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Extract the order as JSON. {i}"}],
                                        "letter": "e"}) + "\n" for i in range(40)))
    return path


def _overrides(tiny_model_dir, prompts, output, reward, *extra):
    return [f"model={tiny_model_dir}", f"data={prompts}", f"output={output}", "stage=grpo", f"grpo.reward={reward}",
            "batch_size=2", "grpo.group_size=4", "grpo.max_new_tokens=8", "max_steps=6", "eval_every=3", "lr=5e-2",
            "lora.r=2", "compare=false", "report=false", "tensorboard=false", "max_seq_len=64", *extra]


def test_rewards_load_from_a_file_or_a_module(rewards_file):
    assert load_reward(f"{rewards_file}:vowels")([], "eee", {"letter": "e"}) == 1.0
    assert load_reward("loraforge.demo.sums:correct")([], "3 + 4 = 7", {"answer": "7"}) == 1.0
    for spec, problem in ((f"{rewards_file}:missing", "has no function 'missing'"),
                          ("no/such/file.py:f", "does not exist"), ("no_such_module_x:f", "importing no_such_module_x"),
                          ("nocolon", "must look like")):
        with pytest.raises(ConfigError, match=f"grpo.reward: .*{problem}"):
            load_reward(spec)
    with pytest.raises(ConfigError, match="stage=grpo needs a reward"):
        load_train_config(None, ["stage=grpo"])
    with pytest.raises(ConfigError, match="2 weights for 1 rewards"):
        load_train_config(None, ["stage=grpo", f"grpo.reward={rewards_file}:vowels", "grpo.reward_weights=[1,2]"])


@pytest.mark.parametrize("value", ["high", float("nan"), None, True])
def test_a_reward_that_returns_no_number_names_the_row(value):
    prompt = PromptRow([{"role": "user", "content": "Hi"}], {}, "prompts.jsonl:7")
    with pytest.raises(TrainingError, match=r"prompts.jsonl:7: reward odd returned .*not a finite number"):
        score([Reward("odd", lambda p, c, r: value, 1.0)], prompt, "an answer")


def test_weighted_rewards_add_up():
    prompt = PromptRow([{"role": "user", "content": "Hi"}], {}, "f:1")
    total, values = score([Reward("a", lambda p, c, r: 1.0, 2.0), Reward("b", lambda p, c, r: 0.5, -1.0)], prompt, "x")
    assert total == pytest.approx(1.5) and values == {"a": 1.0, "b": 0.5}


def test_prompt_rows_are_checked_with_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Fine?"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}) + "\n")
    with pytest.raises(DataError, match=r"prompts.jsonl:2: the prompt must end with a non-empty user turn"):
        load_prompts(path, DataConfig(), DataReport())


def test_a_reward_that_raises_stops_the_run_and_keeps_the_checkpoint(tiny_model_dir, prompts_file, rewards_file,
                                                                     tmp_path):
    # 8 completions per step: the 21st call is in step 3, after the checkpoint of step 2.
    config = load_train_config(None, _overrides(tiny_model_dir, prompts_file, tmp_path / "run",
                                                f"{rewards_file}:flaky", "save_every=2", "eval_every=100"))
    with pytest.raises(TrainingError, match=r"prompts.jsonl:\d+: reward flaky raised ValueError: the grader is down"):
        train(config)
    checkpoints = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-0000002"] and verify_checkpoint(checkpoints[0]) is None


def _val_rewards(run) -> list[float]:
    return [json.loads(line)["val_reward"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "val_reward" in line]


def test_a_tiny_model_learns_a_trivial_reward(tiny_model_dir, prompts_file, rewards_file, tmp_path):
    run = tmp_path / "run"
    config = load_train_config(None, _overrides(tiny_model_dir, prompts_file, run, f"{rewards_file}:vowels",
                                                "max_steps=24", "eval_every=24", "grpo.group_size=8",
                                                "schedule=constant", "data.split=[0.7,0.3,0.0]"))
    result = train(config)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sampled = [r["train_reward"] for r in rows if "train_reward" in r]
    first, last = sum(sampled[:6]) / 6, sum(sampled[-6:]) / 6
    assert len(sampled) == 24 and last > 2 * first, sampled
    assert result.val_metric == "reward" and result.final_val_loss == _val_rewards(run)[-1]
    assert learning_curve_figure(rows).axes[0].get_ylabel() == "reward (mean per completion)"


def test_shared_prompts_compute_what_whole_rows_compute(tiny_model_dir):
    """A group's prompt computed once (its KV cache copied to each completion) gives the same log-probs and
    gradients as every row computed whole, with prompts of different lengths (left padding)."""
    base = SharedBase.load(str(tiny_model_dir), device="cpu")
    torch.manual_seed(0)
    client = base.training_client("a", LoraConfig(r=2, alpha=16))
    for param in client.trainee.trainable():
        param.data.normal_(0, 0.1)  # a non-zero adapter, so its gradients flow through the shared cache too
    tokens = lambda text: base.tokenizer(text, add_special_tokens=False)["input_ids"]
    prompts = [base.prompt_ids([{"role": "user", "content": "What is 3 + 4?"}]),
               base.prompt_ids([{"role": "user", "content": "Extract the order as JSON. Hi, this is Maria."}])]
    completions = [tokens("7 ok<|im_end|>"), tokens("seven"), tokens("The quick brown"), tokens("a")]
    rows = [Datum(prompts[i // 2] + c, [-100] * len(prompts[i // 2]) + c) for i, c in enumerate(completions)]
    whole = batch_of(rows, base.tokenizer.pad_token_id)
    shared = {**whole, **shared_prompt_inputs(prompts, completions, 2, base.tokenizer.pad_token_id,
                                              torch.device("cpu"))}
    results = []
    for batch in (whole, shared):
        with base.lora.using("a"):
            logprobs = token_logprobs(client.model, batch)
        logprobs.sum().backward()
        results.append((logprobs.detach(), [p.grad.clone() for p in client.trainee.trainable()]))
        client.zero_grad()
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_grpo_resumes_step_exactly_inside_a_rollout(tiny_model_dir, prompts_file, rewards_file, tmp_path,
                                                    monkeypatch):
    # Two optimizer steps per rollout; the checkpoint of step 3 is mid-rollout, so step 4 must train on the
    # completions sampled at step 3, which the checkpoint holds.
    extra = ("save_every=3", "grpo.iterations=2", "max_steps=6")
    straight = tmp_path / "straight"
    train(load_train_config(None, _overrides(tiny_model_dir, prompts_file, straight, f"{rewards_file}:vowels", *extra)))
    original = crash_when_taking_step(monkeypatch, GrpoStage, 5)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="power cut"):
        train(load_train_config(None, _overrides(tiny_model_dir, prompts_file, crashed, f"{rewards_file}:vowels",
                                                 *extra)))
    assert (complete_checkpoints(crashed / "checkpoints")[-1] / "stage.safetensors").is_file()
    monkeypatch.setattr(GrpoStage, "micro_batches", original)
    result = train(load_train_config(None, _overrides(tiny_model_dir, prompts_file, crashed, f"{rewards_file}:vowels",
                                                      *extra, "resume=true")))
    assert result.steps == 6 and len(result.losses) == 3
    a, b = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (straight, crashed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _val_rewards(straight) == _val_rewards(crashed)


@pytest.mark.slow
def test_the_bundled_rl_demo_raises_the_reward(tmp_path):
    """`loraforge train stage=grpo` with no data: rank 1, base vs tuned reward on held-out prompts."""
    run = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "loraforge", "train", "stage=grpo", f"output={run}",
                           "tensorboard=false"], capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-2000:]
    models = json.loads((run / "evaluation.json").read_text())["models"]
    assert models["tuned"]["reward"] >= models["base"]["reward"] + 0.3, models
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 1
