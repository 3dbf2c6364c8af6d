"""Environments and multi-turn episodes (posttrain.envs): a scripted engine whose turns are known, so
the episode's token sequence and its mask of model tokens can be checked against the rendered
conversation; malformed calls, broken tools and hostile programs answered as error turns; the turn
and token limits; the same seed, the same episodes on a real (tiny) model."""

import json

import pytest

from posttrain.data import chat, records
from posttrain.envs import make_env
from posttrain.envs.rollout import run_episodes
from posttrain.errors import UserError
from posttrain.inference.engine import Completion, SamplingParams, TransformersEngine
from posttrain.models import load_model, load_tokenizer


def call(code: str) -> str:
    return "<tool_call>\n" + json.dumps({"name": "python", "arguments": {"code": code}}) + "\n</tool_call>"


class Scripted:
    """An engine that answers the k-th turn of every episode with ``turns[k]`` (tokenized, then the stop
    token), and records the prompts it was given."""

    def __init__(self, tokenizer, turns: list[str], stop: bool = True):
        self.tokenizer, self.turns, self.stop = tokenizer, turns, stop
        self.stop_ids = chat.stop_token_ids(tokenizer)
        if "<|im_end|>" in tokenizer.chat_template:  # the template's own end of turn, as a trained model stops
            self.stop_ids.insert(0, tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self.calls: list[list[list[int]]] = []

    def generate(self, prompts, sampling):
        self.calls.append(prompts)
        text = self.turns[len(self.calls) - 1]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + ([self.stop_ids[0]] if self.stop else [])
        ids = ids[:sampling.max_new_tokens]
        cut = len(ids) < len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + self.stop
        return [Completion(text, list(ids), "length" if cut or not self.stop else "stop", i, [-0.5] * len(ids))
                for i in range(len(prompts))]


@pytest.fixture()
def chatml(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    chat.apply_template(tok, chat.CHATML)
    return tok


RECORD = {"messages": [{"role": "user", "content": "What is 123 * 456?"}], "ground_truth": "56088", "verifier": "gsm8k"}


def test_an_episode_is_one_sequence_with_only_the_model_tokens_masked_in(chatml):
    turns = ["I will compute it.\n" + call("x = 123 * 456\nprint(x)"), "123 * 456 = 56088. #### 56088"]
    engine = Scripted(chatml, turns)
    env = make_env("python")
    [ep] = run_episodes(engine, env, [RECORD], SamplingParams(max_new_tokens=400), max_turns=4, max_tokens=2000)
    assert (ep.turns, ep.tool_calls, ep.tool_errors, ep.malformed, ep.finish_reason) == (2, 1, 0, 0, "stop")
    assert ep.text == turns[1]
    # the trajectory in record form: a valid SFT record, the call structured, the result a tool turn
    assert ep.messages[-3:] == [
        {"role": "assistant", "content": "I will compute it.",
         "tool_calls": [{"type": "function", "function": {"name": "python", "arguments": {"code": "x = 123 * 456\nprint(x)"}}}]},
        {"role": "tool", "name": "python", "content": "56088"},
        {"role": "assistant", "content": turns[1]}]
    rec = records.sft_record({"messages": ep.messages, "tools": env.tools}, "episode")
    # the sequence is the rendered conversation, model turns as they were written
    raw = ep.messages[:-3] + [{"role": "assistant", "content": turns[0]}, ep.messages[-2], ep.messages[-1]]
    prompt = chat.prompt_ids(chatml, ep.messages[:-3], env.tools)
    assert engine.calls[0] == [prompt]
    decoded = chatml.decode(prompt + ep.token_ids, clean_up_tokenization_spaces=False)
    assert decoded + "\n" == chat.render(chatml, raw, tools=env.tools)
    pieces = [chatml.decode([t], clean_up_tokenization_spaces=False) for t in ep.token_ids]
    model_text = "".join(p for p, m in zip(pieces, ep.model_mask) if m)
    assert model_text == turns[0] + "<|im_end|>" + turns[1] + "<|im_end|>"
    env_text = "".join(p for p, m in zip(pieces, ep.model_mask) if not m)
    assert env_text == "\n<|im_start|>tool\n56088<|im_end|>\n<|im_start|>assistant\n"
    assert ep.logprobs == [-0.5 if m else 0.0 for m in ep.model_mask]
    # the second turn's prompt is the whole sequence before it
    assert engine.calls[1] == [prompt + ep.token_ids[:ep.model_mask.index(1, ep.model_mask.index(0))]]
    # SFT on the trajectory trains what the model said (calls written in the default format)
    t = chat.tokenize_conversation(chatml, rec["messages"], 10_000, tools=rec["tools"])
    sft_trained = "".join(chatml.decode([i], clean_up_tokenization_spaces=False)
                          for i, m in zip(t.input_ids, t.labels_mask) if m)
    assert sft_trained == ("I will compute it.\n" + call("x = 123 * 456\nprint(x)") + "<|im_end|>\n"
                           + turns[1] + "<|im_end|>\n")


def test_the_tulu_template_answers_tools_as_user_turns(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    chat.apply_template(tok, chat.TULU)
    turns = [call("print(6 * 7)"), "#### 42"]
    [ep] = run_episodes(Scripted(tok, turns), make_env("python"), [RECORD], SamplingParams(max_new_tokens=400))
    pieces = [tok.decode([t], clean_up_tokenization_spaces=False) for t in ep.token_ids]
    assert "".join(p for p, m in zip(pieces, ep.model_mask) if not m) == \
        "\n<|user|>\n<tool_response>\n42\n</tool_response>\n<|assistant|>\n"
    assert "".join(p for p, m in zip(pieces, ep.model_mask) if m) == turns[0] + "</s>" + turns[1] + "</s>"


@pytest.mark.parametrize("code, answer", [
    ("1/0", "Error: ZeroDivisionError: division by zero"),
    ("while True: pass", "Error: the call ran past its 1 s limit; the interpreter was restarted (state lost)"),
    ("import os; os._exit(3)", "Error: the sandbox exited (status 3); the interpreter was restarted (state lost)"),
    ("print('x' * 5000)", "x" * 100 + "\n... (cut at 100 characters)"),
    ("import socket; socket.socket().connect(('1.1.1.1', 53))", "Error: PermissionError: [Errno 1] Operation not permitted"),
    ("open('/etc/passwd', 'w')", "Error: FileNotFoundError: [Errno 2] No such file or directory: '/etc/passwd'"),
    ("import sys; sys.stdout.write('y' * (4 << 20))",
     "Error: " + "y" * 100 + "\n... (cut at 100 characters)\nError: more than 1048576 bytes of output; the interpreter was restarted (state lost)"),
])
def test_a_failing_or_hostile_call_is_an_error_turn_and_the_episode_goes_on(chatml, code, answer):
    env = make_env("python", timeout=1.0, max_output_chars=100, tool_error_penalty=0.25)
    turns = [call(code), call("print(2 + 2)"), "#### 4"]
    [ep] = run_episodes(Scripted(chatml, turns), env, [RECORD], SamplingParams(max_new_tokens=400))
    assert ep.messages[0]["role"] == "system"  # the environment's
    assert ep.messages[3]["content"] == answer
    assert ep.messages[5] == {"role": "tool", "name": "python", "content": "4"}  # a fresh interpreter if it died
    assert ep.finish_reason == "stop" and ep.turns == 3
    assert ep.tool_errors == ("Error" in answer) and ep.shaping == -0.25 * ep.tool_errors


def test_state_is_kept_between_calls_and_the_last_expression_shown(chatml):
    turns = [call("import math\nr = math.isqrt(144)"), call("r * 2"), call("None"), "#### 24"]
    [ep] = run_episodes(Scripted(chatml, turns), make_env("python"), [RECORD], SamplingParams(max_new_tokens=400))
    assert [m["content"] for m in ep.messages if m["role"] == "tool"] == ["(no output)", "24", "(no output)"]


@pytest.mark.parametrize("turn, problem, readable", [
    ("<tool_call>{oops}</tool_call>", "Error: the tool call is not valid JSON", False),
    ('<tool_call>{"name": "shell", "arguments": {"cmd": "ls"}}</tool_call>', "Error: unknown tool 'shell' (tools: python)", False),
    ('<tool_call>{"name": "python", "arguments": {"source": "1"}}</tool_call>', 'Error: python needs a string argument "code"', True),
])
def test_a_malformed_or_unknown_call_is_an_error_turn(chatml, turn, problem, readable):
    env = make_env("python", malformed_penalty=0.5)
    [ep] = run_episodes(Scripted(chatml, [turn, "#### 1"]), env, [RECORD], SamplingParams(max_new_tokens=400))
    assert ep.messages[3]["content"].startswith(problem) and ep.turns == 2
    if not readable:  # kept as written in the trajectory
        assert ep.messages[2] == {"role": "assistant", "content": turn}
    else:
        assert ep.messages[2]["tool_calls"][0]["function"] == {"name": "python", "arguments": {"source": "1"}}
    assert ep.malformed + ep.tool_errors == 1 and ep.shaping == -0.5 * ep.malformed


def test_turn_and_token_limits_end_an_episode(chatml):
    env = make_env("python")
    [ep] = run_episodes(Scripted(chatml, [call("1")] * 3), env, [RECORD], SamplingParams(max_new_tokens=400), max_turns=2)
    assert (ep.finish_reason, ep.turns) == ("turns", 2)
    assert ep.model_mask[-1] == 1  # no environment tokens after the last model turn
    [ep] = run_episodes(Scripted(chatml, [call("1")] * 3), env, [RECORD], SamplingParams(max_new_tokens=400), max_tokens=30)
    assert ep.finish_reason == "length" and len(ep.token_ids) <= 30


def test_episodes_of_a_tiny_model_are_reproducible(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    chat.apply_template(tok, chat.CHATML)
    engine = TransformersEngine(load_model(str(tiny_model_dir)).eval(), tok)
    recs = [dict(RECORD, messages=[{"role": "user", "content": f"What is {a} * 3?"}]) for a in range(3)]
    sampling = SamplingParams(max_new_tokens=24, temperature=1.0, n=2, seed=5)
    runs = [run_episodes(engine, make_env("python"), recs, sampling, max_turns=3, max_tokens=80) for _ in range(2)]
    assert [e.token_ids for e in runs[0]] == [e.token_ids for e in runs[1]]
    assert [e.prompt_index for e in runs[0]] == [0, 0, 1, 1, 2, 2]
    assert len({tuple(e.token_ids) for e in runs[0]}) == 6  # the n episodes of a prompt differ
    for e in runs[0]:
        assert len(e.token_ids) == len(e.model_mask) == len(e.logprobs) <= 80
        assert all(lp <= 0 for lp in e.logprobs)


def test_search_returns_passages_with_ids(fact_index, chatml):
    env = make_env("search", index=str(fact_index.dir), k=2)
    turns = ['<tool_call>{"name": "search", "arguments": {"query": "Where was Ana Lor born?"}}</tool_call>',
             '<tool_call>{"name": "search", "arguments": {"query": "", "k": 1}}</tool_call>', "Ropa."]
    [ep] = run_episodes(Scripted(chatml, turns), env, [RECORD], SamplingParams(max_new_tokens=400))
    first = ep.messages[3]["content"]
    assert ep.messages[0]["content"] == env.system_prompt
    assert first.startswith("[ana#0] Ana Lor\nAna Lor was born in Ropa. Ana Lor plays the harp.")
    assert first.count("\n\n[") == 1  # k = 2 passages
    assert ep.messages[5]["content"] == 'Error: search needs a non-empty string argument "query"'


def test_unknown_environment_and_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown environment .shell.; expected one of python, search or openenv:<module>:<Class>"):
        make_env("shell")
    with pytest.raises(UserError, match="env python: .*unexpected keyword argument 'timout'"):
        make_env("python", timout=3)
    with pytest.raises(UserError, match="env search: give the index directory"):
        make_env("search")
