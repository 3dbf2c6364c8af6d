"""IFEval instruction checks, as in Google's instruction_following_eval, with partial credit.

``ground_truth`` (a dict or its JSON string) is one of
- IFEval's ``{"instruction_id_list": [...], "kwargs": [{...}, ...]}``;
- open-instruct's newer IF data (IFEvalG): ``{"instruction_id": [...], "kwargs": [...]}``, or a list
  holding one such object (only IFEval's 25 instruction ids are known here);
- open-instruct's ``allenai/RLVR-IFeval`` (Tulu 3): ``{"func_name": NAME, ...kwargs}``, one constraint
  checked with open-instruct's semantics (posttrain.rewards.ifeval_functions).
``None`` kwargs are ignored. The score is the fraction
of the listed instructions the response follows (Tulu 3's partial credit). ``strict`` checks the
response as it is; ``loose`` also accepts an instruction when any of these variants follows it:
the response with ``*`` removed, with its first line dropped, its last line dropped, both dropped,
and each of those with ``*`` removed.

Offline text processing: sentences are split with nltk's Punkt model when its data is installed,
otherwise with nltk's untrained ``PunktSentenceTokenizer`` (its built-in rules; it ships with the
nltk package, nothing is downloaded); words for ``number_words`` are ``\\w+`` runs (as the
original); words for ``capital_word_frequency`` come from nltk's ``NLTKWordTokenizer`` (the
Treebank-style tokenizer behind ``word_tokenize``, no data needed). Language detection uses
``langdetect`` with a fixed seed.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from collections.abc import Callable

from posttrain.errors import UserError
from posttrain.rewards.ifeval_functions import FUNCTIONS

_RELATIONS = ("less than", "at least")


def _compare(count: int, relation: str, n: int) -> bool:
    if relation == "less than":
        return count < n
    if relation == "at least":
        return count >= n
    raise ValueError(f"unknown relation {relation!r}; expected one of {_RELATIONS}")


_IMPORT_LOCK = threading.Lock()  # first imports of nltk / langdetect from several scorer threads race
_SENTENCES: list = []  # the sentence splitter, made once


def split_sentences(text: str) -> list[str]:
    if not _SENTENCES:
        with _IMPORT_LOCK:
            if not _SENTENCES:
                import nltk
                from nltk.tokenize.punkt import PunktSentenceTokenizer

                try:
                    nltk.sent_tokenize("A test. Another one.")
                    _SENTENCES.append(nltk.sent_tokenize)
                except LookupError:  # no Punkt data installed: the untrained tokenizer's rules
                    _SENTENCES.append(PunktSentenceTokenizer().tokenize)
    return _SENTENCES[0](text)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def detect_language(text: str) -> str | None:
    with _IMPORT_LOCK:  # langdetect's detector factory is a lazily built global
        from langdetect import DetectorFactory, detect
        from langdetect.lang_detect_exception import LangDetectException

        DetectorFactory.seed = 0
        try:
            return detect(text)
        except LangDetectException:
            return None


# --- the 25 instruction checks: check(response, **kwargs) -> bool -------------------------------

def keywords_existence(r, keywords):
    return all(re.search(k, r, flags=re.IGNORECASE) for k in keywords)


def keywords_frequency(r, keyword, frequency, relation):
    return _compare(len(re.findall(keyword, r, flags=re.IGNORECASE)), relation, frequency)


def keywords_forbidden_words(r, forbidden_words):
    return not any(re.search(r"\b" + w + r"\b", r, flags=re.IGNORECASE) for w in forbidden_words)


def keywords_letter_frequency(r, letter, let_frequency, let_relation):
    return _compare(r.lower().count(letter.lower()), let_relation, let_frequency)


def language_response_language(r, language):
    return detect_language(r) == language


def number_sentences(r, num_sentences, relation):
    return _compare(len(split_sentences(r)), relation, num_sentences)


def number_paragraphs(r, num_paragraphs):
    paragraphs = re.split(r"\s?\*\*\*\s?", r)
    count = len(paragraphs)
    for i, p in enumerate(paragraphs):
        if not p.strip():
            if i in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == num_paragraphs


def number_words(r, num_words, relation):
    return _compare(len(_words(r)), relation, num_words)


def nth_paragraph_first_word(r, num_paragraphs, nth_paragraph, first_word):
    paragraphs = re.split(r"\n\n", r)
    count = sum(1 for p in paragraphs if p.strip())
    if count != num_paragraphs or nth_paragraph > count:
        return False
    nth = [p for p in paragraphs if p.strip()][nth_paragraph - 1].strip()
    word = nth.split()[0] if nth.split() else ""
    word = word.lstrip("'\"").rstrip(".,!?;:'\"").lower()
    return word == first_word.lower()


def number_placeholders(r, num_placeholders):
    return len(re.findall(r"\[.*?\]", r)) >= num_placeholders


def postscript(r, postscript_marker):
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, r.lower(), flags=re.MULTILINE))


def number_bullet_lists(r, num_bullets):
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def constrained_response(r):
    return any(option in r.strip() for option in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


def number_highlighted_sections(r, num_highlights):
    single = [h for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double) >= num_highlights


def multiple_sections(r, section_spliter, num_sections):
    sections = re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", r)
    return len(sections) - 1 >= num_sections


def json_format(r):
    text = r.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON").removeprefix("```")
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def title(r):
    return any(t.strip("<>").strip() for t in re.findall(r"<<[^\n]+>>", r))


def two_responses(r):
    parts = r.split("******")
    valid = [p.strip() for i, p in enumerate(parts) if p.strip() or i not in (0, len(parts) - 1)]
    return len(valid) == 2 and all(valid) and valid[0] != valid[1]


def repeat_prompt(r, prompt_to_repeat):
    return r.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(r, end_phrase):
    return r.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def capital_word_frequency(r, capital_frequency, capital_relation):
    with _IMPORT_LOCK:
        from nltk.tokenize import NLTKWordTokenizer

    words = NLTKWordTokenizer().tokenize(r)
    return _compare(sum(1 for w in words if w.isupper()), capital_relation, capital_frequency)


def english_capital(r):
    return r.isupper() and detect_language(r) == "en"


def english_lowercase(r):
    return r.islower() and detect_language(r) == "en"


def no_comma(r):
    return "," not in r


def quotation(r):
    r = r.strip()
    return len(r) > 1 and r[0] == '"' and r[-1] == '"'


CHECKS: dict[str, Callable[..., bool]] = {
    "keywords:existence": keywords_existence,
    "keywords:frequency": keywords_frequency,
    "keywords:forbidden_words": keywords_forbidden_words,
    "keywords:letter_frequency": keywords_letter_frequency,
    "language:response_language": language_response_language,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:number_words": number_words,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "detectable_content:number_placeholders": number_placeholders,
    "detectable_content:postscript": postscript,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:constrained_response": constrained_response,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "combination:two_responses": two_responses,
    "combination:repeat_prompt": repeat_prompt,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
    "change_case:capital_word_frequency": capital_word_frequency,
    "change_case:english_capital": english_capital,
    "change_case:english_lowercase": english_lowercase,
    "punctuation:no_comma": no_comma,
}


def loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    base = [response, first, last, both]
    return [v for v in base + [v.replace("*", "") for v in base] if v.strip()]


def checks(ground_truth) -> list[tuple[Callable[..., bool], dict]]:
    """The (check, kwargs) pairs a ground truth of any of the accepted formats asks for."""
    gt = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    if isinstance(gt, list) and len(gt) == 1:
        gt = gt[0]
    if not isinstance(gt, dict):
        raise UserError(f"ifeval ground truth: expected an object, got {type(gt).__name__}")
    if "func_name" in gt:
        if gt["func_name"] not in FUNCTIONS:
            raise UserError(f"ifeval ground truth: unknown func_name {gt['func_name']!r}")
        func = FUNCTIONS[gt["func_name"]]
        params = set(inspect.signature(func).parameters) - {"text"}
        return [(lambda text, **kw: func(text.strip(), **kw),  # open-instruct checks the stripped response
                 {k: v for k, v in gt.items() if k in params and v is not None})]
    ids = gt.get("instruction_id_list", gt.get("instruction_id"))
    if not isinstance(ids, list):
        raise UserError("ifeval ground truth: needs 'instruction_id_list' (IFEval), 'instruction_id' or 'func_name'")
    kwargs = gt.get("kwargs") or [{}] * len(ids)
    unknown = [i for i in ids if i not in CHECKS]
    if unknown:
        raise UserError(f"ifeval ground truth: unknown instruction {unknown[0]!r} (known: IFEval's 25)")
    return [(CHECKS[i], {k: v for k, v in (kw or {}).items() if v is not None}) for i, kw in zip(ids, kwargs)]


def followed(response: str, ground_truth, loose: bool = False) -> list[bool]:
    """Per instruction of ``ground_truth``: does ``response`` follow it?"""
    pairs = checks(ground_truth)
    variants = loose_variants(response) if loose else [response]
    return [bool(variants) and any(check(v, **kw) for v in variants) for check, kw in pairs]


def score(response: str, ground_truth) -> float:
    result = followed(response, ground_truth)
    return sum(result) / len(result) if result else 0.0


def score_loose(response: str, ground_truth) -> float:
    result = followed(response, ground_truth, loose=True)
    return sum(result) / len(result) if result else 0.0
