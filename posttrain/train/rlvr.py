"""RLVR: reinforcement learning with verifiable rewards, optimised with GRPO or PPO.

One step:

1. **Prompts.** The step takes the next ``P = per_device_train_batch_size * gradient_accumulation_steps *
   processes / num_generations`` prompts of an order shuffled once per epoch with ``seed + epoch``;
   process ``r`` takes its contiguous share (whole groups). The position is a function of the step, so
   a resumed run continues with the same prompts.
2. **Rollouts.** The engine (posttrain.inference.engine, the policy's current weights) samples
   ``num_generations`` completions per prompt at ``temperature`` / ``top_p`` / ``top_k``, up to
   ``max_completion_length`` tokens, with a seed derived from ``(seed, step)`` (each completion draws from
   its own stream, keyed by its prompt: N processes sample what one would). With the transformers
   engine (the policy itself) its per-token log-probs are the "old" log-probs. ``engine: vllm`` samples
   in a vLLM engine in this process, or on ``vllm_servers`` (posttrain.inference.vllm_servers), after
   the current weights are pushed to it; the trainer then recomputes the old log-probs (exact), logs
   their mismatch with vLLM's, and with ``vllm_importance_sampling_cap`` weights each token's policy
   loss by the truncated ratio of the two (posttrain.train.rl.grpo).
3. **Rewards.** ``score = reward_scale * w_v · verifier_v(text, ground_truth)`` (each record names
   its verifier; ``verifier_weights`` gives ``w_v``, default 1) ``+ format_reward_weight · format``
   ``+ reward_model_weight · RM(prompt, completion)`` ``− unfinished_penalty`` when the completion hit
   ``max_completion_length`` without its end-of-turn token (posttrain.rewards.combine).
4. **Advantages.** GRPO: group-relative, RLOO or REINFORCE++ (posttrain.train.rl.advantages). PPO:
   per-token rewards with the KL penalty, values from the value model, GAE and whitening
   (posttrain.train.rl.ppo). Both, with the recomputed old and reference log-probs, in
   posttrain.train.rl.prepare.
5. **Updates.** ``num_iterations`` optimizer steps over the rollout batch, each with
   ``gradient_accumulation_steps`` micro-batches of ``per_device_train_batch_size`` completions; the
   loss (``grpo.batch_loss``, ``ppo.batch_loss``) is normalised by the count of the whole global batch
   (tokens or sequences, ``grpo.COUNTS``), so accumulation and processes do not change it.

Steps 1-4 are this module's ``Rollouts``, a step source of the one training loop (posttrain.train.loop),
which makes the updates, logs, checkpoints and resumes as it does for every stage.

Log-probs under training use ``softmax(logits / temperature)``, the distribution that was sampled.
With ``beta > 0`` a frozen copy of the initial model gives the reference log-probs. Checkpoints hold the
policy, the value model (PPO), optimizer, scheduler and RNG; a resumed run ends with the same weights as
an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time

import torch

from posttrain.config import RLVRConfig
from posttrain.data import chat
from posttrain.data.mixing import mix
from posttrain.envs import make_env
from posttrain.envs.rollout import run_episodes
from posttrain.errors import UserError
from posttrain.inference.engine import SamplingParams
from posttrain.inference.open import rollout_engine
from posttrain.logprobs import TokenLogProbs
from posttrain.models import load_model, load_tokenizer
from posttrain.rewards import get_verifier
from posttrain.rewards.combine import Scorer, verify
from posttrain.train import contamination, parallel
from posttrain.train.loop import Job, Objective, Result, Run, StepData, finished, train
from posttrain.train.reward import PolicyAndValue, load_value_model
from posttrain.train.rl import advantages, grpo, ppo, prepare
from posttrain.train.rl.rows import micro_batches, model_inputs
from posttrain.util import log


def prepare_prompts(tokenizer, records: list[dict], max_prompt_length: int, env=None) -> tuple[list[dict], dict]:
    """Tokenized prompts; prompts longer than ``max_prompt_length`` are dropped and counted. Every
    verifier name is checked here, before any model is loaded. With an environment, a prompt is what
    the episode starts from (its system turn and tools)."""
    prompts, too_long, verifiers = [], 0, {}
    for i, rec in enumerate(records):
        name = rec["verifier"]
        if name not in verifiers:
            try:
                get_verifier(name)
            except UserError as e:
                raise UserError(f"{rec.get('source', 'datasets')} record {i}: field 'verifier': {e}") from None
        verifiers[name] = verifiers.get(name, 0) + 1
        if env is None:
            ids = chat.prompt_ids(tokenizer, rec["messages"], rec.get("tools"))
        else:
            start = env.reset(rec)
            env.close(start.state)
            ids = chat.prompt_ids(tokenizer, start.messages, start.tools)
        if len(ids) > max_prompt_length:
            too_long += 1
            continue
        prompts.append({"ids": ids, "ground_truth": rec["ground_truth"], "verifier": name,
                        "messages": rec["messages"], "id": rec.get("id", i), "record": rec})
    return prompts, {"records": len(records), "prompts": len(prompts), "dropped_too_long": too_long,
                     "verifiers": verifiers}


def make_scorer(cfg: RLVRConfig, verifiers: list[str]) -> Scorer:
    reward_model = None
    if cfg.reward_model:
        from posttrain.train.reward import RewardModel

        reward_model = RewardModel.from_pretrained(cfg.reward_model).score
    return Scorer(verifiers, verifier_weights=cfg.verifier_weights, reward_scale=cfg.reward_scale,
                  unfinished_penalty=cfg.unfinished_penalty, format_reward=cfg.format_reward,
                  format_reward_weight=cfg.format_reward_weight, reward_model=reward_model,
                  reward_model_weight=cfg.reward_model_weight, overlong_buffer=cfg.overlong_buffer,
                  overlong_penalty=cfg.overlong_penalty, max_completion_length=cfg.max_completion_length)


def rl_objective(cfg: RLVRConfig) -> Objective:
    """The loss the loop minimises: GRPO's (``grpo.batch_loss``) or PPO's policy + value loss."""
    if cfg.algorithm == "grpo":
        def loss(module, batch, num_items):
            logp = module(*model_inputs(batch, batch["input_ids"].device))
            return grpo.batch_loss(logp, batch, num_items, loss_type=cfg.loss_type,
                                   max_completion_length=cfg.max_completion_length, epsilon=cfg.epsilon,
                                   epsilon_high=cfg.clip_high, beta=cfg.beta)

        return Objective(loss=loss, items_key=grpo.COUNTS[cfg.loss_type])

    def ppo_loss(module, batch, num_items):
        logp, values = module(*model_inputs(batch, batch["input_ids"].device))
        return ppo.batch_loss(logp, values, batch, num_items, epsilon=cfg.epsilon, epsilon_high=cfg.clip_high,
                              vf_coef=cfg.vf_coef, cliprange_value=cfg.cliprange_value)

    return Objective(loss=ppo_loss, items_key=ppo.COUNT)


def completion_records(prompts: list[dict], completions: list) -> list[dict]:
    """One record per completion: its prompt index, tokens, sampling log-probs (the old policy's),
    whether a limit cut it and, for an episode, the mask of the model's own tokens."""
    out = [{"prompt": c.prompt_index, "token_ids": c.token_ids, "old_logp": c.logprobs,
            "truncated": c.finish_reason in ("length", "turns")} for c in completions]
    for r, c in zip(out, completions):
        if hasattr(c, "model_mask"):
            r["model_mask"] = c.model_mask
    return out


def generate(engine, env, cfg: RLVRConfig, prompts: list[dict], sampling: SamplingParams, tokenizer) -> list:
    """Completions of the prompts, or with an environment, episodes (posttrain.envs.rollout) rendered
    with the run's tokenizer."""
    if env is None:
        return engine.generate([p["ids"] for p in prompts], sampling)
    return run_episodes(engine, env, [p["record"] for p in prompts], sampling, cfg.max_turns, cfg.max_episode_tokens,
                        tokenizer=tokenizer)


def accuracy_fn(prompts: list[dict], tokenizer, cfg: RLVRConfig, env=None):
    """Greedy held-out evaluation: the mean verifier score (unweighted), overall and per verifier (of
    the final answers of episodes, with an environment)."""

    def evaluate(model) -> dict:
        engine = rollout_engine("transformers", tokenizer, policy=model, batch_size=cfg.generation_batch_size)
        outs = generate(engine, env, cfg, prompts, SamplingParams(max_new_tokens=cfg.max_completion_length), tokenizer)
        scores = [verify(p, o) for p, o in zip(prompts, outs)]
        result = {"accuracy": sum(scores) / max(len(scores), 1), "prompts": len(scores)}
        names = sorted({p["verifier"] for p in prompts})
        if len(names) > 1:
            for name in names:
                mine = [s for p, s in zip(prompts, scores) if p["verifier"] == name]
                result[f"accuracy/{name}"] = sum(mine) / len(mine)
        return result

    return evaluate


class Rollouts:
    """RLVR's step source for the training loop: steps 1-4 of the module docstring."""

    progress_keys = ("reward", "verified")

    def __init__(self, cfg: RLVRConfig, prompts: list[dict], scorer: Scorer, reference: TokenLogProbs | None, env=None):
        self.cfg, self.prompts, self.scorer, self.reference, self.env = cfg, prompts, scorer, reference, env
        self.updates_per_step = cfg.num_iterations
        self.engine = None  # made at the first step by posttrain.inference.open.rollout_engine
        self.gathered: torch.nn.Module | None = None  # under FSDP: the transformers engine's whole copy of the policy
        self.ahead = None  # async_steps: posttrain.train.rl.async_rollouts.AheadRollouts
        self.resumed: dict = {}  # async_steps: the rollouts a checkpoint held
        self.threads = 0  # async_steps with a local worker: this process's torch threads before it started

    def total_steps(self, cfg: RLVRConfig, world: int) -> tuple[int, int]:
        G = cfg.num_generations
        self.prompts_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world // G
        self.steps_per_epoch = len(self.prompts) // self.prompts_per_step
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(self.prompts)} prompts is fewer than one step's {self.prompts_per_step} (batch of "
                            f"{self.prompts_per_step * G} completions / num_generations {G})")
        log(f"rlvr ({cfg.algorithm}): {len(self.prompts)} prompts, {self.prompts_per_step} per step x {G} generations")
        total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * self.steps_per_epoch)
        self.total = total
        return total, self.steps_per_epoch

    def select(self, step: int, rank: int, world: int, attempt: int = 0) -> list[dict]:
        """This process's prompts for ``step``: a contiguous share of the step's slice of an order
        shuffled once per epoch (seed ``seed + epoch``). Dynamic sampling's further attempts draw from
        an order of their own (seeded by step and attempt)."""
        if attempt:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + 7919 * step + attempt)
            chosen = torch.randperm(len(self.prompts), generator=g)[:self.prompts_per_step].tolist()
        else:
            epoch, k = divmod(step, self.steps_per_epoch)
            order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            chosen = order[k * self.prompts_per_step:(k + 1) * self.prompts_per_step].tolist()
        share = self.prompts_per_step // world
        return [self.prompts[i] for i in chosen[rank * share:(rank + 1) * share]]

    def sampling(self, step: int, attempt: int = 0) -> SamplingParams:
        cfg = self.cfg
        return SamplingParams(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, n=cfg.num_generations,  # per-prompt streams: any process split samples alike
                              seed=cfg.seed * 1_000_003 + step + attempt * 7_919_993)

    def __call__(self, step: int, run: Run) -> StepData:
        cfg = self.cfg
        t0 = time.time()
        if cfg.parallel == "fsdp" and self.reference is not None and not parallel.is_sharded(self.reference):
            parallel.shard(self.reference, run.accelerator.device, cfg.fsdp_reshard_after_forward, cfg.fsdp_cpu_offload)
        mine = self.select(step, run.rank, run.world)
        if cfg.async_steps:
            completions, info = self.ahead_completions(step, run)
        else:
            t_push = self.sync_engine(step, run)
            completions = generate(self.engine, self.env, cfg, mine, self.sampling(step), run.tokenizer)
            info = {"generate_seconds": round(time.time() - t0 - t_push, 3)}
            if cfg.engine == "vllm":
                info["weight_push_seconds"] = round(t_push, 3)
        t_score = time.time()
        scores, sums = self.scorer(mine, completions)
        if cfg.dynamic_sampling:
            mine, completions, scores, sums = self.fill(step, run, mine, completions, scores, sums)
        records = completion_records(mine, completions)
        tok = run.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else chat.stop_token_ids(tok)[0]
        sums.update(prepare.prepare_advantages(cfg, run, self.reference, mine, records, scores, pad))
        keys = ("old_logp", "advantages") + (("ref_logp",) if self.reference is not None and cfg.algorithm == "grpo"
                                             else ()) + (
            ("old_values", "returns") if cfg.algorithm == "ppo" else ()) + tuple(k for k in ("keep", "is_weight")
                                                                                  if k in records[0])
        batches = micro_batches(mine, records, cfg.per_device_train_batch_size, cfg.share_prompt, pad, keys)
        sums["completions"] = float(len(completions))
        info["score_seconds"] = round(time.time() - t_score, 3)
        if "engine_logp" in records[0]:
            info["engine_logprob_max_ratio"] = round(max(math.exp(abs(a - b)) for r in records
                                                         for a, b in zip(r["engine_logp"], r["old_logp"])), 6)
        return StepData(batches, sums, info)

    def sync_engine(self, step: int, run: Run) -> float:
        """Make the engine generate with the current weights; returns the seconds a weight push took."""
        cfg = self.cfg
        t0 = time.time()
        policy = run.model
        if run.layout.sharded:  # the engine generates with whole weights, gathered from every process's shards
            if cfg.engine == "transformers":
                policy = self.gathered = run.layout.whole(run.model, self.gathered)
            else:
                policy = run.layout.whole_state(run.model)
        if self.engine is None:  # transformers: the policy itself, updated in place
            self.engine = rollout_engine(cfg.engine, run.tokenizer, policy=policy, model=cfg.model,
                                         servers=cfg.vllm_servers, dtype=cfg.dtype, seed=cfg.seed,
                                         batch_size=cfg.generation_batch_size,
                                         gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
        if cfg.engine == "vllm":
            if not cfg.vllm_servers:  # the current policy, no checkpoint on disk
                self.engine.load_weights(policy)
            elif run.rank == 0:  # one push per step for all processes
                self.engine.load_weights(policy, version=step)
            run.accelerator.wait_for_everyone()
        return time.time() - t0

    def fill(self, step: int, run: Run, mine: list[dict], completions: list, scores: torch.Tensor,
             sums: dict) -> tuple[list[dict], list, torch.Tensor, dict]:
        """Dynamic sampling (DAPO): keep the groups whose rewards differ; sample further batches of
        prompts (``select(step, attempt)``) until this process has as many such groups as prompts, at
        most ``dynamic_sampling_max_tries`` batches in all; zero-variance groups fill what is left. The
        kept batch is scored again for its metrics."""
        from dataclasses import replace

        cfg, G = self.cfg, self.cfg.num_generations
        varied, spare = [], []
        sampled, attempt = len(mine), 1

        def sort(prompts, comps, sc):
            flags = advantages.varied_groups(sc, G).view(-1, G)[:, 0].tolist()
            for i, (p, flag) in enumerate(zip(prompts, flags)):
                (varied if flag else spare).append((p, comps[i * G:(i + 1) * G]))

        sort(mine, completions, scores)
        while len(varied) < len(mine) and attempt < cfg.dynamic_sampling_max_tries:
            extra = self.select(step, run.rank, run.world, attempt)
            comps = generate(self.engine, self.env, cfg, extra, self.sampling(step, attempt), run.tokenizer)
            sort(extra, comps, self.scorer(extra, comps)[0])
            sampled, attempt = sampled + len(extra), attempt + 1
        chosen = (varied + spare)[:len(mine)]
        prompts = [p for p, _ in chosen]
        comps = [replace(c, prompt_index=i) for i, (_, group) in enumerate(chosen) for c in group]
        scores, sums = self.scorer(prompts, comps)
        sums.update({"sampled_prompts": float(sampled), "zero_variance_fill": float(max(len(mine) - len(varied), 0))})
        return prompts, comps, scores, sums

    def ahead_completions(self, step: int, run: Run) -> tuple[list, dict]:
        """``async_steps``: submit the jobs up to ``step + k`` with the current weights, wait for ``step``'s."""
        from posttrain.train.rl.async_rollouts import AheadRollouts, Episodes, ProcessWorker, ServerWorker

        cfg = self.cfg
        if self.ahead is None:
            episodes = Episodes(cfg.env, cfg.env_args, cfg.max_turns, cfg.max_episode_tokens) if cfg.env else None
            if cfg.engine == "vllm":
                worker = ServerWorker(rollout_engine("vllm", run.tokenizer, servers=cfg.vllm_servers), run.tokenizer,
                                      episodes)
            else:
                threads = max(1, (os.cpu_count() or 2) // 2)  # the CPU's threads shared between the two processes
                worker = ProcessWorker(cfg.model, cfg.dtype, run.tokenizer, cfg.generation_batch_size, threads,
                                       episodes)
                self.threads = torch.get_num_threads()
                torch.set_num_threads(max(1, min(self.threads, (os.cpu_count() or 2) - threads)))
            self.ahead = AheadRollouts(worker, cfg.async_steps)
            self.ahead.load_state(self.resumed)
        todo = [s for s in range(step, min(step + cfg.async_steps, self.total - 1) + 1) if s not in self.ahead.submitted]
        if todo:
            weights = (dict(run.layout.whole_state(run.model)) if run.layout.sharded
                       else {n: t.detach().clone() for n, t in run.model.state_dict().items()})
            for s in todo:
                self.ahead.submit(s, step, weights, [p["record"] if cfg.env else p["ids"]
                                                     for p in self.select(s, run.rank, run.world)], self.sampling(s))
        return self.ahead.result(step)

    def state(self, step: int) -> dict | None:
        """With ``async_steps``: the rollouts of steps ``step..step+k-1``, finished, for the checkpoint."""
        if not self.cfg.async_steps or self.ahead is None:
            return None
        return self.ahead.state(range(step, step + self.cfg.async_steps))

    def load_state(self, state: dict) -> None:
        self.resumed = state

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close()
            self.ahead = None
        if self.threads:
            torch.set_num_threads(self.threads)

    @staticmethod
    def summarize(totals: dict[str, float]) -> dict:
        """Per completion: reward, verified, ...; per verifier: its mean score; per trained token: kl,
        clip_fraction, value_loss."""
        n = max(totals["completions"], 1.0)
        tokens = max(totals.get("tokens", 0.0), 1.0)
        out = {"loss": totals["loss"]}
        out.update({k: v / n for k, v in totals.items()
                    if k in ("reward", "verified", "unfinished", "completion_tokens", "format", "reward_model",
                             "zero_variance", "overlong", "shaping", "turns", "tool_calls", "tool_errors", "malformed",
                             "model_tokens")})
        out.update({k: totals[k] for k in ("sampled_prompts", "zero_variance_fill") if k in totals})  # per step
        out.update({k: v / max(totals[f"count/{k[9:]}"], 1.0) for k, v in totals.items() if k.startswith("verifier/")})
        out.update({k: totals[k] / tokens for k in ("kl", "clip_fraction", "value_loss") if k in totals})
        for key in ("engine_logprob_abs_diff", "importance_sampling_capped"):  # per sampled token
            if key in totals:
                out[key] = totals[key] / max(totals.get("model_tokens", totals["completion_tokens"]), 1.0)
        return out


def run_rlvr(cfg: RLVRConfig) -> Result:
    if (done := finished(cfg, "rlvr")) is not None:
        return done
    tokenizer = load_tokenizer(cfg.model)
    template_label = chat.use_template(tokenizer, cfg.chat_template)
    records, lineage = mix(cfg.datasets, "verifiable", cfg.seed)
    env = make_env(cfg.env, **cfg.env_args) if cfg.env else None
    prompts, stats = prepare_prompts(tokenizer, records, cfg.max_prompt_length, env)
    stats["chat_template"] = template_label
    eval_fn = None
    if cfg.eval_datasets:
        held, _ = prepare_prompts(tokenizer, mix(cfg.eval_datasets, "verifiable", cfg.seed)[0], cfg.max_prompt_length, env)
        eval_fn = accuracy_fn(held, tokenizer, cfg, env)

    model = load_model(cfg.model, cfg.dtype)
    reference = None
    if cfg.beta > 0:
        reference = TokenLogProbs(load_model(cfg.model, cfg.dtype).eval().requires_grad_(False), cfg.temperature)
    value = None
    if cfg.algorithm == "ppo":
        value = load_value_model(cfg.value_model or cfg.model, tokenizer, cfg.dtype, cfg.seed,
                                 zero_head=not cfg.value_model)

    def wrap(m):
        policy = TokenLogProbs(m, cfg.temperature)
        return PolicyAndValue(policy, value) if value is not None else policy

    source = Rollouts(cfg, prompts, make_scorer(cfg, list(stats["verifiers"])), reference, env)
    return train(cfg, model, tokenizer, Job("rlvr", source, rl_objective(cfg), lineage, stats, eval_fn=eval_fn, wrap=wrap,
                                            extra_models={"value": value.model} if value is not None else None,
                                            texts=contamination.user_texts(records)))
