"""``posttrain serve`` through the ``openai`` client: several models, streamed tokens, ``n``, log-probs,
budget forcing as extra body fields, concurrent clients, and ``--run`` serving every stage of a run;
the server has an API key (what it refuses: test_serve_hostile.py)."""

import json
import threading

import pytest
from conftest import thinker_model

from posttrain.errors import UserError
from posttrain.inference.engine import SamplingParams, TransformersEngine
from posttrain.inference.serve import models_of_run, parse_models, start_server
from posttrain.models import load_model, load_tokenizer

QUESTION = [{"role": "user", "content": "What is 3 plus 4?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory, addition_sft_model):
    openai = pytest.importorskip("openai")
    thinker = thinker_model(tmp_path_factory.mktemp("serve-think"))
    engines = {name: TransformersEngine(load_model(path), load_tokenizer(path), batch_size=8)
               for name, path in (("thinker", thinker), ("adder", addition_sft_model))}
    server = start_server(engines, api_key="serve-test-key")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="serve-test-key", max_retries=0)
    yield {"client": client, "engines": engines, "openai": openai, "url": server.url}
    server.close()


def test_the_key_is_needed(served):
    openai = served["openai"]
    stranger = openai.OpenAI(base_url=f"{served['url']}/v1", api_key="guessed-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="a valid API key is needed"):
        stranger.models.list()
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model="adder", messages=QUESTION, max_tokens=4)


def test_a_prompt_past_the_models_context_is_a_400(served):
    client, engine = served["client"], served["engines"]["adder"]
    context = engine.max_model_len
    long = [{"role": "user", "content": "1 + 1 " * context}]
    with pytest.raises(served["openai"].BadRequestError, match=f"the model's context is {context} tokens") as e:
        client.chat.completions.create(model="adder", messages=long, max_tokens=4)
    assert e.value.body["param"] == "messages"
    fits = [{"role": "user", "content": "1 + 1 " * (context // 8)}]
    prompt = len(engine.encode(fits))
    with pytest.raises(served["openai"].BadRequestError) as e:
        client.chat.completions.create(model="adder", messages=fits, max_tokens=context - prompt + 1)
    assert e.value.body["param"] == "max_tokens"
    got = client.chat.completions.create(model="adder", messages=fits, temperature=0)  # max_tokens cut to what is left
    assert got.choices[0].finish_reason in ("stop", "length")


def test_models_are_listed_and_an_unknown_one_is_a_404(served):
    client = served["client"]
    assert [m.id for m in client.models.list().data] == ["thinker", "adder"]
    with pytest.raises(served["openai"].NotFoundError, match="model 'other' is not served here"):
        client.chat.completions.create(model="other", messages=QUESTION, max_tokens=4)


def test_a_stream_carries_the_answer_token_by_token(served):
    client = served["client"]
    plain = client.chat.completions.create(model="thinker", messages=QUESTION, max_tokens=40, temperature=0)
    want = served["engines"]["thinker"].generate([QUESTION], SamplingParams(max_new_tokens=40, temperature=0.0))[0]
    assert plain.choices[0].message.content == want.text and plain.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.chat.completions.create(model="thinker", messages=QUESTION, max_tokens=40, temperature=0,
                                                 stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == want.text and len(deltas) >= 5  # piece by piece, not in one block
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_n_samples_and_their_logprobs(served):
    client = served["client"]
    got = client.chat.completions.create(model="adder", messages=QUESTION, max_tokens=8, temperature=1.0, n=3, seed=7,
                                         logprobs=True)
    want = served["engines"]["adder"].generate([QUESTION], SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=7))
    assert [c.message.content for c in got.choices] == [w.text for w in want]
    for c, w in zip(got.choices, want):
        assert [t.logprob for t in c.logprobs.content] == pytest.approx(w.logprobs, abs=1e-6)
        assert len(c.logprobs.content) == len(w.token_ids)


def test_budget_forcing_fields_change_the_thinking(served):
    client = served["client"]
    capped = client.chat.completions.create(model="thinker", messages=QUESTION, max_tokens=16, temperature=0,
                                            extra_body={"max_thinking_tokens": 2})
    waited = client.chat.completions.create(model="thinker", messages=QUESTION, max_tokens=16, temperature=0,
                                            extra_body={"num_wait": 1})
    a, b = capped.choices[0], waited.choices[0]
    assert (a.model_extra["thinking_tokens"], a.model_extra["forced_stop"]) == (2, True)
    assert b.model_extra["waits"] == 1 and "Wait" in b.message.content
    assert a.message.content != b.message.content
    with pytest.raises(served["openai"].BadRequestError, match="'num_wait': must be an integer from 0 to 64"):
        client.chat.completions.create(model="thinker", messages=QUESTION, extra_body={"num_wait": -1})


def test_concurrent_clients_get_their_own_answers(served):
    """Eight threads at once over both models, streamed and not: each gets what it gets alone."""
    client = served["client"]
    jobs = [(("thinker", "adder")[i % 2], f"What is {i} plus {i + 1}?", i % 3 == 0) for i in range(8)]

    def ask(model, text, stream):
        kw = dict(model=model, messages=[{"role": "user", "content": text}], max_tokens=24, temperature=0)
        if not stream:
            return client.chat.completions.create(**kw).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)

    alone = [ask(*job) for job in jobs]
    together: list = [None] * len(jobs)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(*jobs[i]))) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone and len(set(alone)) > 2


def test_run_serves_every_stage(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    for stage in ("sft", "dpo"):
        (run / stage).mkdir(parents=True)
        (run / stage / "config.json").write_text("{}")
    (run / "sft" / "manifest.json").write_text(json.dumps({"config": {"model": str(tiny_model_dir)}}))
    (run / "stages.json").write_text(json.dumps([
        {"stage": "eval-base", "kind": "eval", "output_dir": str(run / "eval-base")},
        {"stage": "sft", "kind": "sft", "output_dir": str(run / "sft")},
        {"stage": "dpo", "kind": "dpo", "output_dir": str(run / "dpo")}]))
    assert models_of_run(str(run)) == {"base": str(tiny_model_dir), "sft": str(run / "sft"), "dpo": str(run / "dpo")}
    assert parse_models(["extra=/m"], str(run))["extra"] == "/m"
    with pytest.raises(UserError, match="no stages.json"):
        models_of_run(str(tmp_path))
    with pytest.raises(UserError, match="the name 'sft' is given twice"):
        parse_models(["sft=/x"], str(run))
