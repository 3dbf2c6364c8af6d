"""OpenScholar (Asai et al., 2024): answers from a datastore with citations, improved by self-feedback,
their citations checked. Works with every engine (it only generates text).

For each question:

1. **Retrieve** the top ``n_retrieve`` passages (hybrid search when the index has embeddings) and
   keep the first ``k``, or the ``k`` a reranker (``rerank(question, passages) -> scores``) puts first.
2. **Answer** from the numbered passages, citing them as ``[n]`` (``PROMPTS["answer"]``).
3. **Self-feedback**, up to ``rounds`` times: the model lists what would improve its draft, one
   ``Feedback:`` line each, and ``Search: <query>`` where information is missing; each query
   retrieves ``k_feedback`` more passages (numbered after the ones already read, duplicates skipped);
   the model then revises its draft to address the feedback. A round whose reply has no feedback
   line (or says ``No feedback``) ends the loop.
4. **Citation verification.** Each sentence's citations are checked against their passages by a
   checker (an engine asked yes/no, or word overlap): an unsupported citation is replaced by the
   first other passage that supports the sentence, else removed; a citation of a passage that does
   not exist is removed.

The result per question: ``text`` (the verified answer), ``passages`` (numbered from 1), ``cited``
(the numbers cited in ``text``), ``drafts`` (each answer before verification), ``feedback`` (per
round), ``searches``, and the counts ``fixed`` and ``removed``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from posttrain.rag.selfrag import passage_text, sentences

PROMPTS = {
    "answer": ("Answer the question using the numbered passages. After each sentence, cite the passages that "
               "support it as [n].\n\n{passages}\n\nQuestion: {question}\nAnswer:"),
    "feedback": ("Here are a question, numbered passages and a draft answer. List up to three improvements to the "
                 "answer, one per line starting with 'Feedback:'. When the answer needs information the passages do "
                 "not have, add a line 'Search: <query>' after that feedback. If the answer needs no change, write "
                 "'No feedback.'\n\n{passages}\n\nQuestion: {question}\nDraft answer: {draft}\n"),
    "revise": ("Revise the draft answer so that it addresses the feedback, using the numbered passages. Cite the "
               "passages that support each sentence as [n].\n\n{passages}\n\nQuestion: {question}\n"
               "Draft answer: {draft}\nFeedback:\n{feedback}\n\nRevised answer:"),
    "verify": "Does the passage support the statement? Answer Yes or No.\n\nPassage: {passage}\nStatement: {statement}",
}
CITATION = re.compile(r"\s*\[(\d+)\]")


class EngineChecker:
    """A statement is supported by a passage when the engine answers yes (``PROMPTS["verify"]``)."""

    def __init__(self, engine, max_new_tokens: int = 8):
        self.engine, self.max_new_tokens = engine, max_new_tokens

    def supports(self, pairs: list[tuple[str, str]]) -> list[bool]:
        from posttrain.inference.engine import SamplingParams

        if not pairs:
            return []
        prompts = [[{"role": "user", "content": PROMPTS["verify"].format(passage=p, statement=s)}] for s, p in pairs]
        outs = self.engine.generate(prompts, SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0))
        return [o.text.strip().lower().startswith("yes") for o in outs]


class OverlapChecker:
    """A statement is supported when at least ``min_share`` of its words (two letters or more) occur in
    the passage: a rule for synthetic data, where a supported sentence repeats its fact."""

    def __init__(self, min_share: float = 0.8):
        self.min_share = min_share

    def supports(self, pairs: list[tuple[str, str]]) -> list[bool]:
        out = []
        for statement, passage in pairs:
            words = set(re.findall(r"\w\w+", statement.lower()))
            have = set(re.findall(r"\w\w+", passage.lower()))
            out.append(bool(words) and len(words & have) >= self.min_share * len(words))
        return out


@dataclass
class Answer:
    question: str
    passages: list[dict]
    draft: str = ""
    drafts: list[str] = field(default_factory=list)
    feedback: list[list[str]] = field(default_factory=list)
    searches: list[str] = field(default_factory=list)
    done: bool = False


def numbered(passages: list[dict]) -> str:
    return "\n".join(f"[{n}] {passage_text(p)}" for n, p in enumerate(passages, 1))


def parse_feedback(reply: str) -> tuple[list[str], list[str]]:
    """``(feedback items, search queries)`` of a feedback reply."""
    items, queries = [], []
    for line in reply.splitlines():
        line = line.strip().lstrip("-* ").strip()
        if line.lower().startswith("feedback:") and line[9:].strip():
            items.append(line[9:].strip())
        elif line.lower().startswith("search:") and line[7:].strip():
            queries.append(line[7:].strip())
    return items, queries


def verify_citations(text: str, passages: list[dict], checker) -> tuple[str, int, int]:
    """``text`` with each sentence's citations checked (see the module docstring); returns the text,
    the number of citations fixed and the number removed."""
    parts = sentences(re.sub(r"([.!?])((?:\s*\[\d+\])+)", r"\2\1", text))  # "x. [1]" -> "x [1]."
    cited = [[int(n) for n in CITATION.findall(s)] for s in parts]
    plain = [CITATION.sub("", s).strip() for s in parts]
    checks = [(i, n) for i, ns in enumerate(cited) for n in ns if 1 <= n <= len(passages)]
    ok = dict(zip(checks, checker.supports([(plain[i], passage_text(passages[n - 1])) for i, n in checks])))
    bad = sorted({i for (i, n), good in ok.items() if not good}
                 | {i for i, ns in enumerate(cited) for n in ns if not 1 <= n <= len(passages)})
    others = [(i, m) for i in bad for m in range(1, len(passages) + 1) if m not in cited[i]]
    alternative = dict(zip(others, checker.supports([(plain[i], passage_text(passages[m - 1])) for i, m in others])))
    fixed = removed = 0
    out = []
    for i, s in enumerate(parts):
        keep = []
        for n in cited[i]:
            if ok.get((i, n)):
                keep.append(n)
                continue
            swap = next((m for m in range(1, len(passages) + 1) if alternative.get((i, m)) and m not in keep), None)
            if swap is not None:
                keep.append(swap)
                fixed += 1
            else:
                removed += 1
        marks = "".join(f" [{n}]" for n in dict.fromkeys(keep))
        body = plain[i]
        end = body[-1] if body and body[-1] in ".!?" else ""
        out.append(f"{body[:-1] if end else body}{marks}{end}" if marks else body)
    return " ".join(out), fixed, removed


class OpenScholar:
    def __init__(self, engine, retriever, checker=None, *, k: int = 5, n_retrieve: int = 20, k_feedback: int = 2,
                 rounds: int = 2, rerank=None, max_new_tokens: int = 256):
        self.engine, self.retriever, self.k, self.n_retrieve = engine, retriever, k, n_retrieve
        self.checker = checker or EngineChecker(engine)
        self.k_feedback, self.rounds, self.rerank, self.max_new_tokens = k_feedback, rounds, rerank, max_new_tokens

    def _generate(self, kind: str, answers: list[Answer], **extra) -> list[str]:
        from posttrain.inference.engine import SamplingParams

        prompts = [[{"role": "user", "content": PROMPTS[kind].format(
            question=a.question, passages=numbered(a.passages), draft=a.draft,
            feedback="\n".join(f"- {f}" for f in (a.feedback[-1] if a.feedback else [])), **extra)}] for a in answers]
        outs = self.engine.generate(prompts, SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0))
        return [o.text.strip() for o in outs]

    def _retrieve(self, question: str) -> list[dict]:
        hits = self.retriever.search(question, k=self.n_retrieve)
        if self.rerank is not None and hits:
            scores = self.rerank(question, hits)
            hits = [h for _, h in sorted(zip(scores, hits), key=lambda x: -x[0])]
        return hits[:self.k]

    def answer(self, questions: list[str]) -> list[dict]:
        answers = [Answer(q, self._retrieve(q)) for q in questions]
        for a, text in zip(answers, self._generate("answer", answers)):
            a.draft = text
            a.drafts.append(text)
        for _ in range(self.rounds):
            live = [a for a in answers if not a.done]
            if not live:
                break
            for a, reply in zip(live, self._generate("feedback", live)):
                items, queries = parse_feedback(reply)
                if not items:
                    a.done = True
                    continue
                a.feedback.append(items)
                seen = {p["id"] for p in a.passages}
                for q in queries:
                    a.searches.append(q)
                    for hit in self.retriever.search(q, k=self.k_feedback):
                        if hit["id"] not in seen:
                            seen.add(hit["id"])
                            a.passages.append(hit)
            revising = [a for a in live if not a.done]
            for a, text in zip(revising, self._generate("revise", revising) if revising else []):
                a.draft = text
                a.drafts.append(text)
        out = []
        for a in answers:
            text, fixed, removed = verify_citations(a.draft, a.passages, self.checker)
            out.append({"text": text, "passages": a.passages, "cited": sorted({int(n) for n in CITATION.findall(text)}),
                        "drafts": a.drafts, "feedback": a.feedback, "searches": a.searches, "fixed": fixed,
                        "removed": removed})
        return out
