"""precision=auto from what the CPU does: torch's capability report, confirmed by a timed matmul, cached."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REAL_CPU_BF16_CAPABILITY

from loraforge import hardware
from loraforge.hardware import MIN_BF16_SPEEDUP, auto_precision, probe_cpu_bf16

CPU = torch.device("cpu")


def _never_timed(*args, **kwargs):
    raise AssertionError("a CPU without native bf16 must not be timed")


def _capable(monkeypatch, fp32_gflops: float, bf16_gflops: float) -> list[torch.dtype]:
    timed: list[torch.dtype] = []

    def fake_time(dtype, *args, **kwargs):
        timed.append(dtype)
        return {torch.float32: fp32_gflops, torch.bfloat16: bf16_gflops}[dtype]

    monkeypatch.setattr(hardware, "cpu_bf16_capability", lambda: (True, "AVX512 with AVX-512 BF16"))
    monkeypatch.setattr(hardware, "time_matmul", fake_time)
    return timed


def test_a_cpu_without_native_bf16_computes_in_fp32_without_a_probe(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "time_matmul", _never_timed)
    choice = auto_precision(CPU, tmp_path / "hw.json")
    assert choice.name == "fp32" and "emulate" in choice.why
    assert not (tmp_path / "hw.json").exists()


def test_a_cpu_whose_bf16_matmul_is_much_faster_computes_in_bf16_and_caches_it(monkeypatch, tmp_path):
    cache = tmp_path / "hw.json"
    timed = _capable(monkeypatch, fp32_gflops=212.0, bf16_gflops=974.0)  # the AVX-512 BF16 EPYC of issue 14
    choice = auto_precision(CPU, cache)
    assert choice.name == "bf16" and "4.6×" in choice.why and "AVX-512 BF16" in choice.why
    assert timed == [torch.float32, torch.bfloat16]
    assert json.loads(cache.read_text())[hardware.machine_key()]["bf16_gflops"] == 974.0
    monkeypatch.setattr(hardware, "time_matmul", _never_timed)  # the second run reads the cache
    assert auto_precision(CPU, cache) == choice


def test_a_capable_cpu_below_the_threshold_stays_fp32(monkeypatch, tmp_path):
    _capable(monkeypatch, fp32_gflops=200.0, bf16_gflops=200.0 * (MIN_BF16_SPEEDUP - 0.5))
    choice = auto_precision(CPU, tmp_path / "hw.json")
    assert choice.name == "fp32" and "not worth it" in choice.why


def test_a_cache_for_another_machine_or_version_is_not_used(monkeypatch, tmp_path):
    cache = tmp_path / "hw.json"
    cache.write_text(json.dumps({"another CPU | torch 0 | 1 threads": {"capable": True, "features": "x",
                                                                      "fp32_gflops": 1.0, "bf16_gflops": 100.0},
                                 hardware.machine_key(): {"unknown_field": 1}}))
    _capable(monkeypatch, fp32_gflops=200.0, bf16_gflops=100.0)
    assert auto_precision(CPU, cache).name == "fp32"  # measured again, not taken from either entry
    cache.write_text("not json")
    assert probe_cpu_bf16(cache).fp32_gflops == 200.0


def test_the_real_probe_on_this_machine(monkeypatch, tmp_path):
    """Whatever this CPU is: capability and timing agree with the choice, and a real matmul is timed."""
    monkeypatch.setattr(hardware, "cpu_bf16_capability", REAL_CPU_BF16_CAPABILITY)  # conftest pins a fake one
    assert hardware.time_matmul(torch.float32, (64, 64, 64), repeats=2) > 0
    capable, features = hardware.cpu_bf16_capability()
    probe = probe_cpu_bf16(tmp_path / "hw.json")
    choice = auto_precision(CPU, tmp_path / "hw.json")
    assert probe.capable == capable and features
    if capable:
        assert probe.speedup is not None and (choice.name == "bf16") == (probe.speedup >= MIN_BF16_SPEEDUP)
    else:
        assert probe.speedup is None and choice.name == "fp32"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_precision_set_in_the_config_is_taken_as_it_is(precision, monkeypatch):
    from loraforge.config import TrainConfig
    from loraforge.hardware import resolve_precision

    monkeypatch.setattr(hardware, "time_matmul", _never_timed)
    device, choice = resolve_precision(TrainConfig(device="cpu", precision=precision))
    assert device == CPU and choice.name == precision and choice.why == "set in the config"
