"""The house: no module imports a layer above its own (every import, also those inside functions).

Layers, lowest first (docs/architecture.md): leaf utilities (errors, io, cache, log) -> metrics ->
data -> text -> models -> train -> tasks -> the research package `hemaclip_research` (beside `hemaclip`
in src/, as open_clip_train sits beside open_clip) -> commands, cli, serve and the Python API. A module
may import its own layer and the layers below; the one exception is the package's `__init__`, which
re-exports the API lazily (on first attribute access), so `import hemaclip` stays a leaf. Of the runtime
package only the CLI (cli.py, commands/) may import the research package, and only inside a command.
metrics/ is numpy with scikit-learn and scipy only: no torch and
no hemaclip module but the errors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import hemaclip

PACKAGE = Path(hemaclip.__file__).resolve().parent
RESEARCH = "hemaclip_research"  # the research package, a sibling of hemaclip under src/
OWN_PACKAGES = ("hemaclip", RESEARCH)
# the runtime modules that may import the research package (inside a command function): the CLI only
MAY_IMPORT_RESEARCH = ("hemaclip.cli", "hemaclip.commands")
LAYERS: list[tuple[str, ...]] = [
    ("hemaclip", "hemaclip.errors", "hemaclip.io", "hemaclip.cache", "hemaclip.log", "hemaclip.constants"),
    ("hemaclip.metrics",),
    ("hemaclip.data",),
    ("hemaclip.text",),
    ("hemaclip.models",),
    ("hemaclip.train",),
    ("hemaclip.tasks",),
    (RESEARCH,),
    ("hemaclip.commands", "hemaclip.cli", "hemaclip.serve", "hemaclip.api"),
]
# (importer, imported) pairs allowed upward: the package re-exports the API lazily (module __getattr__).
LAZY_FACADE = {("hemaclip", "hemaclip.api")}


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that names `module` or a package above it."""
    best, length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and to docs/architecture.md"
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in the file, at any depth; relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from hemaclip.x import y` may import the module hemaclip.x.y
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/")).with_suffix(".py").is_file()]
    return found


def is_under(module: str, prefixes: tuple[str, ...]) -> bool:
    """True if `module` is one of `prefixes` or inside one of them."""
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def all_modules() -> list[Path]:
    """Every module of both packages (hemaclip and the research package beside it)."""
    roots = [PACKAGE.parent / name for name in OWN_PACKAGES]
    return sorted(p for root in roots for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer() -> None:
    for path in all_modules():
        layer_of(module_name(path))


def test_no_module_imports_a_higher_layer() -> None:
    violations = []
    for path in all_modules():
        own = layer_of(module_name(path))
        for line, target in imports_of(path):
            if is_under(target, OWN_PACKAGES):
                if layer_of(target) > own and (module_name(path), target) not in LAZY_FACADE:
                    violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not violations, "imports of a higher layer:\n" + "\n".join(violations)


def test_metrics_are_numpy_only() -> None:
    allowed_hemaclip = ("hemaclip.errors", "hemaclip.metrics")
    allowed_external = ("numpy", "scipy", "sklearn", "__future__", "collections", "typing", "math", "dataclasses", "warnings")
    for path in sorted((PACKAGE / "metrics").rglob("*.py")):
        for line, target in imports_of(path):
            top = target.split(".")[0]
            if top == "hemaclip":
                assert target.startswith(allowed_hemaclip), f"{path.name}:{line} imports {target}"
            else:
                assert top in allowed_external, f"{path.name}:{line} imports {target} (metrics/ is numpy + scikit-learn/scipy)"


def test_the_walker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = PACKAGE / "data" / "preprocess.py"
    targets = {t for _, t in imports_of(source)}
    assert "hemaclip.data.transforms" in targets  # imported inside Preprocess.eval_transform


def test_the_package_imports_its_api_only_lazily() -> None:
    """`import hemaclip` loads neither the API nor torch: the facade's upward import runs on first use only."""
    import subprocess
    import sys

    code = "import sys, hemaclip; print(sorted(m for m in ('hemaclip.api', 'torch', 'hemaclip.tasks') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all("api" not in ast.dump(n) for n in top_level), "hemaclip/__init__.py imports the API at module level"


def test_the_research_package_is_found_by_the_walker() -> None:
    """The checks below would pass vacuously if the walker missed the research package."""
    names = {module_name(p) for p in all_modules()}
    assert {RESEARCH, f"{RESEARCH}.evaluate", f"{RESEARCH}.onboarding", "hemaclip.cli"} <= names


def test_only_the_cli_imports_the_research_package() -> None:
    """The runtime library (everything but cli.py and commands/, serve and the API included) never imports research."""
    violations = []
    for path in all_modules():
        importer = module_name(path)
        if not is_under(importer, ("hemaclip",)) or is_under(importer, MAY_IMPORT_RESEARCH):
            continue
        violations += [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
                       for line, target in imports_of(path) if is_under(target, (RESEARCH,))]
    assert not violations, "the runtime package imports the research package:\n" + "\n".join(violations)


def test_the_cli_imports_the_research_package_only_inside_commands() -> None:
    """`hemaclip --help` and the user-facing commands do not load research code: its imports sit inside functions."""
    violations = []
    for path in all_modules():
        if not is_under(module_name(path), MAY_IMPORT_RESEARCH):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and is_under(node.module or "", (RESEARCH,)):
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {node.module} at module level")
            elif isinstance(node, ast.Import):
                violations += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {a.name} at module level"
                               for a in node.names if is_under(a.name, (RESEARCH,))]
    assert not violations, "\n".join(violations)


def test_the_python_api_does_not_load_the_research_package() -> None:
    """`import hemaclip; hemaclip.load` (the API, and with it torch and the tasks) leaves hemaclip_research unloaded."""
    import subprocess
    import sys

    code = ("import sys, hemaclip; hemaclip.load; "
            f"print('hemaclip.api' in sys.modules, sorted(m for m in sys.modules if m.split('.')[0] == {RESEARCH!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "True []", result.stdout
