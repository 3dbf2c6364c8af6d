"""The training stages by name: ``STAGES[name] = (config class, run function)``.

The one registry the command line (``posttrain sft ...``), recipes (``posttrain run``) and the tests
use. A run function takes its config and returns the loop's ``Result``; its module is imported only
when it runs, so ``posttrain --help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from posttrain.config import DPOConfig, MidtrainConfig, RewardConfig, RLVRConfig, SFTConfig


def _runner(path: str) -> Callable:
    module, name = path.split(":")

    def run(cfg):
        return getattr(importlib.import_module(module), name)(cfg)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = f"{path} (imported when called)"
    return run


STAGES: dict[str, tuple[type, Callable]] = {
    "midtrain": (MidtrainConfig, _runner("posttrain.train.midtrain:run_midtrain")),
    "sft": (SFTConfig, _runner("posttrain.train.sft:run_sft")),
    "dpo": (DPOConfig, _runner("posttrain.train.dpo:run_dpo")),
    "reward": (RewardConfig, _runner("posttrain.train.reward:run_reward")),
    "rlvr": (RLVRConfig, _runner("posttrain.train.rlvr:run_rlvr")),
}
