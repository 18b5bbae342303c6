"""Safe arithmetic for `${hcp.eval:"..."}`: walks the `ast` of numbers and operators, never `eval`."""
from __future__ import annotations

import ast
import math
import operator
from typing import Callable, Union

from hcpdiff.errors import ConfigError

Number = Union[int, float]

_BINARY_OPS: dict[type, Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type, Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTIONS: dict[str, Callable[..., Number]] = {
    "min": min, "max": max, "abs": abs, "round": round, "int": int, "float": float,
    "sqrt": math.sqrt, "floor": math.floor, "ceil": math.ceil, "log": math.log, "log2": math.log2,
    "exp": math.exp,
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}

# Bounds so that a config cannot make the loader hang computing a gigantic power.
MAX_EXPONENT = 10_000
MAX_RESULT_BITS = 100_000


def _power(base: Number, exponent: Number, expression: str) -> Number:
    """`base ** exponent`, refused when the exponent or the integer result would be enormous."""
    too_big = abs(exponent) > MAX_EXPONENT
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        too_big = too_big or abs(base).bit_length() * exponent > MAX_RESULT_BITS
    if too_big:
        raise ConfigError(f"hcp.eval: the power in '{expression}' is too large to compute.")
    result = base ** exponent
    if isinstance(result, complex):
        raise ConfigError(f"hcp.eval: '{expression}' has no real value.")
    return result


class _Evaluator:
    """Evaluates one parsed expression, allowing only numbers, operators and FUNCTIONS / CONSTANTS."""

    def __init__(self, expression: str) -> None:
        self.expression = expression

    def refuse(self) -> ConfigError:
        return ConfigError(
            f"hcp.eval: only arithmetic is allowed, got '{self.expression}' "
            f"(numbers, + - * / // % **, parentheses, {', '.join(FUNCTIONS)}, {', '.join(CONSTANTS)}).")

    def value(self, node: ast.AST) -> Number:
        if isinstance(node, ast.Expression):
            return self.value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.Name) and node.id in CONSTANTS:
            return CONSTANTS[node.id]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
            return _UNARY_OPS[type(node.op)](self.value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            left, right = self.value(node.left), self.value(node.right)
            if isinstance(node.op, ast.Pow):
                return _power(left, right, self.expression)
            return _BINARY_OPS[type(node.op)](left, right)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
                and not node.keywords):
            return FUNCTIONS[node.func.id](*(self.value(arg) for arg in node.args))
        raise self.refuse()


def eval_arithmetic(expression: str) -> Number:
    """The value of an arithmetic expression; ints stay ints, `/` gives a float; anything else is a ConfigError."""
    evaluator = _Evaluator(expression)
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as err:
        raise evaluator.refuse() from err
    try:
        return evaluator.value(tree)
    except (ArithmeticError, ValueError, TypeError) as err:
        raise ConfigError(f"hcp.eval: cannot compute '{expression}': {err}.") from err
