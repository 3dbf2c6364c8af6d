"""``posttrain run RECIPE``: every stage of a recipe in order, each feeding the next, resumably.

A recipe::

    output_dir: runs/smollm2
    stages:
      - {name: sft, stage: sft, config: {model: smollm2-135m-instruct, datasets: [...], max_steps: 200}}
      - {name: dpo, stage: dpo, config: {datasets: [...], loss_type: dpo_norm, beta: 5}}
      - {name: eval-dpo, stage: eval, config: {tasks: [gsm8k], limit: 100}}

``stage`` is one of ``STAGES``; ``config`` holds that stage's keys (its YAML keys; for ``eval`` and
``tts`` the options of those commands; ``onpolicy_pairs`` samples the current model on ``prompts``, a
file of verifiable prompts, and writes ``pairs.jsonl`` of verified-correct vs wrong completions,
see posttrain.data.synth.onpolicy). A training stage without ``model`` starts from the previous
training stage's output; ``eval``/``tts`` evaluate it. Each stage writes to ``output_dir/<name>``
unless its config names an ``output_dir``.

Re-running: a stage's *chain hash* is the hash of its config, the content of the local files it
names and the chain hash of the stage before it. A stage whose output holds a finished run of the same
chain is skipped; one interrupted with the same chain resumes from its last checkpoint; a changed config
or data file (or any change upstream) re-runs it from scratch, and with it every later stage.
``output_dir/report.md`` and ``report.html`` (with PNG loss curves) gather each stage's metrics,
manifest and the license of every data source that reached the model; ``output_dir/stages.json``
lists the stages in order.

Several processes (``torchrun --nproc_per_node N -m posttrain.cli run RECIPE``, or ``accelerate
launch``): every process runs the recipe; training stages train on all of them (DDP or FSDP, each
stage's ``parallel``), evaluation, test-time-scaling and pair stages run on process 0 while the others
wait, and process 0 alone writes the state files, ``stages.json`` and the report.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from posttrain.atomic import write_json
from posttrain.config_io import read_yaml, semantic, world_size
from posttrain.errors import UserError
from posttrain.stages import STAGES, TRAINING
from posttrain.report import write_report
from posttrain.util import log

STAGE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
STATE_DIR = ".pipeline"  # under the recipe's output_dir: one chain-hash file per stage


def chain_hash(parent: str, stage: dict) -> str:
    """The stage's config, the content of every local file it names (a data file rewritten under the
    same path re-runs the stage) and the chain hash of the stage before it."""
    config = stage.get("config", {})
    if stage["stage"] in TRAINING:  # what the stage computes, not how it is logged or laid out over processes
        config = semantic(STAGES[stage["stage"]].config, config)
    files = {}
    for name in _strings(config):
        if (path := Path(name)).is_file():
            stat = path.stat()
            files[name] = _file_digest(path.resolve(), stat.st_size, stat.st_mtime_ns)
    body = json.dumps({"parent": parent, "stage": stage["stage"], "config": config, "files": files},
                      sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for v in value for s in _strings(v)] if isinstance(value, (list, tuple)) else []


@functools.cache
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of the file's bytes, read once per size and modification time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    """The recipe, with ``STAGE.key=value`` overrides applied to the named stage's config."""
    from posttrain.config_io import parse_value, set_dotted

    recipe = read_yaml(path)
    for key in recipe:
        if key not in ("output_dir", "stages"):
            raise UserError(f"{path}: unknown top-level key '{key}' (expected output_dir, stages)")
    if not recipe.get("output_dir"):
        raise UserError(f"{path}: key 'output_dir' is required")
    stages = recipe.get("stages")
    if not isinstance(stages, list) or not stages:
        raise UserError(f"{path}: key 'stages' must be a non-empty list")
    names = set()
    for i, s in enumerate(stages):
        where = f"{path}: stages[{i}]"
        if not isinstance(s, dict) or not s.get("name") or s.get("stage") not in STAGES:
            raise UserError(f"{where}: needs 'name' and 'stage' (one of {', '.join(STAGES)})")
        if not isinstance(s["name"], str) or not STAGE_NAME.fullmatch(s["name"]):
            raise UserError(f"{where}: name {s['name']!r} must be letters, digits, '.', '_' or '-', not starting "
                            "with '.' (it names a directory under output_dir)")
        if s["name"] in names:
            raise UserError(f"{where}: duplicate stage name '{s['name']}'")
        names.add(s["name"])
        if not isinstance(s.setdefault("config", {}), dict):
            raise UserError(f"{where}: 'config' must be a mapping")
    for item in overrides:
        key, sep, raw = item.partition("=")
        name, dot, rest = key.partition(".")
        target = next((s for s in stages if s["name"] == name), None)
        if not sep or not dot or target is None:
            raise UserError(f"override {item!r}: expected STAGE.key=value with STAGE one of {', '.join(sorted(names))}")
        set_dotted(target["config"], rest, parse_value(raw))
    return recipe


def process_group() -> tuple[int, Callable[[], None]]:
    """This process's rank and a barrier: under a launcher (``WORLD_SIZE`` > 1) the group every stage
    shares, made here unless a stage has made it already (with a long timeout: the other processes
    wait through process 0's evaluations); rank 0 and a no-op alone."""
    if world_size() == 1:
        return 0, lambda: None
    import datetime

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(hours=24))
    return dist.get_rank(), dist.barrier


def run(recipe_path: str | Path, overrides: list[str] = ()) -> list[dict]:
    recipe = load_recipe(recipe_path, list(overrides))
    root = Path(recipe["output_dir"])
    rank, barrier = process_group()
    root.mkdir(parents=True, exist_ok=True)
    parent, model, summary = "", None, []
    before = {}  # a skipped stage keeps the time it took when it ran
    if (root / "stages.json").is_file():
        before = {e["stage"]: e for e in json.loads((root / "stages.json").read_text())}
    for s in recipe["stages"]:
        chain = chain_hash(parent, s)
        out = Path(s["config"].get("output_dir") or root / s["name"])
        started = time.time()
        result = _run_stage(s, out, model, chain, _state(root, s["name"]), rank, barrier)
        entry = {"stage": s["name"], "kind": s["stage"], "output_dir": str(out), "chain_hash": chain,
                 "skipped": result.pop("skipped", False), "seconds": round(time.time() - started, 2), **result}
        if entry["skipped"] and s["name"] in before and before[s["name"]].get("chain_hash") == chain:
            entry["seconds"] = before[s["name"]]["seconds"]
        summary.append(entry)
        if rank == 0:  # after every stage: a run stopped later keeps the times of the stages it finished
            done = {e["stage"] for e in summary}
            write_json(root / "stages.json", summary + [e for name, e in before.items() if name not in done])
        barrier()
        log(f"run: stage {s['name']} ({s['stage']}) " + ("skipped, already done" if entry["skipped"] else
                                                          f"done in {entry['seconds']} s"))
        if s["stage"] in TRAINING:
            model = str(out)
        parent = chain
    if rank == 0:
        write_json(root / "stages.json", summary)  # the recipe's stages only
        write_report(root, recipe, summary)
    barrier()
    return summary


def _state(root: Path, name: str) -> Path:
    return root / STATE_DIR / f"{name}.json"


def _run_stage(s: dict, out: Path, model: str | None, chain: str, state: Path, rank: int = 0,
               barrier: Callable[[], None] = lambda: None) -> dict:
    config = dict(s["config"])
    if s["stage"] in TRAINING:
        config.setdefault("model", model)
        if not config["model"]:
            raise UserError(f"stage {s['name']}: no 'model' and no earlier training stage to start from")
    elif not (config.get("model") or model):
        raise UserError(f"stage {s['name']}: nothing to evaluate (no 'model' and no earlier training stage)")
    config["output_dir"] = str(out)
    recorded = json.loads(state.read_text()) if state.is_file() else {}
    fresh = recorded.get("chain_hash") != chain  # a different config here or upstream (or never run): start over
    if fresh and s["stage"] in TRAINING and out.is_dir() and any(out.iterdir()) \
            and recorded.get("output_dir") != str(out.resolve()):  # a fresh training stage deletes its output_dir
        raise UserError(f"stage {s['name']}: {out} exists and was not written by this stage of this recipe; "
                        "remove it or choose another output_dir")
    barrier()  # every process has read the state before process 0 changes it
    if fresh and rank == 0:  # recorded before the stage starts, so an interrupted stage resumes on the next run
        state.parent.mkdir(parents=True, exist_ok=True)
        write_json(state, {"chain_hash": chain, "stage": s["stage"], "output_dir": str(out.resolve())})
    if s["stage"] in TRAINING:
        return _train(s["stage"], config, out, fresh)
    if rank != 0:  # process 0 evaluates; the others wait for it at the barrier after the stage
        return {"skipped": False}
    return _evaluate(s["stage"], config, out, fresh, model)


def _train(kind: str, config: dict, out: Path, fresh: bool) -> dict:
    from posttrain.config_io import load_config

    if fresh and out.exists():
        config["overwrite_output_dir"] = True
    result = STAGES[kind].run(load_config(STAGES[kind].config, base=config))
    return {"skipped": result.skipped, "metrics": result.metrics}


def _evaluate(kind: str, config: dict, out: Path, fresh: bool, model: str | None) -> dict:
    results = out / "results.json"
    if not fresh and results.is_file():
        done = json.loads(results.read_text())
        return {"skipped": True, "results": done.get("results", done.get("points"))}  # eval/pairs, tts
    target = config.pop("model", None) or model
    config.pop("output_dir")
    return {"results": STAGES[kind].run(config, out, target)}
