"""``posttrain eval``: run tasks on a model (or every checkpoint of a run) and write the results.

Output directory: ``results.json`` (task -> metric -> value, with instance and sample counts and the
run's config), ``samples.jsonl`` (one object per sample: ``task``, ``id``, ``index``, ``prompt``,
``output``, ``extracted``, ``ground_truth``, ``score``, ...), ``results.md`` (a table).

With ``env`` (posttrain.envs), a generating task is played as episodes: the model may call the
environment's tools for up to ``max_turns`` turns, its final answer is scored, and each sample also
holds the ``trajectory`` (record form), ``turns``, ``tool_calls``, ``tool_errors`` and ``malformed``;
the task's metrics add their means per sample. Over the
checkpoints of a run: one such directory per checkpoint and ``curve.png`` (each task's first metric
against the training step). Every file is written atomically.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posttrain.atomic import write_json, write_text
from posttrain.data import chat
from posttrain.errors import UserError
from posttrain.eval import plots
from posttrain.eval.tasks import resolve_tasks
from posttrain.eval.tasks.base import Task, load
from posttrain.inference.engine import SamplingParams, TransformersEngine
from posttrain.inference.open import ENGINES, local_engine
from posttrain.models import license_of, load_model, load_tokenizer
from posttrain.util import checkpoints, log


def generate_samples(task: Task, engine, instances: list[dict], seed: int, samples: int | None = None,
                     max_new_tokens: int | None = None) -> list[dict]:
    n = samples or task.samples
    temperature = task.temperature if n == 1 else max(task.temperature, 0.8)
    outs = engine.generate([i["prompt"] for i in instances],
                           SamplingParams(max_new_tokens=max_new_tokens or task.max_new_tokens, temperature=temperature,
                                          n=n, seed=seed))
    with ThreadPoolExecutor(max_workers=4) as pool:  # the code verifier waits on sandboxes
        scored = list(pool.map(lambda o: task.score(o.text, instances[o.prompt_index]), outs))
    out = []
    for o, s in zip(outs, scored):
        inst = instances[o.prompt_index]
        out.append({"task": task.name, "id": inst.get("id"), "index": inst["index"], "prompt": inst["prompt"], "output": o.text,
                    "ground_truth": inst["ground_truth"], "finish_reason": o.finish_reason,
                    "output_tokens": len(o.token_ids), **s})
    return out


@torch.no_grad()
def loglikelihood_samples(task: Task, model, tokenizer, instances: list[dict], batch_size: int = 16) -> list[dict]:
    """Sum of log-probabilities of each option's tokens after the prompt (``" " + option``)."""
    from posttrain.data import packing
    from posttrain.logprobs import TokenLogProbs, collate, per_sample

    scorer = TokenLogProbs(model)
    rows, owners = [], []
    for inst in instances:
        prompt = chat.prompt_ids(tokenizer, inst["prompt"])
        for j, choice in enumerate(inst["choices"]):
            option = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            rows.append({"input_ids": prompt + option, "labels_mask": [False] * len(prompt) + [True] * len(option)})
            owners.append((inst["index"], j))
    rows = packing.unpacked(rows)
    logps = []
    for i in tqdm(range(0, len(rows), batch_size), desc=f"eval {task.name}", unit="batch", dynamic_ncols=True):
        b = collate(rows[i:i + batch_size], tokenizer.pad_token_id)
        logp = scorer(b["input_ids"].to(model.device), b["position_ids"].to(model.device), b["labels"].to(model.device))
        logps += per_sample(logp, b["sample_ids"].to(model.device), b["num_samples"]).tolist()
    out = []
    by_index = {inst["index"]: inst for inst in instances}
    for index, inst in by_index.items():
        scores = [lp for (k, _), lp in zip(owners, logps) if k == index]
        norm = [lp / max(len(c), 1) for lp, c in zip(scores, inst["choices"])]
        pick, pick_norm = max(range(len(scores)), key=scores.__getitem__), max(range(len(norm)), key=norm.__getitem__)
        out.append({"task": task.name, "id": inst.get("id"), "index": index, "prompt": inst["prompt"],
                    "output": inst["choices"][pick], "extracted": pick, "ground_truth": inst["ground_truth"],
                    "score": float(pick == inst["ground_truth"]), "correct_norm": float(pick_norm == inst["ground_truth"]),
                    "option_logprobs": scores})
    return out


EPISODE_COUNTS = ("turns", "tool_calls", "tool_errors", "malformed")


def episode_samples(task: Task, engine, env, instances: list[dict], seed: int, max_turns: int, max_episode_tokens: int,
                    max_new_tokens: int | None = None) -> list[dict]:
    """Greedy episodes of ``env`` for a generating task's instances (one per instance), scored on the final answer."""
    from posttrain.envs.rollout import run_episodes

    records = [{"messages": i["prompt"] if isinstance(i["prompt"], list) else [{"role": "user", "content": i["prompt"]}]}
               for i in instances]
    eps = run_episodes(engine, env, records, SamplingParams(max_new_tokens=max_new_tokens or task.max_new_tokens,
                                                            temperature=task.temperature, seed=seed),
                       max_turns, max_episode_tokens)
    with ThreadPoolExecutor(max_workers=4) as pool:
        scored = list(pool.map(lambda e: task.score(e.text, instances[e.prompt_index]), eps))
    out = []
    for e, s in zip(eps, scored):
        inst = instances[e.prompt_index]
        out.append({"task": task.name, "id": inst.get("id"), "index": inst["index"], "prompt": inst["prompt"],
                    "output": e.text, "ground_truth": inst["ground_truth"], "finish_reason": e.finish_reason,
                    "output_tokens": sum(e.model_mask), "trajectory": e.messages,
                    **{k: getattr(e, k) for k in EPISODE_COUNTS}, **s})
    return out


def judged_samples(task: Task, engine, judge, instances: list[dict], seed: int,
                   max_new_tokens: int | None = None) -> list[dict]:
    """Generate the model's answers, then have ``judge`` (an engine) compare each with its reference."""
    from posttrain.eval.tasks import judge_winrate

    outs = engine.generate([i["prompt"] for i in instances],
                           SamplingParams(max_new_tokens=max_new_tokens or task.max_new_tokens, seed=seed))
    judge.progress = f"judge {task.name}"
    samples = [{"task": task.name, "id": instances[o.prompt_index].get("id"), "index": instances[o.prompt_index]["index"],
                "prompt": instances[o.prompt_index]["prompt"], "instruction": instances[o.prompt_index]["instruction"],
                "output": o.text, "ground_truth": instances[o.prompt_index]["ground_truth"]} for o in outs]
    asks = judge_winrate.judge_prompts(samples, seed)
    verdicts = judge.generate([messages for messages, _ in asks], SamplingParams(max_new_tokens=8, temperature=0.0))
    for s, (_, first), v in zip(samples, asks, verdicts):
        s["score"], s["verdict"] = judge_winrate.verdict(v.text, first)
        s["model_first"], s["judge_output"], s["extracted"] = first, v.text, s["verdict"]
    return samples


def summarize(task: Task, samples: list[dict]) -> dict:
    metrics = task.metrics(samples) if task.metrics else {"accuracy": sum(s["score"] for s in samples) / len(samples)}
    if samples and "trajectory" in samples[0]:
        metrics.update({k: sum(s[k] for s in samples) / len(samples) for k in EPISODE_COUNTS})
    return {**{k: round(v, 6) for k, v in metrics.items()}, "instances": len({s["index"] for s in samples}),
            "samples": len(samples)}


def evaluate(model_path: str, task_names: list[str], output: str | Path, limit: int | None = None,
             data: dict[str, str] | None = None, batch_size: int = 16, seed: int = 0, samples: int | None = None,
             judge: str | None = None, max_new_tokens: int | None = None, engine: str = "transformers",
             chat_template: str | None = None, env: str | None = None, env_args: dict | None = None,
             max_turns: int = 4, max_episode_tokens: int = 1024) -> dict:
    """``judge``: ``openai:<model>@<base_url>`` for judge-based tasks (else they are skipped);
    ``max_new_tokens`` caps every generating task (default: each task's own); ``engine``:
    ``transformers`` or ``vllm`` for a local model; ``chat_template``: render prompts with this
    template (a built-in name or Jinja) instead of the tokenizer's own, e.g. a base model evaluated in
    the format its fine-tuned successors will use (a local model, either engine); ``env``: play
    generating tasks as episodes of this environment (module docstring)."""
    tasks = resolve_tasks(task_names)
    environment = None
    if env:
        from posttrain.envs import make_env

        environment = make_env(env, **(env_args or {}))
        if str(model_path).startswith("openai:"):
            raise UserError("env: episodes need a local model (their token sequences are the engine's)")
    if engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if chat_template and str(model_path).startswith("openai:"):
        raise UserError("chat_template: only for a local model (an endpoint renders its own prompts)")
    kind, engine = engine, None
    data = data or {}
    for name in data:
        if name not in {t.name for t in tasks}:
            raise UserError(f"--data {name}=...: {name} is not among the tasks ({', '.join(t.name for t in tasks)})")
    skipped = {t.name: "no judge endpoint: pass --judge openai:<model>@<base_url>" for t in tasks
               if t.kind == "judge" and not judge}
    for name, why in skipped.items():
        log(f"eval {name}: skipped ({why})")
    tasks = [t for t in tasks if t.name not in skipped]
    judge_engine = None
    if judge and any(t.kind == "judge" for t in tasks):
        from posttrain.inference.openai_engine import OpenAIEngine

        judge_engine = OpenAIEngine.from_spec(judge, cache_dir=Path(output) / "judge_cache")
    instances = {t.name: load(t, data.get(t.name), limit) for t in tasks}  # all data checked before the model loads
    if str(model_path).startswith("openai:"):  # an OpenAI-compatible endpoint: generation tasks only
        from posttrain.inference.openai_engine import OpenAIEngine

        if any(t.kind == "loglikelihood" for t in tasks):
            raise UserError(f"{model_path}: task(s) {', '.join(t.name for t in tasks if t.kind == 'loglikelihood')} "
                            "score option log-likelihoods and need a local model")
        model = tokenizer = None
        engine = OpenAIEngine.from_spec(str(model_path), cache_dir=Path(output) / "cache")
    elif kind == "vllm":  # generation through vLLM; option log-likelihoods still through transformers
        model = tokenizer = None
        if any(t.kind == "loglikelihood" for t in tasks):
            model, tokenizer = load_model(model_path).eval(), load_tokenizer(model_path)
        engine = local_engine(str(model_path), "vllm", batch_size)
        for tok in (engine.tokenizer, tokenizer) if chat_template else ():
            if tok is not None:  # vLLM is given token ids rendered with the engine's tokenizer
                chat.apply_template(tok, chat.resolve_template(tok, chat_template)[0])
    else:
        model, tokenizer = load_model(model_path).eval(), load_tokenizer(model_path)
        if chat_template:
            chat.apply_template(tokenizer, chat.resolve_template(tokenizer, chat_template)[0])
        engine = TransformersEngine(model, tokenizer, batch_size=batch_size)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    all_samples: list[dict] = []
    for t in tasks:
        started = time.time()
        engine.progress = f"eval {t.name}"
        if t.kind == "loglikelihood":
            got = loglikelihood_samples(t, model, tokenizer, instances[t.name], batch_size)
        elif t.kind == "rag":
            from posttrain.eval.tasks import rag_facts

            got = rag_facts.samples(engine, instances[t.name], data.get(t.name), out / t.name,
                                    max_new_tokens or t.max_new_tokens)
        elif t.kind == "judge":
            got = judged_samples(t, engine, judge_engine, instances[t.name], seed, max_new_tokens)
        elif environment is not None:
            got = episode_samples(t, engine, environment, instances[t.name], seed, max_turns, max_episode_tokens,
                                  max_new_tokens)
        else:
            got = generate_samples(t, engine, instances[t.name], seed, samples, max_new_tokens)
        results[t.name] = {**summarize(t, got), "seconds": round(time.time() - started, 2)}
        all_samples += got
        log(f"eval {t.name}: " + ", ".join(f"{k} {v}" for k, v in results[t.name].items()))
    results.update({name: {"skipped": why} for name, why in skipped.items()})
    config = {"model": str(model_path), "tasks": [t.name for t in tasks] + list(skipped), "limit": limit, "data": data,
              "seed": seed, "samples": samples, "judge": judge, "max_new_tokens": max_new_tokens, "engine": kind,
              "chat_template": chat_template, "model_license": license_of(str(model_path))}
    if env:
        config.update({"env": env, "env_args": env_args or {}, "max_turns": max_turns, "max_episode_tokens": max_episode_tokens})
    write_text(out / "samples.jsonl", "".join(json.dumps(s, default=str) + "\n" for s in all_samples))
    write_json(out / "results.json", {"results": results, "config": config})
    write_text(out / "results.md", table(results))
    return results


def table(results: dict) -> str:
    lines = ["| task | metric | value | instances |", "|---|---|---|---|"]
    for task, metrics in results.items():
        if "skipped" in metrics:
            lines.append(f"| {task} | skipped: {metrics['skipped']} | | |")
            continue
        for k, v in metrics.items():
            if k not in ("instances", "samples", "seconds"):
                lines.append(f"| {task} | {k} | {v:.4f} | {metrics['instances']} |")
    return "\n".join(lines) + "\n"


def checkpoint_dirs(run: Path) -> list[tuple[int, Path]]:
    found = [(int(p.name.split("-")[1]), p) for p in checkpoints(run)]
    manifest = run / "manifest.json"
    if manifest.is_file() and (run / "config.json").is_file():
        found.append((int(json.loads(manifest.read_text()).get("steps", found[-1][0] + 1 if found else 0)), run))
    if not found:
        raise UserError(f"{run}: no checkpoints (checkpoints/checkpoint-N) and no finished model")
    return found


def run_eval_stage(config: dict, output: Path, model: str) -> dict:
    """A recipe's ``eval`` stage: ``tasks`` (a list, or ``suite:NAME``) and ``evaluate``'s keys."""
    tasks = config.pop("tasks", None)
    if not tasks:
        raise UserError("eval stage: config key 'tasks' is required (a list of tasks or suite:NAME)")
    return evaluate(model, tasks if isinstance(tasks, list) else [tasks], output, **config)


def evaluate_checkpoints(run: str | Path, task_names: list[str], output: str | Path, **kwargs) -> dict:
    run, out = Path(run), Path(output)
    curve = []
    for step, path in checkpoint_dirs(run):
        results = evaluate(str(path), task_names, out / f"step-{step}", **kwargs)
        curve.append({"step": step, "path": str(path), "results": {t: m for t, m in results.items() if "skipped" not in m}})
    write_json(out / "results.json", {"checkpoints": curve, "config": {"run": str(run), "tasks": task_names, **kwargs}})
    plot_curve(curve, out / "curve.png")
    lines = ["| step | " + " | ".join(f"{t} {next(iter(m))}" for t, m in curve[0]["results"].items()) + " |",
             "|---|" + "---|" * len(curve[0]["results"])]
    for c in curve:
        lines.append(f"| {c['step']} | " + " | ".join(f"{next(iter(m.values())):.4f}" for m in c["results"].values()) + " |")
    write_text(out / "results.md", "\n".join(lines) + "\n")
    return {"checkpoints": curve}


def plot_curve(curve: list[dict], path: Path) -> None:
    fig, ax = plots.figure()
    for task in curve[0]["results"]:
        metric = next(iter(curve[0]["results"][task]))
        ax.plot([c["step"] for c in curve], [c["results"][task][metric] for c in curve], marker="o", label=f"{task} {metric}")
    ax.set_xlabel("training step")
    ax.set_ylabel("score")
    ax.legend()
    ax.grid(alpha=0.3)
    plots.save(fig, path)
