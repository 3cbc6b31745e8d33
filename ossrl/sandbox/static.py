"""Static checks of untrusted source, run in the caller's process before any worker sees it.

`check_source` parses (never executes) the source and lists every construct the policy
refuses: syntax errors, imports outside the allowlist (submodules included), forbidden
builtins (`exec`, `open`, `globals`, `__import__`, ...), dunder and frame/generator-internal
attributes, private attributes of imported modules, and monkeypatching of imported modules.
It is the first of several layers: the worker enforces the same lists again at run time, so
a construct the parser cannot see (`getattr(x, "__cl" + "ass__")`) is still refused there.
"""

from __future__ import annotations

import ast
import dataclasses
import sys

from .policy import FORBIDDEN_NAMES, Policy, is_dunder, is_forbidden_attribute

_ALLOWED_DUNDER_NAMES = frozenset({"__name__", "__doc__"})
_ATTRIBUTE_BUILTINS = frozenset({"getattr", "setattr", "delattr", "hasattr"})


@dataclasses.dataclass(frozen=True)
class Violation:
    """One refused construct: `kind` is syntax | size | import | name | attribute | module."""

    kind: str
    message: str
    lineno: int = 0
    col: int = 0

    def __str__(self) -> str:
        return f"line {self.lineno}: {self.message}"


def check_source(source: str, policy: Policy | None = None) -> list[Violation]:
    """Every construct in `source` that `policy` refuses; an empty list means it may run."""
    policy = policy or Policy()
    if not isinstance(source, str):
        return [Violation("syntax", f"source must be str, got {type(source).__name__}")]
    if len(source.encode("utf-8", "surrogatepass")) > policy.max_source_bytes:
        return [Violation("size", f"source is larger than {policy.max_source_bytes} bytes")]
    try:
        tree = ast.parse(source, filename="<candidate>")
    except (SyntaxError, ValueError) as exc:
        return [Violation("syntax", f"syntax error: {exc.msg if isinstance(exc, SyntaxError) else exc}",
                          getattr(exc, "lineno", 0) or 0, getattr(exc, "offset", 0) or 0)]
    checker = _Checker(policy.allowed_modules)
    checker.visit(tree)
    return checker.violations


def _is_submodule(package: str, name: str) -> bool:
    """Whether `package.name` is a module, judged only from modules already imported here."""
    if f"{package}.{name}" in sys.modules:
        return True
    parent = sys.modules.get(package)
    return parent is not None and hasattr(parent, "__path__") and not hasattr(parent, name)


class _Checker(ast.NodeVisitor):
    def __init__(self, allowed_modules: frozenset[str]):
        self.allowed = allowed_modules
        self.violations: list[Violation] = []
        self.module_aliases: set[str] = set()  # names bound to imported modules
        self.class_depth = 0  # >0 directly inside a class body

    def _add(self, kind: str, message: str, node: ast.AST) -> None:
        self.violations.append(Violation(kind, message, getattr(node, "lineno", 0),
                                         getattr(node, "col_offset", 0)))

    # imports
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name not in self.allowed:
                self._add("import", f"import of {alias.name!r} is not allowed", node)
            self.module_aliases.add(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level:
            self._add("import", "relative imports are not allowed", node)
            return
        if module not in self.allowed:
            self._add("import", f"import from {module!r} is not allowed", node)
            return
        for alias in node.names:
            if alias.name.startswith("_"):
                self._add("import", f"import of private name {module}.{alias.name}", node)
            elif alias.name != "*" and _is_submodule(module, alias.name):
                full = f"{module}.{alias.name}"
                if full not in self.allowed:
                    self._add("import", f"import of {full!r} is not allowed", node)
                else:
                    self.module_aliases.add(alias.asname or alias.name)

    # names and attributes
    def visit_Name(self, node: ast.Name) -> None:
        name = node.id
        if name in FORBIDDEN_NAMES:
            self._add("name", f"use of {name!r} is not allowed", node)
        elif is_dunder(name) and name not in _ALLOWED_DUNDER_NAMES:
            # Class bodies may define __slots__, __hash__ = None, and the like.
            if not (self.class_depth and isinstance(node.ctx, ast.Store)):
                self._add("name", f"use of {name!r} is not allowed", node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        attr = node.attr
        if is_forbidden_attribute(attr):
            self._add("attribute", f"access to attribute {attr!r} is not allowed", node)
        elif isinstance(node.value, ast.Name) and node.value.id in self.module_aliases:
            if attr.startswith("_"):
                self._add("attribute", f"access to private {node.value.id}.{attr}", node)
            elif isinstance(node.ctx, (ast.Store, ast.Del)):
                self._add("module", f"changing module attribute {node.value.id}.{attr}", node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (isinstance(func, ast.Name) and func.id in _ATTRIBUTE_BUILTINS and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                and is_forbidden_attribute(node.args[1].value)):
            self._add("attribute", f"{func.id}(..., {node.args[1].value!r}) is not allowed", node)
        self.generic_visit(node)

    # scopes: dunder stores are fine directly in a class body, not in its methods
    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for child in node.decorator_list + node.bases + node.keywords:
            self.visit(child)
        self.class_depth += 1
        for stmt in node.body:
            self.visit(stmt)
        self.class_depth -= 1

    def _visit_function(self, node) -> None:
        saved, self.class_depth = self.class_depth, 0
        self.generic_visit(node)
        self.class_depth = saved

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_function
