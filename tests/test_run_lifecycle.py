"""A run never loses, mixes or silently corrupts a user's work: the run folder, resume, checkpoints, signals."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import crash_loss_at_call
from safetensors.torch import load_file

from loraforge.config import load_train_config
from loraforge.demo import DEMO_DATA
from loraforge.errors import ConfigError, TrainingError
from loraforge.runtime import training_environment
from loraforge.train import checkpoint as checkpoint_module
from loraforge.train import client as client_module
from loraforge.train import train
from loraforge.train.checkpoint import complete_checkpoints, verify_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "orders.jsonl"
    path.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:40]))
    return path


def _overrides(tiny_model_dir, small_data, output, *extra) -> list[str]:
    rank = [] if "lora.method=adalora" in extra else ["lora.r=4"]  # AdaLoRA's ranks are lora.adalora.*
    return [f"model={tiny_model_dir}", f"data={small_data}", f"output={output}", "batch_size=4", "max_steps=6",
            "lr=5e-3", *rank, "lora.dropout=0.1", "eval_every=3", "compare=false", "tensorboard=false",
            "report=false", "max_seq_len=128", *extra]


def _train(tiny_model_dir, small_data, output, *extra):
    return train(load_train_config(None, _overrides(tiny_model_dir, small_data, output, *extra)))


def _losses(output: Path, key: str = "train_loss") -> list[float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def _final(output: Path, full: bool = False) -> dict[str, torch.Tensor]:
    return load_file(output / ("model/model.safetensors" if full else "adapter/adapter_model.safetensors"))


# -- the run folder --------------------------------------------------------------------------------
def test_a_fresh_run_into_another_runs_folder_refuses_and_overwrite_moves_it_aside(tiny_model_dir, small_data,
                                                                                  tmp_path):
    run = tmp_path / "run"
    _train(tiny_model_dir, small_data, run, "max_steps=2")
    before = _final(run)
    with pytest.raises(ConfigError, match=r"holds another run; continue it with resume=true, or start over with "
                                          r"overwrite=true"):
        _train(tiny_model_dir, small_data, run, "max_steps=2", "seed=1")
    assert torch.equal(_final(run)["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                       before["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])  # untouched
    _train(tiny_model_dir, small_data, run, "max_steps=2", "seed=1", "overwrite=true")
    (aside,) = tmp_path.glob("run.old-*")
    assert all(torch.equal(_final(aside)[k], v) for k, v in before.items())  # the old run, whole
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-0000002"]  # nothing mixed in


def test_resume_refuses_a_different_run_and_names_every_difference(tiny_model_dir, small_data, tmp_path):
    run = tmp_path / "run"
    _train(tiny_model_dir, small_data, run, "max_steps=2")
    changed_data = tmp_path / "other.jsonl"
    changed_data.write_text(small_data.read_text().replace("Valencia", "Bilbao"))
    with pytest.raises(ConfigError) as info:
        train(load_train_config(None, [*_overrides(tiny_model_dir, changed_data, run, "max_steps=2"), "resume=true",
                                       "lr=1e-3", "seed=3", "lora.alpha=8"]))
    message = str(info.value)
    for difference in ("config.lr: 0.005 → 0.001", "config.seed: 0 → 3", "config.lora.alpha: 16.0 → 8.0",
                       "data.train:"):
        assert difference in message
    assert message.startswith(f"resume: {run} is a different run")


def test_resume_may_change_the_length_and_intervals_and_says_so(tiny_model_dir, small_data, tmp_path, capsys):
    run = tmp_path / "run"
    _train(tiny_model_dir, small_data, run, "max_steps=4")
    result = _train(tiny_model_dir, small_data, run, "max_steps=6", "eval_every=2", "resume=true")
    assert result.steps == 6
    assert "resume: eval_every 3 → 2, max_steps 4 → 6 (these may change when a run resumes)" in capsys.readouterr().out


# -- every method resumes step-exactly -------------------------------------------------------------
METHODS = {
    "lora": [], "rslora": ["lora.use_rslora=true"], "dora": ["lora.use_dora=true"],
    "pissa": ["lora.init=pissa", "lora.dropout=0.0"], "lora_plus": ["lora.plus_ratio=16"],
    "loha": ["lora.method=loha", "lora.dropout=0.0"], "lokr": ["lora.method=lokr", "lora.dropout=0.0"],
    "adalora": ["lora.method=adalora", "lora.adalora.init_r=4", "lora.adalora.target_r=2", "lora.adalora.tinit=1",
                "lora.adalora.tfinal=1", "lora.adalora.delta_t=1", "lora.dropout=0.0"],
    "full": ["finetune=full", "lr=1e-3"], "nf4": ["quant=nf4"], "int8": ["quant=int8"],
}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_resumes_step_exactly_after_a_crash(method, tiny_model_dir, small_data, tmp_path, monkeypatch):
    extra = [*METHODS[method], "save_every=2"]
    full = method == "full"
    straight = tmp_path / "straight"
    _train(tiny_model_dir, small_data, straight, *extra)
    crashed = tmp_path / "crashed"
    original = crash_loss_at_call(monkeypatch, 5)  # inside step 5: steps 1–4 done, checkpoints at 2 and 4
    with pytest.raises(RuntimeError, match="power cut"):
        _train(tiny_model_dir, small_data, crashed, *extra)
    assert [p.name for p in complete_checkpoints(crashed / "checkpoints")] == ["step-0000002", "step-0000004"]
    monkeypatch.setattr(client_module, "token_logprobs", original)
    result = _train(tiny_model_dir, small_data, crashed, *extra, "resume=true")
    assert result.steps == 6 and len(result.losses) == 2
    assert _losses(crashed) == _losses(straight) and _losses(crashed, "val_loss") == _losses(straight, "val_loss")
    a, b = _final(straight, full), _final(crashed, full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), method


# -- checkpoints that are damaged, writes that fail -------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_skipped_for_the_one_before(damage, tiny_model_dir, small_data, tmp_path, capsys,
                                                            monkeypatch):
    straight = tmp_path / "straight"
    _train(tiny_model_dir, small_data, straight, "save_every=2")
    run = tmp_path / "run"
    original = crash_loss_at_call(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="power cut"):
        _train(tiny_model_dir, small_data, run, "save_every=2")
    monkeypatch.setattr(client_module, "token_logprobs", original)
    newest = complete_checkpoints(run / "checkpoints")[-1]
    target = newest / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2:]
    else:
        data[-5] ^= 0x40
    target.write_bytes(bytes(data))
    assert "optimizer.safetensors" in verify_checkpoint(newest)
    capsys.readouterr()
    result = _train(tiny_model_dir, small_data, run, "save_every=2", "resume=true")
    out = capsys.readouterr().out
    assert "checkpoint step-0000004 is damaged (optimizer.safetensors" in out and "(step 2)" in out
    assert result.steps == 6 and _losses(run) == _losses(straight)


def test_a_checkpoint_write_that_fails_leaves_the_earlier_ones_and_says_so(tiny_model_dir, small_data, tmp_path,
                                                                           monkeypatch):
    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def disk_full_on_the_second_checkpoint(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # trainee, optimizer, rng of step 2; then step 4's trainee tensors
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full_on_the_second_checkpoint)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"could not write the checkpoint of step 4 .*No space left on device.*"
                                            r"checkpoints before it are intact"):
        _train(tiny_model_dir, small_data, run, "save_every=2")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]  # no half-written folder
    assert verify_checkpoint(run / "checkpoints" / "step-0000002") is None


# -- what a run writes -------------------------------------------------------------------------------
def test_metrics_are_strict_json_and_the_final_loss_is_the_final_adapters(tiny_model_dir, small_data, tmp_path):
    run = tmp_path / "run"
    result = _train(tiny_model_dir, small_data, run, "max_grad_norm=null", "eval_every=4", "max_steps=6")
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl"))
    assert all(row is None for row in _losses(run, "grad_norm"))  # no clipping: no norm, written as null
    assert _losses(run, "val_loss")[-1] == result.final_val_loss  # step 6 evaluated, though not an interval


def test_a_run_without_validation_reports_no_best(tiny_model_dir, small_data, tmp_path):
    result = _train(tiny_model_dir, small_data, tmp_path / "run", "data.split=[1.0,0.0,0.0]", "max_steps=2")
    assert result.best_adapter is None and result.best_val_loss is None and result.final_val_loss is None
    assert not (tmp_path / "run" / "best").exists()


def test_a_stop_request_is_honoured_on_a_skipped_nan_step(tiny_model_dir, small_data, tmp_path, monkeypatch):
    original = client_module.token_logprobs

    def nan_then_stop(model, batch):
        logprobs = original(model, batch)
        os.kill(os.getpid(), signal.SIGTERM)  # the stop arrives during a step whose loss is NaN
        return logprobs * float("nan")

    monkeypatch.setattr(client_module, "token_logprobs", nan_then_stop)
    result = _train(tiny_model_dir, small_data, tmp_path / "run")
    assert result.stopped == "interrupted" and result.steps == 0 and result.skipped_steps == 1


# -- real processes ----------------------------------------------------------------------------------
def _cli(tiny_model_dir, data, output, *extra) -> list[str]:
    return [sys.executable, "-m", "loraforge.cli", "train", *_overrides(tiny_model_dir, data, output, *extra)]


def _environment() -> dict:
    # One thread: the same arithmetic in every process, whatever the machine's core count.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigterm_checkpoints_says_how_to_resume_and_exits_nonzero(tiny_model_dir, small_data, tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(_cli(tiny_model_dir, small_data, run, "max_steps=400", "compare=true", "report=true"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_environment(),
                               cwd=ROOT)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("train_loss") >= 2):
        assert time.monotonic() < deadline and process.poll() is None, "training never started"
        time.sleep(0.2)
    # The command relaunched itself with glibc's allocator setting for training (runtime.py), in the same process:
    # the one this test started and signals.
    expected = training_environment(_environment())
    if expected is not None:
        environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
        assert f"GLIBC_TUNABLES={expected['GLIBC_TUNABLES']}".encode() in environ
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130, out
    assert "resume=true" in out and not (run / "evaluation.json").exists() and not (run / "report.html").exists()
    (checkpoint,) = complete_checkpoints(run / "checkpoints")
    assert verify_checkpoint(checkpoint) is None


def _caught_in(run: Path) -> str:
    """Where a killed run was, from what it left: a folder being written aside, or neither (a step, validation)."""
    left = [p.name for p in run.rglob(".*.tmp")]
    if any(name.startswith(".step-") for name in left):
        return "checkpoint write"
    if any(name.startswith((".best.", ".adapter.")) for name in left):
        return "adapter write"
    return "step or validation"


def _wait_for_a_step(process: subprocess.Popen, run: Path) -> float | None:
    """Polls until metrics.jsonl logs one more training step; when it did (None when the process ended first)."""
    metrics = run / "metrics.jsonl"

    def steps() -> int:
        return metrics.read_text().count('"train_loss"') if metrics.exists() else 0

    start = steps()
    while process.poll() is None:
        if steps() > start:
            return time.monotonic()
        time.sleep(0.002)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(method, tiny_model_dir, small_data,
                                                                           tmp_path):
    """Kill -9 a real `loraforge train` at random moments (steps, checkpoint writes, validation: every step does
    all three here), resume each time; the per-step losses and the final adapter equal an uninterrupted run's."""
    extra = ("max_steps=36", "save_every=1", "eval_every=1", "keep_checkpoints=2", *METHODS[method])
    straight = tmp_path / "straight"
    subprocess.run(_cli(tiny_model_dir, small_data, straight, *extra), check=True, env=_environment(), cwd=ROOT,
                   capture_output=True)
    run = tmp_path / "run"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(40):
        process = subprocess.Popen(_cli(tiny_model_dir, small_data, run, *extra, "resume=true"),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_environment(), cwd=ROOT)
        if kills < 6:
            # The moment is random within one step as long as this machine takes for one (its step, validation
            # and writes): a fixed delay let a fast machine finish the whole run before the 5th kill.
            first, second = _wait_for_a_step(process, run), _wait_for_a_step(process, run)
            if first is not None and second is not None:
                time.sleep(rng.uniform(0.0, second - first))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=60)
                kills += 1
                steps = len(_losses(run)) if (run / "metrics.jsonl").exists() else 0
                print(f"{method}: kill {kills} after {steps} logged steps, during a {_caught_in(run)}")
        process.wait(timeout=300)
        if process.returncode == 0:
            break
    assert kills >= 5, f"only {kills} kills landed"
    assert _losses(run) == _losses(straight)
    assert _losses(run, "val_loss") == _losses(straight, "val_loss")
    a, b = _final(straight), _final(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_adapter_folder_changes_whole_or_not_at_all(tiny_model_dir, small_data, tmp_path, monkeypatch):
    """A crash between writing the weights and the config leaves adapter/ as it was: both files of one save."""
    from loraforge.atomic import write_folder
    from loraforge.lora import files as files_module
    from loraforge.train import loop as loop_module

    run = tmp_path / "run"
    _train(tiny_model_dir, small_data, run, "max_steps=2")
    before = {name: (run / "adapter" / name).read_bytes() for name in ("adapter_model.safetensors",
                                                                       "adapter_config.json")}

    def crash_writing_the_config(path, text):
        raise OSError("power cut between the two files")

    monkeypatch.setattr(files_module, "write_text", crash_writing_the_config)
    folder = loop_module.RunFolder(run)
    trained = loop_module.LoraModel.from_pretrained(
        loop_module.load_model(str(tiny_model_dir))[0], run / "adapter", trainable=True)
    with pytest.raises(OSError, match="power cut"):
        write_folder(folder.last(full=False), trained.save)
    after = {name: (run / "adapter" / name).read_bytes() for name in before}
    assert after == before and not list(run.glob(".adapter.*"))
