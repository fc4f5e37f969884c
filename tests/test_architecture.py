"""The import graph is the architecture (docs/architecture.md): import-linter's contracts hold, the graph has no
cycle whatever the contracts say, and the only imports of mtlm modules inside functions are the documented
deferrals of a heavy or optional dependency. AST walks and one lint-imports run: about a second."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest
from importlinter import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mtlm"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """The mtlm modules an import statement names: `from mtlm.a import b` is mtlm.a.b when that is a module
    (a submodule import), else mtlm.a. Relative imports are resolved against the importer."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "mtlm"]
    base = node.module or ""
    if node.level:
        package = importer.split(".") if MODULES[importer].name == "__init__.py" else importer.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    if base.split(".")[0] != "mtlm":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: anywhere except inside a function body or under
    `if TYPE_CHECKING:` (annotations only; import-linter is told to skip those too)."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) or is_type_checking(child):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def function_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports inside a function body (those under TYPE_CHECKING never run, at module level or not)."""
    skip = {id(n) for n in top_level_imports(tree)}
    skip |= {id(n) for block in ast.walk(tree) if is_type_checking(block) for n in ast.walk(block)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in skip]


def module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in MODULES.items():
        for node in top_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            graph[name].update(t for t in imported(node, name) if t != name)
    return graph


def group(module: str) -> str:
    """mtlm.train.loop -> mtlm.train: the unit the layers are made of."""
    return ".".join(module.split(".")[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as [a, b, ..., a], or None (iterative DFS, three colours)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack, path = [(start, iter(sorted(graph.get(start, ()))))], [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


def test_find_cycle_finds_one_and_only_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_module_import_graph_is_acyclic() -> None:
    """No module reaches itself through module-level imports (a cycle only an import order keeps working)."""
    graph = module_graph()
    assert "mtlm.checks" in graph["mtlm.run"]  # the walk sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_package_import_graph_is_acyclic() -> None:
    """Nor does any group (mtlm.model, mtlm.train, mtlm.config, ...) reach itself through another: the
    layers hold even with every import-linter contract removed."""
    groups: dict[str, set[str]] = defaultdict(set)
    for source, targets in module_graph().items():
        groups[group(source)].update(group(t) for t in targets if group(t) != group(source))
    assert {"mtlm.model", "mtlm.data", "mtlm.train", "mtlm.config"} <= set(groups)
    assert find_cycle(groups) is None, " -> ".join(find_cycle(groups) or [])


def test_config_imports_nothing_above_the_ground() -> None:
    """The schemas are the ground floor: mtlm.config imports only the errors (no group, no check)."""
    assert module_graph()["mtlm.config"] == {"mtlm.errors"}
    assert module_graph().get("mtlm.errors", set()) == set()


def deferred_imports() -> dict[tuple[str, str], int]:
    """(file, mtlm module) -> line of every import of an mtlm module inside a function."""
    found = {}
    for name, path in MODULES.items():
        for node in function_imports(ast.parse(path.read_text(encoding="utf-8"))):
            for target in imported(node, name):
                found[(str(path.relative_to(ROOT)), target)] = node.lineno
    return found


def test_function_local_imports_are_the_documented_deferrals() -> None:
    """An import inside a function is for deferring a heavy or optional dependency only: each one left is
    named in docs/architecture.md (file and module) and carries a comment saying why."""
    doc = ARCHITECTURE.read_text(encoding="utf-8")
    found = deferred_imports()
    assert found, "the walk finds the known deferrals (mtlm/__init__.py's lazy load_model)"
    undocumented = [f"{f}:{line} imports {m}" for (f, m), line in found.items() if f"`{f}`" not in doc
                    or f"`{m}`" not in doc]
    assert not undocumented, "function-local imports not in docs/architecture.md: " + "; ".join(undocumented)
    for (f, m), line in found.items():
        lines = (ROOT / f).read_text(encoding="utf-8").splitlines()
        near = " ".join(lines[max(0, line - 4):line + 1]).lower()
        assert "defer" in near or "lazy" in near, f"{f}:{line} imports {m} in a function without saying why"


def test_import_linter_contracts_hold(capsys: pytest.CaptureFixture[str]) -> None:
    """pyproject.toml's contracts (layers; the core imports no model, loop or data; the model no loop, data or
    metrics; the ground no torch), as `lint-imports` checks them in CI."""
    status = cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert "4 kept, 0 broken" in out, out
    assert status == 0, out


# ---- one place for what the entry points share ------------------------------------------------------------


def test_rank_zero_is_read_from_torchrun_then_slurm() -> None:
    from mtlm.rank_env import is_rank_zero

    assert is_rank_zero({})  # a process that spawns its own ranks
    assert is_rank_zero({"RANK": "0", "SLURM_PROCID": "3"})  # torchrun's RANK wins over SLURM's
    assert not is_rank_zero({"RANK": "2"})
    assert not is_rank_zero({"SLURM_PROCID": "1"})


def test_backend_auto_is_nccl_on_cuda_and_gloo_elsewhere() -> None:
    import torch

    from mtlm.parallel.launch import backend_for

    assert backend_for("auto", torch.device("cuda", 0)) == "nccl"
    assert backend_for("auto", torch.device("cpu")) == "gloo"
    assert backend_for("gloo", torch.device("cuda", 0)) == "gloo"  # a set backend is kept


def test_error_kind_names_each_input_error() -> None:
    from mtlm.convert.pickles import UnsafeCheckpointError
    from mtlm.errors import CheckpointError, ConfigError, DataError, error_kind

    assert [error_kind(e) for e in (ConfigError("k", "m"), DataError("d"), CheckpointError("c"))] == \
        ["config", "data", "checkpoint"]
    assert error_kind(UnsafeCheckpointError("u")) == "checkpoint"  # a subclass keeps its family's word
    with pytest.raises(TypeError):
        error_kind(ValueError("not ours"))


def test_model_options_default_from_the_typed_config() -> None:
    from types import SimpleNamespace

    from mtlm.config import ModelConfig, model_option

    assert model_option(SimpleNamespace(), "activation") == ModelConfig.activation == "gelu_tanh"
    assert model_option({"activation": "gelu"}, "activation") == "gelu"  # a checkpoint's model section
    assert model_option(SimpleNamespace(vocab_size=None), "vocab_size") is None  # set to null stays null


def test_docs_draw_the_layers_the_contract_states() -> None:
    """docs/architecture.md's diagram is the layers contract of pyproject.toml, in its order (top first)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    layers = next(c for c in contracts["contracts"] if c["type"] == "layers")["layers"]
    diagram = ARCHITECTURE.read_text(encoding="utf-8").split("```")[1].splitlines()
    rows = [next((i for i, line in enumerate(diagram) if f" {layer} " in f" {line} "), None) for layer in layers]
    assert None not in rows, [layer for layer, row in zip(layers, rows, strict=True) if row is None]
    assert rows == sorted(rows), "the diagram lists the layers in another order than the contract"
