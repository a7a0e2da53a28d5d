"""The benchmark scripts BENCHMARKS.md cites still import against the code they measure: `make bench` is not
in CI, and bench_serve.py once went on importing a helper that had been renamed."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda path: path.name)
def test_bench_script_imports(script: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs the imports and definitions; main() stays behind __main__
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"
