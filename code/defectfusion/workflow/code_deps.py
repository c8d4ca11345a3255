"""The code each rule runs, found by parsing imports (`code_deps`): the rules declare it as
input, so a change to any code a step runs reruns that step and nothing else."""

from __future__ import annotations

from pathlib import Path

PACKAGE = "defectfusion"


def _module_file(module: str, root: Path) -> Path | None:
    """The source file of a `defectfusion...` module under `root` (the folder holding the
    package), or None when it is not one of the package's modules."""
    parts = module.split(".")
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str, top_level: bool = False) -> set[str]:
    """The `defectfusion` modules a source file imports, at any depth (function-level
    imports too: the package imports its heavy stages lazily), or at its top level only."""
    import ast

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            if name.split(".")[0] != PACKAGE:
                continue
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)  # may name submodules
    return found


def code_deps(*modules: str, root: str | Path = "code") -> list[str]:
    """The source files a rule runs: `modules`, every `defectfusion` module they import,
    transitively, and the packages' ``__init__`` files on the way, as paths under `root`.

    Rules declare these as inputs, so a change to any code a step runs (the augmentations in
    data/loader.py, the metric in evaluation/evaluate.py) reruns that step and nothing else. Found by
    parsing (no import: the Snakefile stays free of torch).
    """
    root = Path(root)
    seen: dict[str, Path] = {}
    parents: dict[str, Path] = {}
    todo: list[tuple[str, bool]] = [(m, False) for m in modules]
    while todo:
        name, as_parent = todo.pop()
        if name in seen or (as_parent and name in parents):
            continue
        path = _module_file(name, root)
        if path is None:
            continue  # a function or class imported from a module, not a module
        (parents if as_parent else seen)[name] = path
        parts = name.split(".")
        # Importing a module runs its parent packages' __init__ (their top level only: a
        # function in __init__ that imports lazily is not called by importing a submodule).
        todo += [(".".join(parts[:i]), True) for i in range(1, len(parts))]
        todo += [(m, False) for m in sorted(_imports(path, name, top_level=as_parent))]
    return sorted(str(p) for p in {*seen.values(), *parents.values()})
