"""Failing asserts that say what the values were, in autocoder's own kernels.

A model that wrote `assert count_vowels("abc") == 2` and gets back a bare `AssertionError`
cannot tell whether its function or its expected value is wrong; `count_vowels('abc') is 1,
but the assert expects 2` lets it judge. Like pytest's assertion rewriting, an IPython AST
transformer adds the message at run time; the code itself, as saved, is untouched.

Only asserts outside functions and classes are rewritten: those are the code's checks, while
an assert inside a function is part of its behaviour. Like everything in inside/, this module
imports nothing of autocoder: the sandboxed kernel cannot import the package, so the server
sends its source whole (`sandbox.kernel_exec_lines()`). The magic never installs it; the user's own kernel keeps its own asserts.
"""

from __future__ import annotations

import ast
import builtins
import sys
from typing import Any

HELPER = "_autocoder_explain"
MAX_REPR = 300
SYMBOLS = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
}


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as e:  # a broken __repr__ must not hide the failed check
        return f"<unprintable {type(value).__name__}: {e}>"
    if len(text) <= MAX_REPR:
        return text
    half = MAX_REPR // 2
    return f"{text[:half]} ... {text[-half:]}"


def is_literal(source: str) -> bool:
    try:
        ast.literal_eval(source)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return True


def explain(
    left_src: str,
    left: Any,
    op: str,
    right_src: str = "",
    right: Any = None,
    names: tuple[str, ...] = (),
) -> str:
    """The message of a failed assert: what each side of its comparison turned out to be, and
    the values of the plain variables it used (a check in a loop over cases names its inputs)."""
    where = sys._getframe(1).f_locals
    values = [
        f"{name} = {_show(where[name])}"
        for name in names
        if name in where
        and name not in (left_src, right_src)
        and not callable(where[name])
        and type(where[name]) is not type(sys)
    ][:4]
    context = f" (where {', '.join(values)})" if values else ""
    if not op:
        return f"{left_src} is {_show(left)}{context}"
    if op == "==":
        if is_literal(right_src):
            return f"{left_src} is {_show(left)}, but the assert expects {_show(right)}{context}"
        return f"{left_src} is {_show(left)}, but {right_src} is {_show(right)}{context}"
    sides = [(left_src, left), (right_src, right)]
    shown = " and ".join(f"{src} is {_show(v)}" for src, v in sides if not is_literal(src))
    return f"{left_src} {op} {right_src} is false: {shown}{context}"


def _names(*nodes: ast.expr) -> ast.expr:
    """The names of the variables the checked expressions read, not counting called functions."""
    called = {id(n.func) for node in nodes for n in ast.walk(node) if isinstance(n, ast.Call)}
    found: dict[str, None] = {}
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and id(n) not in called:
                found[n.id] = None
    return ast.Tuple([ast.Constant(name) for name in found], ast.Load())


def has_checks(node: ast.AST) -> bool:
    """Whether the code checks anything: an assert outside every function and class."""
    if isinstance(node, ast.Assert):
        return True
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
        return False
    return any(has_checks(child) for child in ast.iter_child_nodes(node))


class ExplainAsserts(ast.NodeTransformer):
    """Give each message-less top-level assert a message built from the values it compared."""

    def visit_FunctionDef(self, node: ast.AST) -> ast.AST:
        return node

    visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = visit_FunctionDef

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        if node.msg is not None:
            return node
        test = node.test
        if isinstance(test, ast.Compare) and len(test.ops) == 1:
            left, right = _capture("left", test.left), _capture("right", test.comparators[0])
            new_test: ast.expr = ast.Compare(left=left, ops=test.ops, comparators=[right])
            args = [
                ast.Constant(ast.unparse(test.left)),
                _load("left"),
                ast.Constant(SYMBOLS[type(test.ops[0])]),
                ast.Constant(ast.unparse(test.comparators[0])),
                _load("right"),
                _names(test.left, test.comparators[0]),
            ]
        elif isinstance(test, (ast.Call, ast.Name, ast.Attribute, ast.Subscript)):
            new_test = _capture("value", test)
            args = [ast.Constant(ast.unparse(test)), _load("value"), ast.Constant("")]
            args += [ast.Constant(""), ast.Constant(None), _names(test)]
        else:
            return node
        msg = ast.Call(func=ast.Name(HELPER, ast.Load()), args=args, keywords=[])
        return ast.fix_missing_locations(ast.copy_location(ast.Assert(new_test, msg), node))


def _capture(name: str, value: ast.expr) -> ast.expr:
    target = ast.Name(f"_autocoder_{name}", ast.Store())
    return ast.copy_location(ast.NamedExpr(target=target, value=value), value)


def _load(name: str) -> ast.expr:
    return ast.Name(f"_autocoder_{name}", ast.Load())


def install(shell: Any) -> None:
    """Register the transformer on an IPython shell; the helper lives in builtins so that a
    namespace reset between attempts keeps it."""
    setattr(builtins, HELPER, explain)
    if not any(type(t).__name__ == ExplainAsserts.__name__ for t in shell.ast_transformers):
        shell.ast_transformers.append(ExplainAsserts())


def install_source() -> tuple[str, str, str, str]:
    """(module name, file name, source, the call that installs it) for a fresh kernel: what
    `sandbox.install_line()` wraps, and what a forked kernel finds defined in the zygote, then
    calls."""
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    return "autocoder_asserts", "<autocoder asserts>", source, "install(get_ipython())"
