"""IFEval checks: at least three hand-written cases per instruction type, partial credit, loose mode."""

import json

import pytest
from conftest import DATA

from posttrain.rewards import get_verifier, ifeval

EN = "This is a plain English sentence about the weather and the sea."

# (instruction id, kwargs, response, followed?)
CASES = [
    ("keywords:existence", {"keywords": ["sea", "weather"]}, EN, True),
    ("keywords:existence", {"keywords": ["sea", "mountain"]}, EN, False),
    ("keywords:existence", {"keywords": ["WEATHER"]}, EN, True),
    ("keywords:frequency", {"keyword": "the", "frequency": 2, "relation": "at least"}, EN, True),
    ("keywords:frequency", {"keyword": "the", "frequency": 2, "relation": "less than"}, EN, False),
    ("keywords:frequency", {"keyword": "sea", "frequency": 2, "relation": "less than"}, EN, True),
    ("keywords:forbidden_words", {"forbidden_words": ["rain", "snow"]}, EN, True),
    ("keywords:forbidden_words", {"forbidden_words": ["Weather"]}, EN, False),
    ("keywords:forbidden_words", {"forbidden_words": ["sea"]}, "The season is here.", True),  # whole words only
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 1, "let_relation": "less than"}, EN, True),
    ("keywords:letter_frequency", {"letter": "e", "let_frequency": 8, "let_relation": "at least"}, EN, True),
    ("keywords:letter_frequency", {"letter": "E", "let_frequency": 20, "let_relation": "at least"}, EN, False),
    ("language:response_language", {"language": "en"}, EN, True),
    ("language:response_language", {"language": "de"},
     "Das ist ein ganz normaler deutscher Satz über das Wetter und das Meer.", True),
    ("language:response_language", {"language": "fr"}, EN, False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, "One. Two. Three.", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "One. Two. Three.", False),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "Just one sentence here.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "First part.\n***\nSecond part.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A.\n***\n\n***\nB.", False),  # empty middle
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, EN, True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, EN, False),
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"}, "two words", True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First we go.\n\nThen we stop.", True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First we go.\n\nNow we stop.", False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "then"},
     "First we go.\n\nThen we stop.", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 3}, "Dear [name], at [address].", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 1}, "No placeholders.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body.\nP.S. see you", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Body.\nP.P.S more", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body without one.", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "- one\n* two\n- three", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* three", False),
    ("detectable_format:constrained_response", {}, "My answer is yes.", True),
    ("detectable_format:constrained_response", {}, "Well... My answer is maybe.", True),
    ("detectable_format:constrained_response", {}, "Yes.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and ** **", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "plain", False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nintro\nSection 2\nmore", True),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 3},
     "SECTION 1\nintro\nSECTION 2\nmore", False),
    ("detectable_format:multiple_sections", {"section_spliter": "Part", "num_sections": 1}, "no parts", False),
    ("detectable_format:json_format", {}, '{"a": 1}', True),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', True),
    ("detectable_format:json_format", {}, "{a: 1}", False),
    ("detectable_format:title", {}, "<<A Title>>\nText", True),
    ("detectable_format:title", {}, "<< >>\nText", False),
    ("detectable_format:title", {}, "No title", False),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", True),
    ("combination:two_responses", {}, "Same.\n******\nSame.", False),
    ("combination:two_responses", {}, "Only one.", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Say hi. Hi!", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say HI. hi", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Hi! Say hi.", False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. any other questions?  ", True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? Done.", False),
    ("startend:quotation", {}, '"All quoted."', True),
    ("startend:quotation", {}, '  "Quoted with spaces"  ', True),
    ("startend:quotation", {}, 'Not "quoted"', False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THIS is VERY important", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "THIS is VERY important", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 1, "capital_relation": "less than"},
     "nothing loud here", True),
    ("change_case:english_capital", {}, EN.upper(), True),
    ("change_case:english_capital", {}, EN, False),
    ("change_case:english_capital", {}, "DAS IST EIN GANZ NORMALER DEUTSCHER SATZ ÜBER DAS WETTER UND DAS MEER.", False),
    ("change_case:english_lowercase", {}, EN.lower(), True),
    ("change_case:english_lowercase", {}, EN, False),
    ("change_case:english_lowercase", {}, "das ist ein ganz normaler deutscher satz über das wetter und das meer.", False),
    ("punctuation:no_comma", {}, "No commas here.", True),
    ("punctuation:no_comma", {}, "One, two.", False),
    ("punctuation:no_comma", {}, "", True),
]


def test_every_instruction_type_has_three_cases():
    counts = {}
    for iid, *_ in CASES:
        counts[iid] = counts.get(iid, 0) + 1
    assert set(counts) == set(ifeval.CHECKS) and len(counts) == 25
    assert min(counts.values()) >= 3


@pytest.mark.parametrize("iid, kwargs, response, want", CASES)
def test_instruction(iid, kwargs, response, want):
    assert ifeval.followed(response, {"instruction_id_list": [iid], "kwargs": [kwargs]}) == [want]


def test_partial_credit_loose_mode_and_json_ground_truth():
    gt = {"instruction_id_list": ["punctuation:no_comma", "startend:quotation", "detectable_format:title"],
          "kwargs": [{}, {}, {}]}
    assert get_verifier("ifeval")('"No commas, sorry"', gt) == pytest.approx(1 / 3)
    assert get_verifier("ifeval")(json.dumps(gt) and '"<<T>> fine"', json.dumps(gt)) == 1.0
    wrapped = "Sure! Here it is:\n**<<T>>** text without commas\nHope that helps, friend."
    assert get_verifier("ifeval")(wrapped, gt) == pytest.approx(1 / 3)  # the comma in the last line fails strict
    assert ifeval.followed(wrapped, gt, loose=True) == [True, False, True]
    assert get_verifier("ifeval_loose")(wrapped, gt) == pytest.approx(2 / 3)


def test_every_dev_record_is_checkable():
    rows = [json.loads(x) for x in open(DATA / "ifeval/ifeval_dev.jsonl")]
    for r in rows:
        result = ifeval.followed("A response.\nP.S. thanks", {"instruction_id_list": r["instruction_id_list"],
                                                               "kwargs": r["kwargs"]})
        assert len(result) == len(r["instruction_id_list"])


# --- open-instruct's formats: RLVR-IFeval's func_name + kwargs, IFEvalG's instruction_id ------------

def _tulu(func_name, **kwargs):
    """A ground truth as RLVR-IFeval stores it: every parameter key present, unused ones null."""
    keys = ["N", "quantifier", "end_phrase", "keyword_list", "word", "forbidden_words", "letter", "i", "first_word",
            "postscript_marker", "options", "section_splitter", "original_prompt"]
    return json.dumps({"func_name": func_name, **{k: None for k in keys}, **kwargs})


FUNC_CASES = [  # (ground truth, response, followed?) by open-instruct's semantics
    (_tulu("validate_lowercase"), "all lower case here", True),
    (_tulu("validate_lowercase"), "Not lower", False),
    (_tulu("validate_uppercase"), "ALL UPPER 123", True),
    (_tulu("verify_keyword_frequency", word="sea", N=2), "The sea, the Sea! seaside", True),  # exact count
    (_tulu("verify_keyword_frequency", word="sea", N=1), "The sea, the Sea!", False),
    (_tulu("verify_letter_frequency", letter="a", N=3), "a banana", False),  # 4 a's, case-sensitive
    (_tulu("verify_letter_frequency", letter="a", N=4), "a banana", True),
    (_tulu("validate_word_constraint", N=10, quantifier="around"), " ".join(["w"] * 11), True),  # +-1 for N=10
    (_tulu("validate_word_constraint", N=10, quantifier="around"), " ".join(["w"] * 12), False),
    (_tulu("validate_word_constraint", N=3, quantifier="at most"), "one two three", True),
    (_tulu("verify_sentence_constraint", N=2, quantifier="at least"), "One. Two? Three", True),
    (_tulu("verify_paragraph_count", N=2), "First.\n* * *\nSecond.", True),
    (_tulu("verify_paragraph_count", N=2), "First.\n***\nSecond.", False),  # this format wants '* * *'
    (_tulu("validate_paragraphs", N=2, first_word="Then", i=2), "First.\n\nThen more.", True),
    (_tulu("verify_postscript", postscript_marker="P.S."), "Body.\nP.S. more", True),
    (_tulu("verify_postscript", postscript_marker="P.S."), "Body.\nP.S.", False),
    (_tulu("verify_bullet_points", N=2), "* one\n- two\nthree", True),
    (_tulu("validate_sections", N=2, section_splitter="SECTION"), "SECTION 1 a SECTION 2 b", True),
    (_tulu("validate_two_responses"), "first ****** second", True),
    (_tulu("validate_two_responses"), "same ****** same", False),
    (_tulu("validate_end", end_phrase="Bye."), "  Hello. Bye.\n", True),  # stripped first
    (_tulu("validate_quotation"), '"quoted"', True),
    (_tulu("validate_no_commas"), "a, b", False),
    (_tulu("validate_choice", options=["My answer is yes.", "My answer is no."]), "My answer is no.", True),
    (_tulu("validate_json_format"), '{"a": 1}', True),
    (_tulu("validate_repeat_prompt", original_prompt="Say hi."), "Say hi. Hi!", True),
    (_tulu("verify_keywords", keyword_list=["Sea", "wind"]), "the sea and the wind", True),
    (_tulu("validate_forbidden_words", forbidden_words=["sea"]), "the season", False),  # substrings count here
    (_tulu("validate_frequency_capital_words", N=2, quantifier="at least"), "THE BIG dog", True),
    (_tulu("validate_placeholders", N=2), "[a] and [b]", True),
    (_tulu("validate_highlighted_sections", N=1), "an *important* part", True),
    (_tulu("validate_title"), "<<A title>>", True),
    (_tulu("validate_response_language", language="en"), EN, True),
]


@pytest.mark.parametrize("truth,response,want", FUNC_CASES)
def test_open_instruct_func_name_ground_truth(truth, response, want):
    assert get_verifier("ifeval")(response, truth) == float(want)


def test_every_open_instruct_function_has_a_case_and_formats_agree():
    from posttrain.rewards.ifeval_functions import FUNCTIONS

    assert {json.loads(t)["func_name"] for t, _, _ in FUNC_CASES} == set(FUNCTIONS)
    ifevalg = [{"instruction_id": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}, {}]}]
    assert get_verifier("ifeval")('"no commas here"', ifevalg) == 1.0
    assert get_verifier("ifeval")('"a, b"', json.dumps(ifevalg)) == 0.5
    with pytest.raises(Exception, match="unknown instruction 'new:thing'"):
        ifeval.followed("x", {"instruction_id": ["new:thing"], "kwargs": [{}]})
    with pytest.raises(Exception, match="unknown func_name 'nope'"):
        ifeval.followed("x", {"func_name": "nope"})
