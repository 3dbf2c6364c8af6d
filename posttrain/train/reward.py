"""Reward models: a scalar head on the last token of a conversation, trained Bradley-Terry style.

For a pair with scores ``r_c`` (chosen) and ``r_r`` (rejected), ``L = −log σ(r_c − r_r)``, averaged
over the pairs of the global batch. The model is a standard ``AutoModelForSequenceClassification``
with one label (the head of a causal LM checkpoint is replaced by a new ``score`` layer), saved so
that transformers and other tools load it as is; ``config.pad_token_id`` is set, so their own
forward pass finds the same last token. ``RewardModel.score`` scores conversations or texts
(used by PPO and best-of-N). PPO's value model (``ValueModel``) is the same kind of model with its
head read at every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.config import RewardConfig
from posttrain.data import chat, packing
from posttrain.errors import UserError
from posttrain.logprobs import IGNORE, TokenLogProbs, collate
from posttrain.models import load_tokenizer, resolve
from posttrain.train import contamination
from posttrain.train.dpo import eval_rows, prepare_pairs
from posttrain.train.loop import Job, Objective, Result, RowSource, finished, train


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
    tokenizer, rows, _, stats, lineage, pairs = prepare_pairs(cfg, "reward")
    eval_fn = None
    if cfg.eval_datasets:
        held = eval_rows(cfg, tokenizer)
        eval_fn = lambda model: pair_accuracy(model, held, tokenizer.pad_token_id,  # noqa: E731
                                              cfg.per_device_eval_batch_size)
    torch.manual_seed(cfg.seed)  # the new score head's initialisation
    model = load_reward_model(cfg.model, tokenizer, cfg.dtype)
    return train(cfg, model, tokenizer, Job("reward", RowSource(rows, lambda b: collate(b, tokenizer.pad_token_id)),
                                            reward_objective(), lineage, stats, eval_fn=eval_fn, wrap=RewardScores,
                                            texts=contamination.user_texts(pairs)))


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
        values = self.model.score(picked).squeeze(-1)
        values = values.to(torch.promote_types(values.dtype, torch.float32))  # at least float32 (float64 stays)
        out = torch.zeros(target.shape, dtype=values.dtype, device=input_ids.device)
        out[sel] = values
        return out


class PolicyAndValue(nn.Module):
    """One module (one optimizer, one DDP wrapper) for PPO's policy and value model."""

    shard_parts = ("policy", "value")  # FSDP: one root each, so either can run alone (posttrain.train.parallel)

    def __init__(self, policy: TokenLogProbs, value: ValueModel):
        super().__init__()
        self.policy, self.value = policy, value

    @property
    def model(self) -> nn.Module:
        return self.policy.model

    def forward(self, *inputs):
        return self.policy(*inputs), self.value(*inputs)


def load_value_model(name: str, tokenizer, dtype: str, seed: int, zero_head: bool) -> ValueModel:
    """A value model from a reward model (or the policy's checkpoint with a new head, ``zero_head``:
    V = 0 at the start rather than noise)."""
    torch.manual_seed(seed)  # a new score head's initialisation
    model = load_reward_model(name, tokenizer, dtype)
    if zero_head:
        torch.nn.init.zeros_(model.score.weight)
    return ValueModel(model)
