"""Failing top-level asserts report their values; everything else about the code is unchanged."""

from __future__ import annotations

import ast
import builtins

import pytest

from autocoder.inside import asserts
from autocoder.sandbox import install_line


def run(code: str) -> str:
    """Run `code` as the kernel would after the rewrite; the failed assert's message."""
    tree = asserts.ExplainAsserts().visit(ast.parse(code))
    setattr(builtins, asserts.HELPER, asserts.explain)
    namespace: dict[str, object] = {}
    try:
        exec(compile(tree, "<cell>", "exec"), namespace)
    except AssertionError as e:
        return str(e)
    return "passed"


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("def f(x):\n    return x + 1\nassert f(3) == 5", "f(3) is 4, but the assert expects 5"),
        ("a, b = 1, 2\nassert a == b", "a is 1, but b is 2"),
        ("xs = [1]\nassert 2 in xs", "2 in xs is false: xs is [1]"),
        ("n = 7\nassert n < 3", "n < 3 is false: n is 7"),
        ("ok = lambda: 0\nassert ok()", "ok() is 0"),
        ("assert 1 == 2, 'mine'", "mine"),
        ("assert 1 == 1", "passed"),
    ],
)
def test_messages(code: str, message: str) -> None:
    assert run(code) == message


def test_each_side_is_evaluated_once() -> None:
    code = "calls = []\ndef f():\n    calls.append(1)\n    return 1\nassert f() == 2"
    tree = asserts.ExplainAsserts().visit(ast.parse(code))
    namespace: dict[str, list[int]] = {}
    with pytest.raises(AssertionError):
        exec(compile(tree, "<cell>", "exec"), namespace)
    assert namespace["calls"] == [1]


def test_asserts_in_functions_and_classes_are_left_alone() -> None:
    code = "def f(x):\n    assert x == 1\nclass C:\n    assert True == True\n"
    tree = asserts.ExplainAsserts().visit(ast.parse(code))
    assert ast.unparse(tree) == ast.unparse(ast.parse(code))


def test_a_broken_repr_does_not_hide_the_failure() -> None:
    code = (
        "class Bad:\n    def __repr__(self):\n        raise RuntimeError('no')\nassert Bad() == 1"
    )
    assert run(code) == "Bad() is <unprintable Bad: no>, but the assert expects 1"


def test_long_values_are_cut() -> None:
    message = run("assert list(range(10_000)) == []")
    assert " ... " in message and len(message) < 2 * asserts.MAX_REPR


def test_the_kernel_line_installs_it() -> None:
    class Shell:
        ast_transformers: list[ast.NodeTransformer] = []

    def get_ipython() -> Shell:
        return shell

    shell = Shell()
    exec(install_line(asserts.install_source()), {"get_ipython": get_ipython})
    exec(install_line(asserts.install_source()), {"get_ipython": get_ipython})
    assert len(shell.ast_transformers) == 1


@pytest.mark.parametrize(
    ("code", "checks"),
    [
        ("assert f(1) == 2", True),
        ("for x in xs:\n    if x:\n        assert g(x)", True),
        ("def f(n):\n    assert n > 0\n    return n\nprint(f(1))", False),
        ("class C:\n    assert True\n", False),
        ("print(1)", False),
    ],
)
def test_only_asserts_outside_functions_count_as_checks(code: str, checks: bool) -> None:
    assert asserts.has_checks(ast.parse(code)) is checks
