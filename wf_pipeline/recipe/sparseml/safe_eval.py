"""A small, safe arithmetic evaluator for the `eval(...)` strings found in SparseML recipes.

SparseML recipes compute values from top-level variables, e.g. ``end_epoch: eval(num_epochs - 2)``.
We never hand those strings to Python's ``eval``: the expression is parsed with :mod:`ast` and walked
here, allowing what SparseML recipes evaluate: numbers, variable names, arithmetic and the functions
abs/float/int/min/max/round. Every other construct (comparisons, conditionals, strings, attribute
access, ...) is rejected by name.
"""
from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

from wf_pipeline.errors import RecipeError

MAX_EXPRESSION_CHARS = 1000
MAX_EXPRESSION_NODES = 200
MAX_ABS_EXPONENT = 64  # 2**64 is plenty for epochs, sparsities and learning rates
MAX_ABS_INT = 2**63  # keeps int arithmetic cheap: no bignum blow-ups via repeated products

_HINT = "eval(...) expressions may use numbers, variable names, + - * / // % ** and min/max/round/abs/int/float"

_BINARY_OPERATORS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPERATORS: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "min": min,
    "max": max,
    "round": round,
    "abs": abs,
    "int": int,
    "float": float,
}

# Friendly names for the constructs people most often try, so the error says what was refused.
_FORBIDDEN_NAMES: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access ('.')",
    ast.Subscript: "indexing/subscripts ('[...]')",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "generator expressions",
    ast.List: "list literals",
    ast.Tuple: "tuple literals",
    ast.Dict: "dict literals",
    ast.Set: "set literals",
    ast.Starred: "star-unpacking",
    ast.NamedExpr: "assignment expressions (':=')",
    ast.JoinedStr: "f-strings",
    ast.Compare: "comparisons",
    ast.BoolOp: "and/or",
    ast.IfExp: "conditional expressions ('a if c else b')",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}


class ExpressionError(RecipeError):
    """An eval(...) expression is malformed, unsafe, or refers to something undefined."""


def is_eval_string(value: Any) -> bool:
    """True for SparseML's ``"eval(<expression>)"`` strings."""
    if not isinstance(value, str):
        return False
    text = value.strip()
    return text.startswith("eval(") and text.endswith(")")


def eval_body(value: str) -> str:
    """The expression inside ``eval(...)``."""
    return value.strip()[len("eval(") : -1]


def evaluate_expression(expression: str, variables: Mapping[str, Any]) -> Any:
    """Evaluate one arithmetic expression over ``variables`` without Python's eval/exec.

    A bare variable name returns that variable's value whatever its type (SparseML recipes use
    ``eval(prune_params)`` to reuse a list, ``eval(inter_func)`` a string); arithmetic only accepts numbers.
    """
    tree = _parse(expression)
    return _Evaluator(expression, variables).visit(tree.body)


def referenced_names(expression: str) -> set[str]:
    """Names an expression reads (function names in call position excluded)."""
    tree = _parse(expression)
    called = {
        id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and id(node) not in called}


def resolve_variables(raw: Mapping[str, Any], errors: list[ExpressionError] | None = None) -> dict[str, Any]:
    """Evaluate every ``eval(...)`` variable, in dependency order; other values pass through.

    Raises ExpressionError naming the variable for unknown names and for dependency cycles; with an `errors`
    list, collects every variable's error there instead (once each) and returns the variables that resolved.
    """
    resolved: dict[str, Any] = {}
    visiting: list[str] = []

    def resolve(name: str) -> Any:
        if name in resolved:
            return resolved[name]
        value = raw[name]
        if not is_eval_string(value):
            resolved[name] = value
            return value
        if name in visiting:
            cycle = " -> ".join(visiting[visiting.index(name) :] + [name])
            raise ExpressionError(
                f"recipe variables form a cycle: {cycle}",
                hint="give one of these variables a plain number instead of an eval(...) expression",
            )
        visiting.append(name)
        body = eval_body(value)
        try:
            for dependency in sorted(referenced_names(body)):
                if dependency in raw:
                    resolve(dependency)
            result = evaluate_expression(body, resolved)
        except ExpressionError as exc:
            if exc.message.startswith("recipe variable"):  # already names its variable (or the cycle)
                raise
            raise ExpressionError(f"recipe variable '{name}': {exc.message}", hint=exc.hint) from exc
        finally:
            visiting.pop()
        resolved[name] = result
        return result

    for variable in raw:
        try:
            resolve(variable)
        except ExpressionError as exc:
            if errors is None:
                raise
            if all(exc.message != seen.message for seen in errors):
                errors.append(exc)
    return resolved


def _parse(expression: str) -> ast.Expression:
    if not isinstance(expression, str):
        raise ExpressionError(f"expected an expression string, got {type(expression).__name__}", hint=_HINT)
    text = expression.strip()
    if not text:
        raise ExpressionError("empty eval() expression", hint=_HINT)
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(
            f"eval() expression is {len(text)} characters long (limit {MAX_EXPRESSION_CHARS})",
            hint="split it into several recipe variables",
        )
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"cannot parse eval({text}): {exc.msg}", hint=_HINT) from exc
    node_count = sum(1 for _ in ast.walk(tree))
    if node_count > MAX_EXPRESSION_NODES:
        raise ExpressionError(
            f"eval({text}) is too complex ({node_count} syntax nodes, limit {MAX_EXPRESSION_NODES})",
            hint="split it into several recipe variables",
        )
    return tree


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return type(value).__name__


class _Evaluator:
    def __init__(self, expression: str, variables: Mapping[str, Any]) -> None:
        self.expression = expression.strip()
        self.variables = variables

    def fail(self, message: str, hint: str = _HINT) -> ExpressionError:
        return ExpressionError(f"in eval({self.expression}): {message}", hint=hint)

    def visit(self, node: ast.AST) -> Any:
        handler = getattr(self, f"visit_{type(node).__name__}", None)
        if handler is None:
            what = _FORBIDDEN_NAMES.get(type(node), f"'{type(node).__name__}' syntax")
            raise self.fail(f"{what} is not allowed")
        return handler(node)

    def visit_Constant(self, node: ast.Constant) -> Any:
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return self._checked(node.value)
        raise self.fail(f"constant {node.value!r} of type {_type_name(node.value)} is not allowed (numbers only)")

    def visit_Name(self, node: ast.Name) -> Any:
        name = node.id
        if name.startswith("__"):
            raise self.fail(f"name '{name}' is not allowed (double-underscore names are refused)")
        if name in self.variables:
            return self.variables[name]
        if name in _FUNCTIONS:
            raise self.fail(f"'{name}' is a function: call it, e.g. {name}(a, b)")
        known = ", ".join(sorted(self.variables)) or "none"
        raise self.fail(f"unknown variable '{name}'", hint=f"define it at the top of the recipe (known: {known})")

    def visit_BinOp(self, node: ast.BinOp) -> Any:
        op = _BINARY_OPERATORS.get(type(node.op))
        if op is None:
            raise self.fail(f"operator {type(node.op).__name__} is not allowed")
        left, right = self.visit(node.left), self.visit(node.right)
        if not (_is_number(left) and _is_number(right)):
            raise self.fail(
                f"arithmetic needs numbers, got {_type_name(left)} and {_type_name(right)}"
            )
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_ABS_EXPONENT:
                raise self.fail(f"exponent {right} is too large (limit {MAX_ABS_EXPONENT})")
            if left == 0 and right < 0:
                raise self.fail("zero raised to a negative power")
        try:
            result = op(left, right)
        except ZeroDivisionError as exc:
            raise self.fail("division by zero") from exc
        except (OverflowError, ValueError) as exc:
            raise self.fail(f"arithmetic error: {exc}") from exc
        return self._checked(result)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Any:
        op = _UNARY_OPERATORS.get(type(node.op))
        if op is None:
            raise self.fail(f"operator {type(node.op).__name__} is not allowed")
        operand = self.visit(node.operand)
        if not _is_number(operand):
            raise self.fail(f"unary {'-' if isinstance(node.op, ast.USub) else '+'} needs a number")
        return self._checked(op(operand))

    def visit_Call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name):
            self.visit(node.func)  # names the refused construct (lambda, attribute, ...) where there is one
            raise self.fail("only the functions min, max, round, abs, int and float may be called")
        name = node.func.id
        function = _FUNCTIONS.get(name)
        if function is None:
            raise self.fail(f"function '{name}' is not allowed")
        if node.keywords:
            raise self.fail(f"keyword arguments to {name}() are not allowed")
        args = [self.visit(arg) for arg in node.args]
        if not args:
            raise self.fail(f"{name}() needs at least one argument")
        if not all(_is_number(arg) for arg in args):
            raise self.fail(f"{name}() needs numbers, got {', '.join(_type_name(a) for a in args)}")
        if name in ("abs", "int", "float") and len(args) != 1:
            raise self.fail(f"{name}() takes exactly one argument")
        if name == "round" and len(args) > 2:
            raise self.fail("round() takes one or two arguments")
        if name in ("min", "max") and len(args) < 2:
            raise self.fail(f"{name}() needs at least two arguments")
        try:
            return self._checked(function(*args))
        except (OverflowError, ValueError, TypeError) as exc:
            raise self.fail(f"{name}() failed: {exc}") from exc

    def _checked(self, value: Any) -> Any:
        if not _is_number(value):  # e.g. (-8) ** 0.5 is complex
            raise self.fail(f"result {value!r} is not a real number")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(f"result {value} is not a finite number")
        if isinstance(value, int) and abs(value) > MAX_ABS_INT:
            raise self.fail("integer result is too large (limit 2**63)")
        return value

