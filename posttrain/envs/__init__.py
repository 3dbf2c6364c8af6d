"""Environments for multi-turn tool use (posttrain.envs.base has the interface): ``python`` (a sandboxed
interpreter), ``search`` (a ``posttrain data index`` datastore), and environments of the ``verifiers``
library through its adapter (``openenv:<module>:<Class>``, posttrain.envs.openenv_adapter).
``make_env(name, **args)`` builds one by name."""

from __future__ import annotations

from posttrain.errors import UserError

BUILTIN = ("python", "search")


def make_env(name: str, **args):
    try:
        if name.startswith("openenv:"):
            from posttrain.envs.openenv_adapter import OpenEnvAdapter

            return OpenEnvAdapter(name.removeprefix("openenv:"), **args)
        if name == "python":
            from posttrain.envs.python import PythonEnv

            return PythonEnv(**args)
        if name == "search":
            from posttrain.envs.search import SearchEnv

            return SearchEnv(**args)
    except TypeError as e:
        raise UserError(f"env {name}: {e}") from None
    raise UserError(f"env: unknown environment {name!r}; expected one of {', '.join(BUILTIN)} or openenv:<module>:<Class>")
