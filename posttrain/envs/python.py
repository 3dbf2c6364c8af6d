"""``python``: a code interpreter for the model, one sandboxed process per episode.

The tool ``python(code)`` runs ``code`` in the episode's sandbox (posttrain.rewards.sandbox: its own
namespaces, no network, read-only system files, rlimits, seccomp), whose ``__main__`` keeps its state
between calls as a notebook's does. The answer is what the code printed (stdout, then stderr), then the
value of a last bare expression (as a notebook shows it), then the exception if one was raised; cut
to ``max_output_chars`` characters. Each call has a wall-clock limit (``timeout`` seconds); a call that
passes it, prints more than the sandbox's output cap or kills its interpreter ends that interpreter: the
answer says so and the next call starts a fresh one (its state lost). The sandbox starts at the first
call, so an episode that never calls costs nothing.

Nothing the program prints or writes decides the score: the record's verifier reads the model's final
answer, in the trainer's process.
"""

from __future__ import annotations

import ast

from posttrain.envs.base import ToolEnv, ToolError
from posttrain.rewards.sandbox import Sandbox

PYTHON_TOOL = {"type": "function", "function": {
    "name": "python",
    "description": "Run Python code in a persistent interpreter and see what it prints.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "Python code"}},
                   "required": ["code"]}}}


def show_last_expression(code: str) -> str:
    """``code`` with a last bare expression printed (``repr``, unless None), as a notebook cell; code
    that does not parse is left as is (the interpreter reports its error)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return code
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    last = tree.body[-1]
    shown = ast.parse("__posttrain_last__ = None\nif __posttrain_last__ is not None: print(repr(__posttrain_last__))").body
    shown[0].value = last.value
    tree.body[-1:] = shown
    try:
        return ast.unparse(ast.fix_missing_locations(tree))
    except (RecursionError, ValueError):
        return code


class PythonEnv(ToolEnv):
    name = "python"
    tools = [PYTHON_TOOL]
    system_prompt = ("You can run Python with the python tool: write the computation as code and print the "
                     "result; then give the final answer.")

    def __init__(self, timeout: float = 5.0, max_output_chars: int = 2000, cpu_seconds: int = 30,
                 memory_mb: int = 512, **shaping):
        super().__init__(**shaping)
        self.timeout, self.max_output_chars = timeout, max_output_chars
        self.cpu_seconds, self.memory_mb = cpu_seconds, memory_mb

    def new_state(self, record: dict) -> dict:
        return {"sandbox": None}

    def call(self, state: dict, name: str, arguments: dict) -> str:
        code = arguments.get("code")
        if not isinstance(code, str):
            raise ToolError('python needs a string argument "code"')
        box = state["sandbox"]
        if box is None or not box.alive:
            box = state["sandbox"] = Sandbox(cpu_seconds=self.cpu_seconds, memory_mb=self.memory_mb)
        reply = box.exec(show_last_expression(code), timeout=self.timeout)
        stderr = reply.stderr
        if not reply.ok and "Traceback (most recent call last):" in stderr:  # the exception's line says it
            stderr = stderr[:stderr.index("Traceback (most recent call last):")]
        text = (reply.stdout + stderr).strip()
        if len(text) > self.max_output_chars:
            text = text[:self.max_output_chars] + f"\n... (cut at {self.max_output_chars} characters)"
        if reply.timed_out:
            text += f"\nError: the call ran past its {self.timeout:g} s limit; the interpreter was restarted (state lost)"
        elif not reply.ok:
            kind, message = reply.error["type"], reply.error["message"][:self.max_output_chars]
            if kind in ("SandboxDied", "OutputLimit"):
                text += f"\nError: {message}; the interpreter was restarted (state lost)"
            elif f"{kind}: {message}" not in text:
                text += f"\n{kind}: {message}"
        text = text.strip()
        if not reply.ok:
            raise ToolError(text.removeprefix("Error: "))  # answered as "Error: <what it printed, the exception>"
        return text or "(no output)"

    def close(self, state: dict) -> None:
        if state and state.get("sandbox") is not None:
            state["sandbox"].close()
            state["sandbox"] = None
