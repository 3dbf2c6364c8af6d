"""OpenEnv environments run unchanged through posttrain.envs.openenv_adapter: an MCP environment's tools
are listed and called, its reward ends the episode; a text game takes the model's turns as actions."""

import json

import pytest

pytest.importorskip("openenv.core.env_server.mcp_environment")

from test_envs import RECORD, Scripted  # noqa: E402

from posttrain.data import chat  # noqa: E402
from posttrain.envs import make_env  # noqa: E402
from posttrain.envs.rollout import run_episodes  # noqa: E402
from posttrain.errors import UserError  # noqa: E402
from posttrain.inference.engine import SamplingParams  # noqa: E402
from posttrain.models import load_tokenizer  # noqa: E402


@pytest.fixture()
def chatml(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    chat.apply_template(tok, chat.CHATML)
    return tok


def tool(name, **args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def test_an_mcp_environment_lists_and_runs_its_tools(chatml):
    env = make_env("openenv:openenv_calc:CalcEnv", target=42)
    turns = [tool("add", a=40, b=2), tool("add", a="x", b=2), tool("submit", value=42)]
    [ep] = run_episodes(Scripted(chatml, turns), env, [RECORD], SamplingParams(max_new_tokens=400), max_turns=4)
    start = env.reset(RECORD)
    assert {t["function"]["name"] for t in start.tools} == {"add", "submit"}
    add = next(t for t in start.tools if t["function"]["name"] == "add")["function"]
    assert add["description"] == "Add two integers." and set(add["parameters"]["properties"]) == {"a", "b"}
    env.close(start.state)
    tool_turns = [m for m in ep.messages if m["role"] == "tool"]
    assert tool_turns[0] == {"role": "tool", "name": "add", "content": "42"}
    assert tool_turns[1]["content"].startswith("Error: ")  # a bad argument: the environment's error, the run goes on
    assert (ep.finish_reason, ep.turns, ep.env_reward, ep.tool_errors) == ("stop", 3, 1.0, 1)
    # the tools were listed in the prompt the model saw (default format)
    assert '"name": "submit"' in chatml.decode(chat.prompt_ids(chatml, start.messages, start.tools))


def test_a_text_game_takes_turns_as_actions(chatml):
    env = make_env("openenv:openenv_calc:GuessEnv", secret=7, text_action="openenv_calc:GuessAction")
    [ep] = run_episodes(Scripted(chatml, ["3", "9", "7"]), env, [RECORD], SamplingParams(max_new_tokens=400), max_turns=5)
    assert ep.messages[1] == {"role": "user", "content": "Guess a number from 1 to 10."}
    assert [m["content"] for m in ep.messages if m["role"] == "user"][2:] == ["higher", "lower"]
    assert (ep.turns, ep.env_reward, ep.finish_reason) == (3, 1.0, "stop")


def test_bad_specs_are_user_errors():
    with pytest.raises(UserError, match="env openenv 'nomodule:X': cannot import nomodule"):
        make_env("openenv:nomodule:X")
    with pytest.raises(UserError, match="env openenv 'openenv_calc:Nope': openenv_calc has no Nope"):
        make_env("openenv:openenv_calc:Nope")
    with pytest.raises(UserError, match="text_action 'openenv_calc:GuessObservation': not an OpenEnv Action class"):
        make_env("openenv:openenv_calc:GuessEnv", text_action="openenv_calc:GuessObservation")
