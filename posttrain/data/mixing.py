"""Dataset mixing: several sources, each by ``count`` or ``fraction``, seeded, with license lineage.

For a source of ``n`` records asked for ``k`` (``k = count`` or ``round(fraction * n)``):
``k <= n`` takes a seeded sample of ``k`` distinct records; ``k > n`` takes every record
``k // n`` times plus a seeded sample of ``k % n`` (upsampling). The result is the sources
concatenated in config order (the training loop shuffles). Each record is tagged with its
``source`` and ``license``; the lineage (one entry per source: path, license, fingerprint, counts)
goes into the run's manifest.
"""

from __future__ import annotations

import hashlib
import json
import random

from posttrain.config import DataSource
from posttrain.data.adapters import to_kind
from posttrain.data.io import read_records
from posttrain.errors import UserError


def load_source(src: DataSource, kind: str) -> tuple[list[dict], str]:
    """All records of one source as validated records of ``kind``, and a content fingerprint."""
    out, h = [], hashlib.sha256()
    for raw, where in read_records(src.path, src.split, src.name):
        h.update(json.dumps(raw, sort_keys=True, default=str).encode())
        rec = to_kind(raw, kind, src.format, where)
        rec.setdefault("source", src.path)
        if src.license and "license" not in rec:
            rec["license"] = src.license
        out.append(rec)
    if not out:
        raise UserError(f"{src.path}: no records (split {src.split!r})")
    return out, "sha256:" + h.hexdigest()


def choose(n: int, k: int, rng: random.Random) -> list[int]:
    """Indices of ``k`` draws from ``n`` records: distinct while ``k <= n``, whole copies beyond."""
    copies, rest = divmod(k, n)
    return [i for _ in range(copies) for i in range(n)] + rng.sample(range(n), rest)


def mix(sources: list[DataSource], kind: str, seed: int) -> tuple[list[dict], list[dict]]:
    records, lineage = [], []
    for i, src in enumerate(sources):
        recs, fp = load_source(src, kind)
        n = len(recs)
        k = n if src.count is None and src.fraction is None else (
            src.count if src.count is not None else round(src.fraction * n))
        rng = random.Random(f"{seed}:{i}:{src.path}")
        records.extend(recs[j] for j in choose(n, k, rng))
        licenses = sorted({r.get("license") or "unknown" for r in recs})
        lineage.append({"path": src.path, "split": src.split, "name": src.name, "format": src.format,
                        "license": src.license or (licenses[0] if len(licenses) == 1 else licenses),
                        "records_available": n, "records_used": k, "fingerprint": fp})
    return records, lineage
