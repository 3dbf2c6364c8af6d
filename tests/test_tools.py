"""Tool calls in records, templates and model output (posttrain.data.tools): the rendered text written
out by hand, masks checked token by token (tool results never trained), and every malformed call
read as a problem, never an exception."""

import json

import pytest
from test_chat import check_token_by_token

from posttrain.data import chat, records, tools
from posttrain.errors import UserError
from posttrain.models import load_tokenizer

PY = {"type": "function", "function": {"name": "python", "description": "Run Python code.",
                                       "parameters": {"type": "object", "properties": {"code": {"type": "string"}},
                                                      "required": ["code"]}}}
CALL = '<tool_call>\n{"name": "python", "arguments": {"code": "print(123 * 456)"}}\n</tool_call>'
CONVERSATION = [
    {"role": "user", "content": "What is 123 * 456?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "python", "arguments": '{"code": "print(123 * 456)"}'}}]},
    {"role": "tool", "name": "python", "content": "56088"},
    {"role": "assistant", "content": "123 * 456 = 56088. #### 56088"},
]


def checked():
    return records.sft_record({"messages": CONVERSATION, "tools": [PY]}, "t.jsonl:1")


def test_records_take_openai_tool_calls_and_decode_their_arguments():
    rec = checked()
    assert rec["tools"] == [PY]
    assert rec["messages"][1]["tool_calls"] == [{"type": "function", "function": {"name": "python",
                                                                                "arguments": {"code": "print(123 * 456)"}}}]
    assert rec["messages"][2] == {"role": "tool", "name": "python", "content": "56088"}
    # OpenAI's null content of a call-only turn
    none = [dict(m) for m in CONVERSATION]
    none[1]["content"] = None
    assert records.sft_record({"messages": none}, "t")["messages"][1]["content"] == ""


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop(1), "t.jsonl:1: field 'messages[1]' is a tool turn that answers no assistant tool call"),
    (lambda m: m[1].update(tool_calls=[{"function": {"name": "python", "arguments": "{oops"}}]),
     "t.jsonl:1: field 'messages[1].tool_calls[0].function.arguments' is a string that is not JSON"),
    (lambda m: m[1].update(tool_calls=[{"function": {"arguments": {}}}]),
     "t.jsonl:1: field 'messages[1].tool_calls[0].function.name' must be a non-empty string"),
    (lambda m: m[1].update(tool_calls=[{"function": {"name": "python", "arguments": [1]}}]),
     "t.jsonl:1: field 'messages[1].tool_calls[0].function.arguments' must be a JSON object"),
    (lambda m: m[1].update(tool_calls=[]), "t.jsonl:1: field 'messages[1].tool_calls' must be a non-empty list"),
    (lambda m: m[1].update(tool_calls=None), "t.jsonl:1: field 'messages[1].content' is an empty assistant turn"),
])
def test_bad_tool_records_name_the_field(change, message):
    bad = json.loads(json.dumps(CONVERSATION))
    change(bad)
    with pytest.raises(UserError, match="^" + message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        records.sft_record({"messages": bad}, "t.jsonl:1")
    with pytest.raises(UserError, match=r"^t: field 'tools\[0\].function.name'"):
        records.sft_record({"messages": CONVERSATION, "tools": [{"function": {}}]}, "t")


def test_default_format_under_chatml_written_out(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    chat.apply_template(tok, chat.CHATML)
    rec = checked()
    listing = ("You may call tools. To call one, write\n<tool_call>\n"
               '{"name": <tool name>, "arguments": <arguments as a JSON object>}\n</tool_call>\n'
               "and stop; its result comes back in the next turn. When you have the answer, reply without a tool call.\n"
               f"<tools>\n{json.dumps(PY)}\n</tools>")
    assert chat.render(tok, rec["messages"], tools=rec["tools"]) == (
        f"<|im_start|>system\n{listing}<|im_end|>\n"
        "<|im_start|>user\nWhat is 123 * 456?<|im_end|>\n"
        f"<|im_start|>assistant\n{CALL}<|im_end|>\n"
        "<|im_start|>tool\n56088<|im_end|>\n"
        "<|im_start|>assistant\n123 * 456 = 56088. #### 56088<|im_end|>\n")


@pytest.mark.parametrize("name, start, end", [("chatml", "<|im_start|>assistant\n", "<|im_end|>\n"),
                                              ("tulu", "<|assistant|>\n", "</s>")])
def test_sft_trains_the_calls_and_never_the_tool_results(tiny_model_dir, name, start, end):
    tok = load_tokenizer(str(tiny_model_dir))
    chat.apply_template(tok, chat.resolve_template(tok, name)[0])
    rec = checked()
    rendered = chat.render(tok, rec["messages"], tools=rec["tools"])
    if name == "tulu":  # the tulu template drops a 'tool' role: the result comes as a user turn
        assert "<|user|>\n<tool_response>\n56088\n</tool_response>\n" in rendered
    flat = tools.default_format(tok, rec["messages"], rec["tools"])
    assert chat.render(tok, flat) == rendered
    check_token_by_token(tok, flat, start, end)  # the hand-located spans of test_chat, on the same text
    t = chat.tokenize_conversation(tok, rec["messages"], 10_000, tools=rec["tools"])
    assert t.input_ids == chat.tokenize_conversation(tok, flat, 10_000).input_ids
    assert t.labels_mask == chat.tokenize_conversation(tok, flat, 10_000).labels_mask
    pieces = [tok.decode([i], clean_up_tokenization_spaces=False) for i in t.input_ids]
    trained = "".join(p for p, m in zip(pieces, t.labels_mask) if m)
    assert trained == f"{CALL}{end}123 * 456 = 56088. #### 56088{end}"
    assert "56088" not in "".join(p for p, m in zip(pieces, t.labels_mask) if m).replace("56088. #### 56088", "")


QWEN_LIKE = (  # a tool-aware template in the style of Qwen2.5's: tools= and tool_calls rendered by it
    "{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_tool_aware_template_renders_in_its_own_format(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    chat.apply_template(tok, QWEN_LIKE)
    rec = checked()
    rendered = chat.render(tok, rec["messages"], tools=rec["tools"])
    assert rendered.startswith(f"<|im_start|>system\n# Tools\n{json.dumps(PY)}\n<|im_end|>\n")
    assert "You may call tools" not in rendered  # not the default listing
    assert "<|im_start|>user\n<tool_response>\n56088\n</tool_response><|im_end|>\n" in rendered
    t = chat.tokenize_conversation(tok, rec["messages"], 10_000, tools=rec["tools"])
    pieces = [tok.decode([i], clean_up_tokenization_spaces=False) for i in t.input_ids]
    assert "".join(pieces) == rendered
    trained = "".join(p for p, m in zip(pieces, t.labels_mask) if m)
    assert trained == f"{CALL}<|im_end|>\n123 * 456 = 56088. #### 56088<|im_end|>\n"


def test_smollm2_template_with_tools(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    rec = checked()
    flat = tools.default_format(tok, rec["messages"], rec["tools"])
    assert flat[2] == {"role": "assistant", "content": CALL} and flat[3] == {"role": "tool", "content": "56088"}
    check_token_by_token(tok, flat, "<|im_start|>assistant\n", "<|im_end|>\n")
    t = chat.tokenize_conversation(tok, rec["messages"], 10_000, tools=rec["tools"])
    assert t.labels_mask == chat.tokenize_conversation(tok, flat, 10_000).labels_mask


@pytest.mark.parametrize("text, calls, problem", [
    (f"Let me compute.\n{CALL}", [{"name": "python", "arguments": {"code": "print(123 * 456)"}}], None),
    ('<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"1\\"}"}</tool_call>',
     [{"name": "python", "arguments": {"code": "1"}}], None),
    ("<tool_call>{not json}</tool_call>", [None], "the tool call is not valid JSON"),
    ('<tool_call>["python"]</tool_call>', [None], 'the tool call must be a JSON object with a string "name"'),
    ('<tool_call>{"name": "rm", "arguments": {}}</tool_call>', [None], "unknown tool 'rm' (tools: python)"),
    ('<tool_call>{"name": "python", "arguments": 3}</tool_call>', [None], "the \"arguments\" of 'python' must be a JSON object"),
    ('<tool_call>{"name": "python", "arguments": "x"}</tool_call>', [None], "are a string that is not JSON"),
    ('<tool_call>\n{"name": "python", "arguments": {"code": "print(', [None], "a <tool_call> without its </tool_call>"),
    ("<tool_call>" + "[" * 100_000 + "</tool_call>", [None], "the tool call is not valid JSON"),
    ("The answer is 4.", [], None),
])
def test_parse_tool_calls_never_raises(text, calls, problem):
    parsed = tools.parse_tool_calls(text, {"python"})
    assert parsed.calls == calls
    if problem is None:
        assert parsed.problems == [None] * len(calls)
    else:
        assert parsed.problems[0].startswith(problem) or problem in parsed.problems[0]
    assert "<tool_call>" not in parsed.content
