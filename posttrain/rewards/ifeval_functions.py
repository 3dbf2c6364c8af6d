"""The constraint checks of open-instruct's IF RLVR data (Tulu 3's ``allenai/RLVR-IFeval``).

There a prompt's ground truth is one constraint, a JSON object ``{"func_name": NAME, ...kwargs}``
whose unused keys are ``null``, e.g. ``{"func_name": "validate_word_constraint", "N": 150,
"quantifier": "at least", "end_phrase": null, ...}``. The checks below follow the semantics the data
was made for (they differ from IFEval's in places: counts are exact where IFEval says "at least",
case rules compare the text with its upper/lower-cased self, no language check). The response is
stripped of surrounding whitespace first. ``FUNCTIONS`` maps each name to its check.
"""

from __future__ import annotations

import json
import re


def _quantified(count: int, n: int, quantifier: str, around: int) -> bool:
    return {"at least": count >= n, "at most": count <= n, "around": abs(count - n) <= around}.get(quantifier, False)


def verify_keywords(text, keyword_list):
    return all(k.lower() in text.lower() for k in keyword_list)


def verify_keyword_frequency(text, word, N):
    return re.findall(r"\b\w+\b", text.lower()).count(word.lower()) == N


def validate_forbidden_words(text, forbidden_words):
    return not any(w.lower() in text.lower() for w in forbidden_words)


def verify_letter_frequency(text, letter, N):
    return len(letter) == 1 and text.count(letter) == N


def validate_response_language(text, language):
    from posttrain.rewards.ifeval import detect_language

    return detect_language(text) == language


def verify_paragraph_count(text, N):
    parts = "\n".join(line.strip() for line in text.splitlines()).strip().split("* * *")
    return all(p.strip() for p in parts) and len(parts) == N


def validate_word_constraint(text, N, quantifier):
    return _quantified(len(text.split()), N, quantifier, max(round(0.1 * N), 1))


def verify_sentence_constraint(text, N, quantifier):
    sentences = re.split(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?)\s", text)
    return _quantified(len(sentences), N, quantifier, 1)


def validate_paragraphs(text, N, first_word, i):
    paragraphs = text.split("\n\n")
    return len(paragraphs) == N and 1 <= i <= N and paragraphs[i - 1].strip().startswith(first_word)


def verify_postscript(text, postscript_marker):
    at = text.find(postscript_marker)
    return at >= 0 and len(text[at:].strip()) > len(postscript_marker)


def validate_placeholders(text, N):
    return len(re.findall(r"\[(.*?)\]", text)) >= N


def verify_bullet_points(text, N):
    return sum(line.strip().startswith(("*", "-")) for line in text.split("\n")) == N


def validate_title(text):
    return bool(re.search(r"<<(.*?)>>", text))


def validate_choice(text, options):
    return any(text in option for option in options)


def validate_highlighted_sections(text, N):
    return len(re.findall(r"\*(.*?)\*", text)) >= N


def validate_sections(text, N, section_splitter):
    sections = text.split(section_splitter)
    return len(sections[1:] if sections[0] == "" else sections) == N


def validate_json_format(text):
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def validate_repeat_prompt(text, original_prompt):
    return text.startswith(original_prompt)


def validate_two_responses(text):
    parts = text.split("******")
    return len(parts) == 2 and parts[0].strip() != parts[1].strip()


def validate_uppercase(text):
    return text == text.upper()


def validate_lowercase(text):
    return text == text.lower()


def validate_frequency_capital_words(text, N, quantifier):
    return _quantified(len(re.findall(r"\b[A-Z]+\b", text)), N, quantifier, 0)


def validate_end(text, end_phrase):
    return text.endswith(end_phrase)


def validate_quotation(text):
    return text.startswith('"') and text.endswith('"')


def validate_no_commas(text):
    return "," not in text


FUNCTIONS = {f.__name__: f for f in [
    verify_keywords, verify_keyword_frequency, validate_forbidden_words, verify_letter_frequency,
    validate_response_language, verify_paragraph_count, validate_word_constraint, verify_sentence_constraint,
    validate_paragraphs, verify_postscript, validate_placeholders, verify_bullet_points, validate_title,
    validate_choice, validate_highlighted_sections, validate_sections, validate_json_format, validate_repeat_prompt,
    validate_two_responses, validate_uppercase, validate_lowercase, validate_frequency_capital_words, validate_end,
    validate_quotation, validate_no_commas]}
