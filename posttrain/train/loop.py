"""THE training loop, shared by every algorithm. An algorithm supplies a loss; the loop owns the rest.

Batching. Rows are shuffled once per epoch with a generator seeded by ``seed + epoch``. A step
takes the next ``G = per_device_train_batch_size * gradient_accumulation_steps * num_processes``
rows; process ``r`` takes rows ``[r*P, (r+1)*P)`` of them (``P = G / num_processes``) in
``gradient_accumulation_steps`` micro-batches. The data position is therefore a function of the
step alone, which is what makes resume exact. An incomplete last global batch of an epoch is
dropped.

Normalisation. ``Objective.items_key`` names a batch count (trained tokens, samples, pairs). Before
a step the loop sums it over the step's micro-batches and processes (``N``) and passes ``N`` to
``Objective.loss``, which returns its loss *summed* over the micro-batch and divided by ``N``. The
gradient of a step is then the gradient of ``sum(losses) = (global sum) / N``, whatever the split
into processes and micro-batches (each backward is scaled by ``num_processes`` because DDP averages
gradients across processes). Logged metrics are summed the same way.

Everything else: AdamW (no weight decay on biases and norms), gradient clipping, transformers' LR
schedules with warmup, checkpoints every ``save_steps`` (atomic, see checkpoint.py), resume from
the latest complete checkpoint, ``metrics.jsonl``, a progress bar, optional tensorboard/wandb,
an evaluation hook, and the final model plus ``manifest.json`` in ``output_dir``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posttrain import manifest as manifest_mod
from posttrain.atomic import publish_dir, write_json
from posttrain.config import TrainConfig, config_hash
from posttrain.errors import UserError
from posttrain.train import checkpoint as ckpt_mod
from posttrain.train.logprobs import TokenLogProbs

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


def log(msg: str) -> None:
    """A progress line on stderr, from the main process only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


def prepare_output_dir(cfg: TrainConfig, is_main: bool) -> Path | None:
    """Decide what to do with an existing ``output_dir``: returns the checkpoint to resume from.
    Raises ``UserError`` when it holds a different run and ``overwrite_output_dir`` is not set."""
    out = Path(cfg.output_dir)
    want = config_hash(cfg)
    manifest = out / "manifest.json"
    if cfg.overwrite_output_dir:
        if is_main and out.exists():
            shutil.rmtree(out)
        return None
    if manifest.is_file():
        have = json.loads(manifest.read_text()).get("config_hash")
        if have != want:
            raise UserError(f"{out}: holds a finished run with a different config; "
                            "set overwrite_output_dir=true or choose another output_dir")
        return None
    last = ckpt_mod.latest(out)
    if last is not None and ckpt_mod.read_state(last).get("config_hash") != want:
        raise UserError(f"{last}: checkpoint of a run with a different config; "
                        "set overwrite_output_dir=true or choose another output_dir")
    return last


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


def trim_metrics(path: Path, upto: int) -> None:
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= upto]
    path.write_text("".join(line + "\n" for line in keep))


def reduce_sum(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Sum a dict of floats over processes (every process has the same keys)."""
    if accelerator.num_processes == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return dict(zip(keys, t.tolist()))


def train(cfg: TrainConfig, model, tokenizer, rows: list[dict], collate: Callable[[list[dict]], dict],
          objective: Objective, *, stage: str, data: list[dict], data_stats: dict,
          eval_fn: Callable[[torch.nn.Module], dict] | None = None,
          wrap: Callable[[torch.nn.Module], torch.nn.Module] = TokenLogProbs) -> Result:
    """Train ``model`` on ``rows`` and write the final checkpoint and manifest to ``cfg.output_dir``.
    ``wrap`` puts the module the objective calls around the model (per-token log-probs by default)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    started = time.time()
    for tracker, modules in (("tensorboard", ("tensorboard", "tensorboardX")), ("wandb", ("wandb",))):
        if tracker in cfg.report_to and not any(importlib.util.find_spec(m) for m in modules):
            raise UserError(f"report_to: {tracker} is not installed (pip install {modules[0]})")
    # Without a GPU, accelerate forms a multi-process group (gloo) only when told to use the CPU.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.report_to or None,
                              project_dir=cfg.output_dir)
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    resume_from = prepare_output_dir(cfg, is_main)
    accelerator.wait_for_everyone()
    out = Path(cfg.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)

    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    steps_per_epoch = len(rows) // global_batch
    if steps_per_epoch == 0:
        raise UserError(f"{stage}: {len(rows)} training rows is fewer than one global batch of {global_batch} "
                        "(per_device_train_batch_size x gradient_accumulation_steps x processes)")
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    warmup = math.ceil(cfg.warmup_ratio * total)

    if cfg.use_peft:
        model = apply_peft(cfg, model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    policy = wrap(model)
    optimizer = make_optimizer(cfg, policy)
    scheduler = make_scheduler(cfg, optimizer, warmup, total)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    inner = accelerator.unwrap_model(policy).model

    start = 0
    metrics_path = out / "metrics.jsonl"
    if resume_from is not None:
        start = ckpt_mod.load(resume_from, inner, optimizer, scheduler)["step"]
        if is_main:
            trim_metrics(metrics_path, start)
            log(f"{stage}: resuming from {resume_from} (step {start} of {total})")
    elif is_main:
        metrics_path.unlink(missing_ok=True)
    if report := cfg.report_to:
        accelerator.init_trackers(stage, config={k: str(v) for k, v in vars(cfg).items()})
    if is_main:
        log(f"{stage}: {len(rows)} rows, global batch {global_batch} ({world} process(es) x "
            f"{cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps} accumulation), "
            f"{total} steps, {warmup} warmup")

    orders: dict[int, torch.Tensor] = {}
    bar = tqdm(total=total, initial=start, desc=stage, disable=None if is_main else True, dynamic_ncols=True)
    quiet_every = max(1, total // 10)
    params = [p for p in policy.parameters() if p.requires_grad]
    last: dict = {}
    tokens_seen, t_run = 0, time.time()
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in orders:
            orders = {epoch: torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + epoch))}
        mine = orders[epoch][k * global_batch:(k + 1) * global_batch].tolist()
        per_proc = global_batch // world
        mine = mine[accelerator.process_index * per_proc:(accelerator.process_index + 1) * per_proc]
        bs = cfg.per_device_train_batch_size
        batches = [collate([rows[i] for i in mine[j:j + bs]]) for j in range(0, per_proc, bs)]
        n_items = reduce_sum(accelerator, {"n": sum(b[objective.items_key] for b in batches)})["n"]
        sums: dict[str, float] = {"loss": 0.0}
        for j, batch in enumerate(batches):
            tensors = {key: v.to(accelerator.device) for key, v in batch.items() if isinstance(v, torch.Tensor)}
            sync = j == len(batches) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(policy):
                loss, extra = objective.loss(policy, {**batch, **tensors}, max(n_items, 1.0))
                accelerator.backward(loss * world)
            sums["loss"] += float(loss.detach())
            for key, v in extra.items():
                sums[key] = sums.get(key, 0.0) + float(v)
            tokens_seen += batch["num_input_tokens"] * world
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums = reduce_sum(accelerator, sums)
        done = step + 1
        elapsed = time.time() - t_run
        last = {"step": done, "epoch": round(step / steps_per_epoch, 4), **{k: round(v, 6) for k, v in sums.items()},
                "learning_rate": lr, "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                "num_input_tokens_seen": tokens_seen, "elapsed_seconds": round(elapsed, 3),
                "tokens_per_second": round(tokens_seen / max(elapsed, 1e-9), 1)}
        if done % cfg.logging_steps == 0 or done == total:
            if is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
                if bar.disable and (done % quiet_every == 0 or done == total):
                    log(f"{stage}: step {done}/{total} loss {sums['loss']:.4f} lr {lr:.3g}")
            if report:
                accelerator.log(last, step=done)
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.4f}", lr=f"{lr:.2e}")
        if eval_fn is not None and cfg.eval_steps > 0 and done % cfg.eval_steps == 0 and done < total:
            evaluate_main(accelerator, eval_fn, inner, done, metrics_path)
        checkpoint_at(accelerator, cfg, done, total, inner, tokenizer, optimizer, scheduler, {"epoch": epoch})
    bar.close()
    # The optimizer state (2x the weights) is no longer needed: free it before the final evaluation
    # and save, which would otherwise add their own buffers on top of it at the run's peak.
    del optimizer, scheduler, params
    accelerator.free_memory()
    return finish(accelerator, cfg, stage, inner, tokenizer, last, eval_fn, total, t_run, started, data, data_stats,
                  resume_from)


def checkpoint_at(accelerator, cfg: TrainConfig, done: int, total: int, model, tokenizer, optimizer, scheduler,
                  state: dict, extra_models: dict | None = None) -> None:
    """Every ``save_steps`` steps (not at the end, where the final model is written): a checkpoint."""
    if cfg.save_steps <= 0 or done % cfg.save_steps or done >= total:
        return
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt_mod.save(cfg.output_dir, done, model, tokenizer, optimizer, scheduler,
                      {**state, "config_hash": config_hash(cfg)}, cfg.save_total_limit, extra_models)
    accelerator.wait_for_everyone()


def finish(accelerator, cfg: TrainConfig, stage: str, model, tokenizer, last: dict, eval_fn, total: int, t_run: float,
           started: float, data: list[dict], data_stats: dict, resume_from, extra_models: dict | None = None) -> Result:
    """The end of a run: the final evaluation, the model (and ``extra_models`` in subdirectories) and,
    written last, ``manifest.json``."""
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
        final["train_seconds"] = round(time.time() - t_run, 2)
        write_json(out / "manifest.json", manifest_mod.build(
            stage, cfg, data=data, data_stats=data_stats, metrics=final, started=started,
            world_size=accelerator.num_processes, steps=total, resumed_from=str(resume_from) if resume_from else None))
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
