"""The RL reward of a completion: verifier scores combined with their weights and the optional terms.

``score = reward_scale · w_v · verifier_v(text, ground_truth)`` (the prompt's record names its verifier
``v``; ``verifier_weights`` gives ``w_v``, default 1) ``+ format_reward_weight · format(text)``
``+ reward_model_weight · RM(prompt, completion)`` ``− unfinished_penalty`` when the completion hit
the length limit without its end-of-turn token ``− overlong_penalty · min(max(L − (L_max − B), 0) / B, 1)``
for a completion of ``L`` tokens with ``overlong_buffer B > 0`` (DAPO's soft overlong punishment, Yu et
al. 2025: nothing up to ``L_max − B`` tokens, then linearly more, the full penalty at the limit
``L_max = max_completion_length``).

An episode of an environment (posttrain.envs.rollout.Episode) is scored the same way on its final
turn, with the environment's own reward in place of the verifier's when it gives one, plus its summed
per-turn ``shaping``; one that ran out of turns counts as unfinished.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from posttrain.rewards import get_verifier


class Scorer:
    """Sequence rewards for completions (``.text``, ``.token_ids``, ``.finish_reason``,
    ``.prompt_index``) of prompts (``verifier``, ``ground_truth``, ``messages``), and their parts as
    metric sums. ``reward_model`` scores conversations (a list of messages each) when given."""

    def __init__(self, verifiers: list[str], *, verifier_weights: dict | None = None, reward_scale: float = 1.0,
                 unfinished_penalty: float = 0.0, format_reward: str | None = None, format_reward_weight: float = 0.0,
                 reward_model: Callable[[list[list[dict]]], list[float]] | None = None, reward_model_weight: float = 1.0,
                 overlong_buffer: int = 0, overlong_penalty: float = 1.0, max_completion_length: int = 0,
                 workers: int = 4):
        self.verifiers = sorted(verifiers)
        self.weights, self.scale, self.unfinished_penalty = dict(verifier_weights or {}), reward_scale, unfinished_penalty
        self.format = get_verifier(format_reward) if format_reward else None
        self.format_weight = format_reward_weight
        self.reward_model, self.reward_model_weight = reward_model, reward_model_weight
        self.overlong_buffer, self.overlong_penalty, self.max_length = overlong_buffer, overlong_penalty, max_completion_length
        self.pool = ThreadPoolExecutor(max_workers=workers)  # the code verifier waits on sandboxes

    def __call__(self, prompts: list[dict], completions: list) -> tuple[torch.Tensor, dict[str, float]]:
        owners = [prompts[c.prompt_index] for c in completions]
        verified = list(self.pool.map(verify, owners, completions))
        scores = torch.tensor([self.scale * self.weights.get(p["verifier"], 1.0) * v for p, v in zip(owners, verified)],
                              dtype=torch.float32)
        unfinished = torch.tensor([c.finish_reason in ("length", "turns") for c in completions], dtype=torch.float32)
        scores -= self.unfinished_penalty * unfinished
        metrics = {"verified": sum(verified), "unfinished": float(unfinished.sum()),
                   "completion_tokens": float(sum(len(c.token_ids) for c in completions))}
        if completions and hasattr(completions[0], "model_mask"):  # episodes: the shaping and the counts
            shaping = torch.tensor([c.shaping for c in completions], dtype=torch.float32)
            scores += shaping
            metrics["shaping"] = float(shaping.sum())
            for key in ("turns", "tool_calls", "tool_errors", "malformed"):
                metrics[key] = float(sum(getattr(c, key) for c in completions))
            metrics["model_tokens"] = float(sum(sum(c.model_mask) for c in completions))
        for name in self.verifiers:  # every process reports every name, so the sums can be all-reduced
            mine = [v for p, v in zip(owners, verified) if p["verifier"] == name]
            metrics[f"verifier/{name}"], metrics[f"count/{name}"] = float(sum(mine)), float(len(mine))
        if self.format is not None:
            fmt = torch.tensor([self.format(c.text, None) for c in completions], dtype=torch.float32)
            scores += self.format_weight * fmt
            metrics["format"] = float(fmt.sum())
        if self.reward_model is not None:
            rm = torch.tensor(self.reward_model([p["messages"] + [{"role": "assistant", "content": c.text}]
                                                 for p, c in zip(owners, completions)]), dtype=torch.float32)
            scores += self.reward_model_weight * rm
            metrics["reward_model"] = float(rm.sum())
        if self.overlong_buffer > 0:
            lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
            over = overlong_fraction(lengths, self.max_length, self.overlong_buffer)
            scores -= self.overlong_penalty * over
            metrics["overlong"] = float((self.overlong_penalty * over).sum())
        metrics["reward"] = float(scores.sum())
        return scores, metrics


def verify(prompt: dict, completion) -> float:
    """The verifier's score of a completion, or an environment's own final reward."""
    own = getattr(completion, "env_reward", None)
    if own is not None:
        return float(own)
    return float(get_verifier(prompt["verifier"])(completion.text, prompt["ground_truth"]))


def overlong_fraction(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """``min(max(L − (max_length − buffer), 0) / buffer, 1)`` per completion length ``L``."""
    return ((lengths - (max_length - buffer)).clamp(min=0) / buffer).clamp(max=1)
