"""The OpenAI-compatible engine against a real HTTP server on localhost (``posttrain serve``'s server
around a tiny model): same outputs as the local engine, retries through injected faults, a response
cache that makes an interrupted run lose nothing, and clear errors."""

import pytest
from conftest import addition_records
from faults import Faulty

from posttrain.errors import UserError
from posttrain.inference.engine import SamplingParams, TransformersEngine
from posttrain.inference.openai_engine import OpenAIEngine
from posttrain.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def local(addition_sft_model):
    return TransformersEngine(load_model(addition_sft_model), load_tokenizer(addition_sft_model))


def start(engine, faults=None, fault_delay=3.0):
    server = Faulty(engine, "tiny", faults, fault_delay)
    return server, f"{server.url}/v1"


PROMPTS = [r["messages"][:1] for r in addition_records(40)[:6]]


def test_same_outputs_as_the_local_engine(local):
    server, url = start(local)
    try:
        remote = OpenAIEngine("tiny", url, concurrency=3).generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.0))
        here = local.generate(PROMPTS, SamplingParams(max_new_tokens=6))
        assert [r.text for r in remote] == [h.text for h in here]
        assert [r.finish_reason for r in remote] == [h.finish_reason for h in here]
        sampled = OpenAIEngine("tiny", url).generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, temperature=1.0, n=3))
        assert [c.prompt_index for c in sampled] == [0, 0, 0, 1, 1, 1]
    finally:
        server.close()


def test_retries_through_rate_limits_server_errors_timeouts_and_drops(local):
    # the "timeout" answer comes after 60 s: the client's 5 s timeout always fires first, and no real
    # answer of 6 tokens comes near it
    server, url = start(local, faults=[429, 500, 503, "timeout", "drop", 502], fault_delay=60.0)
    try:
        engine = OpenAIEngine("tiny", url, concurrency=1, timeout=5.0, backoff=0.01)
        outs = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=6, temperature=0.0))
        assert [o.text for o in outs] == [o.text for o in local.generate(PROMPTS[:2], SamplingParams(max_new_tokens=6))]
        assert engine.stats["retries"] == 6 and engine.stats["requests"] == 8
    finally:
        server.close()


def test_cache_makes_an_interrupted_run_lose_nothing(local, tmp_path):
    server, url = start(local, faults=[None, None, None, 500, 500, 500])  # three answers, then a failing server
    try:
        engine = OpenAIEngine("tiny", url, concurrency=1, max_retries=2, backoff=0.01, cache_dir=tmp_path / "cache")
        with pytest.raises(UserError, match=r"gave up after 3 attempts \(HTTP 500\)"):
            engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.0))
        answered = server.served["completions"]
        assert answered >= 3 and len(list((tmp_path / "cache").rglob("*.json"))) == answered
    finally:
        server.close()
    server, url = start(local)
    try:
        engine = OpenAIEngine("tiny", url, concurrency=2, cache_dir=tmp_path / "cache")
        outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.0))
        assert engine.stats == {"requests": 6 - answered, "retries": 0, "cache_hits": answered}
        assert [o.text for o in outs] == [o.text for o in local.generate(PROMPTS, SamplingParams(max_new_tokens=6))]
    finally:
        server.close()
    again = OpenAIEngine("tiny", "http://127.0.0.1:9/v1", cache_dir=tmp_path / "cache")  # nothing listens: all cached
    assert [o.text for o in again.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.0))] == [o.text for o in outs]


def test_clear_errors(local):
    server, url = start(local, faults=[401])
    try:
        with pytest.raises(UserError, match=r"HTTP 401 for model 'tiny'"):
            OpenAIEngine("tiny", url).generate(PROMPTS[:1])
        import openai

        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="messages"):
            client.chat.completions.create(model="tiny", messages=[])
    finally:
        server.close()
    with pytest.raises(UserError, match="expected openai:<model>@<base_url>"):
        OpenAIEngine.from_spec("gpt@")
    assert OpenAIEngine.from_spec("openai:m@http://h:1/v1").model == "m"
