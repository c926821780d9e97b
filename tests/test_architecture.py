"""Enforce the package layering and the side-effect rules (style guide 8.2) with the AST.

Layering: each module belongs to a layer, the first name under ``devmapper``
(``devmapper.pdata.btree`` is in ``pdata``), and may import only the layers in
``ALLOWED``.  A few modules have narrower rules of their own (``SUBMODULE_ALLOWED``),
and some layers must not use certain stdlib or third-party modules (``FORBIDDEN_EXTERNAL``).
``import devmapper.x``, ``from devmapper.x import y``, relative imports, imports under
``if TYPE_CHECKING:`` and ``importlib.import_module("devmapper.x")`` all count.

Side effects: outside ``cli`` no module prints, exits, or reads the environment or argv.

Modules that do not exist yet are simply not checked; a new top-level name under
``devmapper`` fails until it is given a row in ``ALLOWED``.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "devmapper"
ROOT = "<root>"  # the layer of devmapper/__init__.py

_BASE = frozenset({"units", "errors"})
_THIN_AND_BELOW = _BASE | {"export", "format", "blockdev", "pdata", "thin"}

# layer -> layers it may import (its own layer is listed explicitly where allowed).
ALLOWED: dict[str, frozenset[str]] = {
    ROOT: frozenset(),
    "units": frozenset(),
    "errors": frozenset(),
    "export": _BASE,
    "format": _BASE | {"format"},
    "blockdev": _BASE | {"blockdev"},
    "pdata": _BASE | {"format", "blockdev", "pdata"},
    "thin": _THIN_AND_BELOW,
    "control": _THIN_AND_BELOW | {"control"},
    "nbd": _BASE | {"export", "nbd"},
    "fuse": _BASE | {"export", "fuse"},
    "layers": _THIN_AND_BELOW | {"control", "layers"},
    "cli": _THIN_AND_BELOW | {"control", "nbd", "fuse", "layers", "cli"},
}

# Narrower rules for single modules: module -> devmapper modules (exact or package prefix) allowed.
SUBMODULE_ALLOWED: dict[str, frozenset[str]] = {
    # sans-IO: knows bytes and events only.
    "devmapper.nbd.protocol": frozenset(
        {"devmapper.units", "devmapper.errors", "devmapper.nbd.wire", "devmapper.nbd.events"}
    ),
    "devmapper.nbd.events": frozenset({"devmapper.units", "devmapper.errors", "devmapper.nbd.wire"}),
    "devmapper.nbd.wire": frozenset({"devmapper.units", "devmapper.errors"}),
    # the FUSE adapter translates pyfuse3 calls into vfs calls and knows nothing else.
    "devmapper.fuse.adapter": frozenset(
        {"devmapper.units", "devmapper.errors", "devmapper.fuse", "devmapper.fuse.vfs"}
    ),
}

# layer or module -> top-level external modules it must not import.
FORBIDDEN_EXTERNAL: dict[str, frozenset[str]] = {
    "format": frozenset({"os", "io", "logging", "time", "socket", "threading"}),
    "devmapper.nbd.protocol": frozenset({"socket", "socketserver", "selectors", "threading", "asyncio"}),
    "devmapper.nbd.events": frozenset({"socket", "socketserver", "selectors", "threading", "asyncio"}),
    "devmapper.nbd.wire": frozenset({"socket", "socketserver", "selectors", "threading", "asyncio"}),
    "devmapper.fuse.vfs": frozenset({"pyfuse3"}),
}
# layers that may not call the builtin open() (pure bytes <-> values).
NO_OPEN_LAYERS = frozenset({"format"})

# Side effects reserved for cli.
FORBIDDEN_CALLS = frozenset({"print", "exit", "quit", "breakpoint"})
FORBIDDEN_ATTRIBUTES = frozenset(
    {
        ("sys", "exit"),
        ("sys", "argv"),
        ("os", "_exit"),
        ("os", "environ"),
        ("os", "environb"),
        ("os", "getenv"),
        ("os", "getenvb"),
        ("os", "putenv"),
        ("os", "unsetenv"),
    }
)
SIDE_EFFECT_LAYERS = frozenset({"cli"})  # the layers allowed to do all of the above


@dataclasses.dataclass(frozen=True, slots=True)
class Violation:
    module: str
    lineno: int
    message: str

    def __str__(self) -> str:
        return f"{self.module}:{self.lineno}: {self.message}"


def layer_of(module: str) -> str:
    """Return the layer of a dotted devmapper module name."""
    parts = module.split(".")
    assert parts[0] == PACKAGE, module
    return ROOT if len(parts) == 1 else parts[1]


def discover_modules(src: Path = SRC) -> dict[str, Path]:
    """Map every existing module under src/devmapper to its file."""
    modules: dict[str, Path] = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        rel = path.relative_to(src).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str | None:
    """Absolute name of ``from <level dots><target> import ...`` inside ``module``."""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    if not base:
        return None  # beyond the top-level package; Python itself rejects this
    return ".".join(base + ([target] if target else []))


class _Checker(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: frozenset[str]) -> None:
        self.module = module
        self.is_package = is_package
        self.known = known
        self.layer = layer_of(module)
        self.violations: list[Violation] = []

    # -- helpers -------------------------------------------------------------------

    def _report(self, node: ast.AST, message: str) -> None:
        self.violations.append(Violation(self.module, getattr(node, "lineno", 0), message))

    def _check_import(self, node: ast.AST, target: str) -> None:
        top = target.split(".")[0]
        if top != PACKAGE:
            self._check_external(node, top)
            return
        if target == PACKAGE:
            return  # the root package holds only __version__
        target_layer = layer_of(target)
        allowed = ALLOWED.get(self.layer)
        if allowed is None:
            self._report(node, f"layer {self.layer!r} has no row in ALLOWED; add one")
            return
        if target_layer not in allowed:
            self._report(node, f"layer {self.layer!r} must not import {target} (layer {target_layer!r})")
            return
        narrow = SUBMODULE_ALLOWED.get(self.module)
        if narrow is not None and not any(target == ok or target.startswith(ok + ".") for ok in narrow):
            self._report(node, f"{self.module} may import only {sorted(narrow)}, imports {target}")

    def _check_external(self, node: ast.AST, top: str) -> None:
        for key in (self.layer, self.module):
            if top in FORBIDDEN_EXTERNAL.get(key, frozenset()):
                self._report(node, f"{key} must not import {top!r}")

    def _from_target(self, node: ast.ImportFrom) -> str | None:
        if node.level == 0:
            return node.module
        return _resolve_relative(self.module, self.is_package, node.level, node.module)

    # -- imports -------------------------------------------------------------------

    def visit_Import(self, node: ast.Import) -> None:
        if self.layer == ROOT:
            self._report(node, f"devmapper/__init__.py must import nothing, imports {node.names[0].name}")
            return
        for alias in node.names:
            self._check_import(node, alias.name)
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._from_target(node)
        if base is None:
            self._report(node, "relative import beyond the top-level package")
            return
        if base == "__future__":
            return
        if self.layer == ROOT:
            self._report(node, f"devmapper/__init__.py must import nothing, imports from {base}")
            return
        for alias in node.names:
            # `from devmapper.pdata import btree` imports a module; `... import Node` an attribute.
            candidate = f"{base}.{alias.name}"
            self._check_import(node, candidate if candidate in self.known else base)
            if base == "os" and ("os", alias.name) in FORBIDDEN_ATTRIBUTES:
                self._check_side_effect(node, f"from os import {alias.name}")
            if base == "sys" and ("sys", alias.name) in FORBIDDEN_ATTRIBUTES:
                self._check_side_effect(node, f"from sys import {alias.name}")
        self.generic_visit(node)

    # -- side effects --------------------------------------------------------------

    def _check_side_effect(self, node: ast.AST, what: str) -> None:
        if self.layer not in SIDE_EFFECT_LAYERS:
            self._report(node, f"{what} outside cli (only cli prints, exits or reads the environment/argv)")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name):
            if func.id in FORBIDDEN_CALLS:
                self._check_side_effect(node, f"{func.id}()")
            if func.id == "open" and self.layer in NO_OPEN_LAYERS:
                self._report(node, f"layer {self.layer!r} must not call open()")
            if func.id == "__import__":
                self._check_dynamic_import(node)
        elif isinstance(func, ast.Attribute) and func.attr == "import_module":
            self._check_dynamic_import(node)
        self.generic_visit(node)

    def _check_dynamic_import(self, node: ast.Call) -> None:
        if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            name = node.args[0].value
            if not name.startswith("."):
                self._check_import(node, name)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and (node.value.id, node.attr) in FORBIDDEN_ATTRIBUTES:
            self._check_side_effect(node, f"{node.value.id}.{node.attr}")
        self.generic_visit(node)

    def visit_Raise(self, node: ast.Raise) -> None:
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if isinstance(exc, ast.Name) and exc.id == "SystemExit":
            self._check_side_effect(node, "raise SystemExit")
        self.generic_visit(node)


def check_source(
    module: str, source: str, *, is_package: bool = False, known: frozenset[str] = frozenset()
) -> list[Violation]:
    """Return the rule violations in ``source``, the text of dotted module ``module``."""
    tree = ast.parse(source, filename=module)
    checker = _Checker(module, is_package, known)
    checker.visit(tree)
    return sorted(set(checker.violations), key=lambda v: (v.lineno, v.message))


MODULES = discover_modules()
KNOWN = frozenset(MODULES)


def _cases() -> Iterator[tuple[str, Path]]:
    yield from sorted(MODULES.items())


def test_discovers_the_package() -> None:
    assert PACKAGE in MODULES, f"no {PACKAGE}/__init__.py under {SRC}"
    assert len(MODULES) > 1


@pytest.mark.parametrize(("module", "path"), list(_cases()), ids=[m for m, _ in _cases()])
def test_module_follows_layering_and_side_effect_rules(module: str, path: Path) -> None:
    violations = check_source(
        module, path.read_text(encoding="utf-8"), is_package=path.name == "__init__.py", known=KNOWN
    )
    assert not violations, "\n".join(map(str, violations))


# -- the checker can fail ----------------------------------------------------------

SYNTHETIC_KNOWN = frozenset(
    {
        "devmapper",
        "devmapper.units",
        "devmapper.errors",
        "devmapper.format",
        "devmapper.format.superblock",
        "devmapper.pdata",
        "devmapper.pdata.btree",
        "devmapper.thin",
        "devmapper.thin.metadata",
        "devmapper.control",
        "devmapper.cli",
        "devmapper.cli.main",
        "devmapper.nbd",
        "devmapper.nbd.protocol",
        "devmapper.nbd.server",
    }
)


SB = "devmapper.format.superblock"
BTREE = "devmapper.pdata.btree"
META = "devmapper.thin.metadata"


def _messages(module: str, source: str, *, is_package: bool = False) -> list[str]:
    return [v.message for v in check_source(module, source, is_package=is_package, known=SYNTHETIC_KNOWN)]


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        (SB, "from devmapper.pdata import btree\n", "must not import devmapper.pdata"),
        (SB, "import devmapper.thin.metadata\n", "must not import devmapper.thin"),
        (SB, "from ..pdata.btree import x\n", "must not import devmapper.pdata"),
        (BTREE, "from ..thin import metadata\n", "must not import devmapper.thin"),
        (BTREE, "from devmapper import thin\n", "must not import devmapper.thin"),
        ("devmapper.units", "from devmapper.errors import DevmapperError\n", "must not import"),
        ("devmapper.errors", "from . import units\n", "must not import devmapper.units"),
        (META, "from devmapper.cli.main import main\n", "must not import devmapper.cli"),
        (META, "from devmapper.control import x\n", "must not import devmapper.control"),
        ("devmapper.nbd.server", "from devmapper.thin import metadata\n", "must not import devmapper.thin"),
        ("devmapper.nbd.protocol", "from devmapper.export import Export\n", "may import only"),
        ("devmapper.nbd.protocol", "import socket\n", "must not import 'socket'"),
        (SB, "import logging\n", "must not import 'logging'"),
        (SB, "f = open('x')\n", "must not call open()"),
        (META, "import importlib\nimportlib.import_module('devmapper.cli')\n", "cli"),
        ("devmapper.wibble", "from devmapper.units import x\n", "no row in ALLOWED"),
        ("devmapper", "from devmapper.units import x\n", "must import nothing"),
        ("devmapper", "import os\n", "must import nothing"),
        (BTREE, "print('hi')\n", "print() outside cli"),
        (BTREE, "import sys\nsys.exit(1)\n", "sys.exit outside cli"),
        (BTREE, "exit(1)\n", "exit() outside cli"),
        (BTREE, "raise SystemExit(2)\n", "raise SystemExit outside cli"),
        (META, "import os\nd = os.environ['HOME']\n", "os.environ outside cli"),
        (META, "import os\nd = os.getenv('HOME')\n", "os.getenv outside cli"),
        (META, "from os import environ\n", "from os import environ outside cli"),
        ("devmapper.control", "import sys\na = sys.argv\n", "sys.argv outside cli"),
    ],
)
def test_checker_reports_violation(module: str, source: str, expected: str) -> None:
    is_package = module in {"devmapper", "devmapper.control"}
    messages = _messages(module, source, is_package=is_package)
    assert any(expected in m for m in messages), messages


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("devmapper", '"""doc."""\nfrom __future__ import annotations\n__version__ = "0"\n'),
        (SB, "import struct\nfrom devmapper.format import x\nfrom ..units import y\n"),
        (BTREE, "from devmapper.format.superblock import S\nfrom . import btree\n"),
        (META, "import logging\nfrom devmapper.pdata import btree\nfrom devmapper import x\n"),
        ("devmapper.nbd.server", "import socket\nfrom devmapper.nbd.protocol import Conn\n"),
        (
            "devmapper.cli.main",
            "import os, sys\nfrom devmapper.thin import metadata\nprint(os.environ)\nsys.exit(0)\n",
        ),
        (BTREE, "def f(out):\n    out.print('x')\n    return out.environ\n"),
    ],
)
def test_checker_accepts_allowed_code(module: str, source: str) -> None:
    assert _messages(module, source) == []
