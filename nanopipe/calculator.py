"""
The calculator tool of the chat models: when a model writes <|python_start|> expr <|python_end|>, the engine
feeds it <|output_start|> use_calculator(expr) <|output_end|> (nothing when the result is None).

    use_calculator("48/2")                        # '24.0': nanochat's answer, Python's str() of the value
    use_calculator("1,200 + 3")                   # '1203': commas are dropped
    use_calculator("'strawberry'.count('r')")     # '3'
    use_calculator("2**10"), use_calculator("7 % 3")                  # None, None: nanochat refuses both
    use_calculator("2**10", extended=True)        # '1024': ours, with ** and %, '24' for 48/2

By default the calculator gives nanochat's outputs and refusals (its tool outputs are part of what a model
learns and is scored on): an expression of digits, `+ - * / // ( ) .` and spaces is arithmetic (`**` refused);
otherwise one of quotes, letters, digits, `( ) . _` and spaces that calls `.count(` and names nothing
dangerous is a string count; anything else gets no output. Unlike nanochat it never calls eval: both kinds go
through a whitelist walk over Python's AST, which accepts numbers, the arithmetic operators, unary signs and
`'literal'.count('literal')` (after argument-free methods such as .lower()) only, within size bounds: over
CALC_MAX_CHARS characters, or a value that is not a finite number, gets no output here where nanochat's eval
may give one (`()`, `inf`, `'a'.count('a').real`).

`extended=True` is nanopipe's own calculator, an explicit option: `%` and `**` (bounded), commas only as
thousands separators, count calls inside arithmetic, and results formatted as GSM8K writes them (integral
values without '.0', others rounded to 6 decimals).
"""

from __future__ import annotations

import ast
import math
import re
import warnings

CALC_MAX_CHARS = 1000       # longer "expressions" are rejected before parsing
CALC_MAX_INT_BITS = 4096    # above any product 1000 characters can write without **; bounds ** in extended mode
CALC_MAX_STRING_CHARS = 10_000

ARITHMETIC_CHARS = frozenset("0123456789*+-/.() ")
COUNT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
# nanochat gives no output for a count expression containing any of these (in any case, anywhere in it,
# string literals included: 'directory'.count('d') gets no output either)
# argument-free string methods allowed before .count (nanochat evaluates "'Hello'.lower().count('l')")
STRING_METHODS = frozenset({"lower", "upper", "strip", "lstrip", "rstrip", "title", "capitalize", "casefold",
                            "swapcase"})
REFUSED_WORDS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals",
                 "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")

_BINARY_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}


class CalculatorError(ValueError):
    """The expression is outside what the calculator evaluates (or its value is out of range)."""


def _check_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalculatorError(f"not a real number: {value!r}")
    if isinstance(value, int) and value.bit_length() > CALC_MAX_INT_BITS:
        raise CalculatorError(f"integer over {CALC_MAX_INT_BITS} bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError(f"non-finite result {value}")
    return value


def _power(base, exponent):
    if isinstance(base, int) and isinstance(exponent, int) and exponent >= 0:
        # |base ** exponent| has about bit_length(base) * exponent bits: refuse before computing it
        if abs(base) > 1 and base.bit_length() * exponent > CALC_MAX_INT_BITS + 64:
            raise CalculatorError(f"{base} ** {exponent} is too large")
        if abs(base) <= 1 and exponent > CALC_MAX_INT_BITS:
            raise CalculatorError(f"exponent {exponent} is too large")
    elif abs(exponent) > CALC_MAX_INT_BITS:
        raise CalculatorError(f"exponent {exponent} is too large")
    return base ** exponent  # float overflow raises OverflowError; a complex result fails _check_number


def _evaluate(node):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str):
            if len(node.value) > CALC_MAX_STRING_CHARS:
                raise CalculatorError("string literal too long")
            return node.value
        return _check_number(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _check_number(_evaluate(node.operand))
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and (type(node.op) in _BINARY_OPS or isinstance(node.op, ast.Pow)):
        left = _check_number(_evaluate(node.left))
        right = _check_number(_evaluate(node.right))
        if isinstance(node.op, ast.Pow):
            return _check_number(_power(left, right))
        return _check_number(_BINARY_OPS[type(node.op)](left, right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.keywords:
        method, args = node.func.attr, node.args
        if method == "count" and len(args) == 1 and isinstance(args[0], ast.Constant) and isinstance(
                args[0].value, str):
            return _string(node.func.value).count(_evaluate(args[0]))
        if method in STRING_METHODS and not args:
            return getattr(_string(node.func.value), method)()
    raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


def _string(node) -> str:
    """A string literal, or one transformed by STRING_METHODS ('Hello'.lower())."""
    value = _evaluate(node)
    if not isinstance(value, str):
        raise CalculatorError(f"not a string: {value!r}")
    return value


def evaluate_expression(expr: str) -> int | float:
    """Value of an arithmetic expression (+ - * / // % **, parentheses, unary signs) or of
    `'literal'.count('literal')`, commas between digit groups read as thousands separators. Raises
    CalculatorError for anything else."""
    if len(expr) > CALC_MAX_CHARS:
        raise CalculatorError(f"expression longer than {CALC_MAX_CHARS} characters")
    if "'" not in expr and '"' not in expr:
        expr = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", expr)  # thousands separators: 1,200 -> 1200
    try:
        with warnings.catch_warnings():  # a model's '5or 1' would print Python's SyntaxWarning into the stage log
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise CalculatorError(f"cannot parse {expr!r}: {err}") from None
    try:
        value = _evaluate(tree)
    except (ArithmeticError, RecursionError) as err:  # ZeroDivisionError, OverflowError
        raise CalculatorError(f"{type(err).__name__}: {err}") from None
    return _check_number(value)


def format_number(value: int | float) -> str:
    """The extended calculator's output: integers plainly (48/2 -> '24', as GSM8K writes it), other floats
    rounded to 6 decimals."""
    if isinstance(value, float):
        rounded = round(value, 6)
        if rounded.is_integer() and abs(rounded) < 1e15:
            return str(int(rounded))
        return repr(rounded)
    return str(value)


def nanochat_expression(expr: str) -> str | None:
    """The expression nanochat's calculator would evaluate (commas dropped), or None where it gives no
    output whatever the expression's value."""
    expr = expr.replace(",", "")
    chars = set(expr)
    if chars <= ARITHMETIC_CHARS:
        return None if "**" in expr else expr
    if chars <= COUNT_CHARS and ".count(" in expr and not any(w in expr.lower() for w in REFUSED_WORDS):
        return expr
    return None


def use_calculator(expr: str, extended: bool = False) -> str | None:
    """The tool's output for `expr`, or None when the calculator gives none (see the module docstring)."""
    try:
        if extended:
            return format_number(evaluate_expression(expr))
        accepted = nanochat_expression(expr)
        return None if accepted is None else str(evaluate_expression(accepted))
    except CalculatorError:
        return None
