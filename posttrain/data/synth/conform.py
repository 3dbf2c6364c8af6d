"""Constraint-following SFT data without a teacher model: a reference reply, edited to meet the prompt's
constraints, kept only when the ``ifeval`` verifier passes it.

A prompt of ``posttrain data constraints`` names its base request's record (``request_source``,
``path:line``). That record's own reply is the reference: a self-instruct instance's output, the first
assistant turn of an hh-rlhf ``chosen`` conversation, a GSM8K solution (persona requests have none).
Each constraint has a deterministic edit, applied in an order that keeps earlier edits intact:

1. length: "less than" bounds keep the first sentences that fit (with a margin for text added later);
2. words: forbidden words are replaced or dropped, commas removed;
3. shape: the reply's sentences are dealt into paragraphs (``***`` dividers or blank lines, a required
   first word), ``SECTION k`` blocks, exactly ``n`` bullet lines or two responses (``******``); the
   first sentences outside bullets are ``*highlighted*``;
4. additions: placeholders (``[name]``), words in capitals, a ``<<title>>``, a postscript or end phrase;
5. case (all lower / all upper), then wrapping (double quotes, JSON), then the repeated request in front.

Constraints without an edit (at-least lengths, keywords, letter counts, language, yes/no answers) are
only checked. Every edited reply is scored by ``posttrain.rewards.ifeval`` (strict); a record is kept
only when every constraint is followed, so an edit that falls short costs a record, never a wrong label.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter

_REPLACE = {"very": "", "really": "", "basically": "", "actually": "", "literally": "", "just": "",
            "thing": "item", "stuff": "material", "good": "fine", "nice": "pleasant"}
_POSTSCRIPTS = ["I hope this helps.", "Feel free to ask if anything is unclear.", "Thanks for the question."]
_PLACEHOLDERS = ["[name]", "[date]", "[place]"]
_ADDED = ("detectable_content:postscript", "startend:end_checker", "detectable_content:number_placeholders",
          "detectable_format:title")


def reference_reply(raw: dict, where: str) -> str | None:
    """The reply a base-request record already carries (``None`` for personas and prompt files)."""
    from posttrain.data.adapters import gsm8k_solution, parse_hh_text, self_instruct_task

    if isinstance(raw.get("instances"), list) and isinstance(raw.get("instruction"), str):
        return self_instruct_task(raw, where)[1] or None
    if isinstance(raw.get("chosen"), str):
        turns = parse_hh_text(raw["chosen"], where, "chosen")
        return turns[1]["content"] if len(turns) > 1 and turns[1]["role"] == "assistant" else None
    if isinstance(raw.get("question"), str) and isinstance(raw.get("answer"), str):
        return gsm8k_solution(raw["answer"])
    return None


def read_references(prompts: list[dict]) -> dict[str, tuple[str, str]]:
    """``request_source`` -> (base request, reference reply), reading each named file once."""
    from posttrain.data.io import read_records
    from posttrain.data.synth.constraints import request_texts

    paths = sorted({p["request_source"].rsplit(":", 1)[0] for p in prompts if p.get("request_source")})
    out = {}
    for path in paths:
        for raw, where in read_records(path):
            reply = reference_reply(raw, where)
            if reply and reply.strip():
                out[where] = (request_texts(raw, where)[0][1].strip(), reply.strip())
    return out


def _sentences(text: str) -> list[str]:
    from posttrain.rewards.ifeval import split_sentences

    lines = [re.sub(r"^\s*(?:[*-]|\d+[.)])\s+", "", line) for line in text.splitlines()]
    return [s.strip() for s in split_sentences(" ".join(" ".join(lines).split())) if s.strip()]


def _deal(items: list[str], n: int) -> list[list[str]]:
    """``items`` in order, into ``n`` non-empty runs as even as possible."""
    q, r = divmod(len(items), n)
    out, i = [], 0
    for k in range(n):
        size = q + (k < r)
        out.append(items[i:i + size])
        i += size
    return out


def _trim(text: str, truth: dict) -> str | None:
    ids = truth["instruction_id_list"]
    margin = sum(i in _ADDED for i in ids)
    for i, kw in zip(ids, truth["kwargs"]):
        if i == "length_constraints:number_words" and kw["relation"] == "less than":
            budget, kept, sents = kw["num_words"] - 1 - 8 * margin, [], _sentences(text)
            for s in sents:
                if len(re.findall(r"\w+", " ".join(kept + [s]))) > budget:
                    break
                kept.append(s)
            if not kept:
                return None
            text = " ".join(kept) if len(kept) < len(sents) else text
        if i == "length_constraints:number_sentences" and kw["relation"] == "less than":
            sents = _sentences(text)
            keep = kw["num_sentences"] - 1 - margin
            if keep < 1:
                return None
            if len(sents) > keep:
                text = " ".join(sents[:keep])
    return text


def _words(text: str, truth: dict) -> str:
    for i, kw in zip(truth["instruction_id_list"], truth["kwargs"]):
        if i == "keywords:forbidden_words":
            for w in kw["forbidden_words"]:
                text = re.sub(r"\b" + re.escape(w) + r"\b", _REPLACE.get(w.lower(), ""), text, flags=re.IGNORECASE)
            text = re.sub(r"[ \t]{2,}", " ", re.sub(r" +([.,!?;:])", r"\1", text))
        if i == "punctuation:no_comma":
            text = text.replace(",", "")
    return text


def _shape(text: str, truth: dict) -> str | None:
    kw = dict(zip(truth["instruction_id_list"], truth["kwargs"]))
    shaped = {"length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word",
              "detectable_format:multiple_sections", "detectable_format:number_bullet_lists",
              "combination:two_responses", "detectable_format:number_highlighted_sections"}
    if not shaped & set(kw):
        return text
    sents = [s.replace("*", "") for s in _sentences(text)]
    if "combination:two_responses" in kw:
        if len(sents) < 2:
            return None
        text = " ".join(sents) + "\n******\n" + " ".join(sents[:max(1, len(sents) // 2)])
        return _highlight(text, kw) if "detectable_format:number_highlighted_sections" in kw else text
    n_bullets = kw.get("detectable_format:number_bullet_lists", {}).get("num_bullets", 0)
    para = kw.get("length_constraints:number_paragraphs") or kw.get("length_constraints:nth_paragraph_first_word") \
        or {}
    n_blocks = para.get("num_paragraphs") or kw.get("detectable_format:multiple_sections", {}).get("num_sections", 1)
    n_high = kw.get("detectable_format:number_highlighted_sections", {}).get("num_highlights", 0)
    prose = sents[:len(sents) - n_bullets] if n_bullets else sents
    bullets = sents[len(prose):]
    if len(prose) < max(n_blocks, n_high) or len(bullets) < n_bullets:
        return None
    for k in range(min(n_high, len(prose))):
        prose[k] = f"*{prose[k]}*"
    blocks = [" ".join(run) for run in _deal(prose, n_blocks)]
    if bullets:
        blocks[-1] += "\n" + "\n".join(f"* {b}" for b in bullets)
    nth = kw.get("length_constraints:nth_paragraph_first_word")
    if nth:
        k = nth["nth_paragraph"] - 1
        first = blocks[k]
        lead = first[1:] if first.startswith("*") else first
        lead = lead[:1].lower() + lead[1:] if lead[:2].istitle() else lead
        blocks[k] = ("*" if first.startswith("*") else "") + f"{nth['first_word'].capitalize()} {lead}"
    sec = kw.get("detectable_format:multiple_sections")
    if sec:
        blocks = [f"{sec['section_spliter']} {k + 1}\n{b}" for k, b in enumerate(blocks)]
    joiner = "\n\n***\n\n" if "length_constraints:number_paragraphs" in kw else "\n\n"
    return joiner.join(blocks)


def _highlight(text: str, kw: dict) -> str:
    """The first response's first sentences (split again after joining, as the data was built) highlighted."""
    n = kw["detectable_format:number_highlighted_sections"]["num_highlights"]
    first, sep, rest = text.partition("\n******\n")
    sents = _sentences(first)
    sents[:n] = [f"*{s}*" for s in sents[:n]]
    return " ".join(sents) + sep + rest


def _add(text: str, truth: dict, request: str, rng: random.Random) -> str:
    kw = dict(zip(truth["instruction_id_list"], truth["kwargs"]))
    para = "\n" if "length_constraints:nth_paragraph_first_word" in kw else "\n\n"
    if "detectable_content:number_placeholders" in kw:
        n = kw["detectable_content:number_placeholders"]["num_placeholders"]
        slots = " and ".join(_PLACEHOLDERS[:n])
        text += f" Fill in {slots} to make it your own."
    if "change_case:capital_word_frequency" in kw and kw["change_case:capital_word_frequency"]["capital_relation"] == "at least":
        need = kw["change_case:capital_word_frequency"]["capital_frequency"]
        words = re.findall(r"\b[a-zA-Z]{4,}\b", text)
        for w in list(dict.fromkeys(words))[:need]:
            text = re.sub(r"\b" + re.escape(w) + r"\b", w.upper(), text)
    if "detectable_format:title" in kw:
        from posttrain.data.synth.constraints import content_words

        words = content_words(request)[:3] or ["answer"]
        text = f"<<{' '.join(w.capitalize() for w in words)}>>\n{text}"
    if "detectable_content:postscript" in kw:
        text += f"{para}{kw['detectable_content:postscript']['postscript_marker']} {rng.choice(_POSTSCRIPTS)}"
    if "startend:end_checker" in kw:
        text += f"{para}{kw['startend:end_checker']['end_phrase']}"
    if "change_case:english_lowercase" in kw:
        text = text.lower()
    if "change_case:english_capital" in kw:
        text = text.upper()
    if "startend:quotation" in kw:
        text = f'"{text}"'
    if "detectable_format:json_format" in kw:
        text = json.dumps({"response": text}, ensure_ascii=False, indent=2)
    if "combination:repeat_prompt" in kw:
        text = f"{kw['combination:repeat_prompt']['prompt_to_repeat']}\n\n{text}"
    return text


def conform(reply: str, request: str, truth: dict, rng: random.Random) -> str | None:
    """``reply`` edited to follow ``truth`` (IFEval ground truth), or ``None`` when an edit cannot apply."""
    text = _trim(reply.strip(), truth)
    if text is None:
        return None
    text = _shape(_words(text, truth), truth)
    return None if text is None else _add(text, truth, request, rng)


def build(prompts: list[dict], references: dict[str, tuple[str, str]], seed: int = 0) -> tuple[list[dict], dict]:
    """``prompts``: records with the ``ifeval`` verifier's ground truth (the command checks it). SFT
    records (prompt + edited reference reply) for the prompts the verifier passes, and a report:
    per instruction id, how many prompts carried it and how many of those were kept."""
    from posttrain.rewards.ifeval import followed

    rng = random.Random(seed)
    records, seen, kept, why = [], Counter(), Counter(), Counter()
    for p in prompts:
        truth = p["ground_truth"]
        ids = truth["instruction_id_list"]
        seen.update(ids)
        if p.get("request_source") not in references:
            why["no reference reply"] += 1
            continue
        request, reply = references[p["request_source"]]
        text = conform(reply, request, truth, rng)
        if text is None:
            why["no edit applies"] += 1
            continue
        ok = followed(text, truth)
        if not all(ok):
            why["not followed: " + ", ".join(i for i, o in zip(ids, ok) if not o)] += 1
            continue
        kept.update(ids)
        records.append({"messages": p["messages"] + [{"role": "assistant", "content": text}],
                        **{k: p[k] for k in ("id", "source", "request_source", "license") if k in p}})
    report = {"prompts": len(prompts), "records": len(records),
              "dropped": dict(why.most_common(20)),
              "instructions": {i: {"prompts": seen[i], "kept": kept[i]} for i in sorted(seen)}}
    return records, report
