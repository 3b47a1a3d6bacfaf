"""The tree keeps its design: the engine imports neither the queue, the HTTP service nor the
command line (nor Celery or FastAPI), and no module imports itself back through others. Every
import statement counts, those inside functions too."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("qfedit", "worker", "api", "cli")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path) -> Iterator[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def project_module(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {project_module(name) for name in _imports(module, path)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_back() -> None:
    assert _cycles(_graph()) == []


def test_cycles_are_found_when_there_are_some() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_engine_imports_no_edge() -> None:
    modules = _modules()
    outside = []
    for module, path in modules.items():
        if module.split(".")[0] != "qfedit":
            continue
        for name in _imports(module, path):
            if name.split(".")[0] in ("worker", "api", "cli", "celery", "fastapi", "starlette"):
                outside.append(f"{module} imports {name}")
    assert outside == []


def test_the_cli_presents_through_the_application_layer_not_the_api() -> None:
    # `qfedit api` and `qfedit serve` start the servers; nothing else of the CLI imports `api`.
    modules = _modules()
    found = [
        f"{module} imports {name}"
        for module, path in modules.items()
        if module.split(".")[0] == "cli" and module not in ("cli", "cli.api", "cli.serving")
        for name in _imports(module, path)
        if name.split(".")[0] == "api"
    ]
    assert found == []


def test_the_engine_imports_no_terminal_library() -> None:
    # Progress is a callback (`qfedit.covariance.compute_covariance`); the CLI draws it.
    modules = _modules()
    found = [
        f"{module} imports {name}"
        for module, path in modules.items()
        if module.split(".")[0] == "qfedit"
        for name in _imports(module, path)
        if name.split(".")[0] in ("rich", "typer")
    ]
    assert found == []


def _loaded_after(code: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m for m in sys.modules if '.' not in m)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.splitlines()[-1].split())  # the probe's line comes last


def test_the_registry_and_the_presenters_import_no_torch() -> None:
    loaded = _loaded_after(
        "import qfedit.registry, qfedit.app.views, qfedit.app.schemas, qfedit.pipeline.submit, "
        "qfedit.pipeline.captures, qfedit.pipeline.lifecycle"
    )
    assert not {"torch", "transformers", "rich", "fastapi", "celery"} & loaded


@pytest.mark.parametrize("command", [["versions"], ["log"], ["batch", "list"], ["facts"], ["model", "list"]])
def test_read_commands_import_no_torch(tmp_path: Path, command: list[str]) -> None:
    # Every command used to import torch and transformers: 3-4 s of CPU for `qfedit versions`.
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFEDIT_")}
    env["QFEDIT_DATA_DIR"] = str(tmp_path / "data")
    run = f"import sys\nsys.argv = ['qfedit', *{command!r}]\nfrom cli import main\ntry:\n    main()\nexcept SystemExit as done:\n    assert not done.code, done.code"
    loaded = _loaded_after(run, env=env, cwd=tmp_path)
    assert "torch" not in loaded and "transformers" not in loaded


def test_the_served_model_knows_no_database() -> None:
    # The loaded model and its versions (`serving.model`) are apart from following an alias
    # (`serving.follower`), which reads the database and the store.
    path = REPO / "qfedit" / "serving" / "model.py"
    found = [
        n
        for n in _imports("qfedit.serving.model", path)
        if n.split(".")[0] == "sqlalchemy" or n.startswith(("qfedit.db", "qfedit.registry", "qfedit.store"))
    ]
    assert found == []
