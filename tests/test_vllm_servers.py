"""The client of RLVR's ``vllm_servers`` against real HTTP servers on localhost (``posttrain serve``'s
server) around an engine that draws each completion from its seed alone, as vLLM does: requests
spread over the servers, a server that goes away mid-run (its share redone by the others, the same
completions), one that comes back (rejoins at the next weight push), none left (a one-line error),
the weight file (tied weights under every name), and the routes' refusals. The same client against
real vLLM servers, killed mid-run, is in test_vllm.py."""

import pytest
import torch

from posttrain.errors import UserError
from posttrain.inference.engine import Completion, SamplingParams, completion_requests
from posttrain.inference.serve import start_server
from posttrain.inference.vllm_servers import ServerFailed, VLLMServers, call, weights_file
from posttrain.models import load_model, load_tokenizer


class SeedEngine:
    """A completion is a function of its prompt and seed only; loaded weights are kept."""

    def __init__(self, tokenizer):
        self.tokenizer, self.weights, self.prompts_seen = tokenizer, None, 0

    def complete(self, prompts, seeds, sampling):
        self.prompts_seen += len(prompts)
        return [Completion(text=f"{seed % 97}", token_ids=[len(p), seed % 50], finish_reason="length",
                           logprobs=[-(seed % 7) / 7, -len(p) / 100]) for p, seed in zip(prompts, seeds)]

    def load_weights(self, pairs):
        self.weights = dict(pairs)


KEY = "rollout-key-0123"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_API_KEY", KEY)  # what the client sends


def start(engine, port=0, accept_weights=True):
    server = start_server(engine, "seeded", port=port, api_key=KEY, accept_weights=accept_weights)
    return server, server.url


def stop(server):
    server.close()


PROMPTS = [[{"role": "user", "content": f"What is {n} mod 2?"}] for n in range(10)] + [
    [{"role": "user", "content": "What is 0 mod 2?"}]]  # a repeated prompt: its own streams (occurrence 1)


def expected(tok, sampling):
    return [(i, [len(ids), seed % 50], f"{seed % 97}") for i, ids, seed in completion_requests(tok, PROMPTS, sampling)]


def got(outs):
    return [(c.prompt_index, c.token_ids, c.text) for c in outs]


def test_requests_spread_a_dead_server_is_left_out_and_a_restarted_one_rejoins(tiny_model_dir, capfd):
    tok = load_tokenizer(tiny_model_dir)
    a, b = SeedEngine(tok), SeedEngine(tok)
    (sa, url_a), (sb, url_b) = start(a), start(b)
    sampling = SamplingParams(max_new_tokens=2, temperature=1.0, n=3, seed=5)
    try:
        servers = VLLMServers([url_a, url_b], tok)
        assert got(servers.generate(PROMPTS, sampling)) == expected(tok, sampling)
        assert a.prompts_seen == 16 and b.prompts_seen == 17  # contiguous shares of the 33 completions
        stop(sb)
        assert got(servers.generate(PROMPTS, sampling)) == expected(tok, sampling)  # b's share redone by a
        assert servers.live == [url_a] and a.prompts_seen == 16 + 16 + 17
        assert f"vLLM server {url_b} left out (rollouts: " in capfd.readouterr().err
        sb, _ = start(b, port=int(url_b.rsplit(":", 1)[1]))  # back on its port: the next push brings it in
        servers.load_weights([("w", torch.ones(2))], version=7)
        assert servers.live == [url_a, url_b] and torch.equal(b.weights["w"], torch.ones(2))
        assert call(url_b, "/health", None, 5.0)["weights_version"] == 7
        assert "rejoins" in capfd.readouterr().err
        stop(sa)
        stop(sb)
        with pytest.raises(UserError, match="no server left of .*resumes from its last checkpoint"):
            servers.generate(PROMPTS, sampling)
    finally:
        for s in (sa, sb):
            s.close()


def test_no_server_answering_at_the_start_is_a_one_line_error(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    server, url = start(SeedEngine(tok))
    stop(server)
    with pytest.raises(UserError, match="none of .* answers at /health"):
        VLLMServers([url], tok)


def test_the_weight_file_carries_tied_weights_under_every_name(tiny_model_dir):
    from safetensors.torch import load

    model = load_model(tiny_model_dir)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied
    loaded = load(weights_file(model))
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert sorted(loaded) == sorted(names) and "lm_head.weight" in loaded
    for name, p in model.named_parameters(remove_duplicate=False):
        assert torch.equal(loaded[name], p.detach())


def test_the_routes_refuse_what_they_should(tiny_model_dir, addition_sft_model, monkeypatch):
    from posttrain.inference.engine import TransformersEngine

    tok = load_tokenizer(tiny_model_dir)
    closed, url = start(SeedEngine(tok), accept_weights=False)
    plain, plain_url = start(TransformersEngine(load_model(addition_sft_model), load_tokenizer(addition_sft_model)))
    try:
        with pytest.raises(UserError, match=r"refused the weights \(HTTP 403: weight loads need serve --accept-weights\)"):
            VLLMServers([url], tok).load_weights([("w", torch.ones(1))])
        with pytest.raises(UserError, match="is not a rollout server"):
            VLLMServers([plain_url], tok)
        bad = b'{"prompts": [[1, 99999]], "seeds": [1], "sampling": {"max_new_tokens": 2}}'
        with pytest.raises(Exception, match=r"HTTP 400: 'prompts\[0\]': must be a non-empty list of token ids below"):
            call(url, "/posttrain/complete", bad, 5.0)
        bad = b'{"prompts": [[1]], "seeds": [1], "sampling": {"max_new_tokens": 2, "n": 4}}'
        with pytest.raises(Exception, match="HTTP 400: 'sampling': must be an object with keys among"):
            call(url, "/posttrain/complete", bad, 5.0)
        monkeypatch.setenv("POSTTRAIN_API_KEY", "not-the-key")
        with pytest.raises(UserError, match=r"refused the API key \(HTTP 401: .*set POSTTRAIN_API_KEY"):
            VLLMServers([url], tok)
        monkeypatch.delenv("POSTTRAIN_API_KEY")
        with pytest.raises(ServerFailed, match="HTTP 401"):
            call(url, "/posttrain/complete", b'{"prompts": [[1]], "seeds": [1], "sampling": {}}', 5.0)
    finally:
        stop(closed)
        stop(plain)
