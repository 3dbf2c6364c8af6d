"""Training rows for RL: a prompt and its sampled completions, with the prompt computed once.

A group is one prompt ``P`` (``p`` tokens) and its completions ``C_1..C_k``. As one row it is laid out
``P C_1 C_2 ... C_k`` with

- positions ``0..p-1`` for the prompt and ``p, p+1, ...`` again for every completion;
- an attention mask in which a prompt token sees the prompt causally and a token of ``C_i`` sees the
  whole prompt and the tokens of ``C_i`` up to itself (never another completion);
- a *predictor* for every token: the position whose hidden state predicts it, the previous position
  except for the first token of each completion, which is predicted from the last prompt token.

The log-probabilities are then exactly those of ``k`` separate rows ``P C_i`` (tested), but the
prompt goes through the model once instead of ``k`` times: with GSM8K-length prompts and short
completions most of a GRPO update's tokens are prompt tokens. The attention of a shared row grows with
``(p + Σ|C_i|)^2`` against ``k (p + |C|)^2`` for separate rows, so ``share_prompt`` decides per group:
share when the prompt is at least as long as the mean completion (``auto``), always, or never.

Per-token fields (``old_logp``, ``ref_logp``, ``advantages``, ``keep`` ...) are lists aligned with each
completion's tokens; ``collate_rows`` scatters them into the ``[B, T-1]`` target layout of ``TokenLogProbs``
(entry ``t`` belongs to token ``t+1``).
"""

from __future__ import annotations

import torch

from posttrain.logprobs import IGNORE


def group_rows(prompt: list[int], completions: list[dict], share: str = "auto") -> list[dict]:
    """``completions``: dicts with ``token_ids`` and per-token lists. Returns one shared row or one row
    per completion."""
    lengths = [len(c["token_ids"]) for c in completions]
    shared = share == "always" or (share == "auto" and len(completions) > 1 and len(prompt) >= sum(lengths) / len(lengths))
    parts = [completions] if shared else [[c] for c in completions]
    return [_row(prompt, part) for part in parts]


def _row(prompt: list[int], completions: list[dict]) -> dict:
    p = len(prompt)
    ids, pos, branch, pred = list(prompt), list(range(p)), [-1] * p, [max(j - 1, 0) for j in range(p)]
    fields: dict[str, list] = {}
    for i, c in enumerate(completions):
        n = len(c["token_ids"])
        pred += [p - 1] + [len(ids) + j - 1 for j in range(1, n)]
        ids += c["token_ids"]
        pos += list(range(p, p + n))
        branch += [i] * n
        for key, values in c.items():
            if key != "token_ids":
                fields.setdefault(key, []).extend(values if isinstance(values, list) else [values] * n)
    return {"input_ids": ids, "position_ids": pos, "branch": branch, "pred": pred,
            "num_sequences": len(completions), **fields}


def collate_rows(rows: list[dict], pad_id: int) -> dict:
    """A padded batch: ``input_ids``, ``position_ids``, ``labels`` (completion tokens), a boolean
    ``attention_mask [B, 1, T, T]``, ``pred_index [B, T-1]`` (the predictor of token ``t+1``),
    ``seq_index [B, T-1]`` (which completion of the batch target ``t`` belongs to, ``-1`` if none),
    the per-token fields in the target layout, and the counts ``num_tokens``, ``num_sequences``,
    ``num_input_tokens``."""
    B, W = len(rows), max(len(r["input_ids"]) for r in rows)
    ids = torch.full((B, W), pad_id, dtype=torch.long)
    pos = torch.zeros((B, W), dtype=torch.long)
    branch = torch.full((B, W), -2, dtype=torch.long)  # -2: padding, -1: prompt, i: completion i
    pred = torch.arange(W).repeat(B, 1)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        pos[b, :n] = torch.tensor(r["position_ids"])
        branch[b, :n] = torch.tensor(r["branch"])
        pred[b, :n] = torch.tensor(r["pred"])
    q, k = branch[:, :, None], branch[:, None, :]
    causal = torch.ones((W, W), dtype=torch.bool).tril()[None]
    mask = causal & (k >= -1) & ((k == -1) | (k == q)) & (q >= -1)
    mask |= torch.eye(W, dtype=torch.bool)[None]  # padding sees itself: no empty softmax rows
    trained = branch >= 0
    labels = torch.where(trained, ids, IGNORE)
    offsets = torch.tensor([0] + [r["num_sequences"] for r in rows]).cumsum(0)[:-1]
    seq = torch.where(trained, branch + offsets[:, None], -1)
    batch = {"input_ids": ids, "position_ids": pos, "labels": labels, "attention_mask": mask[:, None],
             "pred_index": pred[:, 1:], "seq_index": seq[:, 1:], "num_tokens": int(trained.sum()),
             "num_sequences": sum(r["num_sequences"] for r in rows),
             "num_input_tokens": sum(len(r["input_ids"]) for r in rows)}
    sel = trained[:, 1:]
    for key in ("old_logp", "ref_logp", "old_values", "advantages", "returns", "keep"):
        if key in rows[0]:
            t = torch.zeros(sel.shape, dtype=torch.float32)
            t[sel] = torch.tensor([v for r in rows for v in r[key]], dtype=torch.float32)
            batch[key] = t
    if "keep" in batch:  # completions left out of the loss: not counted either
        kept = batch["keep"] > 0
        batch["num_tokens"] = int(kept.sum())
        batch["num_sequences"] = int(batch["seq_index"][kept].unique().numel())
    return batch


def model_inputs(batch: dict, device) -> tuple:
    """The arguments of ``TokenLogProbs`` / ``ValueModel`` for a collated batch."""
    return tuple(batch[k].to(device) for k in ("input_ids", "position_ids", "labels", "attention_mask", "pred_index"))


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
        out.append(collate_rows(rows, pad))
    return out


def split_tokens(values: torch.Tensor, batch: dict, records: list[dict]):
    """Hand ``[B, T-1]`` per-target values of a micro-batch back to its completion records (in order)."""
    flat = values[(batch["labels"][:, 1:] != IGNORE).to(values.device)].tolist()
    start = 0
    for r in records:
        end = start + len(r["token_ids"])
        yield r, flat[start:end]
        start = end
