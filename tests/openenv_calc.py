"""Two environments written for OpenEnv (``openenv-core``) as their users write them, for
tests/test_openenv.py: ``CalcEnv``, an MCP environment with an ``add`` tool that ends the episode with
reward 1 when asked for 42; ``GuessEnv``, a text game (one string action, a hint per guess)."""

from uuid import uuid4

from fastmcp import FastMCP
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.mcp_environment import MCPEnvironment
from openenv.core.env_server.types import Action, Observation, State


class CalcEnv(MCPEnvironment):
    def __init__(self, target: int = 42):
        mcp = FastMCP("calc")

        @mcp.tool
        def add(a: int, b: int) -> int:
            """Add two integers."""
            return a + b

        @mcp.tool
        def submit(value: int) -> str:
            """Submit the final value."""
            self.submitted = value
            return "submitted"

        super().__init__(mcp)
        self.target, self.submitted = target, None
        self._state = State(episode_id=str(uuid4()), step_count=0)

    def reset(self, seed=None, episode_id=None, **kwargs):
        self._state = State(episode_id=str(uuid4()), step_count=0)
        return Observation(done=False, reward=None)

    def step(self, action, timeout_s=None, **kwargs):
        obs = super().step(action, timeout_s=timeout_s, **kwargs)
        if self.submitted is not None:
            obs.done, obs.reward = True, float(self.submitted == self.target)
        return obs

    def _step_impl(self, action, timeout_s=None, **kwargs):
        return Observation(done=False, reward=None)

    @property
    def state(self):
        return self._state


class GuessAction(Action):
    guess: str


class GuessObservation(Observation):
    hint: str = ""


class GuessEnv(Environment):
    def __init__(self, secret: int = 7):
        super().__init__()
        self.secret = secret
        self._state = State(episode_id=str(uuid4()), step_count=0)

    def reset(self, seed=None, episode_id=None, **kwargs):
        return GuessObservation(hint="Guess a number from 1 to 10.")

    def step(self, action, timeout_s=None, **kwargs):
        self._state.step_count += 1
        n = int(action.guess.strip()) if action.guess.strip().isdigit() else -1
        if n == self.secret:
            return GuessObservation(hint="right", done=True, reward=1.0)
        return GuessObservation(hint="higher" if n < self.secret else "lower")

    @property
    def state(self):
        return self._state
