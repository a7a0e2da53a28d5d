"""The training loop: resume exactness, NaN handling, checkpoints, early stopping, LoRA+, schedule."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import crash_loss_at_call
from safetensors.torch import load_file

from loraforge.train.checkpoint import complete_checkpoints
from loraforge.config import TrainConfig, load_train_config
from loraforge.demo import DEMO_DATA
from loraforge.errors import TrainingError
from loraforge.lora import LoraModel
from loraforge.optim import lr_factor, parameter_groups
from loraforge.train import log as log_module
from loraforge.train import loop as loop_module
from loraforge.train import sft as sft_module
from loraforge.train import client as client_module
from loraforge.train import train


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "orders.jsonl"
    path.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:40]))
    return path


def _config(tiny_model_dir, small_data, output, *overrides) -> TrainConfig:
    return load_train_config(None, [
        f"model={tiny_model_dir}", f"data={small_data}", f"output={output}", "batch_size=4", "max_steps=6",
        "lr=5e-3", "lora.r=4", "lora.dropout=0.1", "eval_every=3", "compare=false", "tensorboard=false",
        "max_seq_len=128", *overrides])


def _metric(output, key) -> list[float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def _adapter(output) -> dict[str, torch.Tensor]:
    return load_file(output / "adapter" / "adapter_model.safetensors")


def test_training_lowers_the_loss_and_writes_the_run(tiny_model_dir, small_data, tmp_path):
    result = train(_config(tiny_model_dir, small_data, tmp_path, "max_steps=12", "tensorboard=true", "lr=5e-2"))
    assert result.steps == 12 and result.stopped == "max_steps" and result.skipped_steps == 0
    assert result.losses[-1] < result.losses[0] * 0.8
    for name in ("config.yaml", "data/train.jsonl", "data/test.jsonl", "data_report.json", "adapter/adapter_config.json",
                 "best/adapter_model.safetensors", "metrics.jsonl", "learning_curve.png", "summary.json"):
        assert (tmp_path / name).exists(), name
    assert any((tmp_path / "tensorboard").iterdir())
    assert len(_metric(tmp_path, "val_loss")) == 4  # steps 3, 6, 9, 12
    assert (tmp_path / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "data_report.json").read_text())["split_sizes"]["train"] == 32


def test_interrupt_then_resume_is_step_exact(tiny_model_dir, small_data, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(_config(tiny_model_dir, small_data, straight))

    resumed = tmp_path / "resumed"
    original_log = log_module.MetricsLog.log

    def interrupt_at_step_4(self, step, **values):
        original_log(self, step, **values)
        if step == 4 and "train_loss" in values:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: finish the step, checkpoint, exit

    monkeypatch.setattr(log_module.MetricsLog, "log", interrupt_at_step_4)
    first = train(_config(tiny_model_dir, small_data, resumed))
    assert first.stopped == "interrupted" and first.steps == 4
    assert [p.name for p in complete_checkpoints(resumed / "checkpoints")][-1] == "step-0000004"
    monkeypatch.setattr(log_module.MetricsLog, "log", original_log)

    second = train(_config(tiny_model_dir, small_data, resumed, "resume=true"))
    assert second.steps == 6 and second.stopped == "max_steps"
    assert _metric(resumed, "train_loss") == _metric(straight, "train_loss")  # bit-identical, dropout included
    assert _metric(resumed, "val_loss") == _metric(straight, "val_loss")
    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_crash_mid_training_keeps_last_complete_checkpoint_and_resumes(tiny_model_dir, small_data, tmp_path,
                                                                       monkeypatch):
    straight = tmp_path / "straight"
    train(_config(tiny_model_dir, small_data, straight))
    crashed = tmp_path / "crashed"
    original = crash_loss_at_call(monkeypatch, 5)  # the 5th step's loss
    with pytest.raises(RuntimeError, match="power cut"):
        train(_config(tiny_model_dir, small_data, crashed, "save_every=2"))
    assert [p.name for p in complete_checkpoints(crashed / "checkpoints")] == ["step-0000002", "step-0000004"]
    monkeypatch.setattr(client_module, "token_logprobs", original)
    train(_config(tiny_model_dir, small_data, crashed, "save_every=2", "resume=true"))
    assert _metric(crashed, "train_loss") == _metric(straight, "train_loss")
    a, b = _adapter(straight), _adapter(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_incomplete_checkpoint_is_ignored(tiny_model_dir, small_data, tmp_path):
    train(_config(tiny_model_dir, small_data, tmp_path, "save_every=3"))
    broken = tmp_path / "checkpoints" / "step-0000099"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"half written")
    assert complete_checkpoints(tmp_path / "checkpoints")[-1].name == "step-0000006"


def _nan_at(calls_to_poison: set[int], monkeypatch):
    original = client_module.token_logprobs
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        logprobs = original(model, batch)
        return logprobs * float("nan") if calls["n"] in calls_to_poison else logprobs

    monkeypatch.setattr(client_module, "token_logprobs", poisoned)


def test_nan_step_is_skipped_and_counted(tiny_model_dir, small_data, tmp_path, monkeypatch):
    _nan_at({2, 3}, monkeypatch)
    result = train(_config(tiny_model_dir, small_data, tmp_path))
    assert result.steps == 6 and result.skipped_steps == 2
    assert all(torch.isfinite(t).all() for t in _adapter(tmp_path).values())


def test_nan_k_times_in_a_row_stops_with_a_clear_error(tiny_model_dir, small_data, tmp_path, monkeypatch):
    _nan_at(set(range(3, 100)), monkeypatch)
    with pytest.raises(TrainingError, match="NaN/inf for 3 steps in a row"):
        train(_config(tiny_model_dir, small_data, tmp_path, "max_bad_steps=3", "save_every=2"))
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step-0000002"]


def test_a_lost_peer_anywhere_in_the_loop_ends_with_the_clear_error(tiny_model_dir, small_data, tmp_path,
                                                                    monkeypatch):
    """The collective that times out when another rank hangs may be the stop poll after a step, not the step's own
    (the two-process test stops a rank at a random moment): either way the job says what happened."""
    polls = []

    def poll_that_times_out(flag: bool) -> bool:
        polls.append(flag)
        if len(polls) == 4:  # the auto-checkpointing decision's, then the polls after steps 1, 2 and 3
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read timeout [127.0.0.1]:1234")
        return flag

    monkeypatch.setattr(loop_module, "any_rank", poll_that_times_out)
    monkeypatch.setattr(loop_module, "lost_peer", lambda error: "gloo" in str(error))  # as under torchrun
    with pytest.raises(TrainingError, match="the other ranks stopped answering after step 3 .*Read timeout"):
        train(_config(tiny_model_dir, small_data, tmp_path, "save_every=2"))
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step-0000002"]


def test_early_stopping_keeps_the_best_adapter(tiny_model_dir, small_data, tmp_path, monkeypatch):
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])  # best at the 2nd evaluation, then two without improvement
    saved_at = []
    original_save = LoraModel.save

    def fake_evaluate(*args, **kwargs):
        return {"loss": next(scripted), "perplexity": 1.0, "tokens": 1}

    def recording_save(self, directory, adapter_names=None):
        saved_at.append(directory.name.split(".")[1])  # written as .best.XXXX.tmp, then swapped in as best/
        return original_save(self, directory, adapter_names)

    monkeypatch.setattr(sft_module, "evaluate_loss", fake_evaluate)
    monkeypatch.setattr(LoraModel, "save", recording_save)
    result = train(_config(tiny_model_dir, small_data, tmp_path, "max_steps=40", "eval_every=2", "patience=2"))
    assert result.stopped == "early_stopping" and result.steps == 8
    assert result.best_val_loss == 2.0 and _metric(tmp_path, "val_loss") == [3.0, 2.0, 2.5, 2.6]
    assert saved_at.count("best") == 2  # after evaluations 1 and 2 only
    assert (tmp_path / "best" / "adapter_model.safetensors").exists()


def test_lora_plus_gives_b_a_larger_learning_rate(tiny_model_dir):
    from loraforge.models import load_model

    config = TrainConfig(lr=1e-3, lora={"r": 2, "plus_ratio": 16})
    lora = LoraModel(load_model(str(tiny_model_dir))[0], config.lora)
    groups = parameter_groups(lora, config)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3] and [g["name"] for g in groups] == ["adapter", "lora_B"]
    names = {id(p): n for n, p in lora.named_parameters()}
    assert {names[id(p)].split(".")[-3] for p in groups[0]["params"]} == {"lora_A"}
    assert {names[id(p)].split(".")[-3] for p in groups[1]["params"]} == {"lora_B"}
    assert len(groups[0]["params"]) == len(groups[1]["params"]) == 2 * 7


def test_schedule_warmup_then_cosine_to_min():
    config = TrainConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(s, 20, config) for s in range(20)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4] == pytest.approx(1.0) and factors[-1] > 0.1 and lr_factor(20, 20, config) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert lr_factor(10, 20, TrainConfig(schedule="linear")) == pytest.approx(0.5)
    assert lr_factor(10, 20, TrainConfig(schedule="constant")) == 1.0


@pytest.mark.slow
def test_a_few_steps_on_the_real_smollm2(small_data, tmp_path):
    config = load_train_config(None, [
        f"data={small_data}", f"output={tmp_path}", "max_steps=4", "batch_size=4", "lr=1e-3", "lora.r=8",
        "eval_every=2", "compare=false", "tensorboard=false", "max_seq_len=128"])
    result = train(config)
    assert result.steps == 4 and result.losses[-1] < result.losses[0]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert saved["r"] == 8 and len(saved["target_modules"]) == 7


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="fp16 with a grad scaler needs CUDA (run on the GPU machine)"))])
def test_mixed_precision_trains_with_fp32_adapters(tiny_model_dir, small_data, tmp_path, precision):
    result = train(_config(tiny_model_dir, small_data, tmp_path, f"precision={precision}", "lr=5e-2"))
    assert result.steps == 6 and result.skipped_steps == 0 and result.losses[-1] < result.losses[0]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in _adapter(tmp_path).values())
    optimizer_state = load_file(complete_checkpoints(tmp_path / "checkpoints")[-1] / "optimizer.safetensors")
    assert optimizer_state and all(t.dtype == torch.float32 for t in optimizer_state.values() if t.is_floating_point())


def test_fp16_on_cpu_is_a_config_error(tiny_model_dir, small_data, tmp_path):
    from loraforge.errors import ConfigError

    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        train(_config(tiny_model_dir, small_data, tmp_path, "precision=fp16", "device=cpu"))


def test_gradient_checkpointing_gives_the_same_training(tiny_model_dir, small_data, tmp_path):
    plain = train(_config(tiny_model_dir, small_data, tmp_path / "plain", "lora.dropout=0.0"))
    checkpointed = train(_config(tiny_model_dir, small_data, tmp_path / "ckpt", "lora.dropout=0.0",
                                 "gradient_checkpointing=true"))
    assert checkpointed.losses == pytest.approx(plain.losses, abs=1e-5)


@pytest.mark.parametrize("free_bytes, on", [(1e3, True), (1e15, False)])
def test_auto_checkpointing_follows_the_devices_free_memory(tiny_model_dir, small_data, tmp_path, monkeypatch,
                                                            free_bytes, on):
    from rich.console import Console

    from loraforge.models import gradient_checkpointing_on

    monkeypatch.setattr(loop_module, "free_memory", lambda device: free_bytes)
    console = Console(record=True, width=300)
    result = train(_config(tiny_model_dir, small_data, tmp_path, "max_steps=2"), console, keep_model=True)
    assert gradient_checkpointing_on(result.lora.model) is on
    assert f"gradient checkpointing {'on' if on else 'off'} (auto: a step needs" in console.export_text()


def test_validation_uses_a_fixed_sample_at_intervals_and_the_whole_split_at_the_end(tiny_model_dir, small_data,
                                                                                      tmp_path):
    from rich.console import Console

    console = Console(record=True, width=200)
    result = train(_config(tiny_model_dir, small_data, tmp_path, "val_samples=2"), console)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in rows if "val_loss" in r]
    n_validation = json.loads((tmp_path / "data_report.json").read_text())["split_sizes"]["validation"]
    assert n_validation > 2
    assert [(r["step"], r["val_rows"]) for r in evaluations] == [(3, 2), (6, n_validation)]
    assert evaluations[0]["val_loss"] == evaluations[0]["val_sample_loss"]
    assert result.final_val_loss == evaluations[-1]["val_loss"] != evaluations[-1]["val_sample_loss"]
    # The capacity advisor: estimated from step 1 (no pass of its own), then measured over the epoch trained.
    text = console.export_text()
    assert "estimated from the base model's loss on step 1's 4 rows" in text
    assert "measured: training log-loss over the" in text and result.dataset_bits > 0
    assert json.loads((tmp_path / "summary.json").read_text())["dataset_bits"] == result.dataset_bits


def test_the_default_validation_sample_costs_a_tenth_of_the_interval_training():
    config = TrainConfig(batch_size=8, grad_accum=2)
    # 20 steps × 16 rows trained = 960 row-forwards of compute; 10% of it is 96 rows' forward.
    assert loop_module.validation_sample_size(config, 20, 1000) == 96
    assert loop_module.validation_sample_size(config, 1, 1000) == loop_module.MIN_VALIDATION_ROWS
    assert loop_module.validation_sample_size(config, 20, 50) == 50
    assert loop_module.validation_sample_size(TrainConfig(val_samples=7), 20, 50) == 7
    assert loop_module.evenly_spaced(list(range(10)), 3) == ([0, 3, 7], [1, 2, 4, 5, 6, 8, 9])
    # Ten intervals, unless the smallest sample (16 rows) would cost more than 10% of an interval's training:
    # 16 rows ≤ 0.3 × interval × rows per step, i.e. an interval of at least 7 steps at 8 rows, 27 at 2.
    assert loop_module.default_eval_every(TrainConfig(batch_size=8), 1000) == 100
    assert loop_module.default_eval_every(TrainConfig(batch_size=8), 20) == 7
    assert loop_module.default_eval_every(TrainConfig(batch_size=2), 100) == 27
    for batch_size in (1, 2, 8, 64):
        config = TrainConfig(batch_size=batch_size)
        every = loop_module.default_eval_every(config, 20)
        assert loop_module.validation_sample_size(config, every, 10_000) <= 3 * 0.10 * every * batch_size + 0.5


@pytest.mark.parametrize("precision, base_dtype, narrowed", [("bf16", "auto", True), ("fp32", "bf16", False)])
def test_the_frozen_embedding_is_kept_in_the_dtype_the_run_computes_in(precision, base_dtype, narrowed):
    """base_dtype=auto under bf16 autocast keeps the tied embedding/head in bf16 (and says so); bf16 storage under
    fp32 compute narrows only the adapted layers (the head would be widened at every step)."""
    from conftest import make_model

    from loraforge.hardware import DTYPES
    from loraforge.train.trainee import build_trainee

    model = make_model("gpt2")
    said: list[str] = []
    config = TrainConfig(lora={"targets": "all-linear"}, precision=precision, base_dtype=base_dtype)
    amp_dtype = None if precision == "fp32" else DTYPES[precision]
    build_trainee(config, model, None, 1, amp_dtype, said.append)
    embedding = model.get_input_embeddings().weight
    assert embedding.dtype == (torch.bfloat16 if narrowed else torch.float32)
    assert model.get_output_embeddings().weight is embedding
    assert ("embedding and head" in said[-1]) == narrowed
