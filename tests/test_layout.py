"""The package's shape: the read-along file stays short, imports go one way, the commands stand apart.

The import graph is read from the source (every `import` and `from ... import`, inside functions too), so
a circle cannot hide behind an import placed in a function.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minifastv"
COMMANDS = {"minifastv.__main__", "minifastv.analyze", "minifastv.bench", "minifastv.eval", "minifastv.figures",
            "minifastv.flops.__main__"}
# The package from the bottom up: a module imports only modules of lower tiers, so no arrow runs back up.
TIERS = [
    {"minifastv.errors", "minifastv.flops"},  # the error types; FLOPs as plain arithmetic on a config
    {"minifastv.model"},  # the read-along file: the model at the bottom
    {"minifastv.checkpoint", "minifastv.generation", "minifastv.compiled", "minifastv.rules", "minifastv.prompt"},
    {"minifastv.image", "minifastv.tiny"},  # image.py reads preprocessor_config.json as checkpoint.py reads JSON
    {"minifastv.video"},  # frames through image.py's preprocessing
    {"minifastv.cli"},  # what the commands share
    COMMANDS | {"minifastv.lmms_eval_model"},  # lmms-eval's adapter stands beside the commands
    {"minifastv"},  # the package's names
]


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules():
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(path, known):
    """The package modules that the file at `path` imports, anywhere in it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "minifastv"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            elif node.module and node.module.split(".")[0] == "minifastv":
                base = node.module
            else:
                continue
            for alias in node.names:  # `from . import cli` imports the module minifastv.cli
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found - {name}


def import_graph():
    known = modules()
    return {name: imports_of(path, known) for name, path in known.items()}


def find_cycle(graph):
    """One import circle as a list of modules, or None."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return trail[trail.index(target):] + [target]
            if target not in state:
                cycle = visit(target, trail + [target])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_graph_reader_sees_what_it_should():
    graph = import_graph()
    assert "minifastv.cli" in graph["minifastv.__main__"]  # `from . import cli`
    assert "minifastv.flops" in graph["minifastv.generation"]  # `from .flops import ...`
    assert "minifastv.cli" in graph["minifastv.flops.__main__"]  # `from .. import cli`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_command_imports_another_command():
    graph = import_graph()
    assert COMMANDS <= set(graph)
    for command in COMMANDS:
        assert not graph[command] & COMMANDS, f"{command} imports {graph[command] & COMMANDS}"


def test_the_model_file_imports_only_the_errors():
    """model.py stands alone: torch, the standard library and the error types; generation drives it."""
    assert import_graph()["minifastv.model"] == {"minifastv.errors"}


def test_every_module_has_a_tier():
    assert set(import_graph()) == set().union(*TIERS)


def test_no_import_runs_back_up():
    tier_of = {module: tier for tier, modules in enumerate(TIERS) for module in modules}
    for module, imported in import_graph().items():
        upward = sorted(name for name in imported if tier_of[name] >= tier_of[module])
        assert not upward, f"{module} (tier {tier_of[module]}) imports {upward}, which are not below it"


def test_the_read_along_file_stays_short():
    lines = len((PACKAGE / "model.py").read_text().splitlines())
    assert lines <= 650, f"minifastv/model.py has {lines} lines; the read-along file stays at 650 or fewer"


def test_pyproject_depends_on_what_requirements_txt_lists():
    """pip install -e . and pip install -r requirements.txt bring the same runtime packages."""
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    lines = (PACKAGE.parent / "requirements.txt").read_text().splitlines()
    listed = [line.split("#")[0].strip() for line in lines]
    assert sorted(project["dependencies"]) == sorted(filter(None, listed))
    lines = (PACKAGE.parent / "requirements-test.txt").read_text().splitlines()
    listed = [line.split("#")[0].strip() for line in lines]
    assert sorted(project["optional-dependencies"]["test"]) == sorted(filter(None, listed))
