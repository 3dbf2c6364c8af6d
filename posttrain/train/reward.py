"""Reward models: a scalar head on the last token of a conversation, trained Bradley-Terry style.

For a pair with scores ``r_c`` (chosen) and ``r_r`` (rejected), ``L = −log σ(r_c − r_r)``, averaged
over the pairs of the global batch. The model is a standard ``AutoModelForSequenceClassification``
with one label (the head of a causal LM checkpoint is replaced by a new ``score`` layer), saved so
that transformers and other tools load it as is; ``config.pad_token_id`` is set, so their own
forward pass finds the same last token. ``RewardModel.score`` scores conversations or texts
(used by PPO and best-of-N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.config import RewardConfig
from posttrain.data import chat, packing
from posttrain.errors import UserError
from posttrain.models import load_tokenizer, resolve
from posttrain.train.dpo import eval_rows, prepare_pairs
from posttrain.train.logprobs import collate
from posttrain.train.loop import Objective, Result, finished, train


class RewardScores(nn.Module):
    """``forward(input_ids, position_ids, sample_ids, num_samples)`` -> one score per sequence of
    the (padding-free) batch: the score head applied to the sequence's last token."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, sample_ids, num_samples: int) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        flat = sample_ids.flatten()
        keep = flat >= 0
        index = torch.arange(flat.numel(), device=flat.device)
        last = torch.zeros(num_samples, dtype=torch.long, device=flat.device)
        last = last.scatter_reduce(0, flat[keep], index[keep], reduce="amax", include_self=False)
        return self.model.score(hidden.flatten(0, 1)[last]).squeeze(-1).float()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair ``−log σ(r_c − r_r)``."""
    return -F.logsigmoid(chosen - rejected)


def reward_objective() -> Objective:
    def loss(scorer, batch, num_pairs):
        scores = scorer(batch["input_ids"], batch["position_ids"], batch["sample_ids"], batch["num_samples"])
        chosen, rejected = scores[0::2], scores[1::2]
        d = lambda x: float(x.detach().sum()) / num_pairs  # noqa: E731
        return bradley_terry_loss(chosen, rejected).sum() / num_pairs, {
            "rewards/chosen": d(chosen), "rewards/rejected": d(rejected), "rewards/margins": d(chosen - rejected),
            "rewards/accuracies": d((chosen > rejected).float())}

    return Objective(loss=loss, items_key="num_pairs")


def load_reward_model(name: str, tokenizer, dtype: str = "float32"):
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(resolve(name), num_labels=1,
                                                                   dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise UserError(f"model {name!r}: could not load as a sequence classifier ({str(e).splitlines()[0]})") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


@torch.no_grad()
def pair_accuracy(model, rows: list[dict], pad_id: int, batch_size: int = 16) -> dict:
    """Share of pairs whose chosen response scores higher, and the mean margin."""
    scorer = RewardScores(model)
    right, margin, n = 0, 0.0, 0
    for i in range(0, len(rows), batch_size):
        b = collate(rows[i:i + batch_size], pad_id)
        s = scorer(b["input_ids"].to(model.device), b["position_ids"].to(model.device),
                   b["sample_ids"].to(model.device), b["num_samples"])
        right += int((s[0::2] > s[1::2]).sum())
        margin += float((s[0::2] - s[1::2]).sum())
        n += b["num_pairs"]
    return {"accuracy": right / max(n, 1), "margin": margin / max(n, 1), "pairs": n}


def run_reward(cfg: RewardConfig) -> Result:
    if (done := finished(cfg, "reward")) is not None:
        return done
    tokenizer, rows, _, stats, lineage = prepare_pairs(cfg, "reward")
    eval_fn = None
    if cfg.eval_datasets:
        held = eval_rows(cfg, tokenizer)
        eval_fn = lambda model: pair_accuracy(model, held, tokenizer.pad_token_id,  # noqa: E731
                                              cfg.per_device_eval_batch_size)
    torch.manual_seed(cfg.seed)  # the new score head's initialisation
    model = load_reward_model(cfg.model, tokenizer, cfg.dtype)
    return train(cfg, model, tokenizer, rows, lambda b: collate(b, tokenizer.pad_token_id), reward_objective(),
                 stage="reward", data=lineage, data_stats=stats, eval_fn=eval_fn, wrap=RewardScores)


class RewardModel:
    """Score conversations (lists of messages, rendered with the model's chat template) or plain
    texts with a trained reward model: ``RewardModel.from_pretrained(DIR).score(items)``."""

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size

    @classmethod
    def from_pretrained(cls, path: str, batch_size: int = 16) -> "RewardModel":
        tokenizer = load_tokenizer(path)
        return cls(load_reward_model(path, tokenizer), tokenizer, batch_size)

    @torch.no_grad()
    def score(self, items: list) -> list[float]:
        samples = []
        for item in items:
            text = item if isinstance(item, str) else chat.render(self.tokenizer, item)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            samples.append({"input_ids": ids, "labels_mask": [False] * len(ids)})
        rows = packing.unpacked(samples)
        scorer = RewardScores(self.model)
        out: list[float] = []
        for i in range(0, len(rows), self.batch_size):
            b = collate(rows[i:i + self.batch_size], self.tokenizer.pad_token_id)
            out += scorer(b["input_ids"].to(self.model.device), b["position_ids"].to(self.model.device),
                          b["sample_ids"].to(self.model.device), b["num_samples"]).tolist()
        return out
