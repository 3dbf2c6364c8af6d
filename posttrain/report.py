"""The report of a ``posttrain run``: ``report.md`` and ``report.html`` in the run's output directory.

Both hold a table of the stages (kind, whether skipped, seconds, tokens, key results; for evaluation
stages the held-out score, the task's first metric, and its gain over the previous evaluation of the
same task), the contamination report of each training stage, the license of the model each training
stage started from and of every data source that reached the model, and per stage the curves that
matter, as PNG files beside them:

- SFT, DPO, reward models, mid-training: the loss (``loss-STAGE.png``);
- RL: mean reward, verified share, KL (when there is a reference) and completion length
  (``rl-STAGE.png``), not the loss, which is noise around 0 by construction;
- an evaluation over checkpoints (``eval --checkpoints``): its ``curve.png``.

``report.html`` is a page of its own (no script, no network): the tables rendered, the images, and each
stage's config folded under it.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import yaml

from posttrain.atomic import write_text

RL_CURVES = (("reward", "mean reward"), ("verified", "verified share"), ("kl", "KL to the reference"),
             ("completion_tokens", "completion length (tokens)"))


def _float(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def key_results(entry: dict) -> str:
    if "metrics" in entry:
        m = entry["metrics"]
        return ", ".join(f"{k} {v:.4g}" for k, v in m.items() if _float(v) and (k in ("loss", "reward") or k.startswith("eval/")))
    res = entry.get("results")
    if isinstance(res, dict):
        return "; ".join(f"{t}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items() if isinstance(v, float))
                         if isinstance(r, dict) else f"{t} {r}" for t, r in res.items())
    return ""


def stage_rows(summary: list[dict]) -> list[dict]:
    """Per stage: ``stage``, ``kind``, ``skipped``, ``seconds``, ``tokens``, ``score`` (an evaluation's
    first task and metric: ``(task, metric, value)``), ``gain`` (over the previous evaluation of that task
    and metric) and ``key`` (the key results as text)."""
    rows, last = [], {}
    for entry in summary:
        row = {"stage": entry["stage"], "kind": entry["kind"], "skipped": entry.get("skipped", False),
               "seconds": entry.get("seconds"), "tokens": None, "score": None, "gain": None, "key": key_results(entry)}
        if "metrics" in entry:
            row["tokens"] = entry["metrics"].get("num_input_tokens_seen")
        res = entry.get("results")
        if isinstance(res, dict) and res:
            task, metrics = next(iter(res.items()))
            if isinstance(metrics, dict):
                metric = next((k for k, v in metrics.items() if isinstance(v, float)), None)
                if metric is not None:
                    row["score"] = (task, metric, metrics[metric])
                    if (task, metric) in last:
                        row["gain"] = metrics[metric] - last[task, metric]
                    last[task, metric] = metrics[metric]
        rows.append(row)
    return rows


def curves(root: Path, entry: dict) -> list[str]:
    """The stage's figures, written into ``root``: their file names."""
    from posttrain.eval import plots

    out = Path(entry["output_dir"])
    made = []
    metrics = out / "metrics.jsonl"
    if "metrics" in entry and metrics.is_file():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        rl = any("reward" in r for r in rows)
        panels = [(k, label) for k, label in (RL_CURVES if rl else [("loss", "loss")]) if any(k in r for r in rows)]
        if panels:
            fig, axes = plots.figure((4.2 * len(panels), 3), ncols=len(panels))
            for ax, (k, label) in zip(axes if len(panels) > 1 else [axes], panels):
                ax.plot(*zip(*[(r["step"], r[k]) for r in rows if k in r]))
                ax.set_xlabel("step")
                ax.set_ylabel(label)
                ax.grid(alpha=0.3)
            fig.suptitle(entry["stage"])
            name = f"{'rl' if rl else 'loss'}-{entry['stage']}.png"
            plots.save(fig, root / name)
            made.append(name)
    if (out / "curve.png").is_file():  # an evaluation over checkpoints
        name = f"eval-curve-{entry['stage']}.png"
        shutil.copyfile(out / "curve.png", root / name)
        made.append(name)
    return made


def provenance(summary: list[dict]) -> tuple[list[tuple], dict[str, str], dict[str, set]]:
    """Contamination rows ``(stage, checked against, flagged)``, the model license per training stage
    and ``{data license: paths}``, from the training stages' manifests."""
    contamination, models, licenses = [], {}, {}
    for entry in summary:
        manifest = Path(entry["output_dir"]) / "manifest.json"
        if "metrics" not in entry or not manifest.is_file():
            continue
        made = json.loads(manifest.read_text())
        models[entry["stage"]] = made.get("model_license", "unknown")
        for d in made.get("data", []):
            licenses.setdefault(str(d.get("license") or "unknown"), set()).add(str(d.get("path")))
        c = made.get("contamination") or {}
        against = ", ".join(f"{t} ({n})" for t, n in c.get("against", {}).items()) or "nothing available"
        if c.get("unavailable"):
            against += "; unavailable: " + ", ".join(c["unavailable"])
        flagged = ", ".join(f"{t}: {r['flagged']} of {c['records']}" for t, r in c.get("tasks", {}).items()) or "-"
        contamination.append((entry["stage"], "off" if c.get("checked") is False else against, flagged))
    return contamination, models, licenses


def _tokens(n) -> str:
    return "" if n is None else f"{int(n):,}"


def write_report(root: Path, recipe: dict, summary: list[dict]) -> None:
    root = Path(root)
    rows = stage_rows(summary)
    figures = {entry["stage"]: curves(root, entry) for entry in summary}
    contamination, models, licenses = provenance(summary)
    configs = {s.get("name"): s.get("config") or {} for s in recipe.get("stages", [])}

    md = ["# Run report", "", "| stage | kind | skipped | seconds | key results |", "|---|---|---|---|---|"]
    md += [f"| {r['stage']} | {r['kind']} | {r['skipped']} | {r['seconds']} | {r['key']} |" for r in rows]
    md += ["", "## Contamination (training records against evaluation items, manifest.json)", "",
           "| stage | checked against | flagged |", "|---|---|---|"]
    md += [f"| {s} | {a} | {f} |" for s, a, f in contamination]
    md += ["", "## Model license (of the model each training stage started from)", ""]
    md += [f"- {stage}: {lic}" for stage, lic in models.items()]
    md += ["", "## Data licenses", ""]
    md += [f"- {lic}: {', '.join(sorted(paths))}" for lic, paths in sorted(licenses.items())]
    md += [""] + [f"![{img}]({img})" for imgs in figures.values() for img in imgs]
    write_text(root / "report.md", "\n".join(md) + "\n")

    e = html.escape
    table = ["<table><thead><tr><th>stage</th><th>kind</th><th>held-out score</th><th>gain</th><th>tokens</th>"
             "<th>seconds</th><th>key results</th></tr></thead><tbody>"]
    for r in rows:
        score = f"{r['score'][2]:.3f} <span class='muted'>{e(r['score'][0])} {e(r['score'][1])}</span>" if r["score"] else ""
        gain = "" if r["gain"] is None else f"<span class='{'up' if r['gain'] > 0 else 'down' if r['gain'] < 0 else ''}'>{r['gain']:+.3f}</span>"
        skipped = " <span class='muted'>(skipped: finished earlier)</span>" if r["skipped"] else ""
        table.append(f"<tr><td>{e(r['stage'])}{skipped}</td><td>{e(r['kind'])}</td><td>{score}</td><td>{gain}</td>"
                     f"<td class='num'>{_tokens(r['tokens'])}</td><td class='num'>{r['seconds']}</td><td>{e(r['key'])}</td></tr>")
    table.append("</tbody></table>")
    stages = []
    for r in rows:
        pictures = "".join(f"<img src='{e(img)}' alt='{e(img)}'>" for img in figures[r["stage"]])
        config = yaml.safe_dump(configs.get(r["stage"], {}), sort_keys=False).strip()
        stages.append(f"<section class='stage' id='stage-{e(r['stage'])}'><h3>{e(r['stage'])} <span class='muted'>"
                      f"{e(r['kind'])}</span></h3><p>{e(r['key']) or '&nbsp;'}</p>{pictures}"
                      f"<details><summary>config</summary><pre>{e(config)}</pre></details></section>")
    contam = "".join(f"<tr><td>{e(s)}</td><td>{e(a)}</td><td>{e(f)}</td></tr>" for s, a, f in contamination)
    model_lic = "".join(f"<li>{e(s)}: {e(lic)}</li>" for s, lic in models.items())
    data_lic = "".join(f"<li><b>{e(lic)}</b>: {e(', '.join(sorted(paths)))}</li>" for lic, paths in sorted(licenses.items()))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>posttrain run report</title><link rel="icon" href="data:,">
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; color: #1d2430; max-width: 1150px; margin: 24px auto; padding: 0 16px; }}
table {{ border-collapse: collapse; width: 100%; margin: 8px 0 16px; }}
th, td {{ border-bottom: 1px solid #e3e6eb; padding: 5px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f4f6f8; font-weight: 600; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.muted {{ color: #667085; font-weight: normal; font-size: 12px; }}
.up {{ color: #067647; font-weight: 600; }} .down {{ color: #b42318; font-weight: 600; }}
section.stage {{ border-top: 1px solid #e3e6eb; padding: 8px 0; }}
section.stage img {{ max-width: 100%; display: block; margin: 6px 0; }}
pre {{ background: #f4f6f8; padding: 8px; border-radius: 6px; overflow-x: auto; }}
</style></head>
<body>
<h1>Run report</h1>
<p class="muted">{e(str(root))}: {len(rows)} stages</p>
<h2>Stages</h2>
{''.join(table)}
<h2>Curves and configs</h2>
{''.join(stages)}
<h2>Contamination</h2>
<p class="muted">Training records checked against evaluation items (n-gram overlap; manifest.json of each stage).</p>
<table><thead><tr><th>stage</th><th>checked against</th><th>flagged</th></tr></thead><tbody>{contam}</tbody></table>
<h2>Licenses</h2>
<h3>Model (the model each training stage started from)</h3><ul>{model_lic}</ul>
<h3>Data</h3><ul>{data_lic}</ul>
</body></html>
"""
    write_text(root / "report.html", page)
