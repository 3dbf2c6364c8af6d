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
