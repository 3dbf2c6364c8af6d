"""Every stage a recipe can name, in one registry: ``STAGES[name] = Stage(...)``.

The command line (one ``posttrain NAME`` subcommand per training stage, its help and docs page from
here), recipes (``posttrain run``: which names exist, which train) and the tests read it. A training
stage has a config class and ``run(config) -> Result`` (the loop's); a recipe-only stage (``eval``,
``tts``, ``onpolicy_pairs``) takes its config as a mapping: ``run(config, output_dir, model) ->
results``. A stage's module is imported only when it runs, so ``posttrain --help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from posttrain.config import DPOConfig, MidtrainConfig, RewardConfig, RLVRConfig, SFTConfig


def _runner(path: str) -> Callable:
    module, name = path.split(":")

    def run(*args):
        return getattr(importlib.import_module(module), name)(*args)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = f"{path} (imported when called)"
    return run


@dataclass(frozen=True)
class Stage:
    name: str
    help: str  # one line, for posttrain --help
    docs: str  # docs/<docs>.md lists its keys
    run: Callable
    config: type | None = None  # a training stage's config class

    @property
    def trains(self) -> bool:
        return self.config is not None


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("midtrain", "next-token training on text: warmup + cosine, or a linear anneal to zero", "midtrain",
          _runner("posttrain.train.midtrain:run_midtrain"), MidtrainConfig),
    Stage("sft", "supervised fine-tuning (assistant-only loss, packing, LoRA)", "sft",
          _runner("posttrain.train.sft:run_sft"), SFTConfig),
    Stage("dpo", "preference tuning: dpo, dpo_norm, simpo, ipo (cached reference log-probs)", "dpo",
          _runner("posttrain.train.dpo:run_dpo"), DPOConfig),
    Stage("reward", "train a Bradley-Terry reward model (sequence classifier)", "dpo",
          _runner("posttrain.train.reward:run_reward"), RewardConfig),
    Stage("rlvr", "RL with verifiable rewards: GRPO or PPO on prompts with checkable answers", "rlvr",
          _runner("posttrain.train.rlvr:run_rlvr"), RLVRConfig),
    Stage("eval", "evaluate the model so far on tasks or suites (posttrain eval's keys)", "eval",
          _runner("posttrain.eval.runner:run_eval_stage")),
    Stage("tts", "budget-forcing and majority-vote sweeps of the model so far (posttrain tts's keys)", "eval",
          _runner("posttrain.eval.tts:run_tts_stage")),
    Stage("onpolicy_pairs", "preference pairs from the model's own sampled completions, best vs worst verified",
          "pipeline", _runner("posttrain.data.synth.onpolicy:run_onpolicy_pairs_stage")),
)}
TRAINING = tuple(name for name, s in STAGES.items() if s.trains)
