"""Paired comparison of two evaluations of the same instances (before and after a training stage).

For each task both runs scored (``samples.jsonl`` of ``posttrain eval``), instances are matched by
``index`` (a task's instances must be the same in both). With per-instance scores ``x_i`` (before) and
``y_i`` (after), ``n`` pairs: each accuracy ``p`` has the standard error ``sqrt(p (1 - p) / n)``; the
difference ``d = mean(y - x)`` has the paired standard error ``sd(y_i - x_i) / sqrt(n)`` (``sd`` with
``n - 1``), smaller than the unpaired one when the same instances stay right or wrong. IFEval adds the
instruction level (each instruction of each prompt one pair). Samples of ``n > 1`` completions per
instance are averaged per instance first. Metrics: ``score`` (the task's per-instance score: GSM8K and
MATH accuracy, HumanEval pass@1), IFEval's ``prompt_level_strict_acc`` and ``inst_level_strict_acc``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from posttrain.errors import UserError


def _per_instance(path: Path) -> dict[str, dict[str, dict[int, list[float]]]]:
    """``task -> metric -> index -> scores`` of one run's samples."""
    file = path / "samples.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no samples.jsonl (the output directory of `posttrain eval`)")
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for n, line in enumerate(file.read_text().splitlines(), 1):
        s = json.loads(line)
        if "score" not in s or "index" not in s:
            raise UserError(f"{file}:{n}: a sample needs 'index' and 'score'")
        ifeval = "strict" in s  # IFEval: the prompt level, and one pair per instruction
        out[s["task"]]["prompt_level_strict_acc" if ifeval else "score"][s["index"]].append(float(s["score"]))
        for k, followed in enumerate(s.get("strict") or []):
            out[s["task"]]["inst_level_strict_acc"][(s["index"], k)].append(float(followed))
    return out


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def compare(before: str | Path, after: str | Path) -> list[dict]:
    """One row per task and metric: ``n``, ``before``, ``after`` (with standard errors), ``diff`` and
    its paired standard error."""
    a, b = _per_instance(Path(before)), _per_instance(Path(after))
    rows = []
    for task in sorted(set(a) & set(b)):
        for metric in sorted(set(a[task]) & set(b[task])):
            xa, xb = a[task][metric], b[task][metric]
            if set(xa) != set(xb):
                raise UserError(f"{task}: the two runs scored different instances ({len(xa)} and {len(xb)}); "
                                "compare evaluations of the same data and limit")
            keys = sorted(xa)
            x = [sum(xa[k]) / len(xa[k]) for k in keys]
            y = [sum(xb[k]) / len(xb[k]) for k in keys]
            n = len(keys)
            d = [v - u for u, v in zip(x, y)]
            mean_d = sum(d) / n
            sd = math.sqrt(sum((v - mean_d) ** 2 for v in d) / (n - 1)) if n > 1 else float("nan")
            pa, pb = sum(x) / n, sum(y) / n
            rows.append({"task": task, "metric": metric, "n": n, "before": pa, "before_se": _se(pa, n),
                         "after": pb, "after_se": _se(pb, n), "diff": mean_d, "diff_se": sd / math.sqrt(n)})
    if not rows:
        raise UserError(f"{before} and {after}: no task in common")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| task | metric | n | before | after | difference (paired SE) | difference / SE |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        z = r["diff"] / r["diff_se"] if r["diff_se"] else float("inf") if r["diff"] else 0.0
        lines.append(f"| {r['task']} | {r['metric']} | {r['n']} | {r['before']:.3f} ± {r['before_se']:.3f} | "
                     f"{r['after']:.3f} ± {r['after_se']:.3f} | {r['diff']:+.3f} ± {r['diff_se']:.3f} | {z:+.1f} |")
    return "\n".join(lines) + "\n"
