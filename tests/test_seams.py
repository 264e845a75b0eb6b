"""The seams of train/: layered subpackages whose imports point one way, no import cycle, the backend named only in
train/engine/backends/, one way to write a file, ``--help`` without torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

TRAIN = REPO / "train"


def _in_package(path: Path) -> bool:
    """Whether every folder from train/ down to ``path`` is a package (``train/assets/build.py`` is a script kept
    beside the bundled files it rebuilds, not a module of the package)."""
    return all(
        (folder / "__init__.py").is_file() for folder in path.parents if TRAIN in (folder, *folder.parents)
    )


def _modules() -> dict[str, Path]:
    out = {}
    for path in TRAIN.rglob("*.py"):
        if _in_package(path):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Every import of a train module by another, at any level (a function-level import is a dependency too)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def imported_modules(tree: ast.AST, mods: dict[str, Path]) -> set[str]:
    """The package's modules a file imports: ``from train.engine import dist`` is ``train.engine.dist`` (the
    package ``train.engine`` only where a name is taken from it)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom) and node.module in mods:
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                for a in node.names
            }
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycle_in_train():
    graph = import_graph()
    assert len(graph) > 20 and "train.engine.backends.deepspeed" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail


def test_no_import_cycle_in_bench():
    """The bench/ scripts import each other by file name (their folder is on sys.path): no circle among them."""
    scripts = {p.stem: p for p in (REPO / "bench").glob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in scripts}
    for name, path in scripts.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names} & scripts.keys()
            elif isinstance(node, ast.ImportFrom) and node.module in scripts:
                graph[name].add(node.module)
    assert {"common", "end_to_end"} <= graph["compare_trainer"]  # the graph sees the imports it guards
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


# The layers of train/, lowest first: a module may import its own layer and those below it, never one above
# (docs/CONTRACT.md says why each package sits where it does). The base is the top-level modules every layer
# uses; the entry points (the CLI) sit above everything.
BASE = {"train", "train.config", "train.errors", "train.files", "train.tasks"}
LAYERS = ["folders", "data", "model", "tracking", "engine", "outputs", "sweeps"]
ENTRY = {"train.cli", "train.__main__", "train.assets.build"}  # the CLI; the assets' build script
TOP_LEVEL_MAX = 8


def layer(module: str) -> int:
    if module in BASE:
        return 0
    if module in ENTRY:
        return len(LAYERS) + 1
    package = module.split(".")[1]
    assert package in LAYERS, f"{module}: in no layer (add its package to LAYERS and docs/CONTRACT.md)"
    return LAYERS.index(package) + 1


def wrong_way_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def test_imports_point_down_the_layers():
    graph = import_graph()
    assert all(layer(m) >= 0 for m in graph)  # every module is in a layer
    assert wrong_way_imports(graph) == []
    # the check can fail: the engine reaching up into the outputs is the kind of import it exists to catch
    assert wrong_way_imports({"train.engine.loop": {"train.outputs.card"}, "train.outputs.card": set()}) == [
        "train.engine.loop -> train.outputs.card"
    ]


def test_at_most_eight_modules_at_the_top():
    top = sorted(p.name for p in TRAIN.glob("*.py"))
    assert len(top) <= TOP_LEVEL_MAX, top
    packages = sorted(p.name for p in TRAIN.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(LAYERS), packages


BACKEND_NAMES = re.compile(
    r"ACCELERATE_USE_DEEPSPEED|ACCELERATE_USE_FSDP|ds_numel|ds_shape|deepspeed_engine|DistributedType\."
)
# Named at all (code, comments, strings) only by its backend and by the config schema's own section.
DEEPSPEED = re.compile(r"deepspeed", re.IGNORECASE)
MAY_NAME_DEEPSPEED = (TRAIN / "engine" / "backends", TRAIN / "config.py")


def backend_leaks(path: Path, text: str) -> list[str]:
    rel = path.relative_to(REPO) if path.is_absolute() else path
    names_it = any(path == allowed or allowed in path.parents for allowed in MAY_NAME_DEEPSPEED)
    return [
        f"{rel}:{n}"
        for n, line in enumerate(text.splitlines(), 1)
        if ("backends" not in path.parts and BACKEND_NAMES.search(line))
        or (not names_it and DEEPSPEED.search(line))
    ]


def test_only_the_backends_know_which_backend_runs():
    leaks = [leak for p in TRAIN.rglob("*.py") for leak in backend_leaks(p, p.read_text())]
    assert not leaks, leaks
    # the check can fail: a log-level rule for DeepSpeed in the CLI, a word in a comment of the loop
    rule = 'level = WARNING if launched() == "deepspeed" else ERROR\n'
    assert backend_leaks(TRAIN / "cli.py", rule) == ["train/cli.py:1"]
    assert backend_leaks(TRAIN / "engine" / "loop.py", "x = 1\n# under DeepSpeed the engine clips") == [
        "train/engine/loop.py:2"
    ]
    assert backend_leaks(TRAIN / "engine" / "backends" / "deepspeed.py", rule) == []


def current_calls(tree: ast.AST) -> list[int]:
    """Lines that call ``current()`` or ``<module>.current()``."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "id", None) == "current" or getattr(node.func, "attr", None) == "current")
    ]


def test_the_backend_is_chosen_once():
    """``backends.current()`` is called where the run is built; every other part is handed that Backend."""
    sites = [
        f"{p.relative_to(REPO)}:{line}"
        for p in TRAIN.rglob("*.py")
        for line in current_calls(ast.parse(p.read_text()))
    ]
    assert len(sites) == 1 and sites[0].startswith("train/engine/setup.py:"), sites
    # the check can fail: a second source of truth, however it is imported
    again = "from train.engine.backends import current\nb = backends.current()\nc = current().name\n"
    assert current_calls(ast.parse(again)) == [2, 3]


# The module that holds the step: a loop, not the place where everything else happens too.
LOOP_MAX_LINES = 450
LOOP_MAX_IMPORTS = 12


def test_the_loop_is_only_a_loop():
    mods = _modules()
    trees = {name: ast.parse(path.read_text()) for name, path in mods.items()}
    (loop,) = [
        name
        for name, tree in trees.items()
        if any(isinstance(n, ast.FunctionDef) and n.name == "train_one_epoch" for n in tree.body)
    ]
    lines = len(mods[loop].read_text().splitlines())
    imported = imported_modules(trees[loop], mods)
    assert lines <= LOOP_MAX_LINES, f"{loop}: {lines} lines"
    assert len(imported) <= LOOP_MAX_IMPORTS, sorted(imported)
    assert not [m for m in imported if m.startswith("train.outputs")], imported  # outputs come from hooks
    # the count can fail: each module named once, whichever way it is imported
    sample = (
        "from train.engine import dist, checkpoint\nimport train.files\nfrom train.config import Config\n"
    )
    assert imported_modules(ast.parse(sample), mods) == {
        "train.engine.dist",
        "train.engine.checkpoint",
        "train.files",
        "train.config",
    }


def test_help_does_not_import_torch():
    """``glue-train --help`` lists every command, and each command's ``--help`` answers without torch."""
    from train.cli import COMMANDS

    probe = (
        "import sys\nfrom train.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules))"
    )
    for argv in (["--help"], *([name, "--help"] for name in COMMANDS)):
        proc = subprocess.run(
            [sys.executable, "-c", probe, *argv], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, (argv, proc.stderr)
        assert proc.stdout.strip().endswith("HEAVY []"), (argv, proc.stdout[-500:])
        assert "usage:" in proc.stdout, (argv, proc.stdout[-500:])
        if argv == ["--help"]:
            assert "config keys" in proc.stdout
            assert all(f"  {name} " in proc.stdout for name in COMMANDS), proc.stdout


def test_every_error_class_is_a_user_error_in_errors_py():
    """One place for the program's error classes, all answered by the one boundary (exit 2, one paragraph)."""
    from train import errors

    elsewhere = [
        f"{p.relative_to(REPO)}: {node.name}"
        for p in TRAIN.rglob("*.py")
        if p.name != "errors.py"
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.ClassDef)
        and any(getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception")) for b in node.bases)
        and not any(getattr(b, "id", "") == "BaseException" for b in node.bases)  # control flow, like Ctrl-C
    ]
    assert elsewhere == []
    ours = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert {c.__module__ for c in ours} == {"train.errors"}
    assert all(issubclass(c, errors.UserError) for c in ours if c is not errors.UserError), ours


def test_the_contract_names_every_module():
    """docs/CONTRACT.md covers every module and package of train/, and says where to add things."""
    text = (REPO / "docs" / "CONTRACT.md").read_text()
    missing = []
    for path in TRAIN.rglob("*.py"):
        rel = path.relative_to(TRAIN)
        if rel in (Path("__init__.py"), Path("__main__.py")):
            continue  # train/__init__.py and __main__.py: the package itself
        name = rel.parent.as_posix() + "/" if rel.name == "__init__.py" else rel.name
        if f"`{name}`" not in text and f"`{rel.as_posix()}`" not in text:
            missing.append(rel.as_posix())
    assert not missing, f"docs/CONTRACT.md does not name: {missing}"
    for thing in ("a GLUE-like task", "a metric", "a model family", "a backend"):
        assert f"**{thing}**" in text


HISTORY = re.compile(
    r"\b" + "iss" + r"ues?\s*#?\d+", re.IGNORECASE
)  # spelled apart: this file is scanned too
CODE_SUFFIXES = {".py", ".sh", ".sbatch", ".yaml", ".yml", ".toml"}


def test_no_history_in_the_code():
    """Why a line exists is said in the line's comment; which ticket asked for it lives in git, not the code."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    found = [
        f"{path}:{n}: {line.strip()}"
        for path in tracked.stdout.split()
        if Path(path).suffix in CODE_SUFFIXES or path.startswith((".ci/", "launch/", "slurm/"))
        for n, line in enumerate((REPO / path).read_text(errors="replace").splitlines(), 1)
        if HISTORY.search(line)
    ]
    assert found == [], "\n".join(found)


def test_every_module_says_its_job_first():
    """Each module of train/ opens with a docstring whose first line says its one job."""
    silent = [
        str(p.relative_to(REPO))
        for p in sorted((REPO / "train").rglob("*.py"))
        if p.stat().st_size and not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()
    ]
    assert silent == []
