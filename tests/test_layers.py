"""Data flows one way: scripts -> training/ -> soflow.py, with fid.py beside the scripts.

Every import of the project's modules is read from their source (imports inside functions too) and checked
against the layers; the checker itself is shown to catch an upward import and a circle.
"""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train_toy", "train_cifar", "train_imagenet", "sample", "fid"}
# What each kind of module may import of the project (besides the standard library and its requirements).
ALLOWED = {
    "soflow": set(),                                   # the method: torch and einops alone
    "training.data": set(),                            # fid.py reads CIFAR-10 through it
    "fid": {"training.data"},
    "training": {"soflow", "fid", "training"},         # every other module of training/
    "script": {"soflow", "fid", "training"},           # never another script
}
# soflow.hub_file imports huggingface_hub where it is used (hf:// paths), as an optional package.
THIRD_PARTY_OF_SOFLOW = {"torch", "einops", "huggingface_hub"}


def project_sources():
    """{module name: source} of soflow.py, the scripts and training/*.py."""
    files = [ROOT / "soflow.py", *(ROOT / f"{name}.py" for name in SCRIPTS),
             *(ROOT / "training").glob("*.py")]
    return {module_name(path): path.read_text() for path in files}


def module_name(path):
    relative = path.relative_to(ROOT).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def imports(source, module):
    """Every module that source imports, anywhere in it (functions too), relative imports resolved."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[:-node.level] if module.count(".") else []
                base = ".".join([*package, base]) if base else ".".join(package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)   # `from training import loop`
    return found


def kind(module):
    if module in ("soflow", "training.data", "fid"):
        return module
    return "training" if module.split(".")[0] == "training" else "script"


def violations(sources):
    """['a imports b: ...'] for every import that breaks the layers, and every module on an import circle."""
    ours = set(sources)
    problems, graph = [], {}
    for module, source in sources.items():
        graph[module] = {name for name in imports(source, module) if name in ours} - {module}
        allowed = ALLOWED[kind(module)]
        for name in sorted(graph[module]):
            if kind(module) == "script" and name in SCRIPTS - {"fid"}:
                problems.append(f"{module} imports the script {name}")
            elif name not in allowed and name.split(".")[0] not in allowed:
                problems.append(f"{module} imports {name}: a module of kind {kind(module)!r} may import only "
                                f"{sorted(allowed) or 'the standard library and its requirements'}")
        if module == "soflow":
            outside = {name.split(".")[0] for name in imports(source, module)} - THIRD_PARTY_OF_SOFLOW
            if bad := sorted(name for name in outside if name not in sys.stdlib_module_names):
                problems.append(f"soflow imports {bad}: the method file imports only torch and einops")

    def reaches(start, node, seen):
        return any(nxt == start or (nxt not in seen and not seen.add(nxt) and reaches(start, nxt, seen))
                   for nxt in graph.get(node, ()))
    return problems + [f"{module} is on an import circle" for module in sorted(graph)
                       if reaches(module, module, set())]


def test_the_project_keeps_its_layers():
    sources = project_sources()
    assert {"soflow", "fid", "sample", "training.loop", "training.data"} <= set(sources)
    assert violations(sources) == []


@pytest.mark.parametrize("module, line, message", [
    ("training.checkpoints", "import train_cifar", "imports train_cifar"),               # upward
    ("training.data", "from training import loop", "imports training.loop"),           # fid's reader
    ("fid", "def f():\n    from training.files import write_npz", "imports training.files"),   # lazy
    ("soflow", "import numpy", "soflow imports ['numpy']"),
    ("sample", "import train_cifar", "sample imports the script train_cifar"),
    ("training.files", "from training import loop", "on an import circle"),            # loop -> files
])
def test_an_upward_import_or_a_circle_is_caught(module, line, message):
    sources = project_sources()
    sources[module] += "\n" + line + "\n"
    assert any(message in problem for problem in violations(sources)), violations(sources)


if __name__ == "__main__":           # python tests/test_layers.py: the import graph of the project's modules
    sources = project_sources()
    for module in sorted(sources, key=lambda m: (kind(m) != "script", m)):
        used = sorted(name for name in imports(sources[module], module) if name in sources)
        used = [name for name in used if name != "training"]                     # the package's __init__
        print(f"{module:<22} -> {', '.join(used) or '(nothing of the project)'}")
