"""THE training loop, shared by every stage. A stage supplies its steps and a loss; the loop owns the rest.

Steps. A ``StepSource`` hands the loop each step's micro-batches for this process: ``RowSource`` for
fixed rows (SFT, DPO, reward models, mid-training: rows shuffled once per epoch with ``seed + epoch``,
a step takes the next ``G = per_device_train_batch_size * gradient_accumulation_steps * processes``
rows, process ``r`` its contiguous share), RLVR's rollout source for RL (prompts -> rollouts ->
rewards -> advantages). The data position is a function of the step alone, which makes resume exact.
A source may ask for several optimizer updates over one step's batches (``updates_per_step``, RL's
``num_iterations``); the learning-rate schedule counts updates.

Normalisation. ``Objective.items_key`` names a batch count (trained tokens, samples, pairs,
completions). Before a step the loop sums it over the step's micro-batches and processes (``N``) and
passes ``N`` to ``Objective.loss``, which returns its loss *summed* over the micro-batch and divided by
``N``. The gradient of an update is then the gradient of ``(global sum) / N``, whatever the split into
processes and micro-batches (each backward is scaled by ``num_processes`` because DDP averages
gradients across processes). Logged metrics are summed the same way; the source's ``summarize`` turns
the global sums into the logged values.

Processes. The layout (posttrain.train.parallel) wraps the module: ``parallel: ddp`` in DDP through
accelerate, ``fsdp`` sharded with FSDP2 (per-layer units, DCP checkpoints that any number of
processes resumes), ``deepspeed`` in a ZeRO engine; it makes the updates, writes and reads the
checkpoints and hands out the whole model for generation, evaluation and the final save. The rest of
the loop is the same for all three.

Everything else, for every stage: the accelerator, the output directory, seeding, resume from the
latest complete checkpoint (possibly written by another number of processes with the same global
batch), AdamW (no weight decay on biases and norms), gradient clipping with the norm logged
(``grad_norm``), transformers' LR schedules with warmup, ``metrics.jsonl`` every ``logging_steps``
with tokens/s, the bytes of parameters, gradients and optimizer state each process holds and every
process's peak resident memory (in the final metrics), a progress bar, optional tensorboard/wandb, an
evaluation hook, checkpoints every ``save_steps`` (atomic, see checkpoint.py), and the end of a run:
the final model, the contamination report and, written last, ``manifest.json``. This module is the
only place that calls ``backward`` (the layout's: accelerate's, or DeepSpeed's engine's).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from posttrain import manifest as manifest_mod
from posttrain.atomic import publish_dir, write_json
from posttrain.config import TrainConfig
from posttrain.config_io import config_hash
from posttrain.errors import UserError
from posttrain.logprobs import TokenLogProbs
from posttrain.train import checkpoint as ckpt_mod
from posttrain.train import contamination, parallel
from posttrain.util import log

LossFn = Callable[[torch.nn.Module, dict, float], tuple[torch.Tensor, dict[str, torch.Tensor | float]]]
SCHEDULES = {"linear": "linear", "cosine": "cosine", "cosine_min": "cosine_with_min_lr", "constant": "constant_with_warmup"}


def make_scheduler(cfg: TrainConfig, optimizer, warmup: int, total: int):
    """transformers' schedule ``cfg.lr_scheduler_type`` (``cosine_min`` ends at ``min_lr_ratio`` of the peak)."""
    from transformers import get_scheduler

    extra = {"scheduler_specific_kwargs": {"min_lr_rate": cfg.min_lr_ratio}} if cfg.lr_scheduler_type == "cosine_min" else {}
    return get_scheduler(SCHEDULES[cfg.lr_scheduler_type], optimizer, num_warmup_steps=warmup, num_training_steps=total,
                         **extra)


@dataclass
class Objective:
    """``loss(policy, batch, num_items)`` -> (loss summed over the batch / num_items, metrics
    summed the same way). ``policy`` is the prepared ``TokenLogProbs`` module."""

    loss: LossFn
    items_key: str


@dataclass
class Result:
    metrics: dict
    output_dir: Path
    skipped: bool = False


def finished(cfg: TrainConfig, stage: str) -> Result | None:
    """The result of a finished run of this exact config in ``output_dir``, if there is one."""
    manifest = Path(cfg.output_dir) / "manifest.json"
    if cfg.overwrite_output_dir or not manifest.is_file():
        return None
    m = json.loads(manifest.read_text())
    if m.get("config_hash") != config_hash(cfg):
        return None
    log(f"{stage}: {cfg.output_dir} already holds this finished run; nothing to do")
    return Result(metrics=m["metrics"], output_dir=Path(cfg.output_dir), skipped=True)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per parameter group; on a CPU about 5x faster than the default
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, fused=True)


def apply_peft(cfg: TrainConfig, model):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def reduce_sum(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Sum a dict of floats over processes (every process has the same keys)."""
    if accelerator.num_processes == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return dict(zip(keys, t.tolist()))


def per_process(accelerator, mine: float) -> list[float]:
    """``mine`` of every process, in process order."""
    slots = {f"{r:06d}": (mine if r == accelerator.process_index else 0.0) for r in range(accelerator.num_processes)}
    return [round(v, 1) for _, v in sorted(reduce_sum(accelerator, slots).items())]


def peak_rss_mb(accelerator) -> list[float]:
    """The peak resident memory of every process so far, in MB (Linux: ``ru_maxrss`` is in KB)."""
    import resource

    return per_process(accelerator, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


@dataclass
class StepData:
    """One step's input from a ``StepSource``: this process's micro-batches, metric sums to add over
    processes (``sums``), and values logged as they are (``info``)."""

    batches: list[dict]
    sums: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


@dataclass
class Run:
    """The run context a step source sees: the accelerator, the prepared module the objective calls,
    the inner model (for generation), the tokenizer, the config and the layout over processes."""

    accelerator: object
    module: torch.nn.Module
    model: torch.nn.Module
    tokenizer: object
    cfg: TrainConfig
    layout: object = None  # posttrain.train.parallel: whole weights for the engine (``layout.whole``)
    job: "Job | None" = None
    total: int = 0  # steps
    resume_from: Path | None = None  # the checkpoint this run resumed from
    started: float = 0.0  # wall time the stage started (manifest)
    t_run: float = 0.0  # wall time the steps started

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


class StepSource(Protocol):
    """Where a stage's steps come from: fixed rows (``RowSource``) or rollouts (RLVR)."""

    updates_per_step: int  # optimizer updates over one step's micro-batches (RL's num_iterations)
    progress_keys: tuple[str, ...]  # metrics shown on the progress bar

    def total_steps(self, cfg: TrainConfig, world: int) -> tuple[int, int]: ...  # (steps, steps per epoch)

    def __call__(self, step: int, run: Run) -> StepData: ...

    def summarize(self, sums: dict[str, float]) -> dict: ...  # global sums -> logged metrics

    # optional: ``state(step) -> dict | None`` (JSON) saved with the checkpoint after ``step``,
    # ``load_state(dict)`` on resume, ``close()`` after the last step


class RowSource:
    """Fixed training rows. A step takes the next ``G = per_device_train_batch_size *
    gradient_accumulation_steps * processes`` rows of an order shuffled once per epoch (seed ``seed +
    epoch``); process ``r`` takes rows ``[r*P, (r+1)*P)`` of them in micro-batches. ``max_rows``
    (a token budget) sets the number of steps to ``max_rows // G`` whatever the number of processes."""

    updates_per_step = 1
    progress_keys = ("loss",)

    def __init__(self, rows, collate: Callable[[list[dict]], dict], max_rows: int | None = None):
        self.rows, self.collate, self.max_rows = rows, collate, max_rows
        self.order: dict[int, list[int]] = {}

    def total_steps(self, cfg: TrainConfig, world: int) -> tuple[int, int]:
        self.micro = cfg.per_device_train_batch_size
        self.global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
        self.seed = cfg.seed
        self.steps_per_epoch = len(self.rows) // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(self.rows)} training rows is fewer than one global batch of {self.global_batch} "
                            "(per_device_train_batch_size x gradient_accumulation_steps x processes)")
        if self.max_rows:
            return max(1, self.max_rows // self.global_batch), self.steps_per_epoch
        if cfg.max_steps > 0:
            return cfg.max_steps, self.steps_per_epoch
        return math.ceil(cfg.num_train_epochs * self.steps_per_epoch), self.steps_per_epoch

    def __call__(self, step: int, run: Run) -> StepData:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self.order:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self.order = {epoch: torch.randperm(len(self.rows), generator=g).tolist()}
        chosen = self.order[epoch][k * self.global_batch:(k + 1) * self.global_batch]
        share = self.global_batch // run.world
        mine = chosen[run.rank * share:(run.rank + 1) * share]
        return StepData([self.collate([self.rows[i] for i in mine[j:j + self.micro]])
                         for j in range(0, share, self.micro)])

    def summarize(self, sums: dict[str, float]) -> dict:
        return sums


@dataclass
class Job:
    """What a stage hands the loop: its steps (``source``), its loss (``objective``), the module the
    objective calls around the model (``wrap``: per-token log-probs by default), models trained
    beside it (``extra_models``: RL's value model, checkpointed and saved in subdirectories), an
    evaluation hook, and for the end of the run its data lineage and statistics (manifest) and the
    user text of every training record (``texts``: the contamination report)."""

    stage: str
    source: StepSource
    objective: Objective
    data: list[dict]
    data_stats: dict
    eval_fn: Callable[[torch.nn.Module], dict] | None = None
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = TokenLogProbs
    extra_models: dict[str, torch.nn.Module] | None = None
    texts: Iterable[str] = ()


def train(cfg: TrainConfig, model, tokenizer, job: Job) -> Result:
    """Train ``model`` on the steps of ``job.source`` and write the final checkpoint and manifest to
    ``cfg.output_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    started = time.time()
    stage, source, objective, eval_fn, extra_models = job.stage, job.source, job.objective, job.eval_fn, job.extra_models
    checker = contamination.Checker(cfg.decontaminate_against)
    for tracker, modules in (("tensorboard", ("tensorboard", "tensorboardX")), ("wandb", ("wandb",))):
        if tracker in cfg.report_to and not any(importlib.util.find_spec(m) for m in modules):
            raise UserError(f"report_to: {tracker} is not installed (pip install {modules[0]})")
    # Without a GPU, accelerate forms a multi-process group (gloo) only when told to use the CPU.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.report_to or None,
                              project_dir=cfg.output_dir)
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    resume_from = ckpt_mod.resume_point(cfg, is_main)
    accelerator.wait_for_everyone()
    out = Path(cfg.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)

    try:
        total, steps_per_epoch = source.total_steps(cfg, world)
    except UserError as e:
        raise UserError(f"{stage}: {e}") from None
    updates = total * source.updates_per_step
    warmup = math.ceil(cfg.warmup_ratio * updates)

    if cfg.freeze_embeddings:  # the input embedding and the output head (the same tensor when tied)
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None:
                emb.weight.requires_grad_(False)
    if cfg.use_peft:
        model = apply_peft(cfg, model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = job.wrap(model)
    module.train()
    layout = parallel.layout(cfg, accelerator)
    module, optimizer = layout.prepare(module, lambda m: make_optimizer(cfg, m))
    scheduler = make_scheduler(cfg, optimizer, warmup, updates)
    inner = accelerator.unwrap_model(module).model
    run = Run(accelerator, module, inner, tokenizer, cfg, layout, job, total, resume_from, started)

    start = 0
    metrics_path = out / "metrics.jsonl"
    if resume_from is not None:
        loaded = layout.load(resume_from, inner, scheduler, extra_models)
        start = loaded["step"]
        if "source_state" in loaded:  # e.g. rollouts generated ahead (async RL), one entry per process
            states = json.loads(loaded["source_state"])
            if len(states) != world:
                raise UserError(f"{resume_from}: holds the step source's state of {len(states)} process(es); "
                                f"resume it on {len(states)}")
            source.load_state(states[accelerator.process_index])
        if is_main:
            ckpt_mod.trim_metrics(metrics_path, start)
            log(f"{stage}: resuming from {resume_from} (step {start} of {total})")
    elif is_main:
        metrics_path.unlink(missing_ok=True)
    if report := cfg.report_to:
        accelerator.init_trackers(stage, config={k: str(v) for k, v in vars(cfg).items()})
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    log(f"{stage}: {total} steps x {source.updates_per_step} update(s), {warmup} warmup, global batch {global_batch} "
        f"({world} process(es) x {cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps} accumulation)")

    bar = tqdm(total=total, initial=start, desc=stage, disable=None if is_main else True, dynamic_ncols=True)
    quiet_every = max(1, total // 10)
    params = [p for p in module.parameters() if p.requires_grad]
    last: dict = {}
    tokens_seen, t_run = 0, time.time()
    run.t_run = t_run
    for step in range(start, total):
        t0 = time.time()
        got = source(step, run)
        n_items = reduce_sum(accelerator, {"n": sum(b[objective.items_key] for b in got.batches)})["n"]
        sums: dict[str, float] = {"loss": 0.0}
        for _ in range(source.updates_per_step):
            for j, batch in enumerate(got.batches):
                tensors = {key: v.to(accelerator.device) for key, v in batch.items() if isinstance(v, torch.Tensor)}
                with layout.accumulating(last=j == len(got.batches) - 1):
                    loss, extra = objective.loss(module, {**batch, **tensors}, max(n_items, 1.0))
                    layout.backward(loss * layout.loss_scale)  # a share of the global mean, scaled back from averages
                for key, v in {"loss": loss.detach(), **extra}.items():
                    sums[key] = sums.get(key, 0.0) + float(v) / source.updates_per_step
                tokens_seen += batch["num_input_tokens"] * world
            lr = scheduler.get_last_lr()[0]
            grad_norm = layout.step(params)  # clip, optimizer step, zero the gradients
            scheduler.step()
        totals = reduce_sum(accelerator, {**got.sums, **sums})
        done = step + 1
        elapsed = time.time() - t_run
        last = {"step": done, "epoch": round(step / steps_per_epoch, 4),
                **{k: round(v, 6) for k, v in source.summarize(totals).items()}, **got.info,
                "learning_rate": lr, "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                "num_input_tokens_seen": tokens_seen, "step_seconds": round(time.time() - t0, 3),
                "elapsed_seconds": round(elapsed, 3), "tokens_per_second": round(tokens_seen / max(elapsed, 1e-9), 1)}
        shown = {k: last[k] for k in source.progress_keys if k in last}
        if done % cfg.logging_steps == 0 or done == total:
            if is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
                if bar.disable and (done % quiet_every == 0 or done == total):
                    log(f"{stage}: step {done}/{total} " + " ".join(f"{k} {v:.4f}" for k, v in shown.items())
                        + f" lr {lr:.3g}")
            if report:
                accelerator.log(last, step=done)
        bar.update(1)
        bar.set_postfix({**{k: f"{v:.4f}" for k, v in shown.items()}, "lr": f"{lr:.2e}"})
        if eval_fn is not None and cfg.eval_steps > 0 and done % cfg.eval_steps == 0 and done < total:
            evaluate_main(accelerator, eval_fn, layout.whole(inner, keep=is_main), done, metrics_path)
        if cfg.save_steps > 0 and done % cfg.save_steps == 0 and done < total:  # the end writes the final model
            state = {"epoch": step // steps_per_epoch, "config_hash": config_hash(cfg),
                     "global_batch_size": ckpt_mod.global_batch_size(cfg), "parallel": cfg.parallel, "processes": world}
            if (source_state := getattr(source, "state", lambda _: None)(done)) is not None:
                from accelerate.utils import gather_object

                state["source_state"] = json.dumps(gather_object([source_state]) if world > 1 else [source_state])
            layout.save(cfg.output_dir, done, inner, tokenizer, scheduler, state, extra_models)
    bar.close()
    getattr(source, "close", lambda: None)()
    # The optimizer state (2x the weights) is no longer needed: free it before the final evaluation
    # and save, which would otherwise add their own buffers on top of it at the run's peak.
    last.update(layout.memory)
    del optimizer, scheduler, params
    layout.optimizer = None
    accelerator.free_memory()
    last["peak_rss_mb_per_process"] = peak_rss_mb(accelerator)
    if accelerator.device.type == "cuda":  # the accelerator's own peak (tensors allocated), in MB
        last["peak_gpu_mb_per_process"] = per_process(accelerator, torch.cuda.max_memory_allocated() / 2**20)
    # the whole model (gathered from every process's shards onto process 0 when sharded), to evaluate and save
    inner = layout.whole(inner, keep=is_main)
    extra_models = {name: layout.whole(m, keep=is_main) for name, m in (extra_models or {}).items()}
    return finish(run, inner, last, extra_models, checker.report(job.texts) if accelerator.is_main_process else {})


def finish(run: Run, model, last: dict, extra_models: dict | None, contamination_report: dict) -> Result:
    """The end of a run: the final evaluation, the whole ``model`` (and ``extra_models`` in
    subdirectories), the contamination report of the training records (posttrain.train.contamination)
    and, written last, ``manifest.json``."""
    accelerator, cfg, job, tokenizer, total = run.accelerator, run.cfg, run.job, run.tokenizer, run.total
    stage, eval_fn = job.stage, job.eval_fn
    out = Path(cfg.output_dir)
    metrics_path = out / "metrics.jsonl"
    final = dict(last)
    if eval_fn is not None:
        final.update(evaluate_main(accelerator, eval_fn, model, total, metrics_path))
    if accelerator.is_main_process:
        save_final(model, tokenizer, out, cfg.use_peft)
        for name, extra in (extra_models or {}).items():
            tmp = out / f".tmp-{name}"
            extra.save_pretrained(tmp)
            publish_dir(tmp, out / name)
        final["train_seconds"] = round(time.time() - run.t_run, 2)
        report = contamination_report or {}
        if report.get("flagged"):
            log(f"{stage}: {report['flagged']} training record(s) overlap evaluation items: "
                + ", ".join(f"{t} {r['flagged']}" for t, r in report["tasks"].items() if r["flagged"]))
        write_json(out / "manifest.json", manifest_mod.build(
            stage, cfg, data=job.data, data_stats=job.data_stats, metrics=final, started=run.started,
            world_size=accelerator.num_processes, steps=total,
            resumed_from=str(run.resume_from) if run.resume_from else None, contamination=report))
        log(f"{stage}: wrote {out}")
    accelerator.wait_for_everyone()
    if cfg.report_to:
        accelerator.end_training()
    return Result(metrics=final, output_dir=out)


def evaluate_main(accelerator, eval_fn, model, step: int, metrics_path: Path) -> dict:
    result = {}
    if accelerator.is_main_process:
        model.eval()
        with torch.no_grad():
            result = {f"eval/{k}": v for k, v in eval_fn(model).items()}
        model.train()
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **result}) + "\n")
        log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in result.items()))
    accelerator.wait_for_everyone()
    return result


def save_final(model, tokenizer, out: Path, merge_lora: bool) -> None:
    """Save the final model and tokenizer beside the manifest: into a temporary directory first,
    then each file renamed into ``out``; ``manifest.json`` (written last) marks the run complete."""
    import tempfile

    from posttrain.data.chat import stop_token_ids

    if merge_lora:
        model = model.merge_and_unload()
    stops = stop_token_ids(tokenizer)
    if getattr(model, "generation_config", None) is not None and stops:
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tmp-final-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
