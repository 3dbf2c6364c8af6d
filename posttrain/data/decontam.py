"""N-gram decontamination of training prompts against evaluation sets (Tulu 3, section 2.2).

Text is normalised into words: the runs of letters and digits (any script) of its lower-cased form.
An evaluation instance ``e`` with the word sequence ``w`` has the set of n-grams
``N(e) = {w[i:i+n]}`` (one gram, the whole sequence, when ``len(w) < n``; an item with fewer than
``min(n, min_words)`` words, default 4, is too short to tell contamination from chance, e.g. "Yes.",
and is not checked but counted). A training record ``r`` (its user turns) has the same kind of set
``N(r)`` (including grams of the short lengths that evaluation instances have). Its overlap with
``e`` is

    overlap(r, e) = |N(r) ∩ N(e)| / |N(e)|,

the share of the evaluation instance's n-grams that the training prompt contains. ``r`` is
contaminated by ``e`` when ``overlap(r, e) >= threshold``; the report names the instance with the
largest overlap (the earliest on ties). ``mode="exact"`` flags ``r`` only when the whole normalised
evaluation text occurs in its normalised text, word-aligned.

The index maps each evaluation gram (a tuple of word ids; a word that no evaluation text uses gets
an id no gram holds) to the instances that contain it. Training texts are checked in batches: a hash
of every window of words is looked up among the indexed grams' hashes with numpy, and only the
windows that hit are checked exactly, then counted per matching instance (``NgramIndex``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path

import numpy as np

from posttrain.data.adapters import parse_hh_text
from posttrain.errors import UserError
from posttrain.util import log

_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits (any script)."""
    return _WORD.findall(text.lower())


def ngrams(seq: list, n: int) -> set[tuple]:
    """Distinct n-grams of ``seq`` (the whole sequence when it is shorter than ``n``)."""
    if len(seq) < n:
        return {tuple(seq)} if seq else set()
    return set(zip(*(seq[i:] for i in range(n))))


def _turn_texts(turns, where: str, key: str) -> list[str]:
    if isinstance(turns, str):
        return [turns]
    if not isinstance(turns, list):
        raise UserError(f"{where}: field '{key}' must be a string or a list of messages")
    return [m["content"] for m in turns if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)]


def prompt_text(raw: dict, where: str) -> str:
    """The user-written text of one training record, whatever its format: the user turns of
    ``messages`` / ``prompt`` / ``chosen`` (hh-rlhf text too), or ``question`` / ``problem`` /
    ``instruction`` (plus the ``input`` of self-instruct ``instances``)."""
    parts: list[str] = []
    for key in ("messages", "prompt"):
        if key in raw:
            parts += _turn_texts(raw[key], where, key)
            break
    else:
        if isinstance(raw.get("chosen"), str) and raw["chosen"].lstrip("\n").startswith("Human:"):
            parts += [t["content"] for t in parse_hh_text(raw["chosen"], where, "chosen") if t["role"] == "user"]
        elif isinstance(raw.get("chosen"), list):
            parts += _turn_texts(raw["chosen"], where, "chosen")
        for key in ("question", "problem", "instruction"):
            if isinstance(raw.get(key), str):
                parts.append(raw[key])
                break
        for inst in raw.get("instances") or []:
            if isinstance(inst, dict) and isinstance(inst.get("input"), str):
                parts.append(inst["input"])
    if not parts:
        raise UserError(f"{where}: no user text found; expected 'messages', 'prompt', 'chosen', 'question', "
                        f"'problem' or 'instruction' (fields present: {', '.join(sorted(raw)) or 'none'})")
    return "\n".join(parts)


@dataclass
class EvalInstance:
    task: str
    index: int
    id: str | None
    text: str


@dataclass
class Match:
    task: str
    index: int
    id: str | None
    overlap: float


_MISSING = np.uint64(2**63 - 25)  # the id of a word no evaluation text uses
_MULT = np.uint64(0x9E3779B97F4A7C15)


def window_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit polynomial hash of every window of ``n`` ids (uint64 arithmetic wraps)."""
    if len(ids) < n:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    for j in range(n):
        h = h * _MULT + ids[j:len(ids) - n + 1 + j]
    return h


_FILTER_BITS = 24


def hash_filter(keys: np.ndarray) -> np.ndarray:
    """A table of 2^24 flags, set at the top 24 bits of each key: a lookup answers "maybe" for every
    key in the set and for a few others (about len(keys) / 2^24 of them), which the exact check drops."""
    table = np.zeros(1 << _FILTER_BITS, dtype=bool)
    table[keys >> np.uint64(64 - _FILTER_BITS)] = True
    return table


@dataclass
class NgramIndex:
    """The grams of a set of evaluation instances, for fast lookups of training texts.

    Lookups go a batch of texts at a time: the ids of all their words in one array, a hash of every
    window of ``n`` (and of ``min_words``, for short items) looked up in a flag table of the indexed
    grams' hashes (``hash_filter``) with numpy; only the windows it flags are then checked exactly as
    tuples, so a hash collision can cost time but never change a result."""

    n: int = 8
    vocab: dict[str, int] = field(default_factory=dict)
    postings: dict[tuple, list[int]] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)  # |N(e)| per instance
    instances: list[EvalInstance] = field(default_factory=list)
    normalized: list[str] = field(default_factory=list)
    min_words: int = 4
    short: dict[tuple, set[tuple]] = field(default_factory=dict)  # first min_words ids -> items shorter than n
    too_short: Counter = field(default_factory=Counter)  # per task: items not checked
    _filters: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, inst: EvalInstance) -> None:
        ws = words(inst.text)
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in ws]
        if len(ids) < min(self.n, self.min_words):  # "Yes." would match everything: not checked, counted
            self.too_short[inst.task] += 1
            grams = set()
        else:
            grams = ngrams(ids, self.n)
        if grams and len(ids) < self.n:
            self.short.setdefault(tuple(ids[:self.min_words]), set()).add(tuple(ids))
        k = len(self.instances)
        for g in grams:
            self.postings.setdefault(g, []).append(k)
        self.sizes.append(len(grams))
        self.instances.append(inst)
        self.normalized.append(" ".join(ws))
        self._filters = None

    def filters(self) -> tuple[np.ndarray, np.ndarray]:
        """Hash filters of the n-grams and of the short items' first ``min_words`` words."""
        if self._filters is None:
            def table(grams: list[tuple], width: int) -> np.ndarray:
                flat = np.array(grams, dtype=np.uint64).reshape(-1)
                return hash_filter(window_keys(flat, width)[::width] if grams else np.zeros(0, dtype=np.uint64))
            self._filters = (table([g for g in self.postings if len(g) == self.n], self.n),
                             table(list(self.short), self.min_words))
        return self._filters

    def grams_of_batch(self, texts: list[str]) -> list[set[tuple]]:
        """Per text, the indexed grams it contains."""
        full, short = self.filters()
        get, missing = self.vocab.get, repeat(int(_MISSING))
        ids = [list(map(get, words(t), missing)) for t in texts]
        starts = np.concatenate([[0], np.cumsum([len(x) for x in ids])])
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.uint64, count=int(starts[-1]))
        out: list[set[tuple]] = [set() for _ in texts]
        shift = np.uint64(64 - _FILTER_BITS)
        for width, table, used in ((self.n, full, self.postings), (self.min_words, short, self.short)):
            if not used or len(flat) < width:
                continue
            hits = np.nonzero(table[window_keys(flat, width) >> shift])[0]
            owner = np.searchsorted(starts, hits, side="right") - 1
            for pos, t in zip(hits.tolist(), owner.tolist()):
                local = pos - int(starts[t])
                if local + width > len(ids[t]):
                    continue  # the window runs into the next text
                gram = tuple(ids[t][local:local + width])
                if width == self.n and gram in self.postings:
                    out[t].add(gram)
                elif width == self.min_words:
                    for seq in self.short.get(gram, ()):
                        if tuple(ids[t][local:local + len(seq)]) == seq:
                            out[t].add(seq)
        return out

    def best_matches(self, texts: list[str], threshold: float = 0.5, mode: str = "ngram") -> list[Match | None]:
        """Per text, the evaluation instance it overlaps most, when that overlap reaches ``threshold``."""
        return [self._best(grams, text, threshold, mode) for grams, text in zip(self.grams_of_batch(texts), texts)]

    def best_match(self, text: str, threshold: float = 0.5, mode: str = "ngram") -> Match | None:
        return self.best_matches([text], threshold, mode)[0]

    def _best(self, grams: set[tuple], text: str, threshold: float, mode: str) -> Match | None:
        if not grams:
            return None
        counts: Counter = Counter()
        for g in grams:
            counts.update(self.postings[g])
        best_k, best = -1, -1.0
        padded = f" {' '.join(words(text))} " if mode == "exact" else ""
        for k, c in counts.items():
            overlap = c / self.sizes[k]
            if mode == "exact":
                if overlap < 1.0 or f" {self.normalized[k]} " not in padded:
                    continue
            elif overlap < threshold:
                continue
            if overlap > best or (overlap == best and k < best_k):
                best_k, best = k, overlap
        if best_k < 0:
            return None
        inst = self.instances[best_k]
        return Match(inst.task, inst.index, inst.id, round(best, 6))


def train_sources(train: list[str]) -> list[dict]:
    """``train`` entries are data files / hub ids, or a YAML mix (a ``datasets:`` list of sources with
    ``path`` and optional ``split``/``name``, the training configs' format). Every record of a source
    is checked (a mix's ``count``/``fraction`` pick among them later)."""
    from posttrain.config_io import read_yaml

    out = []
    for item in train:
        if item.endswith((".yaml", ".yml")):
            entries = read_yaml(item).get("datasets")
            if not isinstance(entries, list):
                raise UserError(f"{item}: expected a 'datasets:' list of sources")
            for i, e in enumerate(entries):
                if not isinstance(e, dict) or not e.get("path"):
                    raise UserError(f"{item}: datasets[{i}]: field 'path' is required")
                out.append({"path": e["path"], "split": e.get("split", "train"), "name": e.get("name")})
        else:
            out.append({"path": item, "split": "train", "name": None})
    return out


def _record_id(raw: dict):
    return next((raw[k] for k in ("id", "key", "task_id", "unique_id") if raw.get(k) is not None), None)


_INDEX: NgramIndex | None = None  # the index a worker process checks against (inherited by fork)


def _check(args: tuple[list[str], float, str]) -> list[Match | None]:
    texts, threshold, mode = args
    return _INDEX.best_matches(texts, threshold, mode)


def check_texts(index: NgramIndex, texts: list[str], threshold: float = 0.5, mode: str = "ngram",
                workers: int = 1, chunk: int = 2000) -> list[Match | None]:
    """``index.best_match`` of every text, in ``workers`` forked processes when above 1."""
    global _INDEX
    if workers <= 1 or len(texts) <= chunk:
        return [m for i in range(0, len(texts), chunk) for m in index.best_matches(texts[i:i + chunk], threshold, mode)]
    index.filters()  # built once, before the fork
    _INDEX = index
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_check, [(texts[i:i + chunk], threshold, mode) for i in range(0, len(texts), chunk)])
    finally:
        _INDEX = None
    return [m for part in parts for m in part]


def decontaminate(train: list[str], against: list[str], instances: list[EvalInstance], output: str | Path, n: int = 8,
                  threshold: float = 0.5, mode: str = "ngram", remove: bool = False, examples: int = 3,
                  workers: int | None = None, min_words: int = 4) -> dict:
    """Check every record of every training source against ``instances`` (the evaluation sets named
    ``against``: ``posttrain.eval.instances.eval_instances``); write ``output/report.json`` (and with
    ``remove`` a clean copy of each source under ``output/clean/`` plus ``output/manifest.json``)."""
    from posttrain.atomic import write_json, write_text
    from posttrain.data.io import read_records

    if mode not in ("ngram", "exact"):
        raise UserError(f"mode must be 'ngram' or 'exact', got {mode!r}")
    if not 0 < threshold <= 1:
        raise UserError(f"threshold must be in (0, 1], got {threshold}")
    if n < 1:
        raise UserError(f"ngram must be >= 1, got {n}")
    workers = workers or min(os.cpu_count() or 1, 8)
    t0 = time.perf_counter()
    index = NgramIndex(n, min_words=min_words)
    for inst in instances:
        index.add(inst)
    build = time.perf_counter() - t0
    log(f"decontaminate: {len(index.instances)} evaluation instances, {len(index.postings)} distinct {n}-grams "
        f"indexed in {build:.2f} s")
    where_is = {(e.task, e.index): e for e in index.instances}
    out = Path(output)
    flagged, sources, kept_files = [], {}, {}
    t1 = time.perf_counter()
    for src in train_sources(train):
        name = src["path"]
        raws, texts = [], []
        for raw, where in read_records(src["path"], src["split"], src["name"]):
            raws.append(raw)
            texts.append(prompt_text(raw, where))
        matches = check_texts(index, texts, threshold, mode, workers)
        stats = {"records": len(raws), "flagged": 0, "percent": 0.0, "by_task": Counter(), "examples": []}
        kept = []
        for i, (raw, m) in enumerate(zip(raws, matches)):
            if m is None:
                kept.append(raw)
                continue
            entry = {"source": name, "index": i, "matched_task": m.task, "matched_index": m.index, "overlap": m.overlap}
            if _record_id(raw) is not None:
                entry["id"] = _record_id(raw)
            if m.id is not None:
                entry["matched_id"] = m.id
            flagged.append(entry)
            stats["flagged"] += 1
            stats["by_task"][m.task] += 1
            if len(stats["examples"]) < examples:
                stats["examples"].append({**entry, "text": texts[i][:300], "eval_text": where_is[m.task, m.index].text[:300]})
        stats["percent"] = round(100 * stats["flagged"] / max(stats["records"], 1), 3)
        stats["by_task"] = dict(stats["by_task"])
        sources[name] = stats
        kept_files[name] = kept
        log(f"decontaminate: {name}: {stats['flagged']} of {stats['records']} records flagged ({stats['percent']}%)"
            + (f": {stats['by_task']}" if stats["by_task"] else ""))
    seconds = time.perf_counter() - t1
    checked = sum(s["records"] for s in sources.values())
    summary = {"ngram": n, "threshold": threshold, "mode": mode, "against": dict(Counter(e.task for e in index.instances)),
               "not_checked_too_short": dict(index.too_short),
               "records": checked, "flagged": len(flagged), "sources": sources, "index_grams": len(index.postings),
               "index_seconds": round(build, 3), "check_seconds": round(seconds, 3)}
    if remove:
        manifest = {"against": against, "ngram": n, "threshold": threshold, "mode": mode, "sources": {}}
        for i, (name, kept) in enumerate(kept_files.items()):
            clean = out / "clean" / f"{i:02d}-{_stem(name)}.jsonl"
            write_text(clean, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in kept))
            manifest["sources"][name] = {"clean_file": str(clean), "records": sources[name]["records"], "kept": len(kept),
                                         "removed": [{k: v for k, v in e.items() if k != "source"}
                                                     for e in flagged if e["source"] == name]}
        write_json(out / "manifest.json", manifest)
    report = {"summary": summary, "flagged": flagged}
    write_json(out / "report.json", report)
    return report


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet"):
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "source"
