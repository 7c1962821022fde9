"""setup.py declares what the package imports, and only that.

Every third-party module imported by vlm_jax/, input_pipeline/ or experiments/ must come from a
distribution named in setup.py: in ``install_requires`` when imported at module level (an
import error there breaks ``import vlm_jax``), or in ``install_requires`` or an extra when the
import is optional (inside a function or a ``try``). Module names are mapped to distributions
with ``importlib.metadata.packages_distributions()`` of this environment (``PIL`` -> pillow,
``absl`` -> absl-py). Conversely, every distribution of ``install_requires`` must be imported
somewhere, so that nothing is installed on every TPU VM for nothing.
"""

import ast
import importlib.metadata
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("vlm_jax", "input_pipeline", "experiments")


def _norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    """``'etils[epath]>=1.7'`` -> ``'etils'``."""
    return _norm(re.match(r"[A-Za-z0-9._-]+", spec).group(0))


def _setup_requirements() -> tuple[set[str], dict[str, set[str]]]:
    """(install_requires, {extra: requirements}) read from setup.py's literals."""
    tree = ast.parse((REPO / "setup.py").read_text())
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    required = {_requirement_name(r) for r in values["INSTALL_REQUIRES"]}
    extras = {k: {_requirement_name(r) for r in v} for k, v in values["EXTRAS"].items()}
    return required, extras


class _Imports(ast.NodeVisitor):
    """Top-level names of absolute imports, and whether each is optional (in a function or a
    ``try``)."""

    def __init__(self):
        self.found: list[tuple[str, bool, int]] = []
        self._depth = 0

    def _nested(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Try = _nested

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append((alias.name.split(".")[0], self._depth > 0, node.lineno))

    def visit_ImportFrom(self, node):
        if node.level == 0 and node.module:
            self.found.append((node.module.split(".")[0], self._depth > 0, node.lineno))


def _third_party_imports():
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            visitor = _Imports()
            visitor.visit(ast.parse(path.read_text(), str(path)))
            for module, optional, line in visitor.found:
                if module in sys.stdlib_module_names or module in PACKAGES or module == "tests":
                    continue
                yield module, optional, f"{path.relative_to(REPO)}:{line}"


def test_imports_are_declared_in_setup_py():
    required, extras = _setup_requirements()
    in_extras = set().union(*extras.values())
    owners = importlib.metadata.packages_distributions()
    problems = []
    for module, optional, where in _third_party_imports():
        # An optional module that is not installed here: its distribution has its name.
        dists = {_norm(d) for d in owners.get(module, [module])}
        if dists & required:
            continue
        if optional and dists & in_extras:
            continue
        where_to = "install_requires or an extra" if optional else "install_requires"
        problems.append(f"{where}: import {module} (distribution {sorted(dists)}) is not in "
                        f"setup.py's {where_to}")
    assert not problems, "\n".join(problems)


def test_install_requires_are_imported():
    required, _ = _setup_requirements()
    owners = importlib.metadata.packages_distributions()
    imported = {_norm(d) for module, _, _ in _third_party_imports()
                for d in owners.get(module, [module])}
    unused = sorted(required - imported)
    assert not unused, (f"setup.py install_requires {unused} are imported nowhere in "
                        f"{PACKAGES}: drop them (or import what they are for).")
