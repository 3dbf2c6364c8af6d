"""Chat templates and assistant-only loss masks.

A conversation is rendered with a chat template (the tokenizer's own, or a built-in one) and cut
into segments. For each assistant turn ``i`` the trained span is the text between
``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])``: the assistant's
content and the template's end-of-turn marker, which is exactly what the model must produce after
the generation prompt at inference time. Each segment is tokenized on its own and the ids are
concatenated, so a trained span never shares a token with the text around it, and the prompt part
tokenizes as it does when the prompt is rendered for generation.

Retrieved context inside an assistant turn is read, never trained: a ``<paragraph>...</paragraph>``
span (Self-RAG's passages, tags included) is cut out of the trained span as an untrained segment.

Tool use (posttrain.data.tools): a tool-aware template renders ``tool_calls`` and ``tools`` itself;
any other gets the documented default format. ``tool`` turns are never trained: each assistant turn
is, calls included.

A template must be prefix-consistent (rendering more turns only appends text); one that rewrites
earlier turns (e.g. drops past reasoning) is refused with a clear error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from posttrain.data import tools as tool_format
from posttrain.errors import UserError
from posttrain.templates import CHATML, GEMMA, TULU

BUILTIN = {"tulu": TULU, "chatml": CHATML, "gemma": GEMMA}
# Text that ends an assistant turn under each built-in template (besides the tokenizer's eos).
END_OF_TURN = {"chatml": "<|im_end|>", "gemma": "<end_of_turn>"}
CONTEXT_SPAN = re.compile(r"<paragraph>.*?</paragraph>", re.S)


def resolve_template(tokenizer, name: str | None) -> tuple[str, str]:
    """Return ``(template, label)`` for a config value: a built-in name, a Jinja string, or None
    (the tokenizer's own, falling back to ``tulu`` when it has none)."""
    if name is None:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.chat_template, "tokenizer"
        name = "tulu"
    if name in BUILTIN:
        if name == "tulu" and not tokenizer.eos_token:
            raise UserError("chat_template 'tulu' needs a tokenizer with an eos_token")
        return BUILTIN[name], name
    if "{%" in name or "{{" in name:
        return name, "custom"
    raise UserError(f"config: chat_template must be one of {', '.join(BUILTIN)} or a Jinja template, got {name!r}")


def apply_template(tokenizer, template: str) -> None:
    """Make ``template`` the tokenizer's own, so a saved checkpoint carries the template it was trained with."""
    tokenizer.chat_template = template


def use_template(tokenizer, name: str | None) -> str:
    """Resolve a config's ``chat_template`` and apply it; returns its label (for the manifest)."""
    template, label = resolve_template(tokenizer, name)
    apply_template(tokenizer, template)
    return label


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    """The conversation as text; with tool calls, tool turns or ``tools``, in the template's own tool
    format or the default one (posttrain.data.tools)."""
    if tool_format.tool_aware(getattr(tokenizer, "chat_template", None)):
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        messages = tool_format.default_format(tokenizer, messages, tools)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def segments(tokenizer, messages: list[dict], train_from: int = 0, tools: list[dict] | None = None) -> list[tuple[str, bool]]:
    """Cut the rendered conversation into ``(text, trained)`` pieces; trained = the span of an
    assistant turn at index ``>= train_from`` (preference pairs train only the turns after the prompt)."""
    full = render(tokenizer, messages, tools=tools)
    out, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from:
            continue
        start = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        end = render(tokenizer, messages[: i + 1], tools=tools)
        if not (end.startswith(start) and full.startswith(end) and len(start) >= pos):
            raise UserError("the chat template is not prefix-consistent (rendering more turns changes earlier "
                            "text), so assistant spans cannot be found; set chat_template to tulu or chatml")
        out.append((start[pos:], False))
        out += _context_cut(end[len(start):])
        pos = len(end)
    out.append((full[pos:], False))
    return [(text, trained) for text, trained in out if text]


def _context_cut(text: str) -> list[tuple[str, bool]]:
    """An assistant span as trained pieces and untrained ``<paragraph>...</paragraph>`` pieces."""
    out, pos = [], 0
    for m in CONTEXT_SPAN.finditer(text):
        out += [(text[pos:m.start()], True), (m.group(), False)]
        pos = m.end()
    return out + [(text[pos:], True)]


@dataclass
class Tokenized:
    input_ids: list[int]
    labels_mask: list[bool]  # True where the token is trained on
    truncated: bool


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int, train_from: int = 0,
                          tools: list[dict] | None = None) -> Tokenized:
    ids, mask = [], []
    for text, trained in segments(tokenizer, messages, train_from, tools):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([trained] * len(piece))
    truncated = len(ids) > max_length
    return Tokenized(ids[:max_length], mask[:max_length], truncated)


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a prompt rendered for generation (the same ids training saw before a reply)."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True, tools=tools),
                     add_special_tokens=False)["input_ids"]


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn: the eos token and, where the vocabulary has them, ``<|im_end|>``
    and ``<end_of_turn>``."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in END_OF_TURN.values():
        tid = tokenizer.convert_tokens_to_ids(text)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids
