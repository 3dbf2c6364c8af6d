"""Per-token log-probabilities of a causal LM, the quantity every post-training loss is built from.

``TokenLogProbs(model)(input_ids, position_ids, labels)`` returns ``logp[b, t] = log p(labels[b, t+1]
| input_ids[b, :t+1])`` for every position whose next label is not ``-100`` and 0 elsewhere (shape
``[B, T-1]``). The output projection and softmax run only on those positions, which on a CPU saves
the largest matmul for every prompt and padding token. Models whose head does more than a linear
map (logit soft-capping or scaling) take the plain forward instead.

A large vocabulary (Gemma 3: 262,144 entries) makes the ``[tokens, vocab]`` logits the largest tensor
of a step (1 GB per 1,000 tokens in float32, three times over with the softmax and its gradient).
Past ``CHUNK_ELEMENTS`` logits the head and cross-entropy run over chunks of tokens, each under
activation checkpointing, so at most one chunk's logits exist at a time, forward or backward; the
values are those of the unchunked computation. When the head's weight is not trained
(``freeze_embeddings``), ``FrozenHeadLogProbs`` instead computes each chunk's gradient with respect to
the hidden states in the forward pass: two matmuls a chunk instead of three (forward, recomputation,
input gradient), and ``[tokens, hidden]`` kept for the backward pass.

Rows come from ``collate``: padding-free, ``position_ids`` restart at 0 for every packed sample and
for the padding at the end of a row, so no token attends across samples or into padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
CHUNK_ELEMENTS = 2**26  # logits per chunk (256 MB in float32)


def collate(rows: list[dict], pad_id: int) -> dict:
    """Rows (``input_ids``, ``labels_mask``, ``position_ids``, ``num_samples``) -> a padded batch with
    ``labels`` (``-100`` where untrained), ``sample_ids`` (which sequence of the batch each token
    belongs to, counting across rows in order; ``-1`` on padding), ``num_tokens`` (trained tokens),
    ``num_samples``, and ``pair_index`` / ``num_pairs`` for rows of preference pairs."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    sample_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    seen = 0
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        row_ids = torch.tensor(r["input_ids"], dtype=torch.long)
        row_pos = torch.tensor(r["position_ids"], dtype=torch.long)
        keep = torch.tensor(r["labels_mask"], dtype=torch.bool) & (row_pos > 0)
        ids[i, :n] = row_ids
        pos[i, :n] = row_pos
        pos[i, n:] = torch.arange(width - n)
        labels[i, :n] = torch.where(keep, row_ids, IGNORE)
        sample_ids[i, :n] = seen + torch.cumsum(row_pos == 0, 0) - 1
        seen += int((row_pos == 0).sum())
    pairs = [k for r in rows for k in r.get("pair_index", [])]
    return {"input_ids": ids, "position_ids": pos, "labels": labels, "sample_ids": sample_ids,
            "num_tokens": int((labels != IGNORE).sum()), "num_samples": sum(r["num_samples"] for r in rows),
            "num_input_tokens": sum(len(r["input_ids"]) for r in rows),
            "pair_index": torch.tensor(pairs, dtype=torch.long), "num_pairs": len(pairs)}


def per_sample(values: torch.Tensor, sample_ids: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Sum ``values`` (aligned with targets: ``[B, T-1]``, target ``t`` is token ``t+1``) per sequence."""
    ids = sample_ids[:, 1:]
    keep = ids >= 0
    out = torch.zeros(num_samples, dtype=values.dtype, device=values.device)
    return out.index_add(0, ids[keep], values[keep])


def has_plain_head(model) -> bool:
    cfg = getattr(model, "config", None)
    return (hasattr(model, "get_decoder") and model.get_output_embeddings() is not None
            and not getattr(cfg, "final_logit_softcapping", None) and not getattr(cfg, "logit_scale", None))


class TokenLogProbs(nn.Module):
    """``temperature``: log-probs of ``softmax(logits / temperature)``, the distribution RL samples from."""

    def __init__(self, model: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.fast = has_plain_head(model)
        self.temperature = temperature

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None, pred_index: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask`` (optional): a boolean ``[B, 1, T, T]`` mask used as is, or a ``[B, T]``
        padding mask the model completes (causal, sliding windows); ``pred_index``
        (optional, ``[B, T-1]``): the position whose output predicts token ``t+1`` (default ``t``),
        for rows whose sequences branch (posttrain.train.rl.rows)."""
        target = labels[:, 1:]
        sel = target != IGNORE
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        if self.fast:
            states = self.model.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                              **extra).last_hidden_state
        else:
            states = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra).logits
        if pred_index is None:
            picked = states[:, :-1][sel]
        else:
            picked = states[torch.arange(states.shape[0], device=states.device)[:, None].expand_as(pred_index)[sel],
                            pred_index[sel]]
        head = self.model.get_output_embeddings() if self.fast else None
        wanted = target[sel]
        vocab = head.weight.shape[0] if head is not None else picked.shape[-1]
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        if (head is not None and not head.weight.requires_grad and getattr(head, "bias", None) is None
                and picked.requires_grad and torch.is_grad_enabled()):
            logp = FrozenHeadLogProbs.apply(picked, head.weight, wanted, self.temperature, chunk)
        elif head is None or picked.shape[0] <= chunk:
            logp = self._logp(head, picked, wanted)
        else:
            from torch.utils.checkpoint import checkpoint

            logp = torch.cat([checkpoint(self._logp, head, picked[i:i + chunk], wanted[i:i + chunk], use_reentrant=False)
                              for i in range(0, picked.shape[0], chunk)])
        out = torch.zeros(target.shape, dtype=logp.dtype, device=input_ids.device)
        out[sel] = logp
        return out

    def _logp(self, head: nn.Module | None, states: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
        logits = head(states) if head is not None else states
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32 (float64 stays)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return -F.cross_entropy(logits, wanted, reduction="none")


class FrozenHeadLogProbs(torch.autograd.Function):
    """``logp_i = z_i[y_i] - logsumexp(z_i)`` with ``z_i = W h_i / T`` for a fixed head ``W``, and its
    gradient ``d logp_i / d h_i = W^T (onehot(y_i) - softmax(z_i)) / T``, both computed chunk by chunk
    in the forward pass; the backward pass scales the stored ``[n, hidden]`` gradients by the
    incoming ones. The logits are computed once and never kept."""

    @staticmethod
    def forward(ctx, states: torch.Tensor, weight: torch.Tensor, wanted: torch.Tensor, temperature: float,
                chunk: int) -> torch.Tensor:
        logps, grads = [], []
        for i in range(0, states.shape[0], chunk):
            logits = states[i:i + chunk] @ weight.T
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            if temperature != 1.0:
                logits = logits / temperature
            logp_all = logits.log_softmax(-1)
            rows = torch.arange(logits.shape[0], device=logits.device)
            picked = wanted[i:i + chunk]
            logps.append(logp_all[rows, picked])
            coef = logp_all.exp_().neg_()  # -softmax, in place of the log-softmax
            coef[rows, picked] += 1.0
            grad = coef.to(weight.dtype) @ weight
            grads.append((grad / temperature if temperature != 1.0 else grad).to(states.dtype))
        ctx.save_for_backward(torch.cat(grads))
        return torch.cat(logps)

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor):
        (grads,) = ctx.saved_tensors
        return grad_logp.to(grads.dtype)[:, None] * grads, None, None, None, None
