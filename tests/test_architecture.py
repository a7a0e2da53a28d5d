"""The folder list is the architecture: imports between loraforge modules point one way (no cycles, lazy imports
included), and the LoRA core never imports evaluation, training, serving or the quant-aware merge."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "loraforge"
# What the LoRA core (loraforge/lora/) may not reach: the application built on top of it.
ABOVE_THE_CORE = ("loraforge.evaluate", "loraforge.train", "loraforge.serve", "loraforge.merge", "loraforge.models",
                  "loraforge.cli", "loraforge.compare", "loraforge.estimate", "loraforge.report")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every loraforge module and the loraforge modules it imports anywhere in its body (but `if TYPE_CHECKING:`)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycles_between_loraforge_modules():
    cycle = _cycle(_imports())
    assert cycle is None, " → ".join(cycle)


def test_the_lora_core_imports_nothing_built_on_it():
    graph = _imports()
    for module, targets in graph.items():
        if module.startswith("loraforge.lora"):
            above = sorted(t for t in targets if t.startswith(ABOVE_THE_CORE))
            assert not above, f"{module} imports {above}"


def test_the_quantization_module_imports_only_torch_bitsandbytes_and_leaves():
    assert _imports()["loraforge.quant"] <= {"loraforge.errors", "loraforge.memory"}


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
