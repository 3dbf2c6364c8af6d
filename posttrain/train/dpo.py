"""Preference tuning: DPO, length-normalised DPO, SimPO and IPO, with cached reference log-probs.

Notation, per pair: ``pc``, ``pr`` = policy log-probs of the chosen and rejected responses summed
over their tokens, ``rc``, ``rr`` = the same under the reference (the starting policy), ``nc``,
``nr`` = response token counts, ``Δ = (pc − pr) − (rc − rr)``, ``β = beta``,
``ε = label_smoothing``, ``σ`` the logistic function.

- ``dpo``:       ``L = −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)``
- ``dpo_norm``:  the same with every log-prob averaged per token: ``Δ = (pc/nc − pr/nr) − (rc/nc − rr/nr)``
                 (Tulu 3's final choice: β = 5, lr 5e-7, one epoch)
- ``simpo``:     ``L = −log σ(β·(pc/nc − pr/nr) − γ)``, ``γ = gamma_beta_ratio · β``; no reference
- ``ipo``:       ``L = (Δ_avg − 1/(2β))²`` with ``Δ_avg`` the per-token-averaged ``Δ``
- ``rpo_alpha`` (any loss): ``L + α·(−pc/nc)``, the chosen response's per-token negative log-likelihood
                 (RPO, Pang et al. 2024), which keeps the chosen responses likely while the margin grows

The loss of a step is the mean of ``L`` over the pairs of the global batch. Implicit rewards are
``β·(p − r)`` in the loss's own normalisation (``β·p/n`` for SimPO); logged as ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (chosen reward > rejected), with
``logps/chosen`` and ``logps/rejected`` (policy sums).

Each pair is one row segment pair ``[chosen | rejected]`` (position ids restart), so chosen and
rejected go through the model in one forward; ``packing: true`` puts several pairs in a row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.config import DPOConfig
from posttrain.data import chat, packing
from posttrain.data.mixing import mix
from posttrain.data.records import preference_problem
from posttrain.errors import UserError
from posttrain.logprobs import TokenLogProbs, collate, per_sample
from posttrain.models import load_model, load_tokenizer
from posttrain.train import contamination, reference
from posttrain.train.loop import Job, Objective, Result, RowSource, finished, train
from posttrain.util import log


def preference_loss(loss_type: str, pc, pr, rc, rr, nc, nr, beta: float, label_smoothing: float = 0.0,
                    gamma_beta_ratio: float = 0.5, rpo_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit chosen/rejected rewards (see the module docstring)."""
    if loss_type == "dpo":
        delta = (pc - pr) - (rc - rr)
        rewards = beta * (pc - rc), beta * (pr - rr)
    elif loss_type in ("dpo_norm", "ipo"):
        delta = (pc / nc - pr / nr) - (rc / nc - rr / nr)
        rewards = beta * (pc - rc) / nc, beta * (pr - rr) / nr
    elif loss_type == "simpo":
        delta = pc / nc - pr / nr
        rewards = beta * pc / nc, beta * pr / nr
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "simpo":
        losses = -F.logsigmoid(beta * delta - gamma_beta_ratio * beta)
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    if rpo_alpha:
        losses = losses - rpo_alpha * pc / nc
    return losses, rewards[0], rewards[1]


def dpo_objective(cfg: DPOConfig, ref: torch.Tensor | None) -> Objective:
    """``ref``: ``[pairs, 2]`` reference log-prob sums (chosen, rejected); None for SimPO."""

    def loss(policy, batch, num_pairs):
        logp = policy(batch["input_ids"], batch["position_ids"], batch["labels"])
        sums = per_sample(logp, batch["sample_ids"], batch["num_samples"])
        counts = per_sample((batch["labels"][:, 1:] != -100).to(sums), batch["sample_ids"], batch["num_samples"])
        pc, pr, nc, nr = sums[0::2], sums[1::2], counts[0::2], counts[1::2]
        r = torch.zeros(len(pc), 2).to(sums) if ref is None else ref[batch["pair_index"].cpu()].to(sums)
        losses, chosen, rejected = preference_loss(cfg.loss_type, pc, pr, r[:, 0], r[:, 1], nc, nr,
                                                   cfg.beta, cfg.label_smoothing, cfg.gamma_beta_ratio, cfg.rpo_alpha)
        d = lambda x: float(x.detach().sum()) / num_pairs  # noqa: E731
        return losses.sum() / num_pairs, {
            "rewards/chosen": d(chosen), "rewards/rejected": d(rejected), "rewards/margins": d(chosen - rejected),
            "rewards/accuracies": d((chosen > rejected).float()), "logps/chosen": d(pc), "logps/rejected": d(pr)}

    return Objective(loss=loss, items_key="num_pairs")


def tokenize_pairs(tokenizer, pairs: list[dict], max_length: int) -> tuple[list[dict], dict]:
    """Each usable pair -> one sample holding two sequences (prompt+chosen, prompt+rejected), only
    the response turns trained. Pairs with a problem (identical sides, differing prompts, an empty
    response) or with a response cut away entirely by ``max_length`` are dropped and counted."""
    samples, stats = [], {"pairs": len(pairs), "dropped": {}}
    for pair in pairs:
        why = preference_problem(pair)
        if why is None:
            n = len(pair["prompt"])
            c = chat.tokenize_conversation(tokenizer, pair["prompt"] + pair["chosen"], max_length, train_from=n)
            r = chat.tokenize_conversation(tokenizer, pair["prompt"] + pair["rejected"], max_length, train_from=n)
            if not any(c.labels_mask[1:]) or not any(r.labels_mask[1:]):
                why = "response truncated away"
        if why is not None:
            stats["dropped"][why] = stats["dropped"].get(why, 0) + 1
            continue
        samples.append({"input_ids": c.input_ids + r.input_ids, "labels_mask": c.labels_mask + r.labels_mask,
                        "position_ids": list(range(len(c.input_ids))) + list(range(len(r.input_ids))),
                        "num_samples": 2, "pair_index": len(samples)})
    stats["kept"] = len(samples)
    return samples, stats


@torch.no_grad()
def preference_accuracy(model, rows: list[dict], pad_id: int, normalize: bool, batch_size: int = 16) -> dict:
    """Share of pairs where the policy gives the chosen response the higher log-probability
    (per token when ``normalize``), and the mean log-prob margin."""
    policy = TokenLogProbs(model)
    right, margin, n = 0, 0.0, 0
    for i in range(0, len(rows), batch_size):
        b = collate(rows[i:i + batch_size], pad_id)
        logp = policy(b["input_ids"].to(model.device), b["position_ids"].to(model.device), b["labels"].to(model.device))
        sums = per_sample(logp, b["sample_ids"].to(model.device), b["num_samples"])
        if normalize:
            sums = sums / per_sample((b["labels"][:, 1:] != -100).to(sums), b["sample_ids"], b["num_samples"])
        right += int((sums[0::2] > sums[1::2]).sum())
        margin += float((sums[0::2] - sums[1::2]).sum())
        n += b["num_pairs"]
    return {"preference_accuracy": right / max(n, 1), "logp_margin": margin / max(n, 1), "pairs": n}


def prepare_pairs(cfg, stage: str):
    """Tokenizer (with the config's chat template), pair rows, number of pairs, data stats and
    lineage: the common start of every stage that trains on preference pairs."""
    tokenizer = load_tokenizer(cfg.model)
    template_label = chat.use_template(tokenizer, cfg.chat_template)
    pairs, lineage = mix(cfg.datasets, "preference", cfg.seed)
    samples, stats = tokenize_pairs(tokenizer, pairs, cfg.max_seq_length)
    if not samples:
        raise UserError(f"{stage}: no usable preference pairs (dropped: {stats['dropped']})")
    rows = packing.pack(samples, 2 * cfg.max_seq_length) if cfg.packing else packing.unpacked(samples)
    stats.update(rows=len(rows), chat_template=template_label)
    log(f"{stage}: {stats['pairs']} pairs, {stats['kept']} kept, dropped {stats['dropped'] or 'none'}; "
        f"{len(rows)} rows")
    return tokenizer, rows, len(samples), stats, lineage, pairs


def eval_rows(cfg, tokenizer) -> list[dict]:
    pairs, _ = mix(cfg.eval_datasets, "preference", cfg.seed)
    return packing.unpacked(tokenize_pairs(tokenizer, pairs, cfg.max_seq_length)[0])


def run_dpo(cfg: DPOConfig, eval_fn=None) -> Result:
    if (done := finished(cfg, "dpo")) is not None:
        return done
    tokenizer, rows, num_pairs, stats, lineage, pairs = prepare_pairs(cfg, "dpo")
    if cfg.eval_datasets and eval_fn is None:
        held = eval_rows(cfg, tokenizer)
        eval_fn = lambda model: preference_accuracy(  # noqa: E731
            model, held, tokenizer.pad_token_id, cfg.loss_type != "dpo", cfg.per_device_eval_batch_size)
    model = load_model(cfg.model, cfg.dtype)
    ref = None
    if cfg.loss_type != "simpo":
        settings = {"loss_type": cfg.loss_type, "max_seq_length": cfg.max_seq_length, "dtype": cfg.dtype}
        ref, path, hit = reference.load_or_compute(cfg.model, model, rows, num_pairs, tokenizer.pad_token_id,
                                                   cfg.per_device_eval_batch_size, settings)
        stats["reference_cache"] = {"path": str(path), "hit": hit}
        log(f"dpo: reference log-probs {'loaded from' if hit else 'computed and cached in'} {path}")
    return train(cfg, model, tokenizer, Job("dpo", RowSource(rows, lambda b: collate(b, tokenizer.pad_token_id)),
                                            dpo_objective(cfg, ref), lineage, stats, eval_fn=eval_fn,
                                            texts=contamination.user_texts(pairs)))
