"""Distributed training with real processes: torchrun, gloo on CPU, the tiny llama.

The property everything rests on: N processes with grad_accum=g train exactly what one process with grad_accum=N·g
trains (the same examples per step, the loss over the global count, gradients summed), so losses and adapters agree
to fp32 summation order, and a run may resume on another number of processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge.config import load_train_config
from loraforge.demo import default_data
from loraforge.errors import ConfigError
from loraforge.train import train
from loraforge.train.checkpoint import complete_checkpoints, verify_checkpoint
from loraforge.train.sft import SftStage

from conftest import crash_when_taking_step

STEPS = 24
ADAPTER = "adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddata") / "orders.jsonl"
    path.write_text("".join(Path(default_data("sft")).read_text().splitlines(keepends=True)[:60]))
    return path


def _overrides(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    # fp32 and no dropout: on any CPU both sides compute alike, and no random draw differs between the layouts.
    return [f"model={model}", f"data={data}", f"output={output}", "batch_size=2", f"max_steps={STEPS}", "lr=5e-3",
            "lora.r=4", "lora.dropout=0", "eval_every=8", "compare=false", "report=false", "tensorboard=false",
            "max_seq_len=128", "precision=fp32", *extra]


def torchrun(nproc: int, overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_command(nproc, overrides), capture_output=True, text=True, timeout=timeout,
                          env=_env())


def _torchrun_command(nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "loraforge", "train", *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _losses(output: Path, key: str = "train_loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if r.get(key) is not None}


def _assert_same_run(a: Path, b: Path, tolerance: float = 1e-5) -> None:
    losses_a, losses_b = _losses(a), _losses(b)
    assert losses_a.keys() == losses_b.keys() == set(range(1, STEPS + 1))
    for step in losses_a:
        assert losses_b[step] == pytest.approx(losses_a[step], rel=tolerance), f"step {step}"
    assert _losses(b, "val_loss") == pytest.approx(_losses(a, "val_loss"), rel=tolerance)
    adapter_a, adapter_b = load_file(str(a / ADAPTER)), load_file(str(b / ADAPTER))
    assert adapter_a.keys() == adapter_b.keys()
    moved = max(float(t.abs().max()) for t in adapter_a.values())
    assert moved > 0.05  # the adapter trained: agreeing on zeros would prove nothing
    for key in adapter_a:
        torch.testing.assert_close(adapter_b[key], adapter_a[key], rtol=tolerance, atol=tolerance * moved)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, data, tmp_path_factory):
    """The reference: one process, grad_accum=2 (4 examples a step), per extra-overrides case."""
    runs = {}

    def run(*extra: str) -> Path:
        if extra not in runs:
            output = tmp_path_factory.mktemp("one")
            train(load_train_config(None, _overrides(tiny_model_dir, data, output, "grad_accum=2", *extra)))
            runs[extra] = output
        return runs[extra]

    return run


@pytest.mark.parametrize("extra", [
    ("distributed.strategy=ddp",), ("distributed.strategy=fsdp",), ("distributed.strategy=ddp", "quant=nf4"),
    ("distributed.strategy=fsdp", "gradient_checkpointing=true")], ids=["ddp", "fsdp", "ddp-qlora", "fsdp-checkpointing"])
def test_two_processes_train_what_one_process_trains(tiny_model_dir, data, one_process, tmp_path, extra):
    reference = one_process(*(e for e in extra if not e.startswith("distributed")))
    done = torchrun(2, _overrides(tiny_model_dir, data, tmp_path, "grad_accum=1", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(reference, tmp_path)
    # Rank 0 alone wrote the run folder: one adapter, every step logged once, the world size recorded.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["adapter", "best", "checkpoints", "data"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in line]
    assert steps == list(range(1, STEPS + 1))
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 2
    assert done.stdout.count("done:") == 1  # only rank 0 talks
    if "distributed.strategy=fsdp" in extra:  # the frozen base is split between the two ranks
        held, whole = map(float, re.search(r"this rank holds ([\d.]+) MB of the ([\d.]+) MB", done.stdout).groups())
        assert 0.4 * whole <= held <= 0.6 * whole


def _children(pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            rank = next((v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")), None)
            if rank is not None:
                workers[int(rank)] = int(entry.name)
    return workers


def test_a_killed_rank_ends_the_job_and_the_run_resumes_on_one_process(tiny_model_dir, data, one_process, tmp_path):
    """SIGKILL one of two ranks mid-run: the job exits non-zero within seconds (no hang), the newest checkpoint is
    complete, and one process with grad_accum=2 resumes it to the same end as the uninterrupted run."""
    job = subprocess.Popen(_torchrun_command(2, _overrides(tiny_model_dir, data, tmp_path, "save_every=1")),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    deadline = time.monotonic() + 180
    while len(complete_checkpoints(tmp_path / "checkpoints")) < 1 or \
            int(complete_checkpoints(tmp_path / "checkpoints")[-1].name.split("-")[1]) < 3:
        assert job.poll() is None, job.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(_children(job.pid)[1], signal.SIGKILL)
    killed = time.monotonic()
    output, _ = job.communicate(timeout=90)
    assert job.returncode != 0
    assert time.monotonic() - killed < 60  # torchrun's agent takes the other rank down
    assert "FAILED" in output and "SIGKILL" in output, output[-2000:]
    checkpoints = complete_checkpoints(tmp_path / "checkpoints")
    newest = checkpoints[-1]
    assert verify_checkpoint(newest) is None
    stopped_at = int(newest.name.split("-")[1])
    assert 3 <= stopped_at < STEPS, "the kill came too late to test a resume"

    result = train(load_train_config(None, _overrides(tiny_model_dir, data, tmp_path, "save_every=1", "grad_accum=2",
                                                      "resume=true")))
    assert result.steps == STEPS
    _assert_same_run(one_process(), tmp_path)


def test_a_one_process_run_resumes_on_two(tiny_model_dir, data, one_process, tmp_path, monkeypatch):
    crash_when_taking_step(monkeypatch, SftStage, 10)
    with pytest.raises(RuntimeError, match="power cut"):
        train(load_train_config(None, _overrides(tiny_model_dir, data, tmp_path, "grad_accum=2", "save_every=4")))
    assert complete_checkpoints(tmp_path / "checkpoints")[-1].name.endswith("08")
    done = torchrun(2, _overrides(tiny_model_dir, data, tmp_path, "grad_accum=1", "save_every=4", "resume=true"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "step 8" in done.stdout
    _assert_same_run(one_process(), tmp_path)


def test_a_resume_needs_the_same_examples_per_step(tiny_model_dir, data, tmp_path):
    train(load_train_config(None, _overrides(tiny_model_dir, data, tmp_path, "max_steps=2", "grad_accum=2")))
    with pytest.raises(ConfigError, match="examples_per_step: 4 → 2"):
        train(load_train_config(None, _overrides(tiny_model_dir, data, tmp_path, "grad_accum=1", "resume=true")))


def test_an_error_on_rank_0_reaches_every_rank(tiny_model_dir, data, tmp_path):
    """Rank 0 refuses to mix runs: the other rank does not wait for it forever, and each says what happened."""
    (tmp_path / "run.json").write_text("{}")
    done = torchrun(2, _overrides(tiny_model_dir, data, tmp_path), timeout=120)
    assert done.returncode != 0
    assert "[rank 0] error: output:" in done.stderr and "holds another run" in done.stderr
    assert "[rank 1] error: rank 0 failed (ConfigError): output:" in done.stderr


@pytest.mark.parametrize("overrides, message", [
    (["quant=nf4"], "no FSDP2 all-gather extension"),
    (["finetune=full"], "finetune=full has no frozen base"),
    (["stage=grpo", "grpo.reward=r.py:f"], "stage=grpo samples on each rank's own engine"),
])
def test_what_fsdp_cannot_do_is_refused_by_the_key(overrides, message):
    with pytest.raises(ConfigError, match=r"distributed\.strategy") as error:
        load_train_config(None, ["distributed.strategy=fsdp", *overrides])
    assert message in str(error.value)


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory) -> dict[str, list[str]]:
    """Per stage: its data and options, for a 2-process run ≡ 1-process check."""
    from test_dpo import WRONG
    from test_grpo import REWARDS

    folder = tmp_path_factory.mktemp("stages")
    rows = [json.loads(line) for line in Path(default_data("sft")).read_text().splitlines()[:40]]
    (folder / "pairs.jsonl").write_text("".join(json.dumps({
        "prompt": r["messages"][:-1], "chosen": [r["messages"][-1]],
        "rejected": [{"role": "assistant", "content": WRONG}]}) + "\n" for r in rows))
    (folder / "prompts.jsonl").write_text("".join(json.dumps({
        "messages": [{"role": "user", "content": f"Extract the order as JSON. {i}"}], "letter": "e"}) + "\n"
        for i in range(40)))
    (folder / "rewards.py").write_text(REWARDS)
    return {"dpo": [f"data={folder / 'pairs.jsonl'}", "stage=dpo", "lr=2e-2"],
            # Two steps per rollout, and a checkpoint inside one: each rank's rollout share goes into it.
            "grpo": [f"data={folder / 'prompts.jsonl'}", "stage=grpo", f"grpo.reward={folder / 'rewards.py'}:vowels",
                     "grpo.group_size=4", "grpo.max_new_tokens=8", "grpo.iterations=2", "lr=5e-2", "save_every=3"]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_preference_and_rl_stages_train_on_two_processes_as_on_one(tiny_model_dir, stage_data, tmp_path, stage):
    one, two = tmp_path / "one", tmp_path / "two"
    common = [o for o in _overrides(tiny_model_dir, Path(), Path()) if not o.startswith(("data=", "output="))]
    overrides = [*common, f"max_steps={STEPS // 2}", *stage_data[stage]]
    train(load_train_config(None, [*overrides, f"output={one}", "grad_accum=2"]))
    done = torchrun(2, [*overrides, f"output={two}", "grad_accum=1"])
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert a.keys() == b.keys() == set(range(1, STEPS // 2 + 1))
    if stage == "dpo":
        assert [b[k] for k in sorted(b)] == pytest.approx([a[k] for k in sorted(a)], rel=1e-4, abs=1e-6)
        assert _losses(two, "val_loss") == pytest.approx(_losses(one, "val_loss"), rel=1e-4, abs=1e-6)
        adapter_a, adapter_b = load_file(str(one / ADAPTER)), load_file(str(two / ADAPTER))
        for key in adapter_a:
            torch.testing.assert_close(adapter_b[key], adapter_a[key], rtol=1e-4, atol=1e-5)
        return
    # GRPO: completion k of the step's prompt i has the same seed whichever rank samples it, so the first rollout
    # is the same and so are the two steps trained on it. After that the two layouts may part: one engine batch of
    # 16 rows and two of 8 round their logits differently, which can flip a sampled token at a near-tie.
    assert [b[1], b[2]] == pytest.approx([a[1], a[2]], rel=1e-4, abs=1e-6)
    assert all(math.isfinite(v) for v in b.values())
    # The mid-rollout checkpoint holds the whole step's rollout, gathered from both ranks.
    from loraforge.train.checkpoint import stage_tensors

    inside, last = complete_checkpoints(two / "checkpoints")
    assert inside.name.endswith("09") and len({name.split(".")[1] for name in stage_tensors(inside)}) == 2
    # One process resumes there, with both ranks' micro-batches: step 10 trains on the same rollout, from the
    # same adapter, so its loss is the two processes' step 10.
    shutil.rmtree(last)
    train(load_train_config(None, [*overrides, f"output={two}", "grad_accum=2", "resume=true"]))
    assert _losses(two)[10] == pytest.approx(b[10], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_a_hung_rank_times_out_instead_of_hanging_the_job(tiny_model_dir, data, tmp_path):
    """SIGSTOP one rank (alive, silent): the other's next collective gives up after distributed.timeout_s and says
    why; torchrun then takes the stopped rank down. No hang, the checkpoints as they were."""
    overrides = _overrides(tiny_model_dir, data, tmp_path, "max_steps=100000", "save_every=1", "eval_every=100000",
                           "distributed.timeout_s=10")
    job = subprocess.Popen(_torchrun_command(2, overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=_env())
    deadline = time.monotonic() + 180
    while not complete_checkpoints(tmp_path / "checkpoints"):
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(_children(job.pid)[1], signal.SIGSTOP)
    stopped = time.monotonic()
    output, _ = job.communicate(timeout=150)
    assert job.returncode != 0
    assert time.monotonic() - stopped < 10 + 60  # the timeout, then torchrun's grace period before SIGKILL
    assert "[rank 0] error: rank 0: the other ranks stopped answering" in output, output[-3000:]
    assert verify_checkpoint(complete_checkpoints(tmp_path / "checkpoints")[-1]) is None


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_the_step_every_rank_finished(tiny_model_dir, data, tmp_path):
    overrides = _overrides(tiny_model_dir, data, tmp_path, "max_steps=100000", "eval_every=100000")
    job = subprocess.Popen(_torchrun_command(2, overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=_env())
    deadline = time.monotonic() + 180
    while not (tmp_path / "metrics.jsonl").is_file() or len((tmp_path / "metrics.jsonl").read_text().splitlines()) < 5:
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=90)
    assert job.returncode != 0
    (checkpoint,) = complete_checkpoints(tmp_path / "checkpoints")
    assert verify_checkpoint(checkpoint) is None
    logged = max(_losses(tmp_path))
    assert checkpoint.name == f"step-{logged:07d}", output[-2000:]  # the last step trained is the one saved
