"""RLVR: reinforcement learning with verifiable rewards, optimised with GRPO or PPO.

One step:

1. **Prompts.** The step takes the next ``P = per_device_train_batch_size * gradient_accumulation_steps *
   processes / num_generations`` prompts of an order shuffled once per epoch with ``seed + epoch``;
   process ``r`` takes its contiguous share (whole groups). The position is a function of the step, so
   a resumed run continues with the same prompts.
2. **Rollouts.** The engine (posttrain.inference.engine, the policy's current weights) samples
   ``num_generations`` completions per prompt at ``temperature`` / ``top_p`` / ``top_k``, up to
   ``max_completion_length`` tokens, with a seed derived from ``(seed, step, process)``. The engine's
   per-token log-probs are the "old" log-probs (the policy has not changed since sampling).
3. **Rewards.** ``score = reward_scale * Σ_v w_v · verifier_v(text, ground_truth)`` (each record names
   its verifier; ``verifier_weights`` gives ``w_v``, default 1) ``+ format_reward_weight · format``
   ``+ reward_model_weight · RM(prompt, completion)`` ``− unfinished_penalty`` when the completion hit
   ``max_completion_length`` without its end-of-turn token.
4. **Advantages.** GRPO: group-relative (posttrain.train.rl.grpo). PPO: per-token rewards with the KL
   penalty, values from the value model, GAE and whitening (posttrain.train.rl.ppo).
5. **Updates.** ``num_iterations`` optimizer steps over the rollout batch, each with
   ``gradient_accumulation_steps`` micro-batches of ``per_device_train_batch_size`` completions; the
   loss is normalised by the count of the whole global batch (tokens or sequences, see
   ``grpo.aggregate``), so accumulation and processes do not change it.

Log-probs under training use ``softmax(logits / temperature)``, the distribution that was sampled.
With ``beta > 0`` a frozen copy of the initial model gives the reference log-probs. Checkpoints hold the
policy, the value model (PPO), optimizer, scheduler and RNG; a resumed run ends with the same weights as
an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from posttrain.config import RLVRConfig
from posttrain.data import chat
from posttrain.data.mixing import mix
from posttrain.errors import UserError
from posttrain.inference.engine import SamplingParams, TransformersEngine
from posttrain.models import load_model, load_tokenizer
from posttrain.rewards import get_verifier
from posttrain.train import checkpoint as ckpt_mod
from posttrain.train.logprobs import IGNORE, TokenLogProbs
from posttrain.train.loop import (
    Result,
    checkpoint_at,
    evaluate_main,
    finish,
    finished,
    log,
    make_optimizer,
    make_scheduler,
    prepare_output_dir,
    reduce_sum,
    trim_metrics,
)
from posttrain.train.rl import grpo, ppo
from posttrain.train.rl.rows import collate as rows_collate
from posttrain.train.rl.rows import group_rows, model_inputs


def prepare_prompts(tokenizer, records: list[dict], max_prompt_length: int) -> tuple[list[dict], dict]:
    """Tokenized prompts; prompts longer than ``max_prompt_length`` are dropped and counted. Every
    verifier name is checked here, before any model is loaded."""
    prompts, too_long, verifiers = [], 0, {}
    for i, rec in enumerate(records):
        name = rec["verifier"]
        if name not in verifiers:
            try:
                get_verifier(name)
            except UserError as e:
                raise UserError(f"{rec.get('source', 'datasets')} record {i}: field 'verifier': {e}") from None
        verifiers[name] = verifiers.get(name, 0) + 1
        ids = chat.prompt_ids(tokenizer, rec["messages"])
        if len(ids) > max_prompt_length:
            too_long += 1
            continue
        prompts.append({"ids": ids, "ground_truth": rec["ground_truth"], "verifier": name,
                        "messages": rec["messages"], "id": rec.get("id", i)})
    return prompts, {"records": len(records), "prompts": len(prompts), "dropped_too_long": too_long,
                     "verifiers": verifiers}


class Scorer:
    """The sequence score of step 3 of the module docstring, and its parts for logging."""

    def __init__(self, cfg: RLVRConfig, verifiers: list[str], workers: int = 4):
        self.cfg, self.verifiers = cfg, sorted(verifiers)
        self.format = get_verifier(cfg.format_reward) if cfg.format_reward else None
        self.reward_model = None
        if cfg.reward_model:
            from posttrain.train.reward import RewardModel

            self.reward_model = RewardModel.from_pretrained(cfg.reward_model)
        self.pool = ThreadPoolExecutor(max_workers=workers)  # the code verifier waits on sandboxes

    def __call__(self, prompts: list[dict], completions: list) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        owners = [prompts[c.prompt_index] for c in completions]
        verified = list(self.pool.map(lambda pc: float(get_verifier(pc[0]["verifier"])(pc[1].text, pc[0]["ground_truth"])),
                                      zip(owners, completions)))
        scores = torch.tensor([cfg.reward_scale * cfg.verifier_weights.get(p["verifier"], 1.0) * v
                               for p, v in zip(owners, verified)], dtype=torch.float32)
        unfinished = torch.tensor([c.finish_reason == "length" for c in completions], dtype=torch.float32)
        scores -= cfg.unfinished_penalty * unfinished
        metrics = {"verified": sum(verified), "unfinished": float(unfinished.sum()),
                   "completion_tokens": float(sum(len(c.token_ids) for c in completions))}
        for name in self.verifiers:  # every process reports every name, so the sums can be all-reduced
            mine = [v for p, v in zip(owners, verified) if p["verifier"] == name]
            metrics[f"verifier/{name}"], metrics[f"count/{name}"] = float(sum(mine)), float(len(mine))
        if self.format is not None:
            fmt = torch.tensor([self.format(c.text, None) for c in completions], dtype=torch.float32)
            scores += cfg.format_reward_weight * fmt
            metrics["format"] = float(fmt.sum())
        if self.reward_model is not None:
            rm = torch.tensor(self.reward_model.score([p["messages"] + [{"role": "assistant", "content": c.text}]
                                                       for p, c in zip(owners, completions)]))
            scores += cfg.reward_model_weight * rm
            metrics["reward_model"] = float(rm.sum())
        metrics["reward"] = float(scores.sum())
        return scores, metrics


class ValueModel(nn.Module):
    """Per-token values: a sequence classifier's ``score`` head applied to every hidden state, read at
    the state before each completion token (aligned with ``TokenLogProbs``'s output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, labels, attention_mask=None, pred_index=None):
        target = labels[:, 1:]
        sel = target != IGNORE
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                       **extra).last_hidden_state
        if pred_index is None:
            picked = hidden[:, :-1][sel]
        else:
            rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(pred_index)
            picked = hidden[rows[sel], pred_index[sel]]
        out = torch.zeros(target.shape, dtype=torch.float32, device=input_ids.device)
        out[sel] = self.model.score(picked).squeeze(-1).float()
        return out


class PolicyAndValue(nn.Module):
    """One module (one optimizer, one DDP wrapper) for PPO's policy and value model."""

    def __init__(self, policy: TokenLogProbs, value: ValueModel):
        super().__init__()
        self.policy, self.value = policy, value
        self.model = policy.model

    def forward(self, *inputs):
        return self.policy(*inputs), self.value(*inputs)


def load_value_model(cfg: RLVRConfig, tokenizer) -> ValueModel:
    from posttrain.train.reward import load_reward_model

    torch.manual_seed(cfg.seed)  # a new score head's initialisation
    model = load_reward_model(cfg.value_model or cfg.model, tokenizer, cfg.dtype)
    if not cfg.value_model:
        torch.nn.init.zeros_(model.score.weight)  # start from V = 0 rather than noise
    return ValueModel(model)


def completion_records(prompts: list[dict], completions: list) -> list[dict]:
    """One record per completion: its prompt index, tokens and sampling log-probs (the old policy's)."""
    return [{"prompt": c.prompt_index, "token_ids": c.token_ids, "old_logp": c.logprobs} for c in completions]


def micro_batches(prompts: list[dict], records: list[dict], size: int, share: str, pad: int,
                  keys: tuple[str, ...]) -> list[dict]:
    """Collated micro-batches of ``size`` completions each; within one, the completions of a prompt
    share a row (posttrain.train.rl.rows) as ``share`` decides. Carries the per-token ``keys``."""
    out = []
    for j in range(0, len(records), size):
        chunk, rows = records[j:j + size], []
        for i in dict.fromkeys(r["prompt"] for r in chunk):
            mine = [{"token_ids": r["token_ids"], **{k: r[k] for k in keys}} for r in chunk if r["prompt"] == i]
            rows += group_rows(prompts[i]["ids"], mine, share)
        out.append(rows_collate(rows, pad))
    return out


def split_tokens(values: torch.Tensor, batch: dict, records: list[dict]):
    """Hand ``[B, T-1]`` per-target values of a micro-batch back to its completion records (in order)."""
    flat = values[(batch["labels"][:, 1:] != IGNORE).to(values.device)].tolist()
    start = 0
    for r in records:
        end = start + len(r["token_ids"])
        yield r, flat[start:end]
        start = end


def select_prompts(cfg: RLVRConfig, n_prompts: int, step: int, per_step: int, rank: int, world: int) -> list[int]:
    steps_per_epoch = n_prompts // per_step
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(cfg.seed + epoch))
    mine = order[k * per_step:(k + 1) * per_step].tolist()
    share = per_step // world
    return mine[rank * share:(rank + 1) * share]


def accuracy_fn(prompts: list[dict], tokenizer, cfg: RLVRConfig):
    """Greedy held-out evaluation: the mean verifier score (unweighted), overall and per verifier."""

    def evaluate(model) -> dict:
        engine = TransformersEngine(model, tokenizer, batch_size=cfg.generation_batch_size)
        outs = engine.generate([p["ids"] for p in prompts], SamplingParams(max_new_tokens=cfg.max_completion_length))
        scores = [float(get_verifier(p["verifier"])(o.text, p["ground_truth"])) for p, o in zip(prompts, outs)]
        result = {"accuracy": sum(scores) / max(len(scores), 1), "prompts": len(scores)}
        names = sorted({p["verifier"] for p in prompts})
        if len(names) > 1:
            for name in names:
                mine = [s for p, s in zip(prompts, scores) if p["verifier"] == name]
                result[f"accuracy/{name}"] = sum(mine) / len(mine)
        return result

    return evaluate


def run_rlvr(cfg: RLVRConfig) -> Result:
    if (done := finished(cfg, "rlvr")) is not None:
        return done
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    started = time.time()
    tokenizer = load_tokenizer(cfg.model)
    template_label = chat.use_template(tokenizer, cfg.chat_template)
    records, lineage = mix(cfg.datasets, "verifiable", cfg.seed)
    prompts, stats = prepare_prompts(tokenizer, records, cfg.max_prompt_length)
    stats["chat_template"] = template_label
    eval_fn = None
    if cfg.eval_datasets:
        held, _ = prepare_prompts(tokenizer, mix(cfg.eval_datasets, "verifiable", cfg.seed)[0], cfg.max_prompt_length)
        eval_fn = accuracy_fn(held, tokenizer, cfg)

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.report_to or None,
                              project_dir=cfg.output_dir)
    is_main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    resume_from = prepare_output_dir(cfg, is_main)
    accelerator.wait_for_everyone()
    out = Path(cfg.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)

    G = cfg.num_generations
    per_proc = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    prompts_per_step = per_proc * world // G
    steps_per_epoch = len(prompts) // prompts_per_step
    if steps_per_epoch == 0:
        raise UserError(f"rlvr: {len(prompts)} prompts is fewer than one step's {prompts_per_step} "
                        f"(batch of {per_proc * world} completions / num_generations {G})")
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    updates = total * cfg.num_iterations
    warmup = math.ceil(cfg.warmup_ratio * updates)

    model = load_model(cfg.model, cfg.dtype)
    if cfg.use_peft:
        from posttrain.train.loop import apply_peft

        model = apply_peft(cfg, model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = None
    needs_ref = cfg.beta > 0
    if needs_ref:
        reference = TokenLogProbs(load_model(cfg.model, cfg.dtype).eval().requires_grad_(False), cfg.temperature)
    policy = TokenLogProbs(model, cfg.temperature)
    value = load_value_model(cfg, tokenizer) if cfg.algorithm == "ppo" else None
    module = PolicyAndValue(policy, value) if value is not None else policy
    module.train()
    optimizer = make_optimizer(cfg, module)
    scheduler = make_scheduler(cfg, optimizer, warmup, updates)
    module, optimizer = accelerator.prepare(module, optimizer)
    inner = accelerator.unwrap_model(module).model
    extra_models = {"value": value.model} if value is not None else {}

    start = 0
    metrics_path = out / "metrics.jsonl"
    if resume_from is not None:
        start = ckpt_mod.load(resume_from, inner, optimizer, scheduler, extra_models)["step"]
        if is_main:
            trim_metrics(metrics_path, start)
            log(f"rlvr: resuming from {resume_from} (step {start} of {total})")
    elif is_main:
        metrics_path.unlink(missing_ok=True)
    if cfg.report_to:
        accelerator.init_trackers("rlvr", config={k: str(v) for k, v in vars(cfg).items()})
    log(f"rlvr ({cfg.algorithm}): {len(prompts)} prompts, {prompts_per_step} per step x {G} generations, "
        f"{total} steps x {cfg.num_iterations} update(s), {world} process(es)")

    scorer = Scorer(cfg, list(stats["verifiers"]))
    engine = TransformersEngine(inner, tokenizer, batch_size=cfg.generation_batch_size)
    pad = engine.pad_id
    items_key = "num_tokens" if cfg.algorithm == "ppo" or cfg.loss_type == "token_mean" else "num_sequences"
    params = [p for p in module.parameters() if p.requires_grad]
    bar = tqdm(total=total, initial=start, desc=f"rlvr-{cfg.algorithm}", disable=None if is_main else True,
               dynamic_ncols=True)
    last: dict = {}
    t_run = time.time()
    for step in range(start, total):
        t0 = time.time()
        mine = [prompts[i] for i in select_prompts(cfg, len(prompts), step, prompts_per_step, rank, world)]
        sampling = SamplingParams(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                  top_p=cfg.top_p, top_k=cfg.top_k, n=G, seed=(cfg.seed * 1_000_003 + step) * 257 + rank)
        completions = engine.generate([p["ids"] for p in mine], sampling)
        t_gen = time.time() - t0
        scores, rollout_metrics = scorer(mine, completions)
        records = completion_records(mine, completions)
        rollout_metrics.update(_prepare_advantages(cfg, accelerator, module, reference, mine, records, scores, pad))
        keys = ("old_logp", "advantages") + (("ref_logp",) if needs_ref and cfg.algorithm == "grpo" else ()) + (
            ("old_values", "returns") if cfg.algorithm == "ppo" else ()) + (("keep",) if "keep" in records[0] else ())
        batches = micro_batches(mine, records, cfg.per_device_train_batch_size, cfg.share_prompt, pad, keys)
        n_items = reduce_sum(accelerator, {"n": sum(b[items_key] for b in batches)})["n"]
        t_score = time.time() - t0 - t_gen
        sums: dict[str, float] = {}
        for _ in range(cfg.num_iterations):
            update = _update(cfg, accelerator, module, optimizer, batches, n_items, params)
            scheduler.step()
            for k, v in update.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.num_iterations
        totals = reduce_sum(accelerator, {**rollout_metrics, **sums, "completions": float(len(completions))})
        n = max(totals.pop("completions"), 1.0)
        tokens = max(totals.pop("tokens", 0.0), 1.0)
        done = step + 1
        last = {"step": done, "epoch": round(step / steps_per_epoch, 4),
                "loss": round(totals.pop("loss"), 6),
                **{k: round(v / n, 6) for k, v in totals.items()
                   if k in ("reward", "verified", "unfinished", "completion_tokens", "format", "reward_model",
                            "zero_variance")},
                **{k: round(v / max(totals[f"count/{k[9:]}"], 1.0), 6) for k, v in totals.items() if k.startswith("verifier/")},
                **{k: round(totals[k] / tokens, 6) for k in ("kl", "clip_fraction", "value_loss") if k in totals},
                "learning_rate": scheduler.get_last_lr()[0], "generate_seconds": round(t_gen, 3),
                "score_seconds": round(t_score, 3), "step_seconds": round(time.time() - t0, 3),
                "elapsed_seconds": round(time.time() - t_run, 3)}
        if is_main and (done % cfg.logging_steps == 0 or done == total):
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            if bar.disable:
                log(f"rlvr: step {done}/{total} reward {last['reward']:.4f} verified {last['verified']:.3f}")
        if cfg.report_to:
            accelerator.log(last, step=done)
        bar.update(1)
        bar.set_postfix(reward=f"{last['reward']:.3f}", verified=f"{last['verified']:.3f}")
        if eval_fn is not None and cfg.eval_steps > 0 and done % cfg.eval_steps == 0 and done < total:
            evaluate_main(accelerator, eval_fn, inner, done, metrics_path)
        checkpoint_at(accelerator, cfg, done, total, inner, tokenizer, optimizer, scheduler,
                      {"epoch": step // steps_per_epoch}, extra_models)
    bar.close()
    del optimizer, scheduler, params
    accelerator.free_memory()
    return finish(accelerator, cfg, "rlvr", inner, tokenizer, last, eval_fn, total, t_run, started, lineage, stats,
                  resume_from, extra_models)


@torch.no_grad()
def _prepare_advantages(cfg: RLVRConfig, accelerator, module, reference, prompts: list[dict], records: list[dict],
                        scores: torch.Tensor, pad: int) -> dict:
    """Attach ``ref_logp`` (beta > 0), ``advantages`` (per token) and, for PPO, ``old_values`` and
    ``returns`` to the completion records (in place)."""
    device = accelerator.device
    size = cfg.per_device_train_batch_size
    metrics: dict[str, float] = {}
    forwards = []
    if reference is not None:
        forwards.append(("ref_logp", reference))
    if cfg.algorithm == "ppo":
        forwards.append(("old_values", accelerator.unwrap_model(module).value))
    for key, net in forwards:
        was_training = net.training
        net.eval()
        for j, batch in enumerate(micro_batches(prompts, records, size, cfg.share_prompt, pad, ())):
            out = net(*model_inputs(batch, device))
            for r, values in split_tokens(out, batch, records[j * size:(j + 1) * size]):
                r[key] = values
        net.train(was_training)
    if cfg.algorithm == "grpo":
        adv, varied = grpo.group_advantages(scores, cfg.num_generations, cfg.scale_rewards)
        for r, a, keep in zip(records, adv.tolist(), varied.tolist()):
            r["advantages"] = [a] * len(r["token_ids"])
            if cfg.drop_zero_variance:  # out of the loss and of its denominator
                r["keep"] = [float(keep)] * len(r["token_ids"])
        metrics["zero_variance"] = float((~varied).sum())
        return metrics
    # PPO: per-token rewards with the KL penalty, GAE per completion, whitening over the global batch
    n, width = len(records), max(len(r["token_ids"]) for r in records)
    mask = torch.zeros((n, width), dtype=torch.bool)
    logp, values = torch.zeros((n, width)), torch.zeros((n, width))
    ref = torch.zeros((n, width)) if reference is not None else None
    for i, r in enumerate(records):
        k = len(r["token_ids"])
        mask[i, :k] = True
        logp[i, :k], values[i, :k] = torch.tensor(r["old_logp"]), torch.tensor(r["old_values"])
        if ref is not None:
            ref[i, :k] = torch.tensor(r["ref_logp"])
    rewards = ppo.token_rewards(scores, logp, ref, mask, cfg.beta)
    adv, returns = ppo.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if ref is not None:
        metrics["kl"] = float(((logp - ref) * mask).sum())
    if cfg.whiten_advantages:
        adv = ppo.whiten(adv, mask, reduce_sum(accelerator, ppo.whiten_stats(adv, mask)))
    for i, r in enumerate(records):
        k = len(r["token_ids"])
        r["advantages"], r["returns"] = adv[i, :k].tolist(), returns[i, :k].tolist()
    return metrics


def _update(cfg: RLVRConfig, accelerator, module, optimizer, batches: list[dict], n_items: float, params) -> dict:
    """One optimizer step over the rollout batch (all micro-batches); returns summed metrics."""
    import contextlib

    world = accelerator.num_processes
    sums = {"loss": 0.0, "clip_fraction": 0.0, "tokens": 0.0}
    device = accelerator.device
    for j, batch in enumerate(batches):
        t = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        mask = t["labels"][:, 1:] != IGNORE
        if "keep" in t:
            mask = mask & (t["keep"] > 0)
        inputs = model_inputs(batch, device)
        sync = j == len(batches) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(module):
            if cfg.algorithm == "grpo":
                logp = module(*inputs)
                per_token = grpo.token_losses(logp, t["old_logp"], t["advantages"], cfg.epsilon, cfg.epsilon_high,
                                              cfg.beta, t.get("ref_logp"))
                numerator, _ = grpo.aggregate(per_token, mask, cfg.loss_type, cfg.max_completion_length, t["seq_index"])
            else:
                logp, values = module(*inputs)
                pg = grpo.token_losses(logp, t["old_logp"], t["advantages"], cfg.epsilon, cfg.epsilon_high)
                vf = ppo.value_losses(values, t["old_values"], t["returns"], cfg.cliprange_value)
                numerator = ((pg + cfg.vf_coef * vf) * mask).sum()
                sums["value_loss"] = sums.get("value_loss", 0.0) + float((vf.detach() * mask).sum())
            loss = numerator / max(n_items, 1.0)
            accelerator.backward(loss * world)
        with torch.no_grad():
            ratio = torch.exp(logp - t["old_logp"])
            high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
            clipped = ((ratio < 1 - cfg.epsilon) | (ratio > 1 + high)) & mask
            sums["clip_fraction"] += float(clipped.sum())
            if "ref_logp" in t and cfg.algorithm == "grpo":
                sums["kl"] = sums.get("kl", 0.0) + float((grpo.k3_kl(logp, t["ref_logp"]) * mask).sum())
            sums["tokens"] += float(mask.sum())
        sums["loss"] += float(loss.detach())
    if cfg.max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums

