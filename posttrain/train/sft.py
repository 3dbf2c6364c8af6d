"""Supervised fine-tuning with an assistant-only loss.

With ``logp_t`` the log-probability of trained token ``t`` (assistant spans only, see data/chat.py),
over one optimizer step's global batch ``B`` (all micro-batches on all processes):

- ``loss_reduction: mean``: ``L = -sum_{t in B} logp_t / T_B``, ``T_B`` = trained tokens in ``B``.
  Every trained token weighs the same, however samples are split into micro-batches or processes.
- ``loss_reduction: sum``: ``L = -sum_{t in B} logp_t / S_B``, ``S_B`` = samples (conversations) in
  ``B``: each sample's summed token loss, averaged over the samples of the global batch. This is
  Tulu 3's ``sum`` (open-instruct sums token losses per micro-batch of one sample and averages over
  accumulation steps and processes), made independent of the micro-batch split.

Packing (``packing: true``) shuffles the samples with ``seed`` and packs them best-fit decreasing
into rows of ``max_seq_length`` tokens without padding or cross-sample attention (data/packing.py).
"""

from __future__ import annotations

import random

import torch

from posttrain.config import SFTConfig
from posttrain.data import chat, packing
from posttrain.data.mixing import mix
from posttrain.logprobs import TokenLogProbs, collate
from posttrain.models import add_tokens, copy_embedding_rows, load_model, load_tokenizer, resize_embeddings
from posttrain.rag import selfrag
from posttrain.train import contamination
from posttrain.train.loop import Job, Objective, Result, RowSource, finished, train
from posttrain.util import log


def sft_objective(reduction: str) -> Objective:
    def loss(policy, batch, num_items):
        logp = policy(batch["input_ids"], batch["position_ids"], batch["labels"])
        return -logp.sum() / num_items, {"trained_tokens": batch["num_tokens"]}

    return Objective(loss=loss, items_key="num_tokens" if reduction == "mean" else "num_samples")


def tokenize_records(tokenizer, records: list[dict], max_length: int) -> tuple[list[dict], dict]:
    """Tokenize conversations with assistant masks; drop (and count) samples left with no trained
    token after truncation to ``max_length``."""
    samples, dropped, truncated = [], 0, 0
    for rec in records:
        t = chat.tokenize_conversation(tokenizer, rec["messages"], max_length, tools=rec.get("tools"))
        if not any(t.labels_mask[1:]):
            dropped += 1
            continue
        truncated += t.truncated
        samples.append({"input_ids": t.input_ids, "labels_mask": t.labels_mask})
    return samples, {"records": len(records), "samples": len(samples), "dropped_no_trained_tokens": dropped,
                     "truncated": truncated}


def build_rows(samples: list[dict], max_length: int, use_packing: bool, seed: int) -> list[dict]:
    if not use_packing:
        return packing.unpacked(samples)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return packing.pack([samples[i] for i in order], max_length)


def eval_loss_fn(rows: list[dict], pad_id: int, batch_size: int):
    """Mean NLL per trained token over ``rows``, for the loop's evaluation hook."""

    def evaluate(model) -> dict:
        policy = TokenLogProbs(model)
        nll, n = 0.0, 0
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i:i + batch_size], pad_id)
            logp = policy(batch["input_ids"].to(model.device), batch["position_ids"].to(model.device),
                          batch["labels"].to(model.device))
            nll -= float(logp.sum())
            n += batch["num_tokens"]
        return {"loss": nll / max(n, 1), "tokens": n}

    return evaluate


def run_sft(cfg: SFTConfig, eval_fn=None) -> Result:
    if (done := finished(cfg, "sft")) is not None:
        return done
    tokenizer = load_tokenizer(cfg.model)
    template_label = chat.use_template(tokenizer, cfg.chat_template)
    added = add_tokens(tokenizer, [t for name in cfg.add_tokens for t in (selfrag.TOKENS if name == "selfrag" else [name])])
    records, lineage = mix(cfg.datasets, "sft", cfg.seed)
    samples, stats = tokenize_records(tokenizer, records, cfg.max_seq_length)
    rows = build_rows(samples, cfg.max_seq_length, cfg.packing, cfg.seed)
    total_tokens = sum(len(r["input_ids"]) for r in rows)
    stats.update(rows=len(rows), tokens=total_tokens, trained_tokens=sum(sum(s["labels_mask"]) for s in samples),
                 chat_template=template_label)
    if cfg.packing:
        stats["packing_efficiency"] = round(total_tokens / (len(rows) * cfg.max_seq_length), 4)
    log(f"sft: {stats['records']} records -> {stats['samples']} samples "
        f"({stats['dropped_no_trained_tokens']} dropped with no trained tokens after truncation, "
        f"{stats['truncated']} truncated) -> {len(rows)} rows; template {template_label}")
    if cfg.eval_datasets and eval_fn is None:
        eval_records, _ = mix(cfg.eval_datasets, "sft", cfg.seed)
        eval_samples, _ = tokenize_records(tokenizer, eval_records, cfg.max_seq_length)
        eval_fn = eval_loss_fn(packing.unpacked(eval_samples), tokenizer.pad_token_id, cfg.per_device_eval_batch_size)
    model = load_model(cfg.model, cfg.dtype)
    if added:
        resize_embeddings(model, len(tokenizer))
        log(f"sft: {len(added)} tokens added to the vocabulary ({', '.join(added[:4])}{', ...' if len(added) > 4 else ''})")
    if cfg.init_embeddings_from:
        copy_embedding_rows(model, tokenizer, cfg.init_embeddings_from)
        log("sft: embedding rows copied: " + ", ".join(f"{t} <- {f}" for t, f in cfg.init_embeddings_from.items()))
    torch.manual_seed(cfg.seed)
    return train(cfg, model, tokenizer, Job("sft", RowSource(rows, lambda batch: collate(batch, tokenizer.pad_token_id)),
                                            sft_objective(cfg.loss_reduction), lineage, stats, eval_fn=eval_fn,
                                            texts=contamination.user_texts(records)))
