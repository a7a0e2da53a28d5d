"""What a loraforge process settles before torch loads (loraforge/runtime.py): oneDNN's cache bounds and, for
`loraforge train`, glibc's allocator settings through a relaunch of the same command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loraforge import cli, runtime

# A new process imports loraforge, runs bf16 matmuls of 80 shapes, then the first 10 again, and counts the
# primitives oneDNN compiled (its verbose log) in that second pass.
_REUSE_AFTER_80_SHAPES = """
import os
import torch, loraforge  # torch first, as a user's script may: the bound still takes effect
w = torch.randn(64, 32, dtype=torch.bfloat16)
for rows in range(1, 81):
    torch.randn(rows, 64, dtype=torch.bfloat16) @ w
print("SECOND PASS", flush=True)
for rows in range(1, 11):
    torch.randn(rows, 64, dtype=torch.bfloat16) @ w
print(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], os.environ["LRU_CACHE_CAPACITY"], flush=True)
"""


@pytest.mark.parametrize("preset", [None, "1024"])
def test_importing_loraforge_bounds_onednn_caches_unless_the_user_set_them(preset):
    """Importing loraforge caps oneDNN's per-shape caches (else memory grows with every new sequence length) — late
    enough after `import torch` to take effect — and leaves a capacity the user set alone."""
    env = {k: v for k, v in os.environ.items() if k not in runtime.ONEDNN_CACHE_VARIABLES}
    env["ONEDNN_VERBOSE"] = "all"
    if preset:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    done = subprocess.run([sys.executable, "-c", _REUSE_AFTER_80_SHAPES], env=env, capture_output=True, text=True,
                          check=True)
    lines = done.stdout.splitlines()
    assert lines[-1] == f"{preset or runtime.ONEDNN_CACHE_ENTRIES} {runtime.ONEDNN_CACHE_ENTRIES}"
    second = lines[lines.index("SECOND PASS"):]
    compiled = sum("create:cache_miss" in line for line in lines)
    if compiled == 0:
        pytest.skip("this CPU's torch runs bf16 matmuls without oneDNN: no cache to bound")
    recompiled = sum("create:cache_miss" in line for line in second)
    # Under the cap the 70 shapes after the first 10 evicted them (all but the smallest, which may take another
    # kernel); under the user's 1,024 all 80 are kept.
    assert recompiled >= 5 if preset is None else recompiled == 0


def test_the_train_command_relaunches_before_torch_loads():
    """Else every training job would pay torch's import twice: building the whole parser imports it (~3 s)."""
    script = ("import os, sys\n"
              "os.confstr = lambda name: 'glibc 2.36'\n"  # a relaunch on any C library, for the test's sake
              "os.environ.pop('GLIBC_TUNABLES', None)\n"
              "def execve(*args):\n"
              "    print('torch' in sys.modules)\n"
              "    raise SystemExit(0)\n"
              "os.execve = execve\n"
              "sys.argv = ['loraforge', '--debug', 'train', 'max_steps=1']\n"
              "import loraforge.cli\n"
              "loraforge.cli.main()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.fixture
def glibc(monkeypatch):
    monkeypatch.setattr(os, "confstr", lambda name: "glibc 2.36", raising=False)


def test_training_environment_turns_glibcs_small_block_cache_off(glibc):
    assert runtime.training_environment({"HOME": "/h"}) == {"HOME": "/h",
                                                             "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
    # Other tunables are kept, ours appended.
    assert runtime.training_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0"


@pytest.mark.parametrize("tunables", ["glibc.malloc.tcache_count=0", "glibc.malloc.tcache_count=7",
                                      "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=3"])
def test_training_environment_leaves_a_cache_already_set(glibc, tunables):
    """Set already: by our relaunch (no second one), or by the user (their choice stands)."""
    assert runtime.training_environment({"GLIBC_TUNABLES": tunables}) is None


def test_training_environment_is_none_without_glibc(monkeypatch):
    def musl(name):
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(os, "confstr", musl, raising=False)
    assert runtime.training_environment({}) is None


class Relaunched(Exception):
    pass


@pytest.fixture
def execve(monkeypatch, glibc):
    """os.execve recorded instead of run; raises Relaunched (a real one would not return)."""
    calls = []

    def record(path, argv, environment):
        calls.append((path, list(argv), dict(environment)))
        raise Relaunched

    monkeypatch.setattr(os, "execve", record)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    return calls


def test_the_train_command_relaunches_itself_once_with_the_setting(execve, monkeypatch):
    monkeypatch.setenv("LORAFORGE_TEST_MARK", "kept")
    command = ["loraforge", "train", "max_steps=1"]
    monkeypatch.setattr(sys, "argv", command)
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-X", "utf8", *command])
    with pytest.raises(Relaunched):
        cli.main()
    ((path, argv, environment),) = execve
    # The same command line, the interpreter's flags too, and the interpreter by its resolved path.
    assert path == sys.executable and argv == [sys.executable, "-X", "utf8", *command]
    assert environment["GLIBC_TUNABLES"] == runtime.TCACHE_OFF and environment["LORAFORGE_TEST_MARK"] == "kept"


@pytest.mark.parametrize("argv", [["train", "--print-config"], ["report", "/nonexistent/run"],
                                  ["report", "train"]])  # a run folder named train: the command is report
def test_print_config_and_other_commands_do_not_relaunch(execve, monkeypatch, argv, capsys):
    monkeypatch.setattr(sys, "argv", ["loraforge", *argv])
    cli.main()
    assert execve == []


def test_a_call_with_arguments_never_replaces_the_calling_process(execve, tmp_path):
    """main(argv) is the library's way in (tests, notebooks): it runs in the caller's process as it is (here it
    stops at the missing data, after the point where the command would have relaunched)."""
    assert cli.main(["train", f"data={tmp_path / 'missing.jsonl'}", f"output={tmp_path / 'run'}"]) == 2
    assert execve == []
