"""The benchmark scripts BENCHMARKS.md cites still import against the code they measure: `make bench` is not
in CI, and bench_serve.py once went on importing a helper that had been renamed."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(script: Path):
    """The script as a module: its imports and definitions run; main() stays behind `__main__`."""
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda path: path.name)
def test_bench_script_imports(script: Path) -> None:
    assert callable(getattr(_load(script), "main", None)), f"{script.name} has no main()"


def test_gpu_check_script_parses() -> None:
    """bench/gpu_check.sh runs where no one can look at it before a lease starts: at least it must parse."""
    import subprocess

    result = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_gpu_kit_carries_locked_versions() -> None:
    """Every package the GPU kit carries has a pin in the bench lock (the kit downloads exactly that version)."""
    kit = _load(BENCH / "gpu_kit.py")
    versions = kit.locked_versions(kit.ROOT / "requirements" / "bench.txt")
    assert versions["transformers"] and versions["pydantic-core"]  # names normalised: "pydantic_core" in a pin too
    assert [name for name in kit.CARRIED if name not in versions] == []
