"""Self-RAG (Asai et al., 2024): reflection tokens and training data labelled by a critic.

The model learns to write, before each segment (sentence) of its answer, whether it needs evidence,
and after reading a passage, whether the passage is relevant, whether its segment is supported, and
at the end how useful the whole answer is::

    [Retrieval]<paragraph>passage</paragraph>[Relevant]segment[Fully supported] ... [Utility:5]
    [No Retrieval]segment ... [Utility:4]

``[Continue to Use Evidence]`` opens a segment that needs no new retrieval but leans on the passage
already read. Passages are context: ``posttrain.data.chat`` never trains on a
``<paragraph>...</paragraph>`` span. The tokens are added to the vocabulary as whole tokens
(``add_tokens: [selfrag]`` in an SFT config), their embeddings starting at the mean embedding.

``build_records`` turns ``(instruction, output)`` records into such training records: each output
is cut into sentences; a critic labels, for every sentence, whether to retrieve (the query is the
instruction, and after the first sentence the instruction and the previous sentence, so the second
hop of a two-hop answer finds its own passage); for the top ``k`` passages whether each is relevant
and whether it supports the sentence; and the answer's utility. The passage kept for a sentence is
the best by (relevant, support: full > partial > none, retrieval rank). Labels come in batches
(every sentence's retrieval decision, then every passage's relevance, ...), so an engine critic
answers each kind of question in one call.
"""

from __future__ import annotations

import re
from collections import Counter

from posttrain.rag.facts import correct, normalize

RETRIEVAL, NO_RETRIEVAL, CONTINUE = "[Retrieval]", "[No Retrieval]", "[Continue to Use Evidence]"
RELEVANT, IRRELEVANT = "[Relevant]", "[Irrelevant]"
SUPPORT = {"full": "[Fully supported]", "partial": "[Partially supported]", "none": "[No support / Contradictory]"}
UTILITY = tuple(f"[Utility:{i}]" for i in range(1, 6))
OPEN, CLOSE = "<paragraph>", "</paragraph>"
TOKENS = (RETRIEVAL, NO_RETRIEVAL, CONTINUE, RELEVANT, IRRELEVANT, *SUPPORT.values(), *UTILITY, OPEN, CLOSE)
SUPPORT_RANK = {"full": 2, "partial": 1, "none": 0}
TOKEN_PATTERN = re.compile("|".join(re.escape(t) for t in TOKENS))


def sentences(text: str) -> list[str]:
    """``text`` cut after each ``.``, ``!`` or ``?`` followed by white space (a sentence keeps its mark)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def strip_tokens(text: str) -> str:
    """The answer a reader sees: reflection tokens and passages removed."""
    text = re.sub(re.escape(OPEN) + r".*?" + re.escape(CLOSE), "", text, flags=re.S)
    return re.sub(r"\s+", " ", TOKEN_PATTERN.sub(" ", text)).strip()


class RuleCritic:
    """Labels from what a synthetic record knows about itself: its ``support`` sentences (the facts
    an answer rests on; none for a closed-book question) and its ``answer``. A sentence needs
    retrieval when it states a supporting fact; a passage is relevant when it holds a supporting
    sentence, and supports a sentence fully when it holds that sentence; utility is 5 when the
    output contains the answer, else 1."""

    def retrieve(self, items: list[dict]) -> list[bool]:
        return [any(_holds(s, item["segment"]) for s in item["record"].get("support", [])) for item in items]

    def relevant(self, items: list[dict]) -> list[bool]:
        return [any(_holds(item["passage"], s) for s in item["record"].get("support", [])) for item in items]

    def support(self, items: list[dict]) -> list[str]:
        out = []
        for item in items:
            if _holds(item["passage"], item["segment"]):
                out.append("full")
            else:
                words = set(normalize(item["segment"]).split())
                out.append("partial" if len(words & set(normalize(item["passage"]).split())) * 2 >= len(words) else "none")
        return out

    def utility(self, items: list[dict]) -> list[int]:
        answer = [item["record"].get("answer") for item in items]
        return [5 if a is None or correct(item["output"], a) else 1 for a, item in zip(answer, items)]


CRITIC_PROMPTS = {
    "retrieve": ("You decide whether looking up evidence (for example a web page) would help write the next "
                 "sentence of an answer.\n\nInstruction: {instruction}\nAnswer so far: {preceding}\n"
                 "Next sentence: {segment}\n\nWould evidence help? Answer Yes or No."),
    "relevant": ("You judge whether a passage holds information useful for answering an instruction.\n\n"
                 "Instruction: {instruction}\nPassage: {passage}\n\nAnswer Relevant or Irrelevant."),
    "support": ("You judge whether a sentence is supported by a passage.\n\nInstruction: {instruction}\n"
                "Passage: {passage}\nSentence: {segment}\n\nIs every claim of the sentence supported by the passage? "
                "Answer Fully supported, Partially supported, or No support."),
    "utility": ("Rate how useful the response is for the instruction, from 1 (not at all) to 5 (complete and "
                "helpful).\n\nInstruction: {instruction}\nResponse: {output}\n\nAnswer with one number from 1 to 5."),
}


class EngineCritic:
    """Labels by a model through any engine (a local model, vLLM, an OpenAI-compatible endpoint):
    one prompt per item (``CRITIC_PROMPTS``), greedy, the first label named in the reply. A reply
    that names none gets the cautious label (no retrieval, irrelevant, no support, utility 1) and is
    counted in ``unparsed``."""

    def __init__(self, engine, max_new_tokens: int = 16):
        self.engine, self.max_new_tokens = engine, max_new_tokens
        self.unparsed: Counter = Counter()

    def _ask(self, kind: str, items: list[dict]) -> list[str]:
        from posttrain.inference.engine import SamplingParams

        prompts = [[{"role": "user", "content": CRITIC_PROMPTS[kind].format(
            instruction=it["record"]["instruction"], preceding=it.get("preceding", "") or "(nothing yet)",
            segment=it.get("segment", ""), passage=it.get("passage", ""), output=it.get("output", ""))}] for it in items]
        outs = self.engine.generate(prompts, SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0))
        return [o.text.strip().lower() for o in outs]

    def _label(self, kind: str, replies: list[str], options: dict, default):
        out = []
        for reply in replies:
            hits = [(reply.find(word), value) for word, value in options.items() if word in reply]
            if not hits:
                self.unparsed[kind] += 1
            out.append(min(hits)[1] if hits else default)
        return out

    def retrieve(self, items):
        return self._label("retrieve", self._ask("retrieve", items), {"yes": True, "no": False}, False)

    def relevant(self, items):
        return self._label("relevant", self._ask("relevant", items), {"irrelevant": False, "relevant": True}, False)

    def support(self, items):
        return self._label("support", self._ask("support", items),
                           {"fully": "full", "partially": "partial", "no support": "none"}, "none")

    def utility(self, items):
        return self._label("utility", self._ask("utility", items), {str(i): i for i in range(1, 6)}, 1)


def build_records(records: list[dict], retriever, critic, k: int = 3, negatives: float = 0.0) -> tuple[list[dict], dict]:
    """Self-RAG training records (see the module docstring) for ``records`` of ``{"instruction",
    "output"}`` (plus what a rule critic reads: ``support``, ``answer``), and counts of the labels.
    With ``negatives`` (a share, 0 to 1), that share of the records whose retrieving segment also
    retrieved an irrelevant passage (every ``1/negatives``-th of them, in order) is written a second
    time with that passage (the best-ranked irrelevant one) in its first such segment, labelled
    ``[Irrelevant]``: the model also learns to judge relevance, not only to read."""
    segments = [{"record": r, "at": (i, j), "segment": seg, "preceding": " ".join(sentences(r["output"])[:j])}
                for i, r in enumerate(records) for j, seg in enumerate(sentences(r["output"]))]
    needs = dict(zip([s["at"] for s in segments], critic.retrieve(segments) if segments else []))
    pairs = []  # (segment, retrieved passage)
    for s in segments:
        if needs[s["at"]]:
            instruction = s["record"]["instruction"]
            query = f"{instruction} {s['preceding']}" if s["preceding"] else instruction
            pairs += [{**s, "passage": passage_text(h), "rank": h["rank"]} for h in retriever.search(query, k=k)]
    relevant = critic.relevant(pairs) if pairs else []
    support = iter(critic.support([p for p, rel in zip(pairs, relevant) if rel]) if any(relevant) else [])
    chosen: dict[tuple, tuple] = {}  # segment -> (rank key, passage, relevant, support)
    irrelevant: dict[tuple, str] = {}  # segment -> its best-ranked irrelevant passage
    for p, rel in zip(pairs, relevant):
        sup = next(support) if rel else "none"
        key = (rel, SUPPORT_RANK[sup], -p["rank"])
        if p["at"] not in chosen or key > chosen[p["at"]][0]:
            chosen[p["at"]] = (key, p["passage"], rel, sup)
        if not rel:
            irrelevant.setdefault(p["at"], p["passage"])
    utility = critic.utility([{"record": r, "output": r["output"]} for r in records]) if records else []
    by_record: dict[int, list[dict]] = {}
    for s in segments:
        by_record.setdefault(s["at"][0], []).append(s)
    counts: Counter = Counter()

    def answer(i: int, swap: tuple | None = None) -> str:
        text, evidence = "", False
        for s in by_record.get(i, []):
            if s["at"] == swap:
                text += f"{RETRIEVAL}{OPEN}{irrelevant[swap]}{CLOSE}{IRRELEVANT}{s['segment']}"
            elif s["at"] in chosen:
                _, passage, rel, sup = chosen[s["at"]]
                text += f"{RETRIEVAL}{OPEN}{passage}{CLOSE}"
                text += f"{RELEVANT}{s['segment']}{SUPPORT[sup]}" if rel else f"{IRRELEVANT}{s['segment']}"
                evidence = evidence or rel
                if swap is None:
                    counts.update(["retrieval", "relevant" if rel else "irrelevant"] + ([f"support_{sup}"] if rel else []))
            else:
                text += f"{CONTINUE if evidence else NO_RETRIEVAL}{s['segment']}"
                counts.update(["continue" if evidence else "no_retrieval"] if swap is None else [])
        return text

    out, eligible = [], 0
    for i, (r, use) in enumerate(zip(records, utility)):
        counts[f"utility_{use}"] += 1
        variants = [answer(i)]
        swap = next((s["at"] for s in by_record.get(i, []) if s["at"] in chosen and s["at"] in irrelevant), None)
        if swap is not None:
            eligible += 1
            if negatives and int(eligible * negatives) > int((eligible - 1) * negatives):
                variants.append(answer(i, swap))
                counts["negative_records"] += 1
        for text in variants:
            out.append({"messages": [{"role": "user", "content": r["instruction"]},
                                     {"role": "assistant", "content": text + UTILITY[use - 1]}],
                        **{key: r[key] for key in ("source", "license", "id") if key in r}})
    return out, {"records": len(out), "segments": len(segments), **dict(sorted(counts.items()))}


def passage_text(hit: dict) -> str:
    """A retrieved passage as the model reads it: its title on the first line, then its text."""
    return f"{hit['title']}\n{hit['text']}" if hit.get("title") else hit["text"]


def _holds(passage: str, sentence: str) -> bool:
    return f" {normalize(sentence)} " in f" {normalize(passage)} "
