"""Verifiable-instruction prompts (Tulu 3's precise-IF data): a request plus 1-3 IFEval constraints.

A constraint is an IFEval instruction id, a group, a kwargs sampler and its description (IFEval's
wording, so a model learns the phrasing it will be tested on). A draw picks ``k`` constraints in
seeded order and keeps one only when it is *compatible* with those already kept: never two of one
group, never two groups listed in ``CLASHES`` (e.g. all-lowercase with a ``P.S.`` postscript, whose
letters have a case), and the ``solo`` group (JSON output, a fixed yes/no/maybe answer) only alone.
Keyword constraints take their words from the request; ``repeat_prompt`` repeats the request with the
other constraints' sentences (its own sentence excluded, as in IFEval). The record's ground truth is
IFEval's ``{"instruction_id_list", "kwargs"}``, read by the ``ifeval`` verifier.

Base requests come from local files of several kinds (``request_texts``): self-instruct tasks
(instruction + the first instance's input), hh-rlhf conversations (the first user turn), GSM8K
questions, personas (filled into ``PERSONA_TEMPLATES``), and any prompt file. Requests are checked
against an evaluation file (IFEval's prompts) with the n-gram overlap of posttrain.data.decontam
before use; flagged ones are dropped and listed in the report.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from posttrain.errors import UserError


@dataclass(frozen=True)
class Constraint:
    id: str  # IFEval instruction id
    group: str
    sample: Callable[[random.Random, str], dict]  # (rng, request) -> kwargs
    describe: Callable[[dict], str]
    needs_request: bool = False  # kwargs come from the request's words
    not_for: tuple[str, ...] = ()  # request kinds it makes no sense for (a yes/no answer to a GSM8K problem)


_STOP = set("""a an the and or but if then than that this these those there their they them it its is are was were be
been being to of in on at by for with from as into about over under after before between through during your you
me my we our us he she his her him what which who whom whose when where why how can could would should will shall may
might must do does did have has had not no yes so such very just also more most some any each every other another
only own same both all few many much one two three four five six seven eight nine ten write give make tell explain
please using use following given like want need know help""".split())


def content_words(text: str) -> list[str]:
    """Distinct lower-cased words of 4+ letters that are not stop words, in order of appearance."""
    return list(dict.fromkeys(w for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in _STOP))


def _keywords(rng: random.Random, request: str) -> dict:
    words = content_words(request)
    return {"keywords": rng.sample(words, min(2, len(words)))} if words else {}


def _frequency(rng: random.Random, request: str) -> dict:
    words = content_words(request)
    return {"keyword": rng.choice(words), "frequency": rng.randint(2, 3), "relation": "at least"} if words else {}


_FORBIDDEN = ["very", "really", "basically", "actually", "literally", "thing", "stuff", "good", "nice", "just"]
_END_PHRASES = ["Is there anything else I can help with?", "Let me know if you have additional questions.",
                "Any other questions?"]
_FIRST_WORDS = ["first", "today", "next", "finally", "overall", "however", "remember"]

CONSTRAINTS: list[Constraint] = [
    Constraint("punctuation:no_comma", "punctuation", lambda r, q: {},
               lambda k: "In your entire response, refrain from the use of any commas."),
    Constraint("change_case:english_lowercase", "case", lambda r, q: {},
               lambda k: "Your entire response should be in English, and in all lowercase letters. "
                         "No capital letters are allowed."),
    Constraint("change_case:english_capital", "case", lambda r, q: {},
               lambda k: "Your entire response should be in English, and in all capital letters."),
    Constraint("change_case:capital_word_frequency", "capitals",
               lambda r, q: {"capital_frequency": r.randint(2, 4), "capital_relation": r.choice(["at least", "less than"])},
               lambda k: f"In your response, words with all capital letters should appear {k['capital_relation']} "
                         f"{k['capital_frequency']} times."),
    Constraint("detectable_format:title", "title", lambda r, q: {},
               lambda k: "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>."),
    Constraint("detectable_content:postscript", "end", lambda r, q: {"postscript_marker": r.choice(["P.S.", "P.P.S"])},
               lambda k: f"At the end of your response, please explicitly add a postscript starting with "
                         f"{k['postscript_marker']}"),
    Constraint("startend:end_checker", "end", lambda r, q: {"end_phrase": r.choice(_END_PHRASES)},
               lambda k: f"Finish your response with this exact phrase {k['end_phrase']} "
                         "No other words should follow this phrase."),
    Constraint("startend:quotation", "wrap", lambda r, q: {},
               lambda k: "Wrap your entire response with double quotation marks."),
    Constraint("length_constraints:number_words", "length",
               lambda r, q: {"num_words": r.choice([50, 80, 100, 150, 200]), "relation": r.choice(["at least", "less than"])},
               lambda k: f"Answer with {k['relation']} {k['num_words']} words."),
    Constraint("length_constraints:number_sentences", "length",
               lambda r, q: {"num_sentences": r.randint(3, 8), "relation": r.choice(["at least", "less than"])},
               lambda k: f"Your response should contain {k['relation']} {k['num_sentences']} sentences."),
    Constraint("length_constraints:number_paragraphs", "paragraphs", lambda r, q: {"num_paragraphs": r.randint(2, 4)},
               lambda k: f"There should be {k['num_paragraphs']} paragraphs. Paragraphs are separated with the "
                         "markdown divider: ***"),
    Constraint("length_constraints:nth_paragraph_first_word", "paragraphs",
               lambda r, q: (lambda n: {"num_paragraphs": n, "nth_paragraph": r.randint(1, n),
                                        "first_word": r.choice(_FIRST_WORDS)})(r.randint(2, 4)),
               lambda k: f"There should be {k['num_paragraphs']} paragraphs. Paragraphs and only paragraphs are "
                         "separated with each other by two new lines as if it was '\\n\\n' in python. Paragraph "
                         f"{k['nth_paragraph']} must start with word {k['first_word']}."),
    Constraint("detectable_format:number_bullet_lists", "bullets", lambda r, q: {"num_bullets": r.randint(2, 5)},
               lambda k: f"Your answer must contain exactly {k['num_bullets']} bullet points. Use the markdown "
                         "bullet points such as:\n* This is point 1.\n* This is point 2"),
    Constraint("detectable_format:number_highlighted_sections", "highlights", lambda r, q: {"num_highlights": r.randint(1, 3)},
               lambda k: f"Highlight at least {k['num_highlights']} sections in your answer with markdown, i.e. "
                         "*highlighted section*."),
    Constraint("detectable_format:multiple_sections", "sections",
               lambda r, q: {"section_spliter": r.choice(["Section", "SECTION", "PART"]), "num_sections": r.randint(2, 4)},
               lambda k: f"Your response must have {k['num_sections']} sections. Mark the beginning of each section "
                         f"with {k['section_spliter']} X, such as:\n{k['section_spliter']} 1\n[content of section 1]\n"
                         f"{k['section_spliter']} 2\n[content of section 2]"),
    Constraint("detectable_content:number_placeholders", "placeholders", lambda r, q: {"num_placeholders": r.randint(1, 3)},
               lambda k: f"The response must contain at least {k['num_placeholders']} placeholders represented by "
                         "square brackets, such as [address]."),
    Constraint("keywords:existence", "keywords", _keywords,
               lambda k: f"Include keywords {', '.join(k['keywords'])} in the response.", needs_request=True),
    Constraint("keywords:frequency", "keyword_frequency", _frequency,
               lambda k: f"In your response, the word {k['keyword']} should appear {k['relation']} {k['frequency']} "
                         "times.", needs_request=True),
    Constraint("keywords:forbidden_words", "forbidden", lambda r, q: {"forbidden_words": r.sample(_FORBIDDEN, 2)},
               lambda k: f"Do not include keywords {', '.join(k['forbidden_words'])} in the response."),
    Constraint("keywords:letter_frequency", "letters",
               lambda r, q: {"letter": r.choice("aeinorst"), "let_frequency": r.randint(3, 10),
                             "let_relation": r.choice(["at least", "less than"])},
               lambda k: f"In your response, the letter {k['letter']} should appear {k['let_relation']} "
                         f"{k['let_frequency']} times."),
    Constraint("combination:two_responses", "two", lambda r, q: {},
               lambda k: "Give two different responses. Responses and only responses should be separated by 6 "
                         "asterisk symbols: ******."),
    Constraint("combination:repeat_prompt", "repeat", lambda r, q: {},
               lambda k: "First repeat the request word for word without change, then give your answer (1. do not "
                         "say any words or characters before repeating the request; 2. the request you need to "
                         "repeat does not include this sentence)", needs_request=True),
    Constraint("detectable_format:json_format", "solo", lambda r, q: {},
               lambda k: "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```."),
    Constraint("detectable_format:constrained_response", "solo", lambda r, q: {},
               lambda k: "Answer with one of the following options: ('My answer is yes.', 'My answer is no.', "
                         "'My answer is maybe.')", not_for=("gsm8k",)),
]
BY_ID = {c.id: c for c in CONSTRAINTS}

# Groups that cannot go together: a case rule vs text whose letters have a case (a postscript marker,
# an end phrase, a repeated request, capitalised section markers, a count of capital words); a
# letter-count upper bound vs required words; whole-response shapes vs each other.
CLASHES = {frozenset(p) for p in [
    ("case", "end"), ("case", "repeat"), ("case", "sections"), ("case", "capitals"),
    ("two", "repeat"), ("two", "wrap"), ("two", "paragraphs"), ("two", "sections"), ("two", "length"), ("two", "bullets"),
    ("repeat", "wrap"), ("repeat", "letters"), ("repeat", "length"), ("repeat", "punctuation"), ("repeat", "forbidden"),
    ("letters", "keywords"), ("letters", "keyword_frequency"), ("letters", "length"), ("letters", "paragraphs"),
    ("letters", "sections"), ("letters", "end"), ("letters", "two"),
    ("keyword_frequency", "keywords"),
]}


def compatible(picked: list[Constraint], c: Constraint) -> bool:
    groups = {p.group for p in picked}
    if c.group in groups or (picked and (c.group == "solo" or "solo" in groups)):
        return False
    return not any(frozenset((c.group, g)) in CLASHES for g in groups)


def draw(rng: random.Random, k: int, request: str | None = None, kind: str = "") -> list[tuple[Constraint, dict]]:
    """``k`` compatible constraints with their kwargs (the ``solo`` ones only when ``k`` is 1). Without
    a ``request`` (it is not known yet) the constraints that need one are left out; a request without
    content words cannot take keyword constraints."""
    picked: list[tuple[Constraint, dict]] = []
    for c in rng.sample(CONSTRAINTS, len(CONSTRAINTS)):
        if len(picked) == k:
            break
        if (c.needs_request and request is None) or (c.group == "solo" and k > 1) or kind in c.not_for \
                or not compatible([p for p, _ in picked], c):
            continue
        kwargs = c.sample(rng, request or "")
        if c.needs_request and c.id != "combination:repeat_prompt" and not kwargs:
            continue
        picked.append((c, kwargs))
    return picked


def constrain(request: str, picked: list[tuple[Constraint, dict]]) -> tuple[str, dict]:
    """The prompt (request, then each constraint's sentence) and its IFEval ground truth."""
    others = [(c, kw) for c, kw in picked if c.id != "combination:repeat_prompt"]
    body = " ".join([request.strip()] + [c.describe(kw) for c, kw in others])
    ids, kwargs = [c.id for c, _ in others], [kw for _, kw in others]
    repeat = [c for c, _ in picked if c.id == "combination:repeat_prompt"]
    if repeat:
        ids.append(repeat[0].id)
        kwargs.append({"prompt_to_repeat": body})
        body = f"{body} {repeat[0].describe({})}"
    return body, {"instruction_id_list": ids, "kwargs": kwargs}


# --- base requests from local files ------------------------------------------------------------

PERSONA_TEMPLATES = [
    "Write a short letter that {persona} might send to a friend about a recent day at work.",
    "Explain one thing about the daily work of {persona} that most people get wrong.",
    "Write a short blog post from the point of view of {persona}.",
    "Give advice that {persona} would find useful this week.",
    "Describe a typical morning of {persona}.",
]


def _lower_first(text: str) -> str:
    """``A nurse`` -> ``a nurse``; an acronym (``NGO worker``) is kept."""
    return text if text[1:2].isupper() else text[:1].lower() + text[1:]


def request_texts(raw: dict, where: str) -> list[tuple[str, str]]:
    """``(kind, text)`` base requests of one record: a self-instruct task, an hh-rlhf conversation, a
    GSM8K question, a persona (one request per template), or a prompt record."""
    from posttrain.data.adapters import parse_hh_text, self_instruct_task
    from posttrain.data.synth.prompts import prompt_record, user_text

    if isinstance(raw.get("instances"), list) and isinstance(raw.get("instruction"), str):
        return [("self_instruct", self_instruct_task(raw, where)[0])]
    if isinstance(raw.get("chosen"), str):
        return [("hh_rlhf", parse_hh_text(raw["chosen"], where, "chosen")[0]["content"])]
    if isinstance(raw.get("persona"), str):
        persona = _lower_first(raw["persona"].strip().rstrip("."))
        return [("persona", t.format(persona=persona)) for t in PERSONA_TEMPLATES]
    if isinstance(raw.get("question"), str) and isinstance(raw.get("answer"), str):
        return [("gsm8k", raw["question"].strip())]
    return [("prompt", user_text(prompt_record(raw, where)["messages"]) or "")]


def read_requests(paths: list[str], min_words: int = 4, max_words: int = 200) -> tuple[list[dict], Counter]:
    """Every base request of every file (``{"text", "kind", "source", "where"}``), de-duplicated, between
    ``min_words`` and ``max_words`` words; the counter says how many of each kind were dropped as too
    short/long or repeated."""
    from posttrain.data.io import read_records

    out, seen, dropped = [], set(), Counter()
    for path in paths:
        for raw, where in read_records(path):
            for kind, text in request_texts(raw, where):
                text = text.strip()
                n = len(text.split())
                if n < min_words or n > max_words:
                    dropped[f"{kind}: length"] += 1
                elif text.lower() in seen:
                    dropped[f"{kind}: duplicate"] += 1
                else:
                    seen.add(text.lower())
                    out.append({"text": text, "kind": kind, "source": path, "where": where})
    if not out:
        raise UserError(f"{', '.join(paths)}: no usable requests (each needs {min_words}-{max_words} words)")
    return out, dropped


def build(requests: list[dict], n: int, seed: int = 0, min_constraints: int = 1,
          max_constraints: int = 3) -> list[dict]:
    """``n`` RLVR prompt records, each with ``min..max`` constraints. Requests are taken kind by kind in
    turn (each kind in a seeded order), so a large kind (GSM8K) does not crowd out the others until the
    small ones run out; past the last request the order starts again, with new constraints."""
    if not 1 <= min_constraints <= max_constraints:
        raise UserError(f"constraints per prompt: need 1 <= min <= max, got {min_constraints}..{max_constraints}")
    rng = random.Random(seed)
    kinds: dict[str, list[dict]] = {}
    for r in requests:
        kinds.setdefault(r["kind"], []).append(r)
    queues = [rng.sample(rs, len(rs)) for _, rs in sorted(kinds.items())]
    order = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    records = []
    for i in range(n):
        req = order[i % len(order)]
        picked = draw(rng, rng.randint(min_constraints, max_constraints), req["text"], req["kind"])
        prompt, truth = constrain(req["text"], picked)
        records.append({"id": f"if_{seed}_{i}", "messages": [{"role": "user", "content": prompt}],
                        "ground_truth": truth, "verifier": "ifeval", "source": f"constraints/{req['kind']}",
                        "request_source": req["where"]})
    return records
