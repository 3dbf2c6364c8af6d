"""The contamination report every trained model carries: its training records checked against the
evaluation sets available, with the n-gram overlap of ``posttrain data decontaminate``
(posttrain.data.decontam: a record is flagged by an evaluation item when it holds at least
``threshold`` of the item's word ``ngram``-grams).

``decontaminate_against`` takes the specs of ``posttrain data decontaminate --against``: suites
(``suite:dev``), tasks (``gsm8k``) and task files (``gsm8k=PATH``). Left unset, the built-in suites
are checked where their data is present on this machine (a hub dataset already in the local cache);
the others are listed as unavailable, never downloaded. ``[]`` turns the report off.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterable, Iterator

from posttrain.data.decontam import EvalInstance, NgramIndex, check_texts, prompt_text
from posttrain.eval.instances import eval_instances
from posttrain.errors import UserError

NGRAM, THRESHOLD, EXAMPLES = 8, 0.5, 20


def hub_cached(dataset_id: str) -> bool:
    from pathlib import Path

    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"datasets--{dataset_id.replace('/', '--')}").is_dir()


def default_specs() -> tuple[list[str], list[str]]:
    """The built-in suites' tasks whose data is present here, and those that are not."""
    from posttrain.eval.tasks import SUITES, TASKS

    present, missing = [], []
    for name in dict.fromkeys(t for suite in SUITES.values() for t in suite):
        hub = TASKS[name].hub[0] if TASKS[name].hub else None
        (present if hub and hub_cached(hub) else missing).append(name)
    return present, missing


def instances(specs: list[str], strict: bool) -> tuple[list[EvalInstance], list[str]]:
    """Every instance of the named evaluation sets; with ``strict`` a set that cannot be read is an
    error (the user named it), otherwise it is listed as unavailable."""
    out, unavailable = [], []
    for spec in specs:
        try:
            out += eval_instances([spec])
        except (UserError, OSError, ValueError, ConnectionError) as e:
            if strict:
                raise UserError(f"decontaminate_against: {spec}: {e}") from None
            unavailable.append(spec)
    return out, unavailable


def user_texts(records: list[dict]) -> Iterator[str]:
    """The user-written text of each record (SFT, preference or verifiable), as decontamination reads it."""
    return (prompt_text(r, f"record {i}") for i, r in enumerate(records))


class Checker:
    """The evaluation items of ``against``, loaded when a run starts (a set the user named that cannot
    be read is an error before anything is trained); ``report(texts)`` at the end of the run."""

    def __init__(self, against: list[str] | None):
        self.off = against is not None and not against
        self.found: list[EvalInstance] = []
        self.unavailable: list[str] = []
        if self.off:
            return
        if against is None:
            specs, self.unavailable = default_specs()
            self.found, failed = instances(specs, strict=False)
            self.unavailable += failed
        else:
            self.found, self.unavailable = instances(list(against), strict=True)

    def report(self, texts: Iterable[str], chunk: int = 10_000) -> dict:
        """``{"ngram", "threshold", "records", "against": {task: items}, "unavailable": [...],
        "tasks": {task: {"flagged": N, "examples": [...up to 20]}}, "flagged", "seconds"}``;
        ``{"checked": False}`` when turned off."""
        if self.off:
            return {"checked": False}
        t0 = time.perf_counter()
        index = NgramIndex(NGRAM)
        for inst in self.found:
            index.add(inst)
        tasks = {inst.task: {"flagged": 0, "examples": []} for inst in self.found}
        text_of = {(e.task, e.index): e.text for e in self.found}
        records = 0
        stream = iter(texts) if self.found else iter(())  # nothing to check against: the corpus is not read
        while part := list(itertools.islice(stream, chunk)):  # a corpus streams through in chunks
            for i, m in enumerate(check_texts(index, part, THRESHOLD)):
                if m is not None:
                    entry = tasks[m.task]
                    entry["flagged"] += 1
                    if len(entry["examples"]) < EXAMPLES:
                        entry["examples"].append({"record": records + i, "text": part[i][:300], "matched_index": m.index,
                                                  "matched_id": m.id, "eval_text": text_of[m.task, m.index][:300],
                                                  "overlap": round(m.overlap, 4)})
            records += len(part)
        return {"ngram": NGRAM, "threshold": THRESHOLD, "records": records,
                "against": dict(Counter(inst.task for inst in self.found)),
                "unavailable": self.unavailable, "not_checked_too_short": dict(index.too_short), "tasks": tasks,
                "flagged": sum(t["flagged"] for t in tasks.values()), "seconds": round(time.perf_counter() - t0, 3)}
