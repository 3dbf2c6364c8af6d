"""Assistant-only masks, checked token by token against the rendered text."""

import pytest
from conftest import multi_turn_records

from posttrain.data import chat
from posttrain.models import load_tokenizer
from posttrain.train.sft import tokenize_records

CONVERSATION = multi_turn_records(5)[4]["messages"]


def expected_spans(full: str, messages, start_marker: str, end_marker: str) -> list[tuple[int, int]]:
    """Character ranges of what must be trained, found by hand: each assistant turn's content and
    its end-of-turn marker, located after the template's assistant header."""
    spans, pos = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        head = full.index(start_marker, pos) + len(start_marker)
        assert full[head:head + len(m["content"])] == m["content"]
        end = head + len(m["content"]) + len(end_marker)
        assert full[head + len(m["content"]):end] == end_marker
        spans.append((head, end))
        pos = end
    return spans


def check_token_by_token(tokenizer, messages, start_marker, end_marker):
    t = chat.tokenize_conversation(tokenizer, messages, max_length=10_000)
    full = chat.render(tokenizer, messages)
    spans = expected_spans(full, messages, start_marker, end_marker)
    pos, trained_text = 0, ""
    for tok, trained in zip(t.input_ids, t.labels_mask):
        piece = tokenizer.decode([tok], clean_up_tokenization_spaces=False)
        assert full[pos:pos + len(piece)] == piece, f"token {tok!r} does not continue the rendered text at {pos}"
        inside = any(a <= pos and pos + len(piece) <= b for a, b in spans)
        outside = all(pos + len(piece) <= a or pos >= b for a, b in spans)
        assert inside or outside, f"token {piece!r} straddles an assistant span boundary"
        assert trained == inside, f"token {piece!r} at {pos}: trained={trained}, inside an assistant span={inside}"
        trained_text += piece if trained else ""
        pos += len(piece)
    assert pos == len(full)
    assert trained_text == "".join(full[a:b] for a, b in spans)
    return t


@pytest.mark.parametrize("name, start, end", [("tulu", "<|assistant|>\n", "</s>"),
                                              ("chatml", "<|im_start|>assistant\n", "<|im_end|>\n"),
                                              ("gemma", "<start_of_turn>model\n", "<end_of_turn>\n")])
def test_builtin_templates_mask_exactly_the_assistant_spans(tiny_model_dir, name, start, end):
    tok = load_tokenizer(str(tiny_model_dir))
    template, label = chat.resolve_template(tok, name)
    chat.apply_template(tok, template)
    assert label == name
    t = check_token_by_token(tok, CONVERSATION, start, end)
    assert sum(t.labels_mask) > 0


def test_generation_prompt_tokenizes_like_training(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    chat.apply_template(tok, chat.TULU)
    t = chat.tokenize_conversation(tok, CONVERSATION[:3], 10_000)
    prompt = chat.prompt_ids(tok, CONVERSATION[:2])
    first_trained = t.labels_mask.index(True)
    assert t.input_ids[:first_trained] == prompt


def test_smollm2_own_template(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    template, label = chat.resolve_template(tok, None)
    assert label == "tokenizer" and "<|im_start|>" in template
    check_token_by_token(tok, CONVERSATION, "<|im_start|>assistant\n", "<|im_end|>\n")
    # without a system turn the template inserts its default one, which is not trained on
    check_token_by_token(tok, CONVERSATION[1:], "<|im_start|>assistant\n", "<|im_end|>\n")


def test_truncation_drops_samples_with_nothing_to_train(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    chat.apply_template(tok, chat.TULU)
    long_prompt = {"messages": [{"role": "user", "content": "What is 1 + 1? " * 30},
                                {"role": "assistant", "content": "2"}]}
    short = {"messages": CONVERSATION[1:3]}
    samples, stats = tokenize_records(tok, [long_prompt, short, long_prompt], max_length=40)
    assert stats == {"records": 3, "samples": 1, "dropped_no_trained_tokens": 2, "truncated": 0}
    assert len(samples) == 1 and any(samples[0]["labels_mask"])
    # a sample cut inside its answer is kept (it still trains on what remains) and counted as truncated
    n_prompt = len(chat.prompt_ids(tok, CONVERSATION[1:2]))
    samples, stats = tokenize_records(tok, [short], max_length=n_prompt + 2)
    assert stats["truncated"] == 1 and len(samples[0]["input_ids"]) == n_prompt + 2
    assert sum(samples[0]["labels_mask"]) == 2


def test_prefix_inconsistent_template_is_refused(tiny_model_dir):
    from posttrain.errors import UserError

    tok = load_tokenizer(str(tiny_model_dir))
    # drops every assistant turn but the last, as some reasoning templates do with past thoughts
    chat.apply_template(tok, "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                             "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                             "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(UserError, match="not prefix-consistent"):
        chat.tokenize_conversation(tok, CONVERSATION, 1000)
