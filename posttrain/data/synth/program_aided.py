"""Tool-use trajectories from GSM8K solutions: each solution's calculator steps become one program for
the ``python`` tool (program-aided reasoning: turn the problem into code, get the number by running it).

A GSM8K solution marks every computation as ``<<expr=result>>``. The steps become one line each,
``x1 = 48 / 2``, ``x2 = 48 + x1``, ..., then ``print(xN)``: a literal that is a previous step's result
and not a number of the question is replaced by that step's name, so the program is a chain of the
question's numbers rather than a list of answers. The program is checked before it is kept: every
step, evaluated with Python's own arithmetic (an AST walk that admits numbers, earlier names and
``+ - * / // % **``, nothing else), must equal its annotated result, and the last the final answer.
The trajectory is then

    system  the environment's prompt (its tools rendered by the chat template)
    user    the question and the GSM8K task's instruction (as ``posttrain eval --tasks gsm8k`` asks it)
    assistant  a ``python`` call with the program
    tool    what the program prints (``str`` of the last value: what the interpreter prints)
    assistant  ``#### N``

No model is involved; a solution whose steps do not check costs a record, never a wrong one.
"""

from __future__ import annotations

import ast
import operator
import re

STEP = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


class Unchecked(ValueError):
    """A step that does not parse, uses something other than arithmetic, or misses its result."""


def steps(answer: str) -> list[tuple[str, str]]:
    """The ``(expression, result)`` calculator annotations of a GSM8K solution, in order."""
    return [(e.strip(), r.strip()) for e, r in STEP.findall(answer.rpartition("####")[0])]


def _number(text: str) -> float:
    try:
        return float(text.replace(",", "").replace("$", "").rstrip("."))
    except ValueError:
        raise Unchecked(f"result {text!r} is not a number") from None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def evaluate(node: ast.AST, names: dict[str, int | float]) -> int | float:
    """The value of an arithmetic expression tree, by Python's own operators."""
    if isinstance(node, ast.Expression):
        return evaluate(node.body, names)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = evaluate(node.operand, names)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = evaluate(node.left, names), evaluate(node.right, names)
        if isinstance(node.op, ast.Pow) and abs(right) > 16:
            raise Unchecked("an exponent above 16")
        try:
            return _OPS[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as e:
            raise Unchecked(str(e)) from None
    raise Unchecked(f"{type(node).__name__} is not arithmetic")


class _Chain(ast.NodeTransformer):
    """Literals that are earlier results (and not numbers of the question) become those steps' names."""

    def __init__(self, results: list[tuple[str, float]], question_numbers: set[float]):
        self.results, self.question_numbers = results, question_numbers

    def visit_Constant(self, node: ast.Constant):
        if type(node.value) not in (int, float) or any(_close(node.value, q) for q in self.question_numbers):
            return node
        for name, value in reversed(self.results):
            if _close(node.value, value):
                return ast.copy_location(ast.Name(id=name, ctx=ast.Load()), node)
        return node


def program(question: str, answer: str) -> tuple[str, str]:
    """``(code, printed)``: the solution's steps as a checked program and what it prints; raises
    ``Unchecked`` when a step does not check or there is none."""
    found = steps(answer)
    if not found:
        raise Unchecked("no calculator steps")
    final = _number(answer.rpartition("####")[2].strip())
    question_numbers = {float(n) for n in _NUMBER.findall(question.replace(",", ""))}
    names: dict[str, int | float] = {}
    results: list[tuple[str, float]] = []
    lines = []
    for i, (expr, result) in enumerate(found, 1):
        try:
            tree = ast.parse(expr.replace("x", "*").replace("^", "**").replace(",", ""), mode="eval")
        except (SyntaxError, ValueError, RecursionError) as e:
            raise Unchecked(f"step {i} {expr!r} does not parse") from e
        tree = ast.fix_missing_locations(_Chain(results, question_numbers).visit(tree))
        value = evaluate(tree, names)
        if not _close(value, _number(result)):
            raise Unchecked(f"step {i} {expr!r} is {value}, not {result}")
        name = f"x{i}"
        names[name] = value
        results.append((name, _number(result)))
        lines.append(f"{name} = {ast.unparse(tree.body)}")
    if not _close(names[name], final):
        raise Unchecked(f"the last step is {names[name]}, the answer {final}")
    return "\n".join(lines + [f"print({name})"]), str(names[name])


def trajectory(question: str, answer: str, instruction: str, system_prompt: str, tools: list[dict]) -> dict:
    """The SFT record of one solution (module docstring); raises ``Unchecked``."""
    code, printed = program(question, answer)
    final = answer.rpartition("####")[2].strip().replace(",", "")
    call = {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question + instruction},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "python", "content": printed},
        {"role": "assistant", "content": f"#### {final}"}]
    return {"messages": messages, "tools": tools}
