"""What a loraforge process settles before torch loads: settings that libraries read once, when they start.

- oneDNN's and ideep's per-shape caches, bounded (environment variables, read at the first bf16 matmul);
- for `loraforge train` on glibc, the allocator's per-thread cache of small freed blocks, off (a tunable glibc
  reads when the process starts: the command relaunches itself once with it set, before importing torch).

No torch here: `import loraforge` and the CLI run this first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# oneDNN, which runs torch's bf16 matmuls on CPUs, compiles a primitive for every matmul shape it meets and keeps
# up to 1,024 of them; ideep, torch's layer above it, keeps its own 1,024 per-shape entries. A training step meets
# ~25 new shapes with each new sequence length (every projection, forward and backward, LoRA's small ones too), so
# with varied lengths memory grows with each new length, for hundreds of steps: +93 MB between steps and +150 MB at
# the step's peak after 40 steps of the demo alone (lengths 68-74); 2,353 MB instead of 1,386 after 60 steps over
# rows of varied length (bench/bench_memory.py). At 64 entries a step recompiles a few shapes it met before: the
# demo's 12 steps compiled 298 primitives instead of 181, ~1 ms each (BENCHMARKS.md, fourth 2026-12-05 session).
ONEDNN_CACHE_ENTRIES = 64
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")

# glibc keeps up to 7 freed blocks of each small size (up to 1 KiB) per thread, and to the heap they stay in use:
# torch's small allocations of a step (tensor headers, autograd nodes) freed among its activations then split the
# free space the next step's activations need, and the heap grows past them. Steps 5-12 of the demo's training
# (bench/bench_heap.py): malloc's in-use peak 650-730 MB either way, its heap 1,040 MB with the cache and 765 MB
# without; whole jobs peak 90-150 MB lower at the same speed (BENCHMARKS.md, 2026-12-06). A GLIBC_TUNABLES that
# sets tcache_count already (the user's choice) is left alone.
TCACHE_TUNABLE = "glibc.malloc.tcache_count"
TCACHE_OFF = f"{TCACHE_TUNABLE}=0"


def bound_onednn_caches(entries: int = ONEDNN_CACHE_ENTRIES) -> None:
    """Cap oneDNN's primitive cache and ideep's per-shape cache at `entries` each, where the environment does not
    set them already (a user's own setting wins). Both read their variable when first used, so this must run
    before the process's first bf16 matmul on a CPU: loraforge calls it when imported."""
    for name in ONEDNN_CACHE_VARIABLES:
        os.environ.setdefault(name, str(entries))


def uses_glibc() -> bool:
    """Whether this process's C library is glibc (its tunables and mallopt/malloc_trim apply)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), or a C library without the name (musl)
        return False


def training_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment `loraforge train` should run in (glibc's small-block cache off), or None when `environ`
    is that already, the user set the cache themselves, or the C library is not glibc."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if not uses_glibc() or TCACHE_TUNABLE in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TCACHE_OFF}" if tunables else TCACHE_OFF}


def relaunch_for_training() -> None:
    """Replace this process by the same command line in training_environment() (same PID: a supervisor such as
    torchrun or a shell's job control sees no difference); return when there is nothing to change."""
    environment = training_environment(os.environ)
    if environment is None or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # The interpreter's own options kept (orig_argv); its path as resolved (argv[0] may be a bare "python" that
    # the new process would look up on PATH).
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
