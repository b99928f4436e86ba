"""Facts about the code's shape a reviewer can check: no import circles in the parallel and
training layers, nothing private of megarch.model used by megarch.parallel, the model layers
declaring their tensor-parallel partition (no rule on names), one training-step path."""

from __future__ import annotations

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(package: str) -> dict[str, set[tuple[str, tuple[str, ...]]]]:
    """Module name -> the megarch modules it imports (anywhere in its body) with the names."""
    out = {}
    folder = os.path.join(REPO, *package.split("."))
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".py"):
            continue
        name = f"{package}.{file[:-3]}".removesuffix(".__init__")
        with open(os.path.join(folder, file), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megarch"):
                found.add((node.module, tuple(a.name for a in node.names)))
            elif isinstance(node, ast.Import):
                found.update((a.name, ()) for a in node.names if a.name.startswith("megarch"))
        out[name] = found
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_in_training_or_parallel():
    for package in ("megarch.training", "megarch.parallel"):
        imports = _imports(package)
        graph = {m: {dep for dep, _ in deps if dep in imports and dep != package}
                 for m, deps in imports.items() if m != package}
        assert _cycle(graph) is None, f"{package}: import circle {_cycle(graph)}"


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_parallel_uses_nothing_private_of_the_model():
    for module, deps in _imports("megarch.parallel").items():
        for dep, names in deps:
            if dep.startswith("megarch.model"):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{module} imports {private} from {dep}"


def test_no_parameter_name_decides_sharding():
    """The partition of every sharded parameter is declared by its layer (the strings the old
    name rule matched appear in no parallel or training module)."""
    for package in ("megarch.parallel", "megarch.training"):
        folder = os.path.join(REPO, *package.split("."))
        for file in os.listdir(folder):
            if file.endswith(".py"):
                with open(os.path.join(folder, file), encoding="utf-8") as f:
                    text = f.read()
                for rule in ('"wo.weight"', '"o.weight"', '"rel_bias.table"', "tp_split_dim"):
                    assert rule not in text, f"{package}.{file[:-3]} names {rule}"


def test_the_loop_has_one_step_path():
    """Trainer.train_step and evaluate run every layout through run_micro_batches (the pipeline
    schedules; one stage is the whole model), with no fork on the pipeline size."""
    with open(os.path.join(REPO, "megarch", "training", "loop.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    for method in trainer.body:
        if isinstance(method, ast.FunctionDef) and method.name in (
                "train_step", "evaluate", "_clip_and_step"):
            source = ast.unparse(method)
            assert not re.search(r"ctx\.pp\b", source), f"Trainer.{method.name} forks on pp"
    step = ast.unparse(next(m for m in trainer.body if getattr(m, "name", "") == "train_step"))
    assert "run_micro_batches" in step
