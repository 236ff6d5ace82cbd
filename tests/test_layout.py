"""The house: commands at the top import the library (core/) and the model files, never each other;
the library never imports a command; no module imports itself round a circle; files and functions
stay short enough to read. Read from the source's own import statements (AST), not by importing."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the teaching files at the top that the library builds on (the design card keeps them there)
MODEL_FILES = {"k_model", "gpt2_model", "dataset"}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 450, 80


def modules() -> dict[str, Path]:
    """{"pretrain": path, "core.trainer": path, ...} of every module of the project."""
    found = {p.stem: p for p in REPO.glob("*.py")}
    found.update({f"core.{p.stem}": p for p in (REPO / "core").glob("*.py") if p.stem != "__init__"})
    return found


def imports(path: Path, known) -> set[str]:
    """The project's modules that a file imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # "from core import trainer" imports core.trainer; "from core.trainer import x" too
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return found & set(known)


GRAPH = {name: imports(path, modules()) for name, path in modules().items()}
COMMANDS = {name for name in GRAPH if "." not in name and name not in MODEL_FILES}


def test_no_command_imports_another_command():
    offenders = {name: sorted(GRAPH[name] & COMMANDS) for name in COMMANDS if GRAPH[name] & COMMANDS}
    assert not offenders, f"commands importing commands (move what they share into core/): {offenders}"


def test_the_library_and_the_model_files_import_no_command():
    offenders = {name: sorted(GRAPH[name] & COMMANDS) for name in set(GRAPH) - COMMANDS if GRAPH[name] & COMMANDS}
    assert not offenders, f"library modules importing commands: {offenders}"


def test_no_import_circles():
    visiting, done = [], set()

    def visit(name):
        if name in visiting:
            pytest.fail(f"import circle: {' -> '.join(visiting[visiting.index(name):] + [name])}")
        if name in done:
            return
        visiting.append(name)
        for dep in sorted(GRAPH[name]):
            visit(dep)
        visiting.pop()
        done.add(name)

    for name in sorted(GRAPH):
        visit(name)


def test_the_checks_above_can_fail():
    # the graph is real: a command that imports the library and a library module that imports a model file
    assert {"core.trainer"} <= GRAPH["pretrain"] and "dataset" in GRAPH["core.loaders"]
    assert len(COMMANDS) >= 10 and "eval" in COMMANDS and "k_model" not in COMMANDS


@pytest.mark.parametrize("name", sorted(modules()))
def test_files_and_functions_stay_readable(name):
    path = modules()[name]
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MAX_FILE_LINES, f"{path.name}: split it"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path.name}: {node.name} is {length} lines"
