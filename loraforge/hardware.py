"""The machine a job runs on: its device, the precision it computes in, dtype names, the CPU allocator and
oneDNN's per-shape caches.
`precision=auto` is decided from the hardware, never from a fixed choice.

    device, precision = resolve_precision(config)   # cuda | cpu, Precision("bf16" | "fp32", why=...)
    dtype_named("bf16"), dtype_named("bfloat16")     # the one table of dtype names

CPUs differ by more than an order of magnitude in bf16: on this project's machines a bf16 matmul ran 4.6× faster
than fp32 on an AVX-512 BF16 EPYC (974 vs 212 GFLOP/s) and 30× slower on AVX2 ones, where torch emulates it. So the
CPU is asked first (does torch's oneDNN see bf16 instructions?), and a capable one is confirmed by a short timed
matmul of a typical LLM layer shape. The result is cached per machine (CPU model, torch version, threads) in the
loraforge cache, so the probe runs once. Only the autocast dtype follows from it: adapters and the optimizer state
stay fp32 (layers.adapter_dtype, optim).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loraforge.config import TrainConfig
from loraforge.errors import ConfigError
from loraforge.models import cache_dir
from loraforge.runtime import uses_glibc

# Config names (fp32, bf16, fp16) and torch's (float32, bfloat16, float16) for the same three dtypes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TORCH_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# bf16 autocast adds casts and leaves norms, softmax and the optimizer in fp32: the demo's 40 steps took 41 s in
# bf16 vs 77 s in fp32 (1.9×) where the matmul alone was 4.6× faster. Below 2× the gain is noise or a loss.
MIN_BF16_SPEEDUP = 2.0
# SmolLM2's MLP: 512 tokens × 576 → 1536. About 0.9 GFLOP: milliseconds in fp32, under a second in slow bf16.
PROBE_SHAPE = (512, 576, 1536)
PROBE_REPEATS = 5
CACHE_FILE = "hardware.json"


@dataclass(frozen=True)
class Bf16Probe:
    """The CPU's bf16 matmul against fp32 on the same shape (GFLOP/s; None when not timed)."""

    capable: bool  # torch's oneDNN reports native bf16 (AVX-512 BF16 or AMX)
    features: str  # what torch reports, for people
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None

    @property
    def speedup(self) -> float | None:
        if self.fp32_gflops and self.bf16_gflops:
            return self.bf16_gflops / self.fp32_gflops
        return None


@dataclass(frozen=True)
class Precision:
    """The chosen autocast precision and why (printed by `loraforge train`)."""

    name: str  # "bf16" | "fp16" | "fp32"
    why: str


def cpu_bf16_capability() -> tuple[bool, str]:
    """Whether torch sees native bf16 matmul instructions on this CPU, and the features it reports."""
    cpu = torch.cpu
    flags = {"AVX-512 BF16": getattr(cpu, "_is_avx512_bf16_supported", lambda: False)(),
             "AMX": getattr(cpu, "_is_amx_tile_supported", lambda: False)()}
    onednn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: any(flags.values()))()
    seen = [name for name, present in flags.items() if present]
    features = f"{torch.backends.cpu.get_cpu_capability()}" + (f" with {' and '.join(seen)}" if seen else
                                                              ", no native bf16")
    return bool(onednn_bf16 or any(flags.values())), features


def time_matmul(dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = PROBE_REPEATS) -> float:
    """GFLOP/s of the fastest of `repeats` (m×k)·(k×n) matmuls in `dtype`, after one warm-up."""
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(dtype)
    b = torch.randn(k, n, generator=generator).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / max(best, 1e-9) / 1e9


def machine_key() -> str:
    """What the probe's answer depends on: the CPU model, torch's kernels and the threads they use."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def probe_cpu_bf16(cache: Path | None = None) -> Bf16Probe:
    """The bf16 probe for this machine: from the cache when this machine was probed before, else measured (only
    when the CPU reports native bf16: elsewhere torch emulates it, 30× slower measured) and cached."""
    capable, features = cpu_bf16_capability()
    if not capable:
        return Bf16Probe(False, features)
    key = machine_key()
    cached = _read_cache(cache).get(key)
    if isinstance(cached, dict):
        try:
            return Bf16Probe(**cached)
        except TypeError:
            pass  # written by another version: probe again
    probe = Bf16Probe(True, features, time_matmul(torch.float32), time_matmul(torch.bfloat16))
    _write_cache(cache, key, probe)
    return probe


def auto_precision(device: torch.device, cache: Path | None = None) -> Precision:
    """precision=auto: bf16 on CUDA GPUs that have it; on a CPU, bf16 only where it measured ≥ MIN_BF16_SPEEDUP×
    fp32's matmul speed; else fp32."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"{torch.cuda.get_device_name(device)} computes bf16 natively")
        return Precision("fp32", f"{torch.cuda.get_device_name(device)} has no bf16")
    if device.type != "cpu":
        return Precision("fp32", f"no probe for {device.type} devices")
    probe = probe_cpu_bf16(cache)
    if probe.speedup is None:
        return Precision("fp32", f"the CPU ({probe.features}) would emulate bf16")
    figures = (f"a {PROBE_SHAPE[0]}×{PROBE_SHAPE[1]}×{PROBE_SHAPE[2]} matmul ran at {probe.bf16_gflops:.0f} GFLOP/s "
               f"in bf16 vs {probe.fp32_gflops:.0f} in fp32 ({probe.speedup:.1f}×)")
    if probe.speedup >= MIN_BF16_SPEEDUP:
        return Precision("bf16", f"the CPU has {probe.features.split(' with ')[-1]}: {figures}")
    return Precision("fp32", f"bf16 is not worth it on this CPU ({probe.features}): {figures}, "
                             f"below the {MIN_BF16_SPEEDUP:g}× that pays for autocast's casts")


def _cache_path(cache: Path | None) -> Path:
    return cache if cache is not None else cache_dir() / CACHE_FILE


def _read_cache(cache: Path | None) -> dict:
    try:
        data = json.loads(_cache_path(cache).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache: Path | None, key: str, probe: Bf16Probe) -> None:
    path = _cache_path(cache)
    data = _read_cache(cache)
    data[key] = asdict(probe)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only means probing again next time


# -- names, device and precision, resolved in one place ------------------------------------------
def dtype_named(name: str) -> torch.dtype:
    """fp32 / bf16 / fp16, or torch's float32 / bfloat16 / float16."""
    short = TORCH_NAMES.get(name, name)
    if short not in DTYPES:
        raise ConfigError(f"dtype: {name!r} is not one of {', '.join([*DTYPES, *TORCH_NAMES])}")
    return DTYPES[short]


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when one is visible, else the CPU; a named CUDA device must exist."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: CUDA was asked for but no GPU is visible")
    return device


def resolve_precision(config: TrainConfig) -> tuple[torch.device, Precision]:
    """The device and the precision to compute in, with the reason (auto: probed, see auto_precision)."""
    device = resolve_device(config.device)
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision: fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    if config.precision == "auto":
        return device, auto_precision(device)
    return device, Precision(config.precision, "set in the config")


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """The dtype autocast computes in, None for plain fp32 (no autocast)."""
    return None if precision.name == "fp32" else DTYPES[precision.name]


def frozen_storage_dtype(config: TrainConfig, amp_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype to keep adapted layers' frozen weights in, None to leave them as loaded (fp32)."""
    if config.base_dtype == "auto":
        return amp_dtype  # autocast casts them to this in every matmul anyway: storing it loses nothing
    return None if config.base_dtype == "fp32" else DTYPES[config.base_dtype]


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Training's mmap threshold on CPUs (see compact_cpu_allocator); compact_cpu_memory's is COMPACT_THRESHOLD.
LARGE_BLOCK_THRESHOLD = 4 * 2**20
COMPACT_THRESHOLD = 128 * 2**10


def _glibc():
    """The C library when it is glibc (mallopt, malloc_trim), else None (macOS, musl: nothing to tune)."""
    return ctypes.CDLL("libc.so.6") if uses_glibc() else None


def compact_cpu_allocator(threshold: int = COMPACT_THRESHOLD, trim_at_once: bool = False) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes (True if it took): blocks from that size up get a mapping
    of their own, returned to the system when freed. With `trim_at_once` freed heap tops go back at once too.

    By default glibc raises the threshold to the size of every freed mapped block, up to 32 MB, so after a step's
    first large temporaries every tensor comes from the heap, whose holes between live tensors stay resident.
    Training fixes it at LARGE_BLOCK_THRESHOLD: a step's few large temporaries (the head's logit chunks, ~17 MB on
    SmolLM2) stop fragmenting the heap, and blocks of an activation's size still come from it (a mapped block
    costs a fresh, zeroed page per 4 KiB): the demo job's peak RSS −140 MB at the same step time (BENCHMARKS.md).
    At COMPACT_THRESHOLD (compact_cpu_memory) activations are mapped too: the peak fell further (2,686 → 1,857 MB
    on an earlier version of the demo job) but steps ran 1.3–1.8× slower, hence opt-in."""
    libc = _glibc()
    if libc is None:
        return False
    if trim_at_once:
        libc.mallopt(M_TRIM_THRESHOLD, COMPACT_THRESHOLD)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def trim_cpu_heap() -> None:
    """Give the heap's free memory back to the system now (glibc's malloc_trim; elsewhere nothing)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def autocast_for(device: torch.device, amp_dtype: torch.dtype | None) -> Callable[[], AbstractContextManager]:
    """A factory of autocast contexts for `amp_dtype` on `device`; plain fp32 (None) gets autocast switched off."""
    return lambda: torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def grad_scaler_for(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16 needs loss scaling; every other precision gets a disabled scaler whose calls pass straight through."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
